"""Reliability II (issue 15): what users do with models inside the block, half dtypes, second-order
gradients, early exits, activation checkpointing and bad input. One test (or a parametrized group)
per row of the issue; each failed on adaprec 0.1.

The contract for copies (README, "Guarantees"): a ``copy.deepcopy``, ``copy.copy`` or pickle of the
model taken inside the block is a *plain* model of the original classes with the current weights — no
adaprec state, no hooks, FP32 computation — whether taken directly, by ``torch.save(model)``, or by
``torch.optim.swa_utils.AveragedModel`` (SWA/EMA).
"""

from __future__ import annotations

import copy
import functools
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import adaprec
from adaprec.constraints import ClassifierFloor, Floor, Pin
from adaprec.formats import FloatFormat, IntFormat, Precision
from adaprec.policies import Fixed, MuPPET


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(n)]


def _plain_fp32(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the plain architecture computes with ``model``'s current weights."""
    h = F.relu(F.linear(x, model[0]._parameters["weight"], model[0]._parameters["bias"]))
    return F.linear(h, model[2]._parameters["weight"], model[2]._parameters["bias"])


def _is_plain(model: nn.Module) -> bool:
    for m in model.modules():
        if type(m).__module__ != "torch.nn.modules." + type(m).__module__.rsplit(".", 1)[-1]:
            return False
        if any(k.startswith("_adaprec") for k in vars(m)) or "forward" in vars(m):
            return False
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    return all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in model.modules())


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, batch) -> None:
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


# --- copies, pickles, foreign forwards, device moves -------------------------------------------------

@pytest.mark.parametrize("how", ["deepcopy", "copy", "pickle", "torch.save", "AveragedModel"])
def test_copies_taken_inside_are_plain_models_with_the_current_weights(how: str) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data = _data()
    x = data[0][0]
    with adaprec.Controller(model, policy=Fixed(bits=2, grad_bits=4), optimizer=opt,
                            classifier_floor=False) as ctl:
        _train_step(model, opt, data[0])
        if how == "deepcopy":
            twin = copy.deepcopy(model)
        elif how == "copy":
            twin = nn.Sequential(*[copy.copy(m) for m in model])
        elif how == "pickle":
            twin = pickle.loads(pickle.dumps(model))
        elif how == "torch.save":
            buf = io.BytesIO()
            torch.save(model, buf)
            twin = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        else:
            avg = torch.optim.swa_utils.AveragedModel(
                model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
            twin = avg.module
        assert _is_plain(twin)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        assert all(torch.equal(twin.state_dict()[k], v) for k, v in weights.items())
        assert torch.equal(twin(x), _plain_fp32(model, x))  # FP32 computation, its own weights
        assert not torch.equal(model(x), twin(x))  # while the original computes quantized
        _train_step(model, opt, data[1])  # the original moves on; a copy (not a shallow one) does not
        if how != "copy":
            assert all(torch.equal(twin.state_dict()[k], v) for k, v in weights.items())
            if how == "AveragedModel":
                avg.update_parameters(model)
                assert _is_plain(avg.module)
        assert ctl.step_count == 2
    assert _is_plain(twin) and _is_plain(model)
    assert torch.equal(twin(x), _plain_fp32(twin, x))


def test_foreign_instance_forwards_keep_running_and_are_quantized() -> None:
    # Hook libraries (accelerate's add_hook_to_module, profilers) replace a layer's forward on the
    # instance with a wrapper calling the old one; adaprec 0.1 overwrote it silently.
    model = _mlp()
    calls = []

    def wrap(layer: nn.Linear) -> None:
        old = layer.forward

        def new_forward(*args, **kwargs):
            calls.append(layer)
            return old(*args, **kwargs) * 2.0

        layer.forward = new_forward

    wrap(model[0])
    x = torch.randn(5, 6)
    with adaprec.Controller(model, policy=Fixed(bits=3), classifier_floor=False):
        wrap(model[2])  # set inside the block too
        y = model(x)
        xq = IntFormat(3).quantize(x)
        wq = IntFormat(3, per_channel=True).quantize(model[0].weight.detach())
        h = F.relu(2.0 * F.linear(xq, wq, model[0].bias))
        w2 = IntFormat(3, per_channel=True).quantize(model[2].weight.detach())
        assert torch.equal(y, 2.0 * F.linear(IntFormat(3).quantize(h), w2, model[2].bias))
    assert calls == [model[0], model[2]]
    assert "forward" in vars(model[0])  # the user's wrapper is still there after leaving


def test_accelerate_hooks_on_a_layer() -> None:
    hooks = pytest.importorskip("accelerate.hooks")
    seen = []

    class Record(hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append(args[0].unique().numel())
            return args, kwargs

    model = _mlp()
    hooks.add_hook_to_module(model[0], Record())
    x = torch.randn(50, 6)
    with adaprec.Controller(model, policy=Fixed(bits=2), classifier_floor=False):
        model(x)
    model(x)
    # accelerate's hook ran both times; inside, on the quantized input (4 levels).
    assert seen[0] <= 4 < seen[1]


def test_device_and_dtype_moves_inside() -> None:
    model = _mlp()
    with adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=8), classifier_floor=False) as ctl:
        model(torch.randn(5, 6))
        model.double()  # a dtype move: the quantizer state stays float32 and works on float64
        x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
        model(x).sum().backward()
        assert x.grad.dtype == torch.float64 and torch.isfinite(x.grad).all()
        model.to(torch.bfloat16)
        y = model(torch.randn(5, 6, dtype=torch.bfloat16))
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        model.float()
        model.to("meta")  # a device move: the quantizer state follows the parameters
        out = model(torch.randn(5, 6, device="meta"))
        assert out.device.type == "meta" and out.shape == (5, 3)
        site = ctl.backend.sites["0"]
        assert {site.train.weight.p.device.type, site.train.activation.range.device.type,
                site.eval.activation.range.device.type} == {"meta"}
        assert site.eval.activation.range is site.train.activation.range
    assert _is_plain(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_move_to_cuda_inside() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=8), optimizer=opt,
                            classifier_floor=False) as ctl:
        _train_step(model, opt, _data()[0])
        model.cuda()
        x, y = (t.cuda() for t in _data()[1])
        _train_step(model, opt, (x, y))
        assert all(p.is_cuda and torch.isfinite(p).all() for p in model.parameters())
    assert ctl.step_count == 2 and ctl.report()["gmacs"] > 0


# --- dtypes --------------------------------------------------------------------------------------------

def _error_bias(dtype: torch.dtype, autocast: bool, draws: int = 300) -> float:
    """Mean of (quantized error - error) in grid steps, for an 8-bit stochastic error quantizer."""
    n = 32
    layer = nn.Linear(n, n, bias=False)
    if not autocast:
        layer = layer.to(dtype)
    g = torch.Generator().manual_seed(3)
    err = (torch.randn(n, n, generator=g) * 1e-3 + 5e-3).to(dtype)
    eye = torch.eye(n, dtype=torch.float32 if autocast else dtype)
    total = torch.zeros(n, n, dtype=torch.float64)
    pol = Fixed(bits=32, grad_bits=8)  # FP32 forward: the weight gradient is exactly the quantized error
    with adaprec.Controller(nn.Sequential(layer), policy=pol, classifier_floor=False):
        for _ in range(draws):
            layer.weight.grad = None
            with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                y = layer(eye)
            (y.to(dtype) * err).sum().backward()
            total += layer.weight.grad.t().double()
    step = (err.max() - err.min()).double() / 255
    return float(((total / draws - err.double()) / step).mean())


@pytest.mark.parametrize(("dtype", "autocast"),
                         [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)],
                         ids=["bf16", "bf16-autocast", "fp16"])
def test_stochastic_rounding_of_errors_is_unbiased_in_half_precision(dtype, autocast) -> None:
    assert abs(_error_bias(dtype, autocast)) < 0.03  # adaprec 0.1: +0.43 steps in bf16


def test_fp16_model_with_16_bit_formats_stays_finite() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).half()
    x = torch.randn(8, 16, dtype=torch.float16)
    plain = model(x)
    assert torch.isfinite(plain).all()
    with adaprec.Controller(model, policy=Fixed(bits=16, grad_bits=16), classifier_floor=False):
        y = model(x)
        y.float().sum().backward()
    assert torch.isfinite(y).all() and (y - plain).abs().max() < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- second-order gradients ----------------------------------------------------------------------------

def _penalty_grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    out = model(x).pow(2).sum()
    (gx,) = torch.autograd.grad(out, x, create_graph=True)
    model.zero_grad()
    gx.pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_penalty_through_quantized_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(12, 6)
    want = _penalty_grads(model, x)
    with adaprec.Controller(model, policy=Fixed(bits=16, grad_bits=16), classifier_floor=False):
        got = _penalty_grads(model, x)
    for w, g in zip(want, got):
        assert g.abs().sum() > 0  # adaprec 0.1: exactly zero for some parameters
        assert torch.allclose(g, w, rtol=2e-2, atol=1e-4 * w.abs().max())


@pytest.mark.parametrize("route", ["fp8", "int8"])
def test_hardware_routes_refuse_higher_order_gradients(route: str) -> None:
    from adaprec.quant.hardware import hardware_precision

    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 16))
    with adaprec.Controller(model, policy=Fixed(bits="fp32"), backend="hardware",
                            classifier_floor=False) as ctl:
        ctl.backend.apply({"0": hardware_precision(route), "2": Precision.fp32()})
        with pytest.raises(RuntimeError, match=f"hardware '{route}' route does not support higher-order"):
            _penalty_grads(model, torch.randn(32, 32))


# --- early exits ---------------------------------------------------------------------------------------

def test_break_out_of_an_epoch_ends_it() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = _data(6)
    ends = []
    # MuPPET moves up one level at every epoch end here: it must see the ends of epochs left by break.
    pol = MuPPET(levels=(6, 8, 12, "fp32"), max_epochs_per_level=1)
    with adaprec.Controller(model, policy=pol, optimizer=opt, classifier_floor=False) as ctl:
        ctl.on(adaprec.Event.EPOCH_COMPLETED, lambda c, **d: ends.append(d))
        for _ in range(3):
            for i, batch in enumerate(ctl.epoch(data)):
                _train_step(model, opt, batch)
                if i == 2:
                    break
        assert ctl.epoch_index == 3
        with pytest.raises(KeyError):  # an exception in the loop body ends the epoch too
            for batch in ctl.epoch(data):
                _train_step(model, opt, batch)
                raise KeyError("boom")
        assert ctl.epoch_index == 4
    assert [(d["epoch"], d["batches"]) for d in ends] == [(0, 3), (1, 3), (2, 3), (3, 1)]
    assert [h.summary() for h in ctl.history] == ["fx6/fx6", "fx8/fx8", "fx12/fx12", "fp32/fp32"]
    assert len(pol.switches) == 3  # adaprec 0.1: no epoch ever ended, MuPPET never switched


def test_an_epoch_loop_kept_alive_is_ended_with_a_warning() -> None:
    model = _mlp()
    with adaprec.Controller(model, policy="fixed") as ctl:
        it = ctl.epoch(_data())
        next(it)
        ctl.step()
        with pytest.warns(UserWarning, match="epoch 0 was still open"):
            ctl.begin_epoch()
        assert ctl.epoch_index == 1
        ctl.end_epoch()
        del it  # dropping the old loop later changes nothing
        assert ctl.epoch_index == 2


def _muppet_run(stop_epoch: int | None, ckpt: dict | None, epochs: int = 7):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    # Diversity checks every 2 epochs, and a forced move up after 2 epochs at one level: the end of
    # epoch 3 (where the checkpoint is taken, on its last batch) switches.
    pol = MuPPET(levels=(5, 6, 8, 10, 12, "fp32"), resolution=2, patience=1, alpha=1.0, beta=0.0,
                 max_epochs_per_level=2)
    data = _data(3, seed=1)
    saved = None
    with adaprec.Controller(model, policy=pol, optimizer=opt, classifier_floor=False) as ctl:
        first = 0
        if ckpt is not None:
            ctl.load_state_dict(ckpt["ctl"])
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            first = ctl.epoch_index
        for epoch in range(first, epochs):  # 7 epochs: level moves at the ends of epochs 1, 3, 5
            for i, batch in enumerate(ctl.epoch(data)):
                _train_step(model, opt, batch)
                if epoch == stop_epoch and i == len(data) - 1:  # the epoch's last batch
                    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                           "ctl": ctl.state_dict()})
            if saved is not None:
                break
    return model, ctl, saved


def test_checkpoint_on_an_epochs_last_batch_resumes_bitwise() -> None:
    full_model, full, _ = _muppet_run(None, None)
    _, first, ckpt = _muppet_run(3, None)
    assert ckpt["ctl"]["epoch"] == 4  # the epoch's end is part of the checkpoint
    torch.manual_seed(12345)  # whatever happened to the RNG since must not matter
    model, resumed, _ = _muppet_run(None, ckpt)
    assert resumed.history == full.history and resumed.step_count == full.step_count
    switches = [h.step for h in full.history[1:]]
    assert switches == [6, 12, 18]  # before the stop, at it, after it
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


# --- activation checkpointing --------------------------------------------------------------------------

class _Checkpointed(nn.Module):
    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        self.mode = mode

    def forward(self, x):
        if self.mode is None:
            h = self.body(x)
        else:
            h = checkpoint(self.body, x, use_reentrant=self.mode == "reentrant")
        return self.head(h)


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_activation_checkpointing_counts_once(mode: str) -> None:
    results = []
    for m in (None, mode):
        torch.manual_seed(0)
        model = _Checkpointed(m)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(5, 6, requires_grad=True)  # reentrant checkpoint needs an input with grad
        with adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=8), optimizer=opt,
                                classifier_floor=False) as ctl:
            for step in range(3):
                torch.manual_seed(step)
                loss = model(x * (step + 1)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            ranges = {n: s.train.activation.range.clone() for n, s in ctl.backend.sites.items()}
        results.append((ctl.report()["gmacs"], ranges, [p.detach().clone() for p in model.parameters()]))
    (macs, ranges, params), (macs_c, ranges_c, params_c) = results
    assert macs_c == macs  # adaprec 0.1: the recompute counted the body's MACs twice
    for n in ranges:
        assert torch.equal(ranges_c[n], ranges[n]), n  # ... and folded its range in twice
    for a, b in zip(params, params_c):
        assert torch.allclose(a, b, atol=1e-6)


# --- constructor arguments and state versions ----------------------------------------------------------

def _untouched(model: nn.Module) -> bool:
    return _is_plain(model)


@pytest.mark.parametrize(("constraint", "match"), [
    (Floor("fc9", 8),
     r"Floor\('fc9', 8\): 'fc9' matches no quantized layer; the quantized layers are \['0', '2'\]"),
    (Floor(["first", "conv*"], 8), r"'conv\*' matches no quantized layer"),
    (Pin("9", Precision.fp32()), r"Pin\('9'\): '9' matches no quantized layer"),
], ids=["floor-name", "floor-pattern", "pin"])
def test_constraints_naming_missing_layers_are_refused(constraint, match: str) -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=match):
        adaprec.Controller(model, policy="fixed", constraints=[constraint])
    assert _untouched(model)


def test_classifier_floor_naming_a_missing_layer_is_refused_up_front() -> None:
    model = _mlp()
    with pytest.raises(ValueError, match=r"ClassifierFloor: 'fc' is not a quantized layer"):
        adaprec.Controller(model, classifier_floor=ClassifierFloor("fc"))
    with pytest.raises(ValueError, match=r"'2' is not a quantized layer.*\['0'\]"):
        adaprec.Controller(model, layers=["0"], classifier_floor=ClassifierFloor("2"))
    with pytest.raises(TypeError, match="Floor: layers must be a layer name"):
        Floor(3, 8)


def test_reference_as_a_format_name_and_bad_references() -> None:
    model = _mlp()
    with adaprec.Controller(model, policy="fixed", reference="int8") as ctl:
        model(torch.randn(2, 6)).sum().backward()
        ctl.step()
    r = ctl.report()
    assert r["reference"] == "int8/int8" and r["gbitops_reference"] > 0  # adaprec 0.1: AttributeError here
    assert ctl.reference == Precision.uniform("int8") == Precision.cpt(8, 8)
    with adaprec.Controller(model, reference=FloatFormat("bf16")) as ctl:
        pass
    assert ctl.report()["reference"] == "bf16/bf16"
    for bad in ("int99", object(), 3.5):
        with pytest.raises(ValueError, match="reference= must be an adaprec.Precision or a format spec"):
            adaprec.Controller(model, reference=bad)
    assert _untouched(model)


@pytest.mark.parametrize(("state", "exc", "match"), [
    ({"version": 1}, ValueError, r"incomplete adaprec Controller state_dict \(version 1\): missing "
                                 r"\['layer_names', 'step'"),
    ({"version": 2}, ValueError, "state_dict version 2 found; this adaprec reads version 1"),
    ({"0.weight": torch.zeros(1)}, ValueError, "no 'version' key"),
    ([1, 2], TypeError, "takes the dict from ctl.state_dict"),
], ids=["version-only", "future-version", "model-state", "list"])
def test_bad_controller_states_are_named(state, exc, match: str) -> None:
    model = _mlp()
    with adaprec.Controller(model, policy="fixed") as ctl:
        before = ctl.state_dict()
        with pytest.raises(exc, match=match):
            ctl.load_state_dict(state)
        assert ctl.step_count == 0 and ctl.history == before["history"]
    with pytest.raises(exc, match=match):  # before the start as well
        adaprec.Controller(model, policy="fixed").load_state_dict(state)


@pytest.mark.parametrize(("kwargs", "exc", "match"), [
    (dict(logdir=3), TypeError, "logdir must be a path"),
    (dict(sync_stats="yes"), TypeError, "sync_stats must be True or False"),
    (dict(scaler=object()), ValueError, "scaler= needs optimizer="),
    (dict(layers=["0"], filter_fn=lambda m, n: True), ValueError, "not both"),
    (dict(filter_fn="0"), TypeError, "filter_fn= takes a callable"),
], ids=["logdir", "sync_stats", "scaler-without-optimizer", "layers-and-filter_fn", "filter_fn-type"])
def test_more_constructor_arguments_checked_up_front(kwargs: dict, exc: type, match: str) -> None:
    model = _mlp()
    with pytest.raises(exc, match=match):
        adaprec.Controller(model, **kwargs)
    assert _untouched(model)


def test_functools_partial_forward_is_not_a_problem() -> None:
    # The shape accelerate uses: functools.partial(new_forward, module) on the instance.
    model = _mlp()
    layer = model[0]
    layer._old_forward = layer.forward
    layer.forward = functools.partial(lambda mod, x: mod._old_forward(x) + 1.0, layer)
    x = torch.randn(3, 6)
    with adaprec.Controller(model, policy=Fixed(bits=2), classifier_floor=False):
        inside = layer(x)
    xq, wq = IntFormat(2).quantize(x), IntFormat(2, per_channel=True).quantize(layer.weight.detach())
    assert torch.equal(inside, F.linear(xq, wq, layer.bias) + 1.0)


# --- other libraries' class and attribute tricks on a layer --------------------------------------------

def test_parametrizations_before_and_inside_the_block() -> None:
    from torch.nn.utils import parametrizations, parametrize

    model = _mlp()
    parametrizations.weight_norm(model[0])  # before: a parametrized class under adaprec's
    keys = list(model.state_dict())
    x = torch.randn(5, 6)
    with adaprec.Controller(model, policy=Fixed(bits=3), classifier_floor=False):
        assert list(model.state_dict()) == keys
        w = model[0].weight  # outside the forward: the parametrization's value
        wq = IntFormat(3, per_channel=True).quantize(w.detach())
        h = model[0](x)
        assert torch.equal(h, F.linear(IntFormat(3).quantize(x), wq, model[0].bias))
        parametrize.register_parametrization(model[2], "weight", nn.Identity())  # inside the block
        hq = IntFormat(3).quantize(F.relu(h))
        assert torch.equal(model[2](F.relu(h)), F.linear(hq, model[2].weight, model[2].bias))  # FP32 weight
        model(x).sum().backward()
        assert model[0].parametrizations.weight.original0.grad is not None
    assert type(model[0]).__name__ == "ParametrizedLinear" and type(model[0]).__bases__ == (nn.Linear,)
    assert type(model[2]).__bases__ == (nn.Linear,)
    assert not any(k.startswith("_adaprec") for m in model.modules() for k in vars(m))
    assert torch.equal(model[0](x), F.linear(x, model[0].weight, model[0].bias))


def test_old_weight_norm_hook_before_the_block() -> None:
    import warnings

    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still used
        nn.utils.weight_norm(model[0])  # keeps the computed weight as a plain attribute
    x = torch.randn(5, 6)
    with adaprec.Controller(model, policy=Fixed(bits=3), classifier_floor=False):
        y = model[0](x)
        w = model[0].weight
        wq = IntFormat(3, per_channel=True).quantize(w.detach())
        assert torch.equal(y, F.linear(IntFormat(3).quantize(x), wq, model[0].bias))
        model(x).sum().backward()
        assert model[0].weight_v.grad is not None
    assert torch.equal(model[0](x), F.linear(x, model[0].weight, model[0].bias))
    nn.utils.remove_weight_norm(model[0])
    assert isinstance(model[0].weight, nn.Parameter)
