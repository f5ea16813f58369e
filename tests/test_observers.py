"""Observers: gradient diversity (inter-epoch, windowed, per layer) and loss statistics."""

from __future__ import annotations

import io
import math

import pytest
import torch

import adaprec
from adaprec.observers import (
    DiversityAccumulator,
    GradientDiversity,
    LossStats,
    WindowedDiversity,
    gradient_diversity,
)

# --- Yin's diversity --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 7])
def test_identical_vectors_give_one_over_n(n):
    g = torch.randn(50)
    assert gradient_diversity([g.clone() for _ in range(n)]) == pytest.approx(1 / n, rel=1e-12)
    acc = DiversityAccumulator([g])
    for _ in range(n):
        acc.add([g])
    assert acc.diversity(required=n).item() == pytest.approx(1 / n, rel=1e-6)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_orthogonal_vectors_give_one(n):
    q, _ = torch.linalg.qr(torch.randn(20, n, dtype=torch.float64))
    gs = [(q[:, k] * (k + 1.0)).float() for k in range(n)]  # orthogonal, different lengths
    assert gradient_diversity(gs) == pytest.approx(1.0, rel=1e-6)
    acc = DiversityAccumulator([gs[0]])
    for g in gs:
        acc.add([g])
    assert acc.diversity(required=n).item() == pytest.approx(1.0, rel=1e-5)


def test_diversity_edge_cases_and_errors():
    assert gradient_diversity([torch.ones(3), -torch.ones(3)]) == math.inf
    assert math.isnan(gradient_diversity([torch.zeros(3), torch.zeros(3)]))
    with pytest.raises(ValueError, match="at least one"):
        gradient_diversity([])
    with pytest.raises(ValueError, match="same shape"):
        gradient_diversity([torch.ones(3), torch.ones(4)])
    acc = DiversityAccumulator([torch.zeros(2), torch.zeros(2)])
    acc.add([torch.ones(2), None])
    d = acc.diversity(required=1)
    assert d[0].item() == 1.0 and math.isnan(d[1].item())  # tensor 1 never got a gradient
    assert math.isnan(acc.diversity(required=2)[0].item())  # not enough gradients yet


# --- the inter-epoch observer -----------------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _train(model, ctl, opt, epochs, start=0, zero_after=False, set_to_none=True):
    torch.manual_seed(1)
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(3)]
    grads = {}
    for e in range(start, epochs):
        for x, y in ctl.epoch(data):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            grads[e] = [p.grad.clone() for p in model.parameters()]
            if zero_after:
                opt.zero_grad(set_to_none=set_to_none)
    return grads


def _expected(grads, epochs, names):
    per = [gradient_diversity([grads[e][i] for e in epochs]) for i in range(len(names))]
    return per


@pytest.mark.parametrize("capture,zero_after", [("reference", False), ("reference", True), ("copy", True)])
def test_epoch_observer_uses_the_last_minibatch_gradient(capture, zero_after):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with adaprec.Controller(model, optimizer=opt) as ctl:
        obs = GradientDiversity(3, capture=capture).attach(ctl)
        grads = _train(model, ctl, opt, 6, zero_after=zero_after)
    names = [n for n, _ in model.named_parameters()]
    per = _expected(grads, [3, 4, 5], names)
    assert obs.result.per_tensor == pytest.approx(dict(zip(names, per)), rel=1e-5)
    assert obs.result.value == pytest.approx(sum(per) / len(per), rel=1e-5)
    assert obs.result.per_layer["0"] == pytest.approx((per[0] + per[1]) / 2, rel=1e-5)
    assert obs.result.per_layer["2"] == pytest.approx((per[2] + per[3]) / 2, rel=1e-5)
    assert [(h.first, h.last) for h in obs.history] == [(0, 2), (3, 5)]
    assert ctl.stats["grad_diversity"] == obs.result.value
    assert ctl.stats["grad_diversity/2"] == obs.result.per_layer["2"]


def test_in_place_zeroing_after_the_step_is_detected():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="capture='copy'"):
        with adaprec.Controller(model, optimizer=opt) as ctl:
            GradientDiversity(3).attach(ctl)
            _train(model, ctl, opt, 1, zero_after=True, set_to_none=False)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with adaprec.Controller(model, optimizer=opt) as ctl:
        obs = GradientDiversity(3, capture="copy").attach(ctl)
        _train(model, ctl, opt, 3, zero_after=True, set_to_none=False)
    assert obs.result is not None and obs.result.value > 0


def test_no_gradient_is_a_clear_error():
    model = _model()
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        with adaprec.Controller(model) as ctl:
            GradientDiversity(2).attach(ctl)
            for _ in ctl.epoch([0]):
                ctl.step()


def test_windows_are_absolute_epochs_when_attached_late():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with adaprec.Controller(model, optimizer=opt) as ctl:
        _train(model, ctl, opt, 4)
        obs = GradientDiversity(3).attach(ctl)  # attached in the middle of window {3, 4, 5}
        grads = _train(model, ctl, opt, 9, start=4)
    first, second = obs.history
    assert (first.epoch, first.first, first.last) == (5, 3, 5) and math.isnan(first.value)
    names = [n for n, _ in model.named_parameters()]
    per = _expected(grads, [6, 7, 8], names)
    assert (second.first, second.last) == (6, 8)
    assert second.value == pytest.approx(sum(per) / len(per), rel=1e-5)


def test_observer_state_resumes_mid_window():
    def run(stop, state=None, start=0):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with adaprec.Controller(model, optimizer=opt) as ctl:
            obs = GradientDiversity(3).attach(ctl)
            if state is not None:
                ctl.load_state_dict(state)
                model.load_state_dict(state["model"])
            _train(model, ctl, opt, stop, start=start)
            sd = ctl.state_dict()
            sd["model"] = {k: v.clone() for k, v in model.state_dict().items()}
        return obs, sd

    full, _ = run(6)
    _, mid = run(4)  # window {3, 4, 5} holds epochs 3 and 4
    buf = io.BytesIO()
    torch.save(mid["components"]["grad_diversity"], buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    resumed, _ = run(6, mid, start=4)
    assert resumed.result.value == pytest.approx(full.result.value, rel=1e-6)
    other = GradientDiversity(4)
    other.load_state_dict(mid["components"]["grad_diversity"])  # kept until attached
    with pytest.raises(ValueError, match="resolution"):
        with adaprec.Controller(_model()) as ctl:
            other.attach(ctl)


def test_observer_arguments_and_name_clash():
    with pytest.raises(ValueError, match="resolution"):
        GradientDiversity(0)
    with pytest.raises(ValueError, match="capture"):
        GradientDiversity(3, capture="clone")
    with pytest.raises(ValueError, match="must not exceed"):
        WindowedDiversity(every=4, window=5)
    with pytest.raises(TypeError, match="params="):
        GradientDiversity(params="0.*")
    with adaprec.Controller(_model()) as ctl:
        GradientDiversity().attach(ctl)
        with pytest.raises(ValueError, match="already holds"):
            GradientDiversity().attach(ctl)
        obs = GradientDiversity(params=lambda n, p: n.startswith("2.")).attach(ctl, name="last_layer")
        assert obs.names == ["2.weight", "2.bias"] and list(obs.layer_tensors) == ["2"]


def test_windowed_observer_every_k_steps_over_last_n():
    model = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False))
    w = model[0].weight
    seq = [torch.tensor([[5.0, 5.0, 5.0]])] * 2 + list(torch.eye(3).unsqueeze(1))  # 2 ignored, 3 orthogonal
    with adaprec.Controller(model) as ctl:
        obs = WindowedDiversity(every=5, window=3).attach(ctl)
        for g in seq + [torch.ones(1, 3)] * 5:
            w.grad = g.clone()
            ctl.step()
    first, second = obs.history
    assert (first.first, first.last, first.step) == (2, 4, 4) and first.value == pytest.approx(1.0)
    assert (second.first, second.last) == (7, 9) and second.value == pytest.approx(1 / 3)
    assert ctl.stats["grad_diversity_windowed"] == pytest.approx(1 / 3)


def test_broadcast_is_skipped_without_distributed():
    from adaprec.observers.diversity import _agree

    v = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert _agree(v) is v


# --- loss statistics --------------------------------------------------------------------------------

def _reference(xs, m, mf):
    mean = var = fast = None
    for x in xs:
        if not math.isfinite(x):
            continue
        if mean is None:
            mean, var, fast = x, 0.0, x
            continue
        d = x - mean
        mean += (1 - m) * d
        var = m * (var + (1 - m) * d * d)
        fast += (1 - mf) * (x - fast)
    return mean, var, fast


def test_loss_ema_mean_variance_and_trend():
    torch.manual_seed(0)
    xs = (torch.linspace(3, 1, 60) + 0.05 * torch.randn(60)).tolist()
    s = LossStats(momentum=0.9, fast_momentum=0.5)
    for x in xs:
        s.update(torch.tensor(x))
    mean, var, fast = _reference(xs, 0.9, 0.5)
    assert s.mean == pytest.approx(mean) and s.var == pytest.approx(var) and s.std == pytest.approx(var**0.5)
    assert s.trend == pytest.approx((fast - mean) / abs(mean)) and s.trend < 0
    up = LossStats(momentum=0.9, fast_momentum=0.5)
    for x in xs[::-1]:
        up.update(x)
    assert up.trend > 0 and s.count == 60 and s.last == pytest.approx(xs[-1])


def test_loss_spikes_and_non_finite_values():
    s = LossStats(momentum=0.9, warmup=5, spike_sigma=3.0)
    base = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]
    for x in base:
        s.update(x)
    assert s.spikes == 0
    s.update(5.0)
    assert s.spikes == 1 and s.last_was_spike
    s.update(1.0)
    assert not s.last_was_spike
    before = (s.mean, s.var)
    for bad in (math.nan, math.inf, -math.inf):
        s.update(bad)
    assert (s.mean, s.var) == before  # non-finite values do not poison the averages
    assert s.nonfinite == 3 and s.nonfinite_streak == 3 and s.count == len(base) + 2
    s.update(1.0)
    assert s.nonfinite == 3 and s.nonfinite_streak == 0
    # A drop, however large, is not a spike.
    s.update(-100.0)
    assert not s.last_was_spike


def test_loss_stats_on_a_controller_without_host_sync_values():
    model = _model()
    with adaprec.Controller(model) as ctl:
        s = LossStats(warmup=2).attach(ctl)
        for x in [2.0, 1.8, math.nan]:
            ctl.observe(loss=torch.tensor(x))
        ctl.observe(val_acc=0.5)  # other statistics are ignored
        st = ctl.state_dict()["components"]["loss_stats"]
    for k in ("loss_mean", "loss_std", "loss_trend", "loss_spike", "loss_spikes", "loss_nonfinite",
              "loss_nonfinite_streak"):
        assert isinstance(ctl.stats[k], torch.Tensor)
    assert float(ctl.stats["loss_nonfinite"]) == 1 and s.count == 2
    again = LossStats()
    again.load_state_dict(st)
    assert again.summary() == s.summary()
    assert s.summary()["nonfinite_streak"] == 1


def test_loss_stats_bad_inputs():
    s = LossStats()
    with pytest.raises(ValueError, match="scalar"):
        s.update(torch.ones(3))
    with pytest.raises(TypeError, match="number"):
        s.update("1.0")
    for kw, msg in [({"momentum": 1.0}, "momentum"), ({"fast_momentum": 0.99}, "must not exceed"),
                    ({"spike_sigma": 0}, "spike_sigma"), ({"warmup": 1}, "warmup"), ({"key": ""}, "key")]:
        with pytest.raises(ValueError, match=msg):
            LossStats(**kw)
    with pytest.raises(ValueError, match="not a LossStats state"):
        s.load_state_dict({"state": torch.zeros(2)})
    assert math.isnan(s.mean) and s.count == 0
