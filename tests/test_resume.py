"""DESIGN.md contract 4, exact resume across processes, for every policy family and Kahan weight storage.

One run trains ``E`` epochs without stopping. Another trains ``k`` epochs, saves
``{"model", "opt", "ctl"}`` with one ``torch.save`` and exits; a *new* Python process builds everything
afresh, loads the checkpoint (``torch.load`` with its default ``weights_only=True``) and trains the
remaining epochs. On the CPU with fixed seeds the two runs must take the same decisions (the whole
``ctl.history``) and end with bitwise-identical weights and optimizer state.

This file is also the script both processes run (``python tests/test_resume.py first|second DIR``):
phase ``first`` does every case's uninterrupted run and first half, phase ``second`` every case's
second half, so the whole test costs two interpreter starts.

What ``ctl.load_state_dict`` restores: the step and epoch counters, the policy's state, the observers'
windows (``ctl.components``: gradient diversity, the divergence guard's floors), the cost so far, the
decision history with the precisions in force, the last observed values (``ctl.stats``, which a policy
may read when it decides), the controller's stochastic-rounding generator and torch's *global* CPU
generator (plus CUDA's when it was saved). It does not restore the model, the optimizer
(including ``adaprec.optim``'s own rounding generator, which lives in ``opt.state_dict()``), an LR
scheduler, the data order (a ``DataLoader``'s sampler or generator) or Python's/NumPy's RNGs: save and
load those yourself. Order that works for every policy and for weight storage: build model and
optimizer, enter the controller, ``ctl.load_state_dict(ck["ctl"])``, then ``model.load_state_dict`` and
``opt.load_state_dict`` (entering and loading the controller re-split stored weights into the formats
decided then; loading model and optimizer last puts back exactly the saved weights and compensation).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import adaprec  # noqa: F401  (allow-lists the controller's state for torch.load(weights_only=True))

ROOT = Path(__file__).resolve().parents[1]

#: case -> (epochs in the whole run, epochs before the interruption)
CASES: dict[str, tuple[int, int]] = {
    "fixed": (3, 1),
    "cpt": (6, 3),        # 24 steps in 3 cycles of 8: stops in the middle of the second cycle
    "muppet": (12, 5),    # diversity windows {0,1}, {2,3}, {4,5}, ...: stops with epoch 4 in the window
    "kahan": (5, 2),      # CPT decisions stored as the weights' own format by KahanSGD
    "loss": (4, 2),       # decisions read the observed loss (ctl.stats): it is part of the state
    # Weights held compactly (int8 codes) with Adam's moments in 8 bits; stochastic rounding of the
    # weights and of a bf16 momentum (the optimizer's own generator).
    "kahan_adam_8bit": (5, 2),
    "stochastic_bf16_state": (5, 2),
    "guarded": (9, 4),    # GuardedCPT: 3 cycles of 12 steps, stops in the second; error probes every 2
}
BATCHES = 4


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Its own generator: the data must not draw from (or depend on) the global RNG being resumed.
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(BATCHES)]


def _build(case: str) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    from adaprec.optim import Compensated, KahanSGD
    from adaprec.policies import CPT, Fixed, GuardedCPT, MuPPET

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    epochs = CASES[case][0]
    kw: dict[str, Any] = {}
    if case == "kahan":
        opt = KahanSGD(model.parameters(), lr=0.05, momentum=0.9, weight_format="fp32", seed=7)
        policy, kw = CPT(bits=(4, 8), grad_bits=8, cycles=2), {"weight_storage": True}
    elif case == "kahan_adam_8bit":
        opt = Compensated(torch.optim.Adam(model.parameters(), lr=1e-2), weight_format="bf16",
                          state_format="8bit")
        policy, kw = CPT(bits=(4, 8), grad_bits=8, cycles=2), {"weight_storage": True}
    elif case == "stochastic_bf16_state":
        opt = KahanSGD(model.parameters(), lr=0.05, momentum=0.9, weight_format="bf16", update="stochastic",
                       state_format="bf16_stochastic", seed=7)
        policy, kw = CPT(bits=(4, 8), grad_bits=8, cycles=2), {"weight_storage": True}
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        if case == "fixed":
            policy = Fixed(bits=5, grad_bits=6)  # stochastic rounding of the errors: the RNG matters
        elif case == "loss":
            from _policies import LossBits  # tests/ is this script's folder

            policy = LossBits()
        elif case == "cpt":
            policy = CPT(bits=(3, 8), grad_bits=(6, 8), cycles=3)
        elif case == "guarded":  # tolerance 0, z 0: the bound rises on any positive excess
            policy = GuardedCPT(bits=(3, 8), grad_bits=(4, 8), cycles=3, probe_every=2, skip_cycles=0,
                                tolerance=0.0, z=0.0, grad_noise=0.01)
        else:  # T(j) = 1: every drop of diversity is a violation, and one switches (many switches)
            policy = MuPPET(levels=(6, 8, 10, 12, 16, "fp32"), resolution=2, patience=1, alpha=1.0, beta=0.0)
    ctl = adaprec.Controller(model, policy=policy, optimizer=opt, total_steps=epochs * BATCHES, **kw)
    return model, opt, ctl


def _train(model: nn.Module, opt: torch.optim.Optimizer, ctl: Any, epochs: int) -> None:
    data = _data()
    for _ in range(epochs):
        for x, y in ctl.epoch(data):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.observe(loss=loss.detach())


def _result(model: nn.Module, opt: torch.optim.Optimizer, ctl: Any) -> dict[str, Any]:
    return {"model": model.state_dict(), "opt": opt.state_dict(), "history": list(ctl.history),
            "steps": ctl.step_count, "epochs": ctl.epoch_index, "gbitops": ctl.report()["gbitops"],
            "policy": ctl.policy.state_dict()}


def _first(out: Path) -> None:
    for case, (epochs, stop) in CASES.items():
        model, opt, ctl = _build(case)
        with ctl:
            _train(model, opt, ctl, epochs)
        torch.save(_result(model, opt, ctl), out / f"{case}.full.pt")

        model, opt, ctl = _build(case)
        with ctl:
            _train(model, opt, ctl, stop)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ctl": ctl.state_dict()},
                       out / f"{case}.ckpt.pt")
        torch.manual_seed(999)  # whatever happens to the RNG after saving must not matter


def _second(out: Path) -> None:
    for case, (epochs, stop) in CASES.items():
        model, opt, ctl = _build(case)
        ck = torch.load(out / f"{case}.ckpt.pt")  # weights_only=True, torch's default
        with ctl:
            ctl.load_state_dict(ck["ctl"])
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            _train(model, opt, ctl, epochs - stop)
        torch.save(_result(model, opt, ctl), out / f"{case}.resumed.pt")


# --- the test --------------------------------------------------------------------------------------

def _run_phase(phase: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, phase, str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, f"phase {phase} failed:\n{proc.stdout}\n{proc.stderr}"


def _assert_equal_state(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where  # nan == nan here
    else:
        assert a == b, where


def test_resume_in_a_new_process_is_exact(tmp_path: Path) -> None:
    _run_phase("first", tmp_path)
    _run_phase("second", tmp_path)
    for case, (epochs, stop) in CASES.items():
        full = torch.load(tmp_path / f"{case}.full.pt")
        resumed = torch.load(tmp_path / f"{case}.resumed.pt")
        assert resumed["steps"] == full["steps"] == epochs * BATCHES, case
        assert resumed["epochs"] == epochs, case
        # The same decisions at the same steps, before and after the interruption.
        assert resumed["history"] == full["history"], case
        assert resumed["gbitops"] == full["gbitops"], case
        _assert_equal_state(full["policy"], resumed["policy"], f"{case}.policy")
        for k, v in full["model"].items():
            assert torch.equal(v, resumed["model"][k]), f"{case}: weight {k} differs"
        _assert_equal_state(full["opt"], resumed["opt"], f"{case}.opt")
        # The cases really exercise what they are meant to.
        changes = [h.step for h in full["history"]]
        stop_step = stop * BATCHES
        if case == "fixed":
            assert len(changes) == 1
        else:
            assert any(s > stop_step for s in changes), f"{case}: no decision after the resume point"
        if case == "guarded":  # the bound rises after the resume point; the layers' error widths differ
            assert [t["raised"] for t in full["policy"]["trace"]][1:] == [True, True]
            assert len(set(full["policy"]["layer_grad_bits"].values())) == 2
        if case == "muppet":
            switches = full["policy"]["switches"]
            assert {s["epoch"] < stop for s in switches} == {True, False}, switches  # before and after
    kahan = torch.load(tmp_path / "kahan.full.pt")
    assert kahan["opt"]["state"][0]["comp"].abs().sum() > 0  # the compensation really carries something


if __name__ == "__main__":
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    {"first": _first, "second": _second}[sys.argv[1]](Path(sys.argv[2]))
