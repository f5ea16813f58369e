"""The divergence guard (DESIGN.md contract 5, NaN/Inf in low precision): skip the step, raise the
precision of the affected layers, tell the user, and stop clearly when it persists."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.constraints import Pin
from adaprec.formats import FP32, FloatFormat, IntFormat, Precision
from adaprec.guard import DivergenceError, DivergenceGuard, raise_one_level
from adaprec.policies import CPT, Fixed
from adaprec.policies.cpt import cpt_bits


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(5, 6), torch.randint(0, 3, (5,))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _backward(model: nn.Module, opt: torch.optim.Optimizer, *poison: str) -> None:
    """One forward/backward; ``poison`` names parameters whose gradients get a NaN."""
    x, y = _batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name in poison:
        model.get_parameter(name).grad[0] = float("nan")


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        assert st.keys() == ob["state"][i].keys()
        assert all(torch.equal(v, ob["state"][i][k]) for k, v in st.items())  # momentum buffers too


def _left_clean(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    assert all("forward" not in vars(m) for m in model.modules())
    assert "step" not in vars(opt)
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_raise_one_level_ladders() -> None:
    assert raise_one_level(Precision.cpt(4, 8)) == Precision(IntFormat(6, True), IntFormat(6), IntFormat(
        10, rounding="stochastic"))
    assert raise_one_level(Precision.cpt(15, 16)).gradient == FP32()
    assert raise_one_level(Precision.cpt(15, 16)).weight.bits == 16
    assert raise_one_level(Precision.uniform("fp8_e4m3")).weight == FloatFormat("bf16")
    assert raise_one_level(Precision.uniform("bf16")).is_fp32
    assert raise_one_level(Precision.fp32()).is_fp32
    assert raise_one_level(Precision.fixed_point(8), bits_step=4).weight.bits == 12


def test_nonfinite_step_is_skipped_and_the_layer_raised(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    opt = _sgd(model)
    events = []
    with adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=8), optimizer=opt,
                            classifier_floor=False) as ctl:
        ctl.on("divergence", lambda c, **d: events.append(d))
        for _ in range(2):  # momentum buffers exist from here on
            _backward(model, opt)
            opt.step()
        before = _state(model, opt)
        _backward(model, opt, "0.weight")
        with caplog.at_level(logging.WARNING, logger="adaprec"):
            opt.step()
        _assert_same(_state(model, opt), before)  # nothing of the model or the optimizer moved
        assert ctl.step_count == 3  # the iteration counts; only its update was skipped
        assert ctl.current["0"] == raise_one_level(Precision.cpt(4, 8))  # int6/int10
        assert ctl.current["2"] == Precision.cpt(4, 8)  # the healthy layer keeps its precision
        assert ctl.history[-1].step == 3 and ctl.history[-1].layers == ctl.current
        assert events == [{"step": 2, "layers": ["0"], "precisions": {"0": ctl.current["0"]}}]
        assert "non-finite gradients at step 2" in caplog.text and "raised 0 to int6/int10" in caplog.text
        assert (ctl.guard.skipped, ctl.guard.consecutive) == (1, 1)
        # The next healthy step updates again, resets the count and keeps the raised floor.
        _backward(model, opt)
        opt.step()
        assert not torch.equal(model[0].weight, before[0]["0.weight"])
        assert ctl.guard.consecutive == 0 and ctl.current["0"].weight.bits == 6
    _left_clean(model, opt)


def test_nan_loss_raises_every_layer() -> None:
    model = _model()
    opt = _sgd(model)
    with adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=8), optimizer=opt,
                            classifier_floor=False) as ctl:
        before = _state(model, opt)
        x, y = _batch()
        (F.cross_entropy(model(x), y) * float("inf")).backward()
        opt.step()
        _assert_same(_state(model, opt), before)
        assert {n: p.weight.bits for n, p in ctl.current.items()} == {"0": 6, "2": 6}


def test_persistent_divergence_stops_with_the_layer_and_its_precision() -> None:
    model = _model()
    opt = _sgd(model)
    _backward(model, opt)
    opt.step()  # momentum state from a plain step before the controller
    before = _state(model, opt)
    ctl = adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=8), optimizer=opt,
                             guard=DivergenceGuard(max_failures=3), classifier_floor=False)
    with pytest.raises(DivergenceError) as err, ctl:
        for _ in range(5):
            _backward(model, opt, "2.bias")
            opt.step()
    # Two raises (int4/int8 -> int6/int10 -> int8/int12), then the third failure stops the run.
    msg = str(err.value)
    assert "3 consecutive non-finite steps" in msg and "layer '2' at int8/int12" in msg
    assert "learning rate" in msg  # and says what to try
    assert ctl.step_count == 2 and ctl.guard.skipped == 3
    _assert_same(_state(model, opt), before)
    _left_clean(model, opt)


def test_divergence_in_an_fp32_layer_is_an_immediate_error() -> None:
    model = _model()
    opt = _sgd(model)
    before = _state(model, opt)
    ctl = adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=8), optimizer=opt,
                             constraints=[Pin("0", Precision.fp32())])  # layer 2 stays at 4 bits
    with pytest.raises(DivergenceError, match=r"at step 0 in layer\(s\) 0 running in FP32: quantization is "
                                              r"not the cause — check the input data"), ctl:
        _backward(model, opt, "0.weight")
        opt.step()
    _assert_same(_state(model, opt), before)
    _left_clean(model, opt)


def test_a_run_raised_to_fp32_is_still_guarded() -> None:
    # 14 -> 16 -> FP32 (bits_step 2): once every layer is FP32 the next failure cannot be quantization's.
    model = _model()
    opt = _sgd(model)
    before = _state(model, opt)
    ctl = adaprec.Controller(model, policy=Fixed(bits=14, grad_bits=16), optimizer=opt,
                             guard=DivergenceGuard(max_failures=10))
    with pytest.raises(DivergenceError, match="running in FP32"), ctl:
        for _ in range(3):
            _backward(model, opt, "0.bias", "2.weight")
            opt.step()
            assert ctl.guard.consecutive < 3
    assert ctl.guard.skipped == 3 and all(p.is_fp32 for p in ctl.current.values())
    _assert_same(_state(model, opt), before)


def test_an_fp32_run_is_left_to_plain_pytorch() -> None:
    # The guard watches runs that use low precision; a run that is FP32 throughout has no per-step
    # check (no host sync) and behaves exactly like the loop without a controller.
    model = _model()
    opt = _sgd(model)
    with adaprec.Controller(model, policy="fp32", optimizer=opt) as ctl:
        _backward(model, opt, "0.weight")
        opt.step()
    assert not ctl.guard.armed and ctl.guard.skipped == 0
    assert torch.isnan(model[0].weight).any()


def test_guard_off_and_without_optimizer() -> None:
    model = _model()
    opt = _sgd(model)
    with adaprec.Controller(model, policy=Fixed(bits=4), optimizer=opt, guard=False) as ctl:
        assert ctl.guard is None and "step" not in vars(opt)  # opt.step is not wrapped at all
        _backward(model, opt, "0.weight")
        opt.step()
    assert torch.isnan(model[0].weight).any()
    with adaprec.Controller(_model(), policy=Fixed(bits=4)) as ctl:  # no optimizer: nothing to skip
        assert ctl.guard is None
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_failures must be a positive integer"):
            DivergenceGuard(max_failures=bad)
    with pytest.raises(ValueError, match="bits_step must be a positive integer"):
        DivergenceGuard(bits_step=0)


def test_floors_combine_with_a_cycling_policy_and_survive_a_resume() -> None:
    model = _model()
    opt = _sgd(model)
    policy = CPT(bits=(3, 8), grad_bits=8, cycles=2)
    with adaprec.Controller(model, policy=policy, optimizer=opt, total_steps=20,
                            classifier_floor=False) as ctl:
        _backward(model, opt, "0.weight")
        opt.step()  # step 0 ran at 3 bits: layer 0 gets a floor of 5 bits (gradients 10)
        seen = []
        for _ in range(8):
            seen.append((ctl.current["0"].weight.bits, ctl.current["2"].weight.bits))
            _backward(model, opt)
            opt.step()
        buf = io.BytesIO()
        torch.save({"ctl": ctl.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buf)
    # Layer 2 follows the cycle; layer 0 follows it too but never below its floor.
    assert [b2 for _, b2 in seen] == [cpt_bits(t, 20, 2, 3, 8) for t in range(1, 9)]
    assert [b0 for b0, _ in seen] == [max(5, b2) for _, b2 in seen] and min(b2 for _, b2 in seen) == 3
    assert ctl.current["0"].gradient.bits == 10 and ctl.current["2"].gradient.bits == 8
    buf.seek(0)
    ck = torch.load(buf)  # weights_only=True: the floors are allow-listed Precisions
    model2 = _model()
    opt2 = _sgd(model2)
    with adaprec.Controller(model2, policy=CPT(bits=(3, 8), grad_bits=8, cycles=2), optimizer=opt2,
                            total_steps=20, classifier_floor=False) as ctl2:
        ctl2.load_state_dict(ck["ctl"])
        model2.load_state_dict(ck["model"])
        opt2.load_state_dict(ck["opt"])
        assert ctl2.guard.floors == ctl.guard.floors and ctl2.guard.skipped == 1 and ctl2.guard.armed
        assert ctl2.current == ctl.current
        while ctl2.step_count < 20:
            assert ctl2.current["0"].weight.bits >= 5 and ctl2.current["0"].gradient.bits == 10
            _backward(model2, opt2)
            opt2.step()
