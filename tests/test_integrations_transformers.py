"""Issue 14 item 4: ``adaprec.integrations.transformers.AdaprecCallback`` with Hugging Face's ``Trainer``.

A tiny GPT-2 built from its config here (no downloads: ``HF_HUB_OFFLINE=1``), on the CPU. Checked: every
``Conv1D`` and ``lm_head`` is quantized and computes; the controller's state is saved beside each
checkpoint; resuming (inside an epoch, and at an epoch's end) is bitwise equal to the uninterrupted run.
"""

from __future__ import annotations

import math
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


def test_fp16_gradscaler_skipped_steps_count() -> None:
    # The Trainer's fp16 AMP on a GPU: Accelerate's optimizer carries a GradScaler and calls
    # scaler.step(optimizer) in its step(). (On the CPU Accelerate uses no scaler, so the Trainer's own
    # calls are made here around a CPU GradScaler: backward of the scaled loss, step, zero_grad.)
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    args = transformers.TrainingArguments("unused", use_cpu=True, report_to=[])  # (resets Accelerate's state)
    accelerate.Accelerator(cpu=True)
    try:
        model = _gpt2()
        opt = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), device_placement=False,
                                   scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
        state, control = transformers.TrainerState(global_step=0, max_steps=6), transformers.TrainerControl()
        cb = AdaprecCallback(policy=EpochStepBits())
        cb.on_train_begin(args, state, control, model=model, optimizer=opt)
        ctl = cb.controller
        assert ctl.scaler is opt.scaler and ctl.optimizer is opt.optimizer
        batch = _data()[0]
        skipped = []
        for step in range(6):
            loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
            opt.scaler.scale(loss * (math.inf if step in (2, 4) else 1.0)).backward()
            opt.step()
            opt.zero_grad()
            skipped.append(opt.step_was_skipped)
            state.global_step += 1
            cb.on_step_end(args, state, control)
        cb.on_train_end(args, state, control)
        assert skipped == [False, False, True, False, True, False]  # the scaler really skipped them
        assert ctl.step_count == ctl.cost.steps == 6  # and they counted, so the schedule did not drift
        assert [h.step for h in ctl.history] == list(range(6))  # EpochStepBits changes every step
        assert type(model.lm_head) is torch.nn.Linear and "step" not in vars(opt.scaler)
    finally:
        AcceleratorState._reset_state(True)


def test_a_step_the_controller_did_not_see_is_followed_with_one_warning() -> None:
    model = _gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    args = transformers.TrainingArguments("unused", use_cpu=True, report_to=[])
    state, control = transformers.TrainerState(global_step=0, max_steps=8), transformers.TrainerControl()
    cb = AdaprecCallback(policy=EpochStepBits())
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    batch = _data()[0]
    with pytest.warns(UserWarning, match="counted 0 iterations where the trainer counted 2 optimizer steps"):
        for _ in range(2):  # updates behind the optimizer's back (as an engine stepping on its own)
            model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
            state.global_step += 1
        cb.on_step_end(args, state, control)
    assert cb.controller.step_count == 2  # the trainer's count
    opt.step()
    state.global_step += 1
    cb.on_step_end(args, state, control)  # in step again: nothing to say
    cb.on_train_end(args, state, control)
    assert cb.controller.step_count == 3
