"""CPT: the schedule (docs/methods.md#cpt-schedule), its cost (docs/methods.md#bitops), the policy in a
controller, recipes, bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import adaprec
from adaprec.formats import Precision
from adaprec.policies import CPT, Fixed, list_policies, make_policy, write_recipe
from adaprec.policies.cpt import PROFILES, SHAPES, cpt_bits, cpt_schedule, cycle_bits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    # Thousands of tiny ops: with several intra-op threads on a busy 2-core machine they spin and wait
    # far longer than they compute.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _drive(policy, total: int, steps: int | None = None, reference: Precision | None = None,
           backward: bool = False, **kw) -> adaprec.Controller:
    """Run ``steps`` (default ``total``) training forwards of a tiny model under ``policy``; with
    ``backward``, each with its backward (an input that requires grad: all three products run)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    x = torch.randn(1, 4, requires_grad=backward)
    # A one-layer model's only layer is its classifier: switch the classifier floor off so that it
    # follows the policy.
    kw.setdefault("classifier_floor", False)
    ctl = adaprec.Controller(model, policy=policy, total_steps=total, reference=reference, **kw)
    with ctl, torch.set_grad_enabled(backward):  # without autograd a forward bills its product only
        for _ in range(total if steps is None else steps):
            y = model(x)
            if backward:
                y.sum().backward()
            ctl.step()
    return ctl


def _bits_per_step(ctl: adaprec.Controller, layer: str = "0") -> list[int]:
    """Forward bits of every completed iteration, rebuilt from the change history."""
    out = []
    hist = ctl.history
    for t in range(ctl.step_count):
        cur = [h for h in hist if h.step <= t][-1]
        out.append(cur.layers[layer].weight.bits)
    return out


# --- the schedule -----------------------------------------------------------------------------------

def test_paper_test_vectors():
    assert [cpt_bits(t, 64_000, 32, 3, 8) for t in (0, 500, 1000, 1999, 2000)] == [3, 4, 6, 8, 3]


def test_paper_time_shares():
    sched = cpt_schedule(64_000, 32, 3, 8)
    assert len(sched) == 64_000
    # The paper's time shares per width, rounded to 0.1:
    expected = {3: 20.5, 4: 16.5, 5: 13.1, 6: 13.1, 7: 16.5, 8: 20.5}
    for b, share in expected.items():
        assert abs(100 * np.mean(sched == b) - share) <= 0.05 + 1e-9, b
    assert set(np.unique(sched)) == set(expected)


def test_rounding_is_half_to_even():
    # u = 0.5 gives exactly 5.5 for 3..8: numpy's rint (and the released code) give 6, half-up too,
    # but 2..7 at u = 0.5 gives 4.5 -> 4 (half-even), where half-up would give 5.
    assert cpt_bits(1000, 2000, 1, 3, 8) == 6
    assert cpt_bits(1000, 2000, 1, 2, 7) == 4


def test_partial_last_cycle_restarts_at_bmin():
    # 10 steps, 3 cycles: P = 3, the 10th step (t = 9) starts a 4th cycle, as in the released code.
    sched = cpt_schedule(10, 3, 2, 4, profile="linear")
    assert sched.tolist() == [2, 3, 3, 2, 3, 3, 2, 3, 3, 2]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lo,hi", [(3, 8), (2, 4), (4, 16)])
def test_every_profile_and_shape_hits_both_bounds_each_cycle(profile, shape, lo, hi):
    cycles, period = 8, 400
    sched = cpt_schedule(cycles * period, cycles, lo, hi, profile, shape).reshape(cycles, period)
    assert (sched.min(axis=1) == lo).all() and (sched.max(axis=1) == hi).all()
    assert sched[:, 0].tolist() == [lo] * cycles  # every cycle starts at B_min
    one = sched[0]
    if shape == "growth":
        assert (np.diff(one) >= 0).all()  # a ramp up
    else:
        mid = period // 2
        assert (np.diff(one[:mid + 1]) >= 0).all() and (np.diff(one[mid:]) <= 0).all()
        assert one[mid] == hi


@settings(max_examples=60, deadline=None)
@given(lo=st.integers(1, 31), span=st.integers(0, 10), period=st.integers(1, 300),
       profile=st.sampled_from(PROFILES), shape=st.sampled_from(SHAPES))
def test_schedule_stays_within_bounds(lo, span, period, profile, shape):
    hi = min(lo + span, 32)
    vals = cycle_bits(period, lo, hi, profile, shape)
    assert len(vals) == period and min(vals) >= lo and max(vals) <= hi and vals[0] == lo


def test_profiles_differ_in_cost_order():
    # cos and linear are symmetric about the middle (same mean bits); exp rises fast and spends more
    # time near B_max (costlier), rex stays low and rises steeply at the end (cheaper).
    mean = {p: cpt_schedule(2000, 1, 3, 8, p).mean() for p in PROFILES}
    assert abs(mean["cos"] - 5.5) < 0.01 and abs(mean["linear"] - 5.5) < 0.01
    assert mean["exp"] > mean["cos"] + 1 and mean["rex"] < mean["cos"] - 1


# --- the cost meter over a whole schedule -------------------------------------------------------------

@pytest.mark.parametrize("lo,hi,g,expected", [(3, 8, 8, 36.67), (3, 6, 6, 30.04)])
def test_bitops_savings_from_cost_meter(lo, hi, g, expected):
    # The savings depend only on the period P: one cycle of P = 2000 has the shares of the paper's
    # 64,000 iterations in 32 cycles.
    ref = Precision.cpt(hi, g)
    cpt = _drive(CPT(bits=(lo, hi), grad_bits=g, cycles=1), total=2000, reference=ref, backward=True).report()
    assert abs(100 * cpt["savings_vs_reference"] - expected) <= 0.02
    # The reference column equals a real static run's BitOPs per step.
    fixed = _drive(Fixed(bits=hi, grad_bits=g), total=20, reference=ref, backward=True).report()
    assert fixed["gbitops"] == pytest.approx(fixed["gbitops_reference"])
    per_step_fixed = fixed["gbitops"] / 20
    assert abs(100 * (1 - cpt["gbitops"] / (2000 * per_step_fixed)) - expected) <= 0.02


# --- the policy in a controller -----------------------------------------------------------------------

def test_policy_follows_the_pure_schedule():
    total, cycles = 90, 4
    for shape in SHAPES:
        ctl = _drive(CPT(bits=(2, 7), grad_bits=8, cycles=cycles, shape=shape, profile="exp"), total)
        assert _bits_per_step(ctl) == cpt_schedule(total, cycles, 2, 7, "exp", shape).tolist()
        assert all(h.layers["0"].gradient.bits == 8 for h in ctl.history)
        assert ctl.report()["cpt_bounds"] == "2-7"


def test_grad_bits_pair_cycles_too():
    ctl = _drive(CPT(bits=(3, 8), grad_bits=(6, 8), cycles=2), total=40)
    grads = {h.step: h.layers["0"].gradient.bits for h in ctl.history}
    assert min(grads.values()) == 6 and max(grads.values()) == 8
    assert grads[0] == 6 and ctl.history[0].layers["0"].gradient.rounding == "stochastic"


def test_eval_precision_default_max_current_and_int():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    for eval_bits, want in ((None, 8), ("max", 8), ("current", 3), (5, 5)):
        with adaprec.Controller(model, policy=CPT(bits=(3, 8), cycles=2, eval_bits=eval_bits),
                                total_steps=20, classifier_floor=False) as ctl:
            site = ctl.backend.sites["0"]
            assert site.train.weight.fmt.bits == 3  # step 0 trains at B_min
            assert site.eval.weight.fmt.bits == want
            assert site.eval.activation.fmt.bits == want


def test_past_total_steps_keeps_cycling_and_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctl = _drive(CPT(bits=(3, 8), cycles=2), total=20, steps=45)
    past = [w for w in caught if "past total_steps" in str(w.message)]
    assert len(past) == 1
    bits = _bits_per_step(ctl)
    assert bits[20:40] == bits[:20] and bits[40] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run of exactly total_steps does not warn
        _drive(CPT(bits=(3, 8), cycles=2), total=20)


def test_state_dict_resume_gives_same_decisions():
    full = _bits_per_step(_drive(CPT(bits=(3, 8), cycles=3), total=60))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    x = torch.randn(1, 4)

    def controller() -> adaprec.Controller:
        return adaprec.Controller(model, policy=CPT(bits=(3, 8), cycles=3), total_steps=60,
                                  classifier_floor=False)

    ctl = controller()
    with ctl, torch.no_grad():
        for _ in range(25):
            model(x)
            ctl.step()
        state = ctl.state_dict()
    ctl2 = controller()
    with ctl2, torch.no_grad():
        ctl2.load_state_dict(state)
        for _ in range(35):
            model(x)
            ctl2.step()
    assert _bits_per_step(ctl2) == full
    with pytest.raises(ValueError, match="not a CPT state"):
        CPT().load_state_dict({"start": 0})


# --- registry, recipes, tuning ---------------------------------------------------------------------

def test_registered_with_paper_defaults():
    assert "cpt" in list_policies()
    p = make_policy("cpt")
    assert isinstance(p, CPT) and p.needs_total_steps
    assert p.config() == {"bits": [3, 8], "grad_bits": 8, "cycles": 32, "profile": "cos", "shape": "growth"}


@pytest.mark.parametrize("name,bits", [("cpt-cifar.toml", [3, 8]), ("cpt-imagenet.toml", [4, 8])])
def test_recipes_reproduce_paper_configs(name, bits):
    p = make_policy(str(ROOT / "adaprec" / "recipes" / name))
    assert p.config() == {"bits": bits, "grad_bits": 8, "cycles": 32, "profile": "cos", "shape": "growth"}


def test_config_round_trips_through_a_recipe(tmp_path):
    for pol in (CPT(bits=(4, 7), grad_bits=(6, 8), cycles=5, profile="rex", shape="triangular", eval_bits=6),
                CPT(bits=("auto", 6), prt_threshold=0.1, prt_metric="acc")):
        path = write_recipe(tmp_path / "r.toml", pol)
        again = make_policy(str(path))
        assert again.config() == pol.config()
        assert CPT(**pol.config()).config() == pol.config()


def test_search_space_builds_valid_policies():
    optuna = pytest.importorskip("optuna")
    trial = optuna.trial.FixedTrial({"family": "int", "b_min": 3, "span": 5, "grad_bits": 8, "cycles": 16,
                                     "profile": "exp", "shape": "triangular"})
    kwargs = CPT.search_space(trial)
    assert CPT(**kwargs).config()["bits"] == [3, 8]
    mx_params = {"family": "mx", "mx_low": "mxfp4", "mx_grad": "mxfp8", "cycles": 4, "profile": "cos",
                 "shape": "growth"}
    mx = CPT(**CPT.search_space(optuna.trial.FixedTrial(mx_params)))
    assert mx.config()["bits"] == ["mxfp4", "mxfp8"] and mx.bounds == (0, 2)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    families = set()
    for _ in range(20):
        t = study.ask()
        p = CPT(**CPT.search_space(t))
        lo, hi = p.bounds
        families.add(t.params["family"])
        assert 0 <= lo <= hi <= 12 and p.cycles in (1, 2, 4, 8, 16, 32)
    assert families == {"int", "mx"}


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"bits": (8, 3)}, r"B_min \(8\) must not exceed B_max \(3\)"),
    ({"bits": (0, 8)}, r"1\.\.32"),
    ({"bits": (3, 33)}, r"1\.\.32"),
    ({"bits": (3.5, 8)}, r"integer bit-width"),
    ({"bits": (3, 8, 9)}, r"pair"),
    ({"bits": "fast"}, r"pair"),
    ({"grad_bits": 0}, r"1\.\.32"),
    ({"grad_bits": (8, 6)}, r"must not exceed"),
    ({"cycles": 0}, r"cycles must be an int >= 1"),
    ({"cycles": 2.5}, r"cycles must be an int >= 1"),
    ({"profile": "sine"}, r"unknown profile 'sine'; allowed: cos, linear, exp, rex"),
    ({"shape": "saw"}, r"unknown shape 'saw'; allowed: growth, triangular"),
    ({"eval_bits": "min"}, r"eval_bits"),
    ({"bits": "auto", "prt_window": 50}, r"window"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPT(**kwargs)


def test_missing_total_steps_and_too_many_cycles():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="needs total_steps"):
        adaprec.Controller(model, policy="cpt")
    with pytest.raises(ValueError, match=r"cycles \(32\) must not exceed total_steps \(10\)"):
        with adaprec.Controller(model, policy="cpt", total_steps=10):
            pass
    with pytest.raises(ValueError, match="range-test"):
        with adaprec.Controller(model, policy=CPT(bits="auto", cycles=4), total_steps=100):
            pass
    assert "forward" not in model[0].__dict__  # the failed entry left the model alone
    with pytest.raises(ValueError, match="cycles"):
        cpt_bits(0, 10, 11, 3, 8)
    with pytest.raises(ValueError, match="t must be"):
        cpt_bits(-1, 10, 2, 3, 8)
