"""Long runs stay bounded: the controller stores precision *changes*, never per-step records.

The 20,000-step resident-memory figure is ``benchmarks/soak.py`` (results in ``benchmarks/results/soak.*``);
these tests pin the mechanism cheaply: the history of a CPT run has one entry per change of the schedule
however many steps it has, and the size of ``ctl.state_dict()`` does not grow with the step count.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

import adaprec
from adaprec.policies import CPT, Fixed
from adaprec.policies.cpt import cpt_schedule


def _drive(policy, steps: int, total: int | None = None) -> adaprec.Controller:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(2, 4)
    ctl = adaprec.Controller(model, policy=policy, total_steps=total, classifier_floor=False)
    with ctl, torch.no_grad():
        for _ in range(steps):
            model(x)
            ctl.step()
    return ctl


def _changes(schedule: np.ndarray) -> int:
    return 1 + int((np.diff(schedule) != 0).sum())


def _state_bytes(ctl: adaprec.Controller) -> int:
    buf = io.BytesIO()
    torch.save(ctl.state_dict(), buf)
    return buf.tell()


def test_history_and_state_hold_changes_not_steps() -> None:
    short = _drive(CPT(bits=(3, 8), cycles=4), 200, 200)
    long = _drive(CPT(bits=(3, 8), cycles=4), 1000, 1000)
    # 4 cycles of 3..8 bits: 6 changes each, whether a cycle has 50 or 250 steps.
    assert len(short.history) == _changes(cpt_schedule(200, 4, 3, 8)) == 24
    assert len(long.history) == _changes(cpt_schedule(1000, 4, 3, 8)) == 24
    assert [h.layers for h in short.history] == [h.layers for h in long.history]
    assert abs(_state_bytes(long) - _state_bytes(short)) <= 64  # only the counters' digits may differ
    fixed = {n: _drive(Fixed(bits=4, grad_bits=8), n) for n in (1, 400)}
    assert [len(c.history) for c in fixed.values()] == [1, 1]
    assert abs(_state_bytes(fixed[400]) - _state_bytes(fixed[1])) <= 16
