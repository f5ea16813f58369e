"""benchmarks/speed.py's bookkeeping: what a partial results file lacks, the profile's categories, and
``--merge`` keeping what another run saved in the meantime (the figures themselves are the benchmark's)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def speed(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    spec = importlib.util.spec_from_file_location("speed_under_test", BENCH / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    yield mod
    sys.modules.pop("speed_under_test", None)


def test_not_measured_lists_every_missing_part(speed):
    res = {"kernels": {"matmul_1024": {"fp32": {}}}, "timing": {"gpt/eager/1": {}},
           "accuracy": {"resnet": {}}, "profile": {}}
    missing = speed.not_measured(res)
    assert "kernels" not in missing and "timing gpt/eager/1" not in missing
    assert "timing gpt/compiled/2" in missing and "timing resnet/eager/1" in missing
    assert "accuracy gpt" in missing and "accuracy resnet" not in missing
    assert {"profile gpt", "profile resnet"} <= set(missing)
    assert speed.not_measured({})[0] == "kernels"


def test_profile_categories(speed):
    assert speed._category("aten::_int_mm") == "products"
    assert speed._category("aten::convolution_backward") == "products"
    assert speed._category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert speed._category("aten::aminmax") == "other"


def test_merge_keeps_what_another_run_saved_meanwhile(speed, tmp_path):
    earlier = {"config": {"parts": ["timing"]}, "machine": {"flags": [], "load_start": [], "load_end": []},
               "kernels": {"matmul_1024": {"fp32": {"cpu_ms": 1.0, "wall_ms": 1.0}}},
               "timing": {"gpt/eager/1": {"fp32": {"routes": {}, "cpu_ms": 5.0, "wall_ms": 5.0,
                                                   "speedup_vs_fp32": 1.0, "speedup_vs_autocast": None}}}}
    earlier["kernels"]["conv_128x16x32x32_3x3"] = {"fp32": {"cpu_ms": 1.0, "wall_ms": 1.0}}
    (tmp_path / "speed.json").write_text(json.dumps({"data": earlier}))
    out = speed.main(["--merge", "--parts", "profile", "--models", "resnet", "--plans", "fp32",
                      "--warmup", "1"])
    saved = json.loads((tmp_path / "speed.json").read_text())["data"]
    assert saved["timing"] == earlier["timing"]  # the other run's part, untouched
    assert saved["kernels"] == earlier["kernels"]
    prof = saved["profile"]["resnet"]["fp32"]
    assert prof["products_ms"] > 0 and prof["total_ms"] >= prof["products_ms"] + prof["other_ms"] - 1e-6
    assert saved["partial"] and "profile gpt" in saved["not_measured"]
    assert len(saved["runs"]) == 2 and out["profile"] == saved["profile"]
    assert "**Profile, resnet**" in (tmp_path / "speed.md").read_text()


def test_onednn_int8_figure_is_exact_and_in_the_table(speed):
    import torch

    ia = torch.randint(-127, 128, (64, 64), dtype=torch.int8)
    ib = torch.randint(-127, 128, (64, 64), dtype=torch.int8)
    q = speed._onednn_int8(ia, ib, rounds=1)
    if q is None or "error" in q:
        pytest.skip(f"oneDNN's int8 linear does not run here: {q}")
    assert q["exact"] is True and q["product_prepacked"]["cpu_ms"] > 0 and q["prepack_weight"]["cpu_ms"] > 0
    res = {"machine": {"flags": [], "load_start": [], "load_end": []},
           "kernels": {"matmul_1024": {"fp32": {"cpu_ms": 1.0, "wall_ms": 1.0}},
                       "conv_128x16x32x32_3x3": {"fp32": {"cpu_ms": 1.0, "wall_ms": 1.0}},
                       "int8_prepacked_1024": q}}
    assert "packing it takes" in speed.table(res)
