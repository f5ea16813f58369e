"""Issue 14 item 3: ``adaprec.integrations.lightning.AdaprecCallback`` with the real Lightning ``Trainer``.

Tiny models and data built here (CPU, no downloads). Checked: a fit takes the same steps, epochs,
decisions and weights as the plain-loop controller; a NaN under Lightning's closure is skipped; resuming
from a Lightning checkpoint is bitwise equal to the uninterrupted run; bf16-mixed runs under autocast
and 16-mixed's GradScaler-skipped steps count; the controller's scalars reach the trainer's loggers.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed (adaprec[lightning])")

import adaprec  # noqa: E402
from adaprec.decision import Decision  # noqa: E402
from adaprec.events import Event  # noqa: E402
from adaprec.formats import Precision  # noqa: E402
from adaprec.integrations.lightning import AdaprecCallback  # noqa: E402
from adaprec.policies import CPT, Fixed, Policy  # noqa: E402
from adaprec.policies.cpt import cpt_bits  # noqa: E402

from _policies import EpochStepBits  # noqa: E402

BATCHES, BATCH = 4, 8


class StepLossBits(Policy):
    """Bits from the iteration *and* the last observed loss: equal histories need equal steps and losses."""

    name = "step-loss-bits"

    def decide(self, ctl: Any) -> Decision:
        loss = ctl.stats.get("loss")
        bits = 6 if loss is None else 3 + (ctl.step_count + int(float(loss) * 1e4)) % 5
        return Decision.uniform(Precision.cpt(bits, 8))


class Net(pl.LightningModule):
    """A LightningModule around a small MLP; ``poison`` maps a global step to a loss factor (nan, inf)."""

    def __init__(self, poison: dict[int, float] | None = None, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.poison = poison or {}
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls += 1
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss * self.poison.get(self.global_step, 1.0)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _loader(n: int = BATCHES, seed: int = 1) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(n * BATCH, 6, generator=g),
                                        torch.randint(0, 3, (n * BATCH,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=BATCH)  # fixed order: same batches in every run


def _trainer(tmp: Path, cb: AdaprecCallback, epochs: int = 3, **kw: Any) -> pl.Trainer:
    opts = dict(max_epochs=epochs, callbacks=[cb], default_root_dir=str(tmp), logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0)
    opts.update(kw)
    return pl.Trainer(**opts)


def _weights(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _epoch_log(ctl: Any) -> list[tuple[int, int]]:
    log: list[tuple[int, int]] = []
    ctl.on(Event.EPOCH_COMPLETED, lambda c, epoch, batches, **_: log.append((epoch, batches)))
    return log


def test_fit_equals_the_plain_loop_and_logs_to_the_trainers_loggers(tmp_path: Path) -> None:
    # Lightning: the callback observes the loss training_step returns, like the plain loop below.
    model = Net()
    cb = AdaprecCallback(policy=StepLossBits(), log_every_n_steps=4)
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv")
    trainer = _trainer(tmp_path, cb, logger=csv_logger)
    epochs: list[tuple[int, int]] = []
    cb_epochs = _EpochSpy(epochs)
    trainer.callbacks.append(cb_epochs)
    trainer.fit(model, _loader())
    lit = cb.controller

    # The plain loop, same seed, model, optimizer and batches.
    plain = Net()
    opt = plain.configure_optimizers()
    with adaprec.Controller(plain, policy=StepLossBits(), optimizer=opt, total_steps=3 * BATCHES) as ctl:
        plain_epochs = _epoch_log(ctl)
        for _ in range(3):
            for x, y in ctl.epoch(_loader()):
                loss = F.cross_entropy(plain(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                ctl.observe(loss=loss.detach())

    assert lit.step_count == trainer.global_step == ctl.step_count == 3 * BATCHES
    assert lit.epoch_index == trainer.current_epoch == ctl.epoch_index == 3
    assert epochs == plain_epochs == [(0, BATCHES), (1, BATCHES), (2, BATCHES)]
    assert len(lit.history) > 3 and lit.history == ctl.history  # steps, epochs and per-layer precisions
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(plain)))
    assert lit.report()["gbitops"] == ctl.report()["gbitops"]
    assert type(model.net[0]) is nn.Linear and not model.net[0]._forward_hooks  # restored after the fit

    # The controller's scalars went to the trainer's logger every 4 steps and at each epoch end.
    rows = list(csv.DictReader(open(Path(csv_logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("adaprec/gbitops")]
    assert [int(r["step"]) for r in logged] == [4, 8, 12]
    assert float(logged[-1]["adaprec/gbitops"]) == pytest.approx(lit.report()["gbitops"])
    assert float(logged[-1]["adaprec/savings_vs_fp32"]) == pytest.approx(lit.report()["savings_vs_fp32"])
    bits = [float(r["adaprec/weight_bits"]) for r in logged]
    assert all(3 <= b <= 7 for b in bits)


class _EpochSpy(pl.Callback):
    """Records EPOCH_COMPLETED of the AdaprecCallback's controller (subscribed once it started)."""

    def __init__(self, out: list[tuple[int, int]]) -> None:
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, AdaprecCallback))
        cb.controller.on(Event.EPOCH_COMPLETED,
                         lambda c, epoch, batches, **_: self.out.append((epoch, batches)))


def test_nan_at_step_5_under_lightnings_closure_is_skipped(tmp_path: Path, caplog: Any) -> None:
    model = Net(poison={5: math.nan})
    cb = AdaprecCallback(policy=Fixed(bits=4, grad_bits=8))
    _trainer(tmp_path, cb, epochs=2).fit(model, _loader())
    assert "non-finite gradients at step 5" in caplog.text
    ctl = cb.controller
    assert ctl.guard.skipped == 1 and ctl.step_count == 2 * BATCHES
    assert model.calls == 2 * BATCHES  # Lightning's closure ran once per step, the skipped one included
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert ctl.history[-1].layers["net.0"].weight.bits >= 6  # the guard raised the precision (floor +2)


def test_resume_from_a_lightning_checkpoint_is_bitwise_equal(tmp_path: Path) -> None:
    def callback() -> AdaprecCallback:  # decisions from the steps, the epoch ends and the rounding RNG
        return AdaprecCallback(policy=EpochStepBits())

    ckpt_dir = tmp_path / "ckpt"
    # Saved in on_train_batch_end after each epoch's last step, before on_train_epoch_end runs.
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_top_k=-1, every_n_train_steps=BATCHES,
                                        filename="{step}")
    full = Net()
    cb = callback()
    _trainer(tmp_path, cb, callbacks=[cb, ckpt], enable_checkpointing=True).fit(
        full, _loader(), _loader(1, seed=2))
    path = ckpt_dir / f"step={2 * BATCHES}.ckpt"
    saved = torch.load(path, weights_only=True)  # adaprec's state types are allow-listed
    assert saved["callbacks"][cb.state_key]["controller"]["epoch"] == 2  # the epoch ended before the save

    resumed = Net(seed=7)  # other initial weights: everything must come from the checkpoint
    cb2 = callback()
    trainer = _trainer(tmp_path, cb2)
    epochs: list[tuple[int, int]] = []
    trainer.callbacks.append(_EpochSpy(epochs))
    trainer.fit(resumed, _loader(), _loader(1, seed=2), ckpt_path=str(path))
    assert trainer.global_step == cb2.controller.step_count == 3 * BATCHES
    assert epochs == [(2, BATCHES)]
    assert cb2.controller.history == cb.controller.history
    assert cb2.controller.report() == cb.controller.report()
    assert all(torch.equal(a, b) for a, b in zip(_weights(resumed), _weights(full)))


def test_bf16_mixed_runs_under_autocast(tmp_path: Path) -> None:
    model = Net()
    seen: list[torch.dtype] = []
    model.net[2].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    cb = AdaprecCallback(policy=CPT(bits=(4, 8), cycles=2))
    trainer = _trainer(tmp_path, cb, epochs=2, precision="bf16-mixed")
    trainer.fit(model, _loader())
    ctl = cb.controller
    assert ctl.scaler is None and bfloat16_ran(seen)
    assert ctl.step_count == trainer.global_step == 2 * BATCHES and ctl.guard.skipped == 0
    assert [h.step for h in ctl.history][:3] == [0, 1, 2] and ctl.report()["savings_vs_fp32"] > 0.9
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


def bfloat16_ran(dtypes: list[torch.dtype]) -> bool:
    return bool(dtypes) and all(d == torch.bfloat16 for d in dtypes)


def test_16_mixed_gradscaler_skipped_steps_count(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    # Lightning turns precision="16-mixed" on the CPU into bf16; its fp16 plugin given explicitly keeps
    # fp16 autocast and a GradScaler, as on a GPU.
    skipped = {3, 6}
    model = Net(poison={s: math.inf for s in skipped})
    cb = AdaprecCallback(policy=CPT(bits=(3, 8), cycles=2), classifier_floor=False)
    trainer = _trainer(tmp_path, cb, epochs=2, plugins=[MixedPrecision("16-mixed", "cpu")])
    trainer.fit(model, _loader())
    ctl = cb.controller
    assert ctl.scaler is trainer.precision_plugin.scaler is not None
    assert ctl.step_count == trainer.global_step == ctl.cost.steps == 2 * BATCHES  # skipped steps count
    assert sum(ctl.report()["time_at_precision"].values()) == pytest.approx(1.0)
    total = 2 * BATCHES
    expect = [(t, cpt_bits(t, total, 2, 3, 8)) for t in range(total)]
    got = [(h.step, h.layers["net.0"].weight.bits) for h in ctl.history]
    assert got == [(t, b) for t, b in expect if t == 0 or b != cpt_bits(t - 1, total, 2, 3, 8)]  # no drift
    assert ctl.guard.skipped == 0  # the scaler's overflows are not divergences
    assert "step" not in vars(trainer.precision_plugin.scaler)  # the scaler was given back as it was


def test_bad_options_fail_when_the_callback_is_made() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        AdaprecCallback(policy="no-such-policy")
    with pytest.raises(TypeError, match="optimizer= comes from the trainer"):
        AdaprecCallback(policy="fixed", optimizer=None)
    with pytest.raises(TypeError, match=r"unknown Controller option\(s\) \['layer'\]"):
        AdaprecCallback(policy="fixed", layer=["net.0"])
    with pytest.raises(ValueError, match="log_every_n_steps must be a positive integer"):
        AdaprecCallback(log_every_n_steps=0)
