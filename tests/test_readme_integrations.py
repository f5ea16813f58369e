"""The README's section "Using adaprec with Lightning, Hugging Face and torchrun/FSDP2": its three scripts
run as printed (in this process, in a temporary folder; the FSDP2 script on a single-process group, then
resumed from its own DCP checkpoint)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

from _distributed import free_port

README = Path(__file__).resolve().parents[1] / "README.md"


def _scripts() -> dict[str, str]:
    text = README.read_text()
    start = text.index("## Using adaprec with Lightning, Hugging Face and torchrun/FSDP2")
    section = text[start:text.index("\n## ", start + 1)]
    blocks = re.findall(r"```python\n(# (\w+\.py)[^\n]*\n.*?)```", section, flags=re.S)
    return {name: code for code, name in blocks}


def test_the_section_has_the_three_scripts() -> None:
    assert sorted(_scripts()) == ["fsdp_train.py", "hf_train.py", "lightning_train.py"]


def _run(name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(_scripts()[name], f"README.md:{name}", "exec"), namespace)
    return namespace


def test_lightning_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lightning.pytorch", reason="Lightning is not installed (adaprec[lightning])")
    monkeypatch.chdir(tmp_path)
    ns = _run("lightning_train.py")
    ctl, trainer = ns["adaprec_cb"].controller, ns["trainer"]
    assert ctl.step_count == trainer.global_step == 4 * 16 and ctl.epoch_index == 4
    assert ctl.report()["savings_vs_fp32"] > 0.9


def test_hf_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers", reason="transformers is not installed (adaprec[hf])")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    ns = _run("hf_train.py")
    ctl = ns["adaprec_cb"].controller
    assert ctl.step_count == 16 and ctl.layer_names[-1] == "lm_head" and len(ctl.layer_names) == 9
    assert (tmp_path / "gpt2-cpt" / "checkpoint-8" / "adaprec_state.pt").is_file()


def test_fsdp_script_on_one_process_and_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.chdir(tmp_path)
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RESUME", raising=False)
    try:
        full = _run("fsdp_train.py")["ctl"]
        assert (tmp_path / "ckpt" / "epoch3").is_dir()
        for later in ("epoch2", "epoch3"):  # as if the first run had stopped after epoch 1
            shutil.rmtree(tmp_path / "ckpt" / later)
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        monkeypatch.setenv("RESUME", "ckpt/epoch1")
        resumed = _run("fsdp_train.py")["ctl"]
    finally:
        if dist.is_initialized():  # the script failed before destroying its group
            dist.destroy_process_group()
    assert full.step_count == resumed.step_count == 4 * 8
    assert resumed.history == full.history and resumed.report() == full.report()
