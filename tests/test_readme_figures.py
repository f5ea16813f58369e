"""The README's figures equal the result files they come from (benchmarks/readme_figures.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("readme_figures", REPO / "benchmarks" / "readme_figures.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


rf = _load()


def test_every_readme_figure_matches_its_result_file() -> None:
    problems = rf.check([REPO / "README.md"])
    assert not problems, "README figures drifted from benchmarks/results (rerun the benchmark, then " \
                         "python -m benchmarks.readme_figures --write):\n" + "\n".join(map(str, problems))


def test_the_readme_sources_its_measured_figures() -> None:
    markers = rf.find_markers((REPO / "README.md").read_text())
    sources = {m.spec.split(":", 1)[0] for m in markers}
    assert {"main_job", "import_time", "cpt", "kahan", "muppet", "tune", "soak", "overhead"} <= sources
    assert len(markers) >= 60
    # Every result file a marker names exists and was written by a benchmark (it records its command).
    for source in sources:
        data = json.loads((REPO / "benchmarks" / "results" / f"{source}.json").read_text())
        assert data["command"].startswith("python benchmarks/"), source


def test_a_drifted_figure_is_reported_and_write_fixes_it(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "r.json").write_text(json.dumps(
        {"data": {"acc": 0.97123, "rows": {"CPT 3-8/8": {"s": 0.375}},
                  "runs": [{"label": "fx8 kahan", "bpc": 3.6261}, {"label": "fx8 nearest", "bpc": 3.9857}]}}))
    doc = tmp_path / "README.md"
    doc.write_text("acc <!-- fig r:data.acc | .3f -->0.971<!-- /fig --> and\n"
                   'saves <!-- fig r:data.rows["CPT 3-8/8"].s | .1% -->37.5%<!-- /fig -->, '
                   'bpc <!-- fig r:data.runs[label="fx8 nearest"].bpc | .2f -->3.99<!-- /fig -->\n')
    assert rf.check([doc], results) == []
    # The result changes (a rerun), the README does not: the check names the line and both values.
    (results / "r.json").write_text((results / "r.json").read_text().replace("3.9857", "3.9712"))
    (problem,) = rf.check([doc], results)
    assert problem.line == 2 and problem.found == "3.99" and problem.expected == "3.97"
    assert "the text says '3.99', the result file gives '3.97'" in str(problem)
    changed = rf.write([doc], results)
    assert [(c.found, c.expected) for c in changed] == [("3.99", "3.97")]
    assert rf.check([doc], results) == []
    assert "bpc <!-- fig r:data.runs[label=\"fx8 nearest\"].bpc | .2f -->3.97<!-- /fig -->" in doc.read_text()


@pytest.mark.parametrize(("spec", "error"), [
    ("r:data.nope", r"no key 'nope' in 'data' \(keys: 'acc'"),
    ("nofile:data.acc", r"no result file nofile\.json"),
    ("r:data.runs[label=x]", r"0 items of 'runs' have label = 'x'"),
    ("r:data.runs[5]", r"no item \[5\]"),
    ("r:data.acc | .2q", r"ValueError"),
    ("data.acc", r"needs 'SOURCE:PATH'"),
])
def test_unresolvable_markers_are_problems_too(tmp_path: Path, spec: str, error: str) -> None:
    (tmp_path / "r.json").write_text(json.dumps({"data": {"acc": 0.5, "runs": [{"label": "a"}]}}))
    doc = tmp_path / "x.md"
    doc.write_text(f"v <!-- fig {spec} -->1<!-- /fig -->\n")
    (problem,) = rf.check([doc], tmp_path)
    assert problem.error is not None and re.search(error, problem.error), problem.error
    with pytest.raises(ValueError, match="cannot resolve"):
        rf.write([doc], tmp_path)


def test_command_line_check_and_write(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    shutil.copyfile(REPO / "README.md", readme)
    assert rf.main(["--check", str(readme)]) == 0
    text = readme.read_text()
    first = rf.find_markers(text)[0]
    readme.write_text(text[:first.start] + "999" + text[first.end:])
    assert rf.main(["--check", str(readme)]) == 1
    assert "the text says '999'" in capsys.readouterr().out
    assert rf.main(["--write", str(readme)]) == 0
    assert readme.read_text() == text
