"""The built wheel: it holds the shipped recipes, and they work from the installed package by name."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _build_wheel(tmp_path: Path) -> Path:
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("setuptools is needed to build the wheel offline: pip install 'adaprec[test]'")
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "adaprec", src / "adaprec", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
           "-q", "-w", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(out.glob("adaprec-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_contains_every_recipe_and_an_spdx_license(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "adaprec" / "recipes").glob("*.toml"))
    assert shipped, "no recipes in adaprec/recipes"
    assert sorted(Path(n).name for n in names if n.startswith("adaprec/recipes/")) == shipped
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "License-Expression: Apache-2.0" in text


def test_recipes_work_by_name_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    # A pure-Python wheel unpacked onto sys.path is what pip installs; run from a folder that has no
    # checkout around it, so only the package's own files can be found.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (f"import adaprec, adaprec.policies as P; assert adaprec.__file__.startswith({str(site)!r}); "
            "print(sorted(P.list_recipes()), P.make_policy('cpt-cifar').config()['bits'], "
            "P.make_policy('policies/cpt-imagenet.toml').config()['bits'])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == "['cpt-cifar', 'cpt-imagenet'] [3, 8] [4, 8]"
