"""Savings are reported against runs a user can reproduce: FP32, and the static reference precision under
the same constraints (the classifier floor included); the idealised formula stays under ``_ideal``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adaprec
from adaprec.constraints import Floor
from adaprec.formats import Precision
from adaprec.policies import CPT, Fixed


def _run(policy, classes=100, steps=4, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with adaprec.Controller(model, policy=policy, optimizer=opt, total_steps=steps, **kw) as ctl:
        for _ in range(steps):
            loss = F.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, classes, (8,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ctl.report()


def test_a_static_8_8_run_saves_nothing_against_the_reference_it_is():
    # 100 classes: the floor keeps the classifier at ceil(log2 100) + 3 = 10 bits, in both runs.
    r = _run(Fixed(bits=8, grad_bits=8))
    assert r["savings_vs_reference"] == pytest.approx(0.0, abs=1e-12)
    assert r["savings_vs_reference_ideal"] < -0.05        # the formula's all-8-bit run is cheaper than real
    assert r["gbitops_reference"] == pytest.approx(r["gbitops"])


def test_constraints_apply_to_the_reference_too():
    r = _run(Fixed(bits=8, grad_bits=8), constraints=[Floor("first", 12)])
    assert r["savings_vs_reference"] == pytest.approx(0.0, abs=1e-12)
    cpt = _run(CPT(bits=(3, 8), grad_bits=8, cycles=1), classes=10, constraints=[Floor("first", 12)])
    # Against the real static run (layer 0 at 12 bits there too) CPT saves; the ideal all-8-bit run
    # would make it look more expensive than it is.
    assert cpt["savings_vs_reference"] > 0 > cpt["savings_vs_reference_ideal"]


@pytest.mark.parametrize("ref", ["int8", 8, Precision.cpt(8, 8)])
def test_reference_specs(ref):
    r = _run(Fixed(bits=8, grad_bits=8), reference=ref)
    assert r["reference"] == "int8/int8" and r["savings_vs_reference"] == pytest.approx(0.0, abs=1e-12)


def test_bad_reference_is_refused_before_anything_changes():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="reference= must be"):
        adaprec.Controller(model, policy="fixed", reference="int-eight")
    with pytest.raises(ValueError, match="reference= must be"):
        adaprec.Controller(model, policy="fixed", reference=[8, 8])
    assert "forward" not in model.__dict__
