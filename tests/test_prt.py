"""The precision range test (docs/methods.md#precision-range-test): the state machine, find_bounds, and
CPT(bits="auto")."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import adaprec
from adaprec.policies import CPT
from adaprec.policies.cpt import cpt_schedule
from adaprec.prt import PRTResult, RangeTest, find_bounds, level_progress


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a busy machine: extra intra-op threads only wait
    yield
    torch.set_num_threads(n)


def _task(hard: bool, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A linearly separable task; ``hard`` adds one large outlier per batch to an input feature.

    The outlier stretches the per-tensor min/max range of the first layer's input, so at low precision
    the informative small values all round to the same few levels and nothing can be learned; at high
    precision the task is as easy as the clean one.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=g)
    y = (x @ torch.randn(8, generator=g) > 0).long()
    if hard:
        x[::64, 0] = 200.0
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))


def _loss_acc(model, batch):
    out = model(batch[0])
    return F.cross_entropy(out, batch[1]), (out.argmax(1) == batch[1]).float().mean()


# --- the state machine --------------------------------------------------------------------------------

def test_level_progress_modes():
    assert level_progress([0.1, 0.1, 0.3, 0.5], 2, "max") == pytest.approx((0.3, 0.1, 0.4))
    prog, first, last = level_progress([4.0, 4.0, 3.0, 3.0], 2, "min")
    assert (prog, first, last) == (0.25, 4.0, 3.0)


def test_range_test_stops_at_first_passing_level():
    rt = RangeTest(start_bits=2, max_bits=8, steps_per_bits=4, window=2, threshold=0.1)
    assert [rt.bits_at(i) for i in (0, 3, 4, 11, 100)] == [2, 2, 3, 4, 8]
    for v in [0.1, 0.1, 0.12, 0.1] + [0.1, 0.1, 0.1, 0.15] + [0.1, 0.2, 0.4, 0.5]:
        ended = rt.record(v)
    assert ended and rt.done and rt.b_min == 4 and rt.found and rt.steps == 12
    assert [lv.passed for lv in rt.levels] == [False, False, True]
    res = rt.result("acc")
    assert res.bounds == (4, 8) and res.values[0] == (2, 0.1) and res.values[-1] == (4, 0.5)
    with pytest.raises(RuntimeError, match="over"):
        rt.record(1.0)


def test_range_test_full_curve_and_not_found():
    rt = RangeTest(start_bits=3, max_bits=5, steps_per_bits=2, window=1, threshold=0.1, full_curve=True)
    for v in [0.0, 0.5, 0.5, 0.5, 0.5, math.nan]:
        rt.record(v)
    assert rt.done and rt.b_min == 3 and [lv.bits for lv in rt.levels] == [3, 4, 5]
    assert not rt.levels[2].passed  # NaN never passes
    flat = RangeTest(start_bits=3, max_bits=4, steps_per_bits=2, window=1, threshold=0.1)
    for v in [1.0] * 4:
        flat.record(v)
    assert flat.done and not flat.found and flat.b_min == 4
    with pytest.raises(RuntimeError, match="not finished"):
        RangeTest().result()


def test_range_test_state_round_trip():
    rt = RangeTest(steps_per_bits=4, window=2)
    for v in [0.1, 0.2, 0.1, 0.1, 0.3]:
        rt.record(v)
    again = RangeTest(steps_per_bits=4, window=2)
    again.load_state_dict(rt.state_dict())
    assert again.values == rt.values and again.levels == rt.levels and again.bits == rt.bits == 3
    with pytest.raises(ValueError, match="missing"):
        again.load_state_dict({"values": []})


@pytest.mark.parametrize("kwargs,match", [
    ({"start_bits": 0}, r"start_bits must be in 1\.\.32"),
    ({"start_bits": 6, "max_bits": 4}, r"max_bits \(4\) must be >= start_bits \(6\)"),
    ({"max_bits": 33}, r"1\.\.32"),
    ({"steps_per_bits": 1}, r"steps_per_bits"),
    ({"window": 11}, r"window \(11\) must be at most"),
    ({"threshold": math.nan}, r"finite"),
    ({"mode": "up"}, r"mode must be one of"),
])
def test_range_test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RangeTest(**kwargs)


# --- find_bounds --------------------------------------------------------------------------------------

def test_harder_task_at_low_precision_gets_higher_bmin():
    kw = {"lr": 0.05, "steps_per_bits": 16, "window": 4, "threshold": 0.1}
    for seed in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            easy = find_bounds(_mlp(seed), _loss_acc, _task(False, seed), **kw)
            hard = find_bounds(_mlp(seed), _loss_acc, _task(True, seed), **kw)
        assert isinstance(easy, PRTResult) and easy.b_max == hard.b_max == 8
        assert hard.b_min > easy.b_min, (easy.levels, hard.levels)
        assert easy.levels[-1].passed and len(easy.levels) == easy.b_min - 1  # stopped at the first pass
        assert easy.steps == 16 * len(easy.levels) and easy.metric == "metric" and easy.mode == "max"


def test_find_bounds_restores_model_optimizer_grads_and_rng():
    model = _mlp(0)
    data = _task(False, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss, _ = _loss_acc(model, data[0])
    loss.backward()
    opt.step()  # give the optimizer some state (momentum buffers) and leave grads in place
    model.eval()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    opt_state = {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items()}
    rng = torch.get_rng_state()

    res = find_bounds(model, _loss_acc, data, opt, steps_per_bits=6, window=2, full_curve=True,
                      threshold=0.05)
    assert len(res.levels) == 7 and res.steps == 42
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(opt_state[id(p)], s["momentum_buffer"]) for p, s in opt.state.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not model.training
    assert all("forward" not in m.__dict__ for m in model.modules())  # no quantization left behind
    assert opt.param_groups[0]["lr"] == 0.05


def test_find_bounds_without_restore_counts_as_training():
    model = _mlp(0)
    before = [p.clone() for p in model.parameters()]
    res = find_bounds(model, lambda m, b: _loss_acc(m, b)[0], _task(False, 0), restore=False,
                      steps_per_bits=6, window=2, lr=0.05)
    assert res.metric == "loss" and res.mode == "min"  # a loss-only fn watches the loss
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_find_bounds_bad_input():
    model = _mlp(0)
    with pytest.raises(ValueError, match="batches ran out"):
        find_bounds(model, _loss_acc, [], steps_per_bits=4, window=2)
    with pytest.raises(ValueError, match="batches ran out"):
        find_bounds(model, _loss_acc, iter(_task(False, 0)[:2]), steps_per_bits=4, window=2)
    with pytest.raises(ValueError, match="scalar loss"):
        find_bounds(model, lambda m, b: m(b[0]), _task(False, 0), steps_per_bits=4, window=2)
    with pytest.raises(ValueError, match="mode"):
        find_bounds(model, _loss_acc, _task(False, 0), mode="best")
    with pytest.raises(TypeError, match="callable"):
        find_bounds(model, None, _task(False, 0))


# --- CPT(bits="auto") on a live run ------------------------------------------------------------------

def _train_auto(policy: CPT, total: int, observe: str = "after", data_seed: int = 0, hard: bool = False,
                metric: str = "acc") -> adaprec.Controller:
    model = _mlp(0)
    data = _task(hard, data_seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    with adaprec.Controller(model, policy=policy, optimizer=opt, total_steps=total) as ctl:
        step = 0
        while step < total:
            for batch in ctl.epoch(data):
                loss, acc = _loss_acc(model, batch)
                stats = {"acc": acc.detach(), "loss": loss.detach()} if metric else {"other": 1.0}
                if observe == "before":
                    ctl.observe(**stats)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if observe == "after":
                    ctl.observe(**stats)
                step += 1
                if step == total:
                    break
    return ctl


def _bits(ctl):
    hist = ctl.history
    return [[h for h in hist if h.step <= t][-1].layers["0"].weight.bits for t in range(ctl.step_count)]


def test_auto_runs_the_test_then_cycles_between_found_bounds():
    total = 120
    runs = {}
    for observe in ("after", "before"):
        pol = CPT(bits="auto", cycles=4, prt_steps_per_bits=8, prt_window=2, prt_threshold=0.1,
                  prt_metric="acc")
        ctl = _train_auto(pol, total, observe)
        res = pol.prt_result()
        assert res is not None and res.found and res.b_max == 8
        lo, hi = pol.bounds
        assert (lo, hi) == (res.b_min, 8) and pol.start == res.steps == 8 * len(res.levels)
        bits = _bits(ctl)
        assert bits[:pol.start] == [2 + i // 8 for i in range(pol.start)]
        assert bits[pol.start:] == cpt_schedule(total, 4, lo, 8, start=pol.start).tolist()
        assert ctl.report()["cpt_bounds"] == f"{lo}-8" and ctl.report()["prt_steps"] == pol.start
        assert all(h.eval_layers["0"].weight.bits == 8 for h in ctl.history)
        runs[observe] = bits
    # Observing before or after opt.step() attributes each value to the same iteration.
    assert runs["after"] == runs["before"]


def test_auto_finds_higher_bmin_on_the_harder_task_live():
    kw = {"cycles": 2, "prt_steps_per_bits": 16, "prt_window": 4, "prt_threshold": 0.1, "prt_metric": "acc"}
    easy, hard = CPT(bits="auto", **kw), CPT(bits="auto", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train_auto(easy, 130, hard=False)
        _train_auto(hard, 130, hard=True)
    assert hard.bounds[0] > easy.bounds[0]


def test_auto_needs_the_metric_every_iteration():
    pol = CPT(bits="auto", cycles=2, prt_steps_per_bits=4, prt_window=2)  # watches "loss"
    with pytest.raises(RuntimeError, match=r"needs ctl\.observe\(loss=\.\.\.\) once per iteration"):
        _train_auto(pol, 60, metric="")


def test_auto_state_resumes_after_the_test():
    kw = {"cycles": 4, "prt_steps_per_bits": 8, "prt_window": 2, "prt_threshold": 0.1, "prt_metric": "acc"}
    pol = CPT(bits="auto", **kw)
    ctl = _train_auto(pol, 120)
    state = ctl.state_dict()
    again = CPT(bits="auto", **kw)
    model = _mlp(0)
    with adaprec.Controller(model, policy=again, total_steps=120) as ctl2:
        ctl2.load_state_dict(state)
        assert again.bounds == pol.bounds and again.start == pol.start
        assert ctl2.backend.sites["0"].train.weight.fmt.bits == again.bits_at(120, 120)[0] == pol.bounds[0]
    with pytest.raises(ValueError, match="bits='auto'"):
        CPT(bits=(3, 8)).load_state_dict(state["policy"])
