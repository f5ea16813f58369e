"""MuPPET: the threshold, the switching rule on designed gradient streams, resume, per-layer, ladders,
and the modelled training time."""

from __future__ import annotations

import io
import math

import pytest
import torch

import adaprec
from adaprec import Event, Precision
from adaprec.formats import FixedPoint, FloatFormat
from adaprec.policies import MuPPET, make_policy
from adaprec.policies.muppet import level_precision, muppet_threshold
from adaprec.timemodel import (
    HARDWARE,
    Hardware,
    TrainingTimeModel,
    attach_time_model,
    product_rate,
    relative_speed,
)

# --- designed gradient streams -----------------------------------------------------------------------


def designed_grad(numel: int, delta: float, k: int, r: int) -> torch.Tensor:
    """The k-th of r gradients whose diversity is exactly ``delta``: ``u + c e_k`` with u ⟂ e_k.

    Σ||g||² = r(1 + c²) and ||Σg||² = r² + r c², so Δ = (1 + c²)/(r + c²) and c² = (rΔ - 1)/(1 - Δ).
    """
    assert 1 / r <= delta < 1 and numel >= r + 1
    c = math.sqrt((r * delta - 1) / (1 - delta))
    g = torch.zeros(numel, dtype=torch.float64)
    g[0] = 1.0
    g[1 + k] = c
    return g.float()


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 6))


def set_grads(model: torch.nn.Module, epoch: int, delta_of, r: int = 3) -> None:
    """Give every tensor of layer L the gradient of window epoch//r with diversity delta_of(window, L)."""
    w, k = divmod(epoch, r)
    for name, p in model.named_parameters():
        layer = name.split(".")[0]
        p.grad = designed_grad(p.numel(), delta_of(w, layer), k, r).reshape(p.shape)


def run(policy, delta_of, epochs, *, model=None, start=0, state=None, r=3):
    """One step per epoch; returns the controller (left) and the recorded PRECISION_CHANGED steps."""
    model = model or make_model()
    changes = []
    with adaprec.Controller(model, policy=policy) as ctl:
        ctl.on(Event.PRECISION_CHANGED, lambda c, **d: changes.append(d["step"]))
        if state is not None:
            ctl.load_state_dict(state)
        for e in range(start, epochs):
            for _ in ctl.epoch([None]):
                set_grads(model, e, delta_of, r)
                ctl.step()
    return ctl, changes


# Δ per window for the designed global scenario (window w = epochs 3w..3w+2, checked at 3w+2).
DESIGNED = {0: 0.9, 1: 0.95, 2: 0.6, 3: 0.5, 4: 0.96, 5: 0.6,          # level 0: switch at 17
            6: 0.5, 7: 0.45, 8: 0.4, 9: 0.4,                            # level 1: switch at 29
            10: 0.9, 11: 0.4, 12: 0.4,                                  # level 2: switch at 38
            13: 0.9, 14: 0.4, 15: 0.4}                                  # level 3: switch at 47
SWITCHES = [17, 29, 38, 47]


def designed(w, layer):
    return DESIGNED.get(w, 0.5)


def fastest(w, layer):
    """The strongest signal: a new maximum, then two big drops, every three windows."""
    return (0.9, 0.35, 0.35)[w % 3]


# --- the threshold ---------------------------------------------------------------------------------

def test_threshold_values_of_methods_md():
    got = [round(muppet_threshold(j), 3) for j in (2, 8, 14, 29)]
    assert got == [2.228, 1.674, 1.370, 1.083]
    assert MuPPET(alpha=2.0, beta=0.0).threshold(5) == 2.0
    assert MuPPET(lam=0.2).threshold(10) == pytest.approx(1 + 1.5 * math.exp(-2))


def test_designed_grads_have_the_designed_diversity():
    from adaprec.observers import gradient_diversity

    for d in (0.34, 0.5, 0.9):
        gs = [designed_grad(20, d, k, 3) for k in range(3)]
        assert gradient_diversity(gs) == pytest.approx(d, rel=1e-6)


# --- the switching rule ----------------------------------------------------------------------------

def test_switches_at_the_predicted_epochs_and_fires_precision_changed():
    ctl, changes = run(MuPPET(), designed, 52)
    pol = ctl.policy
    assert pol.switch_epochs() == SWITCHES
    assert [s["to"] for s in pol.switches] == ["fx12", "fx14", "fx16", "fp32"]
    # One step per epoch: a switch at the end of epoch j applies from step j + 1.
    assert changes == [j + 1 for j in SWITCHES]  # (the initial change fired before we subscribed)
    assert [h.step for h in ctl.history] == [0, 18, 30, 39, 48]
    assert ctl.history[1].layers["0"] == Precision.fixed_point(12)
    assert ctl.history[-1].layers["1"].is_fp32
    # Checks at absolute epochs 2, 5, 8, …; each uses T(j) of its own epoch.
    checks = [t["epoch"] for t in pol.trace]
    assert checks == list(range(2, 52, 3))
    assert all(t["threshold"] == pytest.approx(muppet_threshold(t["epoch"])) for t in pol.trace)
    by_epoch = {t["epoch"]: t for t in pol.trace}
    assert by_epoch[8]["ratio"] == pytest.approx(0.95 / 0.6) and not by_epoch[8]["violation"]
    assert by_epoch[11]["violation"] and by_epoch[14]["max_gd"] == pytest.approx(0.96)
    assert by_epoch[14]["violations"] == 1  # a new maximum does not reset the count
    assert by_epoch[23]["ratio"] == pytest.approx(0.5 / 0.45) and not by_epoch[23]["violation"]
    assert by_epoch[26]["violation"]


def test_minimum_stay_is_nine_epochs():
    ctl, _ = run(MuPPET(), fastest, 40)
    assert ctl.policy.switch_epochs() == [8, 17, 26, 35]
    assert ctl.policy.level_of() == 4
    # With patience 1 the shortest stay is two checks (a max, then one violation): 6 epochs.
    ctl, _ = run(MuPPET(patience=1), lambda w, layer: (0.9, 0.35)[w % 2], 25)
    assert ctl.policy.switch_epochs() == [5, 11, 17, 23]


def test_constant_diversity_never_switches_unless_max_stay():
    ctl, _ = run(MuPPET(), lambda w, layer: 0.5, 30)
    assert ctl.policy.switches == [] and ctl.current["0"] == Precision.fixed_point(8)
    ctl, _ = run(MuPPET(max_epochs_per_level=5), lambda w, layer: 0.5, 30)
    assert ctl.policy.switch_epochs() == [4, 9, 14, 19]
    assert {s["reason"] for s in ctl.policy.switches} == {"max_epochs"}


def test_resolution_windows_follow_absolute_epochs():
    ctl, _ = run(MuPPET(resolution=4), lambda w, layer: 0.5, 13, r=4)
    assert [t["epoch"] for t in ctl.policy.trace] == [3, 7, 11]
    obs = ctl.components["muppet.diversity"]
    assert [(h.first, h.last) for h in obs.history] == [(0, 3), (4, 7), (8, 11)]
    assert all(h.value == pytest.approx(0.5) for h in obs.history)


def test_resume_mid_level_gives_the_same_switch_epochs():
    full, _ = run(MuPPET(), designed, 52)
    # Stop after epoch 12 finished + epoch 13: mid-window {12, 13, 14}, level 0 with one violation.
    first, _ = run(MuPPET(), designed, 14)
    assert first.policy.ladders["*"].violations == 1 and first.policy.level_of() == 0
    state = first.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    # The components' own states load with weights_only=True (plain containers and tensors).
    for key in ("muppet.diversity", "time_model"):
        b = io.BytesIO()
        torch.save(state["components"][key], b)
        b.seek(0)
        torch.load(b, weights_only=True)
    b = io.BytesIO()
    torch.save(state["policy"], b)
    b.seek(0)
    torch.load(b, weights_only=True)
    resumed, _ = run(MuPPET(), designed, 52, start=14, state=state)
    assert resumed.policy.switch_epochs() == SWITCHES
    assert resumed.policy.trace == full.policy.trace
    assert resumed.policy.switches == full.policy.switches
    assert [h.step for h in resumed.history] == [h.step for h in full.history]
    assert resumed.report()["modelled_speedup_vs_fp32"] == full.report()["modelled_speedup_vs_fp32"]


def test_load_state_rejects_a_different_ladder():
    first, _ = run(MuPPET(), designed, 3)
    with pytest.raises(ValueError, match="levels"):
        run(MuPPET(levels=(8, 16, "fp32")), designed, 4, start=3, state=first.state_dict())
    with pytest.raises(ValueError, match="per_layer"):
        run(MuPPET(per_layer=True), designed, 4, start=3, state=first.state_dict())


# --- per layer --------------------------------------------------------------------------------------

def test_per_layer_each_layer_climbs_its_own_ladder():
    def per_layer(w, layer):
        return fastest(w, layer) if layer == "0" else designed(w, layer)

    ctl, _ = run(MuPPET(per_layer=True), per_layer, 40)
    pol = ctl.policy
    assert pol.switch_epochs("0") == [8, 17, 26, 35]
    assert pol.switch_epochs("1") == [17, 29, 38]
    assert ctl.current["0"].is_fp32 and ctl.current["1"] == Precision.fixed_point(16)
    # At epoch 9 the layers differ: layer 0 at fx12, layer 1 still at fx8.
    at9 = [h for h in ctl.history if h.step <= 9][-1]
    assert at9.layers == {"0": Precision.fixed_point(12), "1": Precision.fixed_point(8)}
    assert "muppet_level/0" in ctl.stats and "grad_diversity/1" in ctl.stats


def test_per_layer_constant_layer_stays():
    ctl, _ = run(MuPPET(per_layer=True), lambda w, layer: fastest(w, layer) if layer == "1" else 0.5, 20)
    assert ctl.policy.switch_epochs("0") == [] and ctl.policy.switch_epochs("1") == [8, 17]


# --- ladders of formats -----------------------------------------------------------------------------

def test_hardware_format_ladder():
    pol = MuPPET(levels=("fp8_e4m3", "bf16", "fp32"))
    assert pol.levels_short() == ["fp8_e4m3", "bf16", "fp32"]
    ctl, _ = run(pol, fastest, 20)
    assert pol.switch_epochs() == [8, 17]
    first = ctl.history[0].layers["0"]
    assert first.weight == FloatFormat("fp8_e4m3") and first.gradient.rounding == "stochastic"
    assert ctl.history[1].layers["0"].weight == FloatFormat("bf16") and ctl.current["0"].is_fp32


def test_level_specs_and_errors():
    assert level_precision(8) == Precision.fixed_point(8)
    assert level_precision(32).is_fp32 and level_precision("fx10").weight == FixedPoint(10)
    assert level_precision(Precision.cpt(4, 8)) == Precision.cpt(4, 8)
    with pytest.raises(ValueError, match="levels\\[1\\]"):
        MuPPET(levels=(8, 1))
    with pytest.raises(ValueError, match="climb"):
        MuPPET(levels=(16, 8))
    with pytest.raises(ValueError, match="levels\\[0\\].*cannot read"):
        MuPPET(levels=("fp7",))
    with pytest.raises(TypeError, match="sequence"):
        MuPPET(levels=8)
    with pytest.raises(ValueError, match="at least one"):
        MuPPET(levels=())
    for kw, msg in [({"resolution": 0}, "resolution"), ({"patience": 0}, "patience"),
                    ({"alpha": math.nan}, "alpha"), ({"lam": -1.0}, "lam"), ({"per_layer": 1}, "per_layer"),
                    ({"max_epochs_per_level": 0}, "max_epochs"), ({"check_every": 1}, "check_every"),
                    ({"check_every": 4, "resolution": 5}, "must not exceed"), ({"capture": "x"}, "capture")]:
        with pytest.raises(ValueError, match=msg):
            MuPPET(**kw)


def test_registered_config_recipe_and_search_space(tmp_path):
    from adaprec.policies import write_recipe

    pol = make_policy("muppet", resolution=2, per_layer=True)
    assert isinstance(pol, MuPPET) and pol.config()["resolution"] == 2
    again = make_policy(write_recipe(tmp_path / "m.toml", pol))
    assert again.config() == pol.config()
    assert MuPPET(**MuPPET().config()).config() == MuPPET().config()

    class Trial:
        def suggest_int(self, name, lo, hi):
            return hi

        def suggest_float(self, name, lo, hi, log=False):
            return lo

    kw = MuPPET.search_space(Trial())
    assert kw["levels"] == [16, "fp32"] and kw["resolution"] == 5 and kw["lam"] == 0.02
    MuPPET(**kw)


def test_windowed_checks_switch_mid_epoch():
    """check_every=4, windows of the last 2 step gradients; T uses the current epoch (0 here)."""
    model = make_model()
    pol = MuPPET(resolution=2, check_every=4, beta=0.5)  # T(0) = 1.5
    pattern = (0.9, 0.55, 0.55)
    with adaprec.Controller(model, policy=pol) as ctl:
        for _ in ctl.epoch(range(16)):
            t = ctl.step_count
            block, pos = divmod(t, 4)
            d = pattern[block % 3]
            for p in model.parameters():
                p.grad = designed_grad(p.numel(), d, max(pos - 2, 0), 2).reshape(p.shape)
            ctl.step()
    assert [t["step"] for t in pol.trace] == [3, 7, 11, 15]
    assert pol.trace[0]["diversity"] == pytest.approx(0.9)
    assert [s["step"] for s in pol.switches] == [11] and [h.step for h in ctl.history] == [0, 12]


def test_real_training_loop_with_optimizer_and_report():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = torch.randn(64, 6), torch.randint(0, 3, (64,))
    data = [(xs[i:i + 16], ys[i:i + 16]) for i in range(0, 64, 16)]
    with adaprec.Controller(model, policy=MuPPET(max_epochs_per_level=2), optimizer=opt) as ctl:
        for _ in range(12):
            for x, y in ctl.epoch(data):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    rep = ctl.report()
    assert ctl.policy.switch_epochs()[:4] == [1, 3, 5, 7]
    assert set(rep["modelled_speedup_vs_fp32"]) == {"t4", "h100"}
    # Two epochs at each of fx8 (16.05x), fx12 (8.02x), fx14, fx16 (4.01x), then four at FP32 on a T4.
    t4 = 12 / (2 / 16.049 + 2 / 8.025 + 4 / 4.012 + 4)
    assert rep["modelled_speedup_vs_fp32"]["t4"] == pytest.approx(t4, rel=2e-3)
    assert "modelled_speedup_vs_fp32" in str(rep)


# --- the time model ---------------------------------------------------------------------------------

def test_product_rates_follow_the_stated_mapping():
    fx = FixedPoint
    assert product_rate(fx(8), fx(8), "t4") == (130e12, "int8")
    assert product_rate(fx(12), fx(12), "t4") == (65e12, "fp16")
    assert product_rate(fx(16), fx(16), "t4") == (130e12 / 4, "int8")
    assert product_rate(fx(16), fx(16), "h100") == (1979e12 / 4, "int8")
    assert product_rate(fx(4), fx(4), "t4") == (260e12, "int4")
    assert product_rate(fx(4), fx(4), "h100") == (1979e12, "int8")
    assert product_rate(FloatFormat("bf16"), FloatFormat("bf16"), "t4") == (8.1e12, "fp32")
    assert product_rate(FloatFormat("fp8_e4m3"), FloatFormat("fp8_e5m2"), "h100") == (1979e12, "fp8")
    assert product_rate(FloatFormat("fp8_e4m3"), FloatFormat("fp8_e4m3"), "t4") == (65e12, "fp16")
    assert product_rate(FloatFormat("bf16"), FloatFormat("fp16"), "h100") == (495e12, "tf32")
    assert relative_speed(Precision.fp32(), "h100") == 1.0
    assert relative_speed(Precision.fixed_point(8), "h100") == pytest.approx(1979 / 67)
    with pytest.raises(ValueError, match="unknown hardware"):
        relative_speed(Precision.fp32(), "a100")
    with pytest.raises(ValueError, match="fp32"):
        Hardware("x", {"int8": 1.0})
    with pytest.raises(ValueError, match="unknown input types"):
        Hardware("x", {"fp32": 1.0, "int2": 1.0})


class _Switcher(adaprec.policies.Policy):
    name = "switcher"

    def decide(self, ctl):
        p = Precision.fp32() if ctl.step_count < 5 else Precision.fixed_point(8)
        return adaprec.Decision.uniform(p)


def _time_run(steps, other_fraction=0.0, state=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    with adaprec.Controller(model, policy=_Switcher()) as ctl:
        tm = TrainingTimeModel(("t4", HARDWARE["h100"]), other_fraction=other_fraction).attach(ctl)
        if state is not None:
            ctl.load_state_dict(state)
        for _ in range(ctl.step_count, steps):
            model(torch.randn(4, 16)).sum().backward()
            ctl.step()
    return ctl, tm


def test_time_model_charges_each_step_at_its_precision():
    ctl, tm = _time_run(10)
    s8 = relative_speed(Precision.fixed_point(8), "t4")
    rep = ctl.report()
    assert rep["modelled_speedup_vs_fp32"]["t4"] == pytest.approx(10 / (5 + 5 / s8))
    macs = ctl.cost.layer_macs.sum().item()
    # The layer reads the data: forward and weight gradient run (2 products of 2 operations per MAC).
    assert rep["modelled_seconds_fp32"]["t4"] == pytest.approx(macs * 4 / 8.1e12)
    assert attach_time_model(ctl) is tm
    # Amdahl: half the FP32 step outside the products caps the speedup below 2.
    ctl, _ = _time_run(10, other_fraction=0.5)
    assert ctl.report()["modelled_speedup_vs_fp32"]["t4"] == pytest.approx(20 / (10 + 5 + 5 / s8))
    with pytest.raises(ValueError, match="other_fraction"):
        TrainingTimeModel(other_fraction=1.0)


def test_time_model_resumes():
    full, _ = _time_run(10)
    part, _ = _time_run(7)
    resumed, _ = _time_run(10, state=part.state_dict())
    assert resumed.report()["modelled_seconds"] == pytest.approx(full.report()["modelled_seconds"])


# --- fixed and random schedules (the ablation's controls) --------------------------------------------

def test_schedule_switches_at_the_listed_epochs_without_diversity():
    from adaprec.policies.muppet import even_schedule

    sched = even_schedule(4, 30)
    assert sched == [5, 11, 17, 23]
    pol = MuPPET(schedule=sched)
    # Diversity would never trigger a switch here (constant Δ); the schedule alone decides.
    ctl, changes = run(pol, lambda w, layer: 0.5, 30)
    assert pol.switch_epochs() == sched
    assert [s["reason"] for s in pol.switches] == ["schedule"] * 4
    assert pol.trace == [] and "muppet.diversity" not in ctl.components
    assert changes == [e + 1 for e in sched]  # one iteration per epoch: the switch applies from the next
    assert ctl.history[-1].layers["0"].is_fp32
    assert pol.config()["schedule"] == sched
    assert make_policy("muppet", schedule=sched).schedule == tuple(sched)


def test_schedule_resumes_mid_run():
    sched = [3, 7]
    full, _ = run(MuPPET(schedule=sched), designed, 12)
    part, _ = run(MuPPET(schedule=sched), designed, 5)
    state = part.state_dict()
    resumed, _ = run(MuPPET(schedule=sched), designed, 12, start=5, state=state)
    assert resumed.policy.switch_epochs() == full.policy.switch_epochs() == sched
    assert resumed.policy.level_of() == full.policy.level_of() == 2


def test_random_schedule_is_seeded_uniform_and_keeps_the_minimum_stay():
    from collections import Counter

    from adaprec.policies.muppet import min_stay, random_schedule

    assert min_stay() == 9
    draws = [tuple(random_schedule(2, 30, stay=9, seed=s)) for s in range(3000)]
    assert random_schedule(2, 30, seed=5) == random_schedule(2, 30, seed=5)
    for d in draws:
        assert d[0] >= 8 and d[1] - d[0] >= 9 and d[1] <= 28
    # Every admissible schedule is possible and about equally likely: C(13, 2) = 78 of them.
    counts = Counter(draws)
    assert len(counts) == 78
    assert max(counts.values()) < 3 * min(counts.values())
    assert random_schedule(0, 10) == []


@pytest.mark.parametrize("kw, err, match", [
    ({"schedule": [5, 3]}, ValueError, "strictly increasing"),
    ({"schedule": [1, 2, 3, 4, 5]}, ValueError, "at most 4"),
    ({"schedule": [-1]}, ValueError, "non-negative int"),
    ({"schedule": "8,17"}, TypeError, "sequence of switch epochs"),
    ({"schedule": [8], "per_layer": True}, ValueError, "cannot be combined"),
])
def test_bad_schedules(kw, err, match):
    with pytest.raises(err, match=match):
        MuPPET(**kw)


def test_schedule_helpers_reject_impossible_requests():
    from adaprec.policies.muppet import even_schedule, random_schedule

    with pytest.raises(ValueError, match="need at least 28 epochs"):
        random_schedule(3, 27, stay=9)
    with pytest.raises(ValueError, match="switches must be an integer"):
        even_schedule(-1, 10)
