"""Keep the numbers the README quotes equal to the result files they come from.

Every measured figure in the README sits between two HTML comments (invisible on GitHub and in most
Markdown renderers) that say where it comes from::

    CPT saved <!-- fig cpt:data.summary.digits.goal.savings | .1% -->37.5%<!-- /fig --> of the BitOPs.

The marker holds ``SOURCE:PATH | FORMAT``:

* ``SOURCE`` — a result file ``benchmarks/results/<SOURCE>.json`` (written by a benchmark script);
* ``PATH`` — where the value is in that JSON: keys joined by dots (``data.check.rss_growth_mib``); a key
  with spaces, dots or other characters in double-quoted brackets (``rows["CPT 3-8/8"]``); a list item
  by index (``samples[-1]``) or by the value of one of its fields (``storage.digits[label="fx8 kahan"]``);
* ``FORMAT`` — optional, a Python format spec applied to the value (``.3f``, ``.1%``, ``,d``); without
  it the value is printed with ``str``.

``python -m benchmarks.readme_figures --check`` (the default) re-renders every marker from the result
files and lists each figure that differs, with its line; ``--write`` puts the current values in;
``--list`` shows every marker and its value. ``tests/test_readme_figures.py`` runs the check, so a README
number cannot drift from its result file: rerun the benchmark, then ``--write``.

Example:
    >>> text = 'acc <!-- fig r:data.acc | .2f -->0.9<!-- /fig -->, `<!-- fig x:y -->1<!-- /fig -->` is code'
    >>> [m.spec for m in find_markers(text)]
    ['r:data.acc | .2f']
    >>> render(42.123, ".1f"), lookup({"a": [{"k": "x", "v": 1}]}, 'a[k="x"].v')
    ('42.1', 1)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_FILES = (ROOT / "README.md",)

__all__ = ["Marker", "Problem", "find_markers", "lookup", "render", "resolve", "check", "write", "main"]

_MARKER = re.compile(r"<!--\s*fig\s+(?P<spec>.*?)\s*-->(?P<value>.*?)<!--\s*/fig\s*-->")
_TOKEN = re.compile(
    r"""\.?(?P<key>[A-Za-z_][\w-]*)            # .key
      | \["(?P<quoted>(?:[^"\\]|\\.)*)"\]       # ["key with spaces"]
      | \[(?P<index>-?\d+)\]                    # [3], [-1]
      | \[(?P<field>[A-Za-z_]\w*)=(?:"(?P<fq>(?:[^"\\]|\\.)*)"|(?P<fv>[^\]]+))\]   # [label="x"]
    """, re.VERBOSE)


@dataclass(frozen=True)
class Marker:
    """One marked figure: its spec, the text between the comments, and where it is."""

    spec: str
    value: str
    line: int
    start: int  # offsets of the value text in the file
    end: int


@dataclass(frozen=True)
class Problem:
    """A figure that differs from its result file, or a marker that cannot be resolved."""

    path: Path
    line: int
    spec: str
    found: str
    expected: str | None
    error: str | None = None

    def __str__(self) -> str:
        where = f"{self.path.name}:{self.line}"
        if self.error is not None:
            return f"{where}: {self.spec}: {self.error}"
        return f"{where}: {self.spec}: the text says {self.found!r}, the result file gives {self.expected!r}"


_CODE = re.compile(r"^(```|~~~).*?^\1[^\n]*$|`[^`\n]+`", re.MULTILINE | re.DOTALL)


def find_markers(text: str) -> list[Marker]:
    """Every ``<!-- fig ... -->value<!-- /fig -->`` in ``text`` (markers do not span lines). Code blocks
    and inline code are skipped: there a marker is shown, not used (e.g. to explain the syntax)."""
    # Blank out code with spaces of the same length, so that offsets stay those of ``text``.
    masked = _CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    out = []
    for m in _MARKER.finditer(masked):
        line = text.count("\n", 0, m.start()) + 1
        start, end = m.start("value"), m.end("value")
        out.append(Marker(text[m.start("spec"):m.end("spec")], text[start:end], line, start, end))
    return out


def _keys(data: Any) -> str:
    if isinstance(data, dict):
        keys = list(data)
        return "keys: " + ", ".join(map(repr, keys[:12])) + (", ..." if len(keys) > 12 else "")
    if isinstance(data, list):
        return f"a list of {len(data)}"
    return f"a {type(data).__name__}"


def lookup(data: Any, path: str) -> Any:
    """The value at ``path`` (see the module docstring) in ``data``; ``KeyError`` says what is there."""
    pos, here = 0, "the file"
    path = path.strip()
    while pos < len(path):
        m = _TOKEN.match(path, pos)
        if m is None or m.end() == pos:
            raise KeyError(f"cannot read the path at {path[pos:]!r}")
        pos = m.end()
        if m.group("key") is not None or m.group("quoted") is not None:
            key = m.group("key") if m.group("key") is not None else re.sub(r"\\(.)", r"\1", m.group("quoted"))
            if not isinstance(data, dict) or key not in data:
                raise KeyError(f"no key {key!r} in {here} ({_keys(data)})")
            data, here = data[key], repr(key)
        elif m.group("index") is not None:
            i = int(m.group("index"))
            if not isinstance(data, list) or not -len(data) <= i < len(data):
                raise KeyError(f"no item [{i}] in {here} ({_keys(data)})")
            data, here = data[i], f"{here}[{i}]"
        else:
            field = m.group("field")
            want = m.group("fq") if m.group("fq") is not None else m.group("fv").strip()
            if not isinstance(data, list):
                raise KeyError(f"[{field}=...] needs a list, {here} is {_keys(data)}")
            hits = [x for x in data if isinstance(x, dict) and str(x.get(field)) == want]
            if len(hits) != 1:
                have = sorted({str(x.get(field)) for x in data if isinstance(x, dict)})
                raise KeyError(f"{len(hits)} items of {here} have {field} = {want!r} (need exactly one; "
                               f"values: {have[:12]})")
            data, here = hits[0], f"{here}[{field}={want!r}]"
    return data


def render(value: Any, fmt: str | None) -> str:
    """``value`` formatted with the Python format spec ``fmt`` (``str(value)`` without one)."""
    if fmt is None or fmt == "":
        return str(value)
    return format(value, fmt)


def resolve(spec: str, results_dir: Path = RESULTS_DIR, cache: dict[str, Any] | None = None) -> str:
    """The text a marker's spec renders to, from the current result files."""
    source_path, sep, fmt = spec.rpartition(" | ")
    if not sep:
        source_path, fmt = spec, None
    source, colon, path = source_path.strip().partition(":")
    if not colon or not source or not path:
        raise ValueError("a marker needs 'SOURCE:PATH' (e.g. cpt:data.summary.digits.goal.savings)")
    if "/" in source or source.startswith("."):
        raise ValueError(f"SOURCE must be a file stem in {results_dir.name}/, got {source!r}")
    cache = {} if cache is None else cache
    if source not in cache:
        file = results_dir / f"{source}.json"
        if not file.is_file():
            have = sorted(p.stem for p in results_dir.glob("*.json"))
            raise FileNotFoundError(f"no result file {file.name} in {results_dir} (there are: {have})")
        cache[source] = json.loads(file.read_text())
    return render(lookup(cache[source], path), fmt.strip() if fmt else None)


def _scan(path: Path, results_dir: Path) -> tuple[str, list[tuple[Marker, str | None, str | None]]]:
    text = path.read_text()
    cache: dict[str, Any] = {}
    out = []
    for m in find_markers(text):
        try:
            out.append((m, resolve(m.spec, results_dir, cache), None))
        except (KeyError, ValueError, TypeError, FileNotFoundError, json.JSONDecodeError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            out.append((m, None, f"{type(exc).__name__}: {msg}"))
    return text, out


def check(paths: Iterable[Path] = DEFAULT_FILES, results_dir: Path = RESULTS_DIR) -> list[Problem]:
    """Every figure in ``paths`` that differs from its result file, and every marker that cannot be read."""
    problems = []
    for path in paths:
        _, scanned = _scan(Path(path), results_dir)
        for m, expected, error in scanned:
            if error is not None or expected != m.value:
                problems.append(Problem(Path(path), m.line, m.spec, m.value, expected, error))
    return problems


def write(paths: Iterable[Path] = DEFAULT_FILES, results_dir: Path = RESULTS_DIR) -> list[Problem]:
    """Put the current values into every marker of ``paths``; returns what it changed (or could not)."""
    changed = []
    for path in paths:
        path = Path(path)
        text, scanned = _scan(path, results_dir)
        bad = [Problem(path, m.line, m.spec, m.value, None, err) for m, _, err in scanned if err is not None]
        if bad:
            raise ValueError("cannot resolve:\n" + "\n".join(map(str, bad)))
        for m, expected, _ in reversed(scanned):  # from the end, so earlier offsets stay valid
            if expected != m.value:
                text = text[:m.start] + expected + text[m.end:]
                changed.append(Problem(path, m.line, m.spec, m.value, expected))
        path.write_text(text)
    return changed[::-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.readme_figures",
                                 description="Check (default) or write the README's figures from "
                                             "benchmarks/results/*.json.")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="list figures that differ; exit 1 if any")
    mode.add_argument("--write", action="store_true", help="put the current values into the markers")
    mode.add_argument("--list", action="store_true", help="print every marker and its current value")
    ap.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md)")
    args = ap.parse_args(argv)
    files = args.files or list(DEFAULT_FILES)
    if args.write:
        try:
            changed = write(files)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 1
        for p in changed:
            print(f"{p.path.name}:{p.line}: {p.found!r} -> {p.expected!r}  ({p.spec})")
        print(f"{len(changed)} figure(s) updated")
        return 0
    if args.list:
        for f in files:
            for m, expected, error in _scan(Path(f), RESULTS_DIR)[1]:
                print(f"{Path(f).name}:{m.line}: {error or expected}  <- {m.spec}")
        return 0
    problems = check(files)
    for p in problems:
        print(p)
    n = sum(len(find_markers(Path(f).read_text())) for f in files)
    print(f"{n} figure(s) checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
