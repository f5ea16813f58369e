"""Issue 14 item 4: ``adaprec.integrations.transformers.AdaprecCallback`` with Hugging Face's ``Trainer``.

A tiny GPT-2 built from its config here (no downloads: ``HF_HUB_OFFLINE=1``), on the CPU. Checked: every
``Conv1D`` and ``lm_head`` is quantized and computes; the controller's state is saved beside each
checkpoint; resuming (inside an epoch, and at an epoch's end) is bitwise equal to the uninterrupted run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach the network
transformers = pytest.importorskip("transformers", reason="transformers is not installed (adaprec[hf])")

from transformers.pytorch_utils import Conv1D  # noqa: E402

from adaprec.integrations.transformers import STATE_FILE, AdaprecCallback  # noqa: E402

from _policies import EpochStepBits  # noqa: E402

SAMPLES, BATCH, EPOCHS = 16, 4, 2  # 4 steps per epoch, 8 in all


def _gpt2(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (SAMPLES, 24), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def _train(out: Path, model: Any, resume: str | None = None) -> AdaprecCallback:
    cb = AdaprecCallback(policy=EpochStepBits())  # depends on the steps, the epoch ends and the rounding RNG
    args = transformers.TrainingArguments(
        str(out), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, learning_rate=3e-3,
        save_strategy="steps", save_steps=2, logging_strategy="no", report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data(), callbacks=[cb])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # quiet: no log lines
    trainer.train(resume_from_checkpoint=resume)
    assert cb.controller.step_count == trainer.state.global_step == EPOCHS * SAMPLES // BATCH
    return cb


def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_gpt2_conv1d_and_lm_head_quantized_and_resume_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    full = _gpt2()
    convs = [n for n, m in full.named_modules() if isinstance(m, Conv1D)]
    cb = _train(out, full)
    ctl = cb.controller
    assert len(convs) == 8 and ctl.layer_names == convs + ["lm_head"]  # every Conv1D, and the LM head
    per_layer = ctl.report()["per_layer_gbitops"]
    assert all(per_layer[n] > 0 for n in ctl.layer_names)  # each one ran quantized (its MACs counted)
    assert ctl.epoch_index == EPOCHS and ctl.policy.ended == EPOCHS
    assert type(full.lm_head) is torch.nn.Linear and not full.lm_head._forward_hooks  # restored after train()
    for step in (2, 4, 6, 8):
        assert (out / f"checkpoint-{step}" / STATE_FILE).is_file()
    assert torch.load(out / "checkpoint-4" / STATE_FILE, weights_only=True)["epoch"] == 1  # epoch 0 ended

    # Resume inside the first epoch and at its end: the same decisions, cost and weights, bit for bit.
    for step in (2, 4):
        resumed = _gpt2(seed=11)  # other initial weights: everything must come from the checkpoint
        cb2 = _train(out, resumed, resume=str(out / f"checkpoint-{step}"))
        assert cb2.controller.history == ctl.history, step
        assert cb2.controller.report() == ctl.report(), step
        got, want = _weights(resumed), _weights(full)
        assert all(torch.equal(got[k], want[k]) for k in want), step


def test_a_missing_controller_state_is_named_before_the_model_is_touched(tmp_path: Path) -> None:
    # What the Trainer calls when it resumes at step 2 from a checkpoint without the controller's state.
    model = _gpt2()
    args = transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    state = transformers.TrainerState(global_step=2, max_steps=8)
    cb = AdaprecCallback(policy="fixed")
    with pytest.raises(FileNotFoundError, match=r"resumes at step 2, but .*checkpoint-2.*resume_from="):
        cb.on_train_begin(args, state, transformers.TrainerControl(), model=model,
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert cb.controller is None and type(model.lm_head) is torch.nn.Linear
    assert not model.lm_head._forward_hooks
