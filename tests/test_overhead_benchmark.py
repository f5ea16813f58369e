"""benchmarks/overhead.py's profile part: its categories and the table it adds (the figures are the
benchmark's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def overhead(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("overhead_under_test", BENCH / "overhead.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["overhead_under_test"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "BATCH", 8)  # a small step: the bookkeeping, not the figure
    yield mod
    sys.modules.pop("overhead_under_test", None)


def test_profile_categories(overhead):
    assert overhead._profile_category("aten::convolution_backward") == "products"
    assert overhead._profile_category("aten::random_") == "noise"
    assert overhead._profile_category("## Call CompiledFxGraph abc123 ##") == "compiled_loops"
    assert overhead._profile_category("aten::native_batch_norm") == "other"


def test_profiled_run_records_categories_and_renders_them(overhead):
    configs = [c for c in overhead.CONFIGS if c.name in ("plain", "fixed8")]
    res = overhead.measure("eager", configs, rounds=1, warmup=0, clock="cpu", profile=True)
    for name in ("plain", "fixed8"):
        p = res[name]["profile"]
        assert p["products_ms"] > 0 and p["total_ms"] >= p["products_ms"]
        assert p["total_ms"] == pytest.approx(sum(p[f"{k}_ms"] for k in overhead._PROFILE_CATEGORIES))
    assert res["fixed8"]["profile"]["noise_ms"] > 0  # its errors are rounded stochastically
    assert res["plain"]["profile"]["noise_ms"] == 0
    assert "| eager | fixed8 |" in overhead._table({"eager": res}, "cpu").split("**Profile**")[1]


def test_bool_store_line(overhead):
    b = {"elements": 10, "eager_mask_ms": 1.0, "compiled_mask_ms": 2.0, "compiled_relu_aminmax_ms": 0.5}
    assert "`x <= 0` eager 1.0, compiled 2.0" in overhead._table({}, "cpu", b)
    assert "Bool stores" not in overhead._table({}, "cpu")
