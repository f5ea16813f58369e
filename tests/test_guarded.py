"""GuardedCPT: its decisions on designed loss signals, its schedule, resume, tuning space, bad input."""

from __future__ import annotations

import io
import math

import optuna
import pytest
import torch

import adaprec
from adaprec.policies import GuardedCPT, make_policy
from adaprec.policies.cpt import cycle_bits


def model() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def run(policy, loss_of, steps, *, start=0, stop=None, state=None, seed=0, observe_before=False):
    """Drive a controller planned for ``steps`` iterations from ``start`` to ``stop``; ``loss_of(t, bits,
    generator)`` gives iteration t's loss."""
    gen = torch.Generator().manual_seed(seed)
    m = model()
    with adaprec.Controller(m, policy=policy, total_steps=steps, classifier_floor=False) as ctl:
        if state is not None:
            ctl.load_state_dict(state)
        for t in range(start, steps if stop is None else stop):
            bits = ctl.current["0"].weight.bits
            loss = torch.tensor(loss_of(t, bits, gen))
            if observe_before:
                ctl.observe(loss=loss)
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(t))
            m(x).pow(2).mean().backward()  # errors for the backward widths' probes
            ctl.step()
            if not observe_before:
                ctl.observe(loss=loss)
    return ctl


def penalty_below(b0, size):
    """Loss 1 + ``size`` per bit below ``b0`` (plus tiny noise): widths >= b0 are free."""
    return lambda t, bits, g: 1.0 + size * max(0, b0 - bits) + 0.001 * float(torch.randn((), generator=g))


def test_lower_bound_rises_until_the_low_end_is_free_and_then_stays():
    pol = GuardedCPT(bits=(3, 8), grad_bits=6, cycles=10, skip_cycles=0)
    ctl = run(pol, penalty_below(6, 0.05), 400)
    assert pol.lower == 6
    rises = [(c["cycle"], c["lower"], c["new_lower"]) for c in pol.trace if c["raised"]]
    assert rises == [(0, 3, 4), (1, 4, 5), (2, 5, 6)]
    assert all(c["reason"] == "excess" for c in pol.trace if c["raised"])
    assert len(pol.trace) == 10
    # Every iteration ran at the schedule of its cycle's bound; backward bits constant.
    period = 40
    for h in ctl.history:
        if h.step >= 400:
            continue
        lo = min(3 + h.step // period, 6)
        assert h.layers["0"].weight.bits == cycle_bits(period, lo, 8, "cos", "triangular")[h.step % period]
        assert h.layers["0"].gradient.bits == 6
    rep = ctl.report()
    assert rep["guarded_lower"] == 6 and rep["guarded_raises"] == [(0, 4), (1, 5), (2, 6)]


def test_noise_alone_does_not_raise_the_bound_but_a_test_without_significance_does():
    noisy = lambda t, bits, g: 1.0 + 0.2 * float(torch.randn((), generator=g))
    pol = GuardedCPT(bits=(3, 8), grad_bits=6, cycles=8)
    run(pol, noisy, 480)
    assert pol.lower == 3 and not any(c["raised"] for c in pol.trace)
    assert all(abs(c["excess"]) < 3 * c["se"] + 0.01 for c in pol.trace)
    loose = GuardedCPT(bits=(3, 8), grad_bits=6, cycles=8, tolerance=0.0, z=0.0)
    run(loose, noisy, 480)
    assert loose.lower > 3  # half of the cycles show a positive excess by chance


def test_a_loss_that_rises_from_cycle_to_cycle_raises_the_bound():
    # Same loss at every width (no excess), but each cycle is 5% worse than the one before.
    pol = GuardedCPT(bits=(3, 8), grad_bits=6, cycles=5)
    run(pol, lambda t, bits, g: 1.0 + 0.05 * (t // 60) + 0.001 * float(torch.randn((), generator=g)), 300)
    assert [c["reason"] for c in pol.trace] == ["", "trend", "trend", "trend", "trend"]
    assert pol.lower == 7


def test_the_first_cycle_is_measured_but_not_judged():
    pol = GuardedCPT(bits=(3, 8), grad_bits=6, cycles=4)  # skip_cycles=1 by default
    run(pol, penalty_below(5, 0.05), 160)
    assert [c["raised"] for c in pol.trace] == [False, True, True, False]
    assert pol.trace[0]["excess"] > 0.05 and pol.lower == 5


def test_never_above_b_max_and_eval_at_b_max():
    pol = GuardedCPT(bits=(6, 7), grad_bits=5, cycles=6)
    ctl = run(pol, penalty_below(9, 0.1), 240)  # every width "costs": the bound climbs to B_max and stops
    assert pol.lower == 7
    assert {h.layers["0"].weight.bits for h in ctl.history} <= {6, 7}
    assert pol.eval_decision(ctl).default.weight.bits == 7


def test_loss_observed_before_the_step_is_filed_under_the_same_iteration():
    a = GuardedCPT(bits=(3, 8), grad_bits=6, cycles=4, skip_cycles=0)
    b = GuardedCPT(bits=(3, 8), grad_bits=6, cycles=4, skip_cycles=0)
    run(a, penalty_below(5, 0.05), 200)
    run(b, penalty_below(5, 0.05), 200, observe_before=True)
    assert a.lower == b.lower == 5
    assert [c["excess"] for c in a.trace] == pytest.approx([c["excess"] for c in b.trace], rel=0.05)


def test_resume_mid_cycle_gives_the_same_decisions_and_trace():
    # A deterministic "noise" of iteration t, so that the resumed half sees the same losses.
    loss = lambda t, bits, g: 1.0 + 0.05 * max(0, 6 - bits) + 0.002 * math.sin(12.9898 * t)
    full = run(GuardedCPT(bits=(3, 8), cycles=6), loss, 300)
    part = run(GuardedCPT(bits=(3, 8), cycles=6), loss, 300, stop=130)
    assert part.policy.layer_grad_bits  # the backward widths were decided before the stop
    buf = io.BytesIO()
    torch.save(part.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = run(GuardedCPT(bits=(3, 8), cycles=6), loss, 300, start=130, state=state)
    assert resumed.policy.lower == full.policy.lower == 6
    assert repr(resumed.policy.trace) == repr(full.policy.trace)  # repr: NaN == NaN
    steps = lambda ctl: [(h.step, h.layers["0"].weight.bits) for h in ctl.history if h.step < 300]
    assert steps(resumed) == steps(full)
    with pytest.raises(ValueError, match="cycles of 50 iterations.*this run's are 60"):
        run(GuardedCPT(bits=(3, 8), cycles=5), loss, 300, start=130, state=state)


def test_state_from_another_configuration_is_rejected():
    ctl = run(GuardedCPT(bits=(3, 8), grad_bits=6, cycles=4, skip_cycles=0), penalty_below(8, 0.05), 120)
    state = ctl.policy.state_dict()
    assert state["lower"] > 4
    with pytest.raises(ValueError, match="outside this policy's bits"):
        GuardedCPT(bits=(3, 4)).load_state_dict(state)
    with pytest.raises(ValueError, match="not a GuardedCPT state"):
        GuardedCPT().load_state_dict({"lower": 4})


def test_search_space_default_and_registry():
    assert make_policy("guarded_cpt").config() == GuardedCPT().config()
    params = GuardedCPT.paper_trial_params()
    kw = GuardedCPT.search_space(optuna.trial.FixedTrial(params))
    assert GuardedCPT(**kw).config() == GuardedCPT().config()
    from adaprec import tune

    assert "guarded_cpt" in tune.tunable_policies()
    assert tune.paper_trial_params("guarded_cpt") == params


@pytest.mark.parametrize("kw, match", [
    ({"bits": (6, 4)}, "must not exceed"),
    ({"bits": (0, 8)}, "bit-width in 1..32"),
    ({"grad_bits": 0}, "grad_bits must be an integer bit-width"),
    ({"cycles": 0}, "cycles must be an int >= 1"),
    ({"profile": "square"}, "unknown profile 'square'"),
    ({"tolerance": -0.1}, "tolerance must be a finite number >= 0"),
    ({"z": math.nan}, "z must be a finite number"),
    ({"min_samples": 1}, "min_samples must be an int >= 2"),
    ({"grad_bits": (8, 6)}, "must not exceed"),
    ({"grad_noise": 0.0}, "grad_noise must be > 0"),
    ({"probe_every": 0}, "probe_every must be an int >= 1"),
    ({"skip_cycles": -1}, "skip_cycles must be an int >= 0"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        GuardedCPT(**kw)


class TwoHeads(torch.nn.Module):
    """Two parallel layers, so that a designed loss gives each output its own error."""

    def __init__(self) -> None:
        super().__init__()
        self.spiky, self.flat = torch.nn.Linear(4, 64), torch.nn.Linear(4, 64)

    def forward(self, x):
        return self.spiky(x), self.flat(x)


def test_backward_widths_follow_each_layers_error_spread():
    # The error at `spiky`'s output is one spike among 4096 zeros (crest 64: 8 bits for 3% noise), at
    # `flat`'s it is +-1 everywhere (crest 2: the floor, 6 bits).
    m = TwoHeads()
    spike = torch.zeros(64, 64)
    spike[3, 5] = 1.0
    signs = torch.ones(64, 64)
    signs[::2] = -1.0
    pol = GuardedCPT(bits=(4, 8), grad_bits=(6, 8), cycles=2, probe_every=2)  # default range: (6, 7)
    with adaprec.Controller(m, policy=pol, total_steps=40, classifier_floor=False) as ctl:
        seen = []
        for _ in range(40):
            a, b = m(torch.randn(64, 4))
            ((a * spike).sum() + (b * signs).sum()).backward()
            ctl.step()
            ctl.observe(loss=torch.tensor(1.0))
            seen.append({n: p.gradient.bits for n, p in ctl.current.items()})
        crest = pol.errors.crest
    assert crest["spiky"] == pytest.approx(64.0, rel=0.01) and crest["flat"] == pytest.approx(2.0, rel=0.01)
    assert pol.layer_grad_bits == {"spiky": 8, "flat": 6}
    assert seen[0] == {"spiky": 8, "flat": 8}  # before three probes: every layer at G_max
    assert seen[-1] == {"spiky": 8, "flat": 6}
    assert ctl.report()["guarded_grad_bits"] == {"spiky": 8, "flat": 6}
    assert not m.spiky._forward_hooks and not m.flat._forward_hooks  # the probes' hooks are gone


def test_needs_total_steps_and_enough_of_them():
    m = model()
    with pytest.raises(ValueError, match="needs total_steps"):
        adaprec.Controller(m, policy=GuardedCPT())
    with pytest.raises(ValueError, match=r"cycles \(8\) must not exceed total_steps \(5\)"):
        with adaprec.Controller(m, policy=GuardedCPT(), total_steps=5):
            pass
    assert [n for n, _ in m.named_children()] == ["0", "1", "2"]  # left as it was
