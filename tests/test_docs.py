"""The documentation stays connected: every cited section of docs/methods.md exists, nothing cites the
old METHODS.md, and every local link in the README points to a file of the checkout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = REPO / "docs" / "methods.md"


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode == 0:
        names = out.stdout.split()
    else:  # not a git checkout (e.g. an unpacked sdist): walk the tree
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [REPO / n for n in names if n.endswith((".py", ".md", ".toml", ".cfg")) and (REPO / n).is_file()]


def test_every_cited_methods_section_exists() -> None:
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', METHODS.read_text()))
    assert {"cpt-schedule", "sbm-quantizer", "precision-range-test", "bitops", "dynamic-fixed-point",
            "muppet-rule", "kahan-update", "classifier-floor", "formats"} <= anchors
    cited: dict[str, set[str]] = {}
    for path in _tracked_text_files():
        for anchor in re.findall(r"docs/methods\.md#([a-z0-9-]+)", path.read_text(errors="replace")):
            cited.setdefault(anchor, set()).add(str(path.relative_to(REPO)))
    # The table of contents links by "#anchor" inside the page itself.
    for anchor in re.findall(r"\]\(#([a-z0-9-]+)\)", METHODS.read_text()):
        cited.setdefault(anchor, set()).add("docs/methods.md")
    missing = {a: sorted(f) for a, f in cited.items() if a not in anchors}
    assert not missing, f"cited sections missing from docs/methods.md: {missing}"
    assert len(cited) >= 8  # the package really cites it


def test_nothing_cites_the_old_methods_file() -> None:
    stale = [str(p.relative_to(REPO)) for p in _tracked_text_files()
             if re.search(r"METHODS\.md\s*§", p.read_text(errors="replace"))]
    assert not stale, stale


def test_readme_local_links_exist() -> None:
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    links += re.findall(r"`((?:docs|benchmarks)/[\w./-]+)`", text)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to nothing local"
    missing = sorted({link for link in local if not (REPO / link).exists()})
    assert not missing, missing
