"""DESIGN.md contracts 1 (exact restore), 2 (invisible to checkpoints), 3 (no recompiles) and 5 (loud on
bad input, nothing lost), on real model families: torchvision ResNet-18 and MobileNetV3-small, a
Transformer encoder and an LSTM language model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.decision import Decision
from adaprec.formats import Precision
from adaprec.policies import Fixed, Policy

torchvision = pytest.importorskip("torchvision")

VOCAB = 20


class TinyTransformerLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(tokens)))


class TinyLSTMLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 12)
        self.rnn = nn.LSTM(12, 16, num_layers=2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(tokens))[0])


def _vision(name: str):
    def build():
        model = getattr(torchvision.models, name)(num_classes=10)
        data = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(4)]
        return model, data
    return build


def _lm(cls):
    def build():
        data = [(t[:, :-1], t[:, 1:]) for t in (torch.randint(0, VOCAB, (2, 7)) for _ in range(4))]
        return cls(), data
    return build


MODELS = {
    "resnet18": _vision("resnet18"),
    "mobilenet_v3_small": _vision("mobilenet_v3_small"),
    "transformer": _lm(TinyTransformerLM),
    "lstm_lm": _lm(TinyLSTMLM),
}


def _loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _train(model: nn.Module, opt: torch.optim.Optimizer, data, seed: int = 100) -> None:
    model.train()
    for i, batch in enumerate(data):
        torch.manual_seed(seed + i)  # dropout draws the same masks in both runs
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def _plain_attrs(m: nn.Module) -> dict:
    return {k: v for k, v in vars(m).items() if isinstance(v, int | float | str | bool | tuple | type(None))}


def _global_hooks() -> dict:
    mod = torch.nn.modules.module
    return {k: len(v) for k, v in vars(mod).items() if k.startswith("_global") and hasattr(v, "__len__")}


def _snapshot(model: nn.Module) -> dict:
    """Everything about a model that a controller could leave behind, by identity and by value."""
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, id(b)) for n, b in model.named_buffers()],
        "attr_names": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "plain_attrs": {n: _plain_attrs(m) for n, m in model.named_modules()},
        "hooks": {n: {k: len(v) for k, v in vars(m).items() if "hook" in k and hasattr(v, "__len__")}
                  for n, m in model.named_modules()},
        "rnn_weights": {n: [id(w) for w in m._flat_weights] for n, m in model.named_modules()
                        if isinstance(m, nn.RNNBase)},
        "keys": list(model.state_dict()),
        "training": [m.training for m in model.modules()],
        "global_hooks": _global_hooks(),
        "mha_fastpath": torch.backends.mha.get_fastpath_enabled(),
    }


def _values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_values(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_behaviour(model: nn.Module, twin: nn.Module, batch) -> None:
    """Bitwise-equal outputs (eval and train mode) and gradients for the same input and RNG."""
    for training in (False, True):
        model.train(training)
        twin.train(training)
        outs = []
        for m in (model, twin):
            m.zero_grad()
            torch.manual_seed(7)
            loss = _loss(m, batch)
            loss.backward()
            outs.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
        assert torch.equal(outs[0][0], outs[1][0])
        assert len(outs[0][1]) == len(outs[1][1])
        for ga, gb in zip(outs[0][1], outs[1][1]):
            assert torch.equal(ga, gb)


# --- contract 1 and 2 ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_policy_trains_bitwise_like_plain_pytorch(name: str) -> None:
    model, data = MODELS[name]()
    twin = copy.deepcopy(model)
    opt, opt_twin = _sgd(model), _sgd(twin)
    with adaprec.Controller(model, policy="fp32", optimizer=opt) as ctl:
        _train(model, opt, data)
    _train(twin, opt_twin, data)
    assert ctl.step_count == len(data)
    _assert_same_values(_values(model), _values(twin))
    _assert_same_behaviour(model, twin, data[0])


@pytest.mark.parametrize("exit_by", ["normal", "exception"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exact_restore_and_checkpoints(name: str, exit_by: str) -> None:
    model, data = MODELS[name]()
    before = _snapshot(model)
    keys = list(model.state_dict())
    twin = copy.deepcopy(model)  # the plain architecture, to compare behaviour after leaving
    opt = _sgd(model)
    ctl = adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=8), optimizer=opt)

    def run() -> bytes:
        with ctl:
            _train(model, opt, data[:2])
            # Contract 2: same keys inside; a checkpoint taken now loads into the plain model.
            assert list(model.state_dict()) == keys
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            model.load_state_dict(model.state_dict())  # and loading works while inside
            if exit_by == "exception":
                raise KeyboardInterrupt  # the harshest way out of a training loop
            return buf.getvalue()

    if exit_by == "exception":
        with pytest.raises(KeyboardInterrupt):
            run()
    else:
        ckpt = run()
        plain = copy.deepcopy(twin)
        plain.load_state_dict(torch.load(io.BytesIO(ckpt)), strict=True)
        _assert_same_values(_values(plain), _values(model))
    assert ctl.step_count == 2
    after = _snapshot(model)
    for k in before:
        assert after[k] == before[k], k
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert "step" not in vars(opt)
    # Same behaviour as the plain architecture carrying the same weights, and identical training on.
    twin.load_state_dict(model.state_dict())
    _assert_same_behaviour(model, twin, data[2])
    opt_twin = _sgd(twin)
    opt_twin.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares the buffers
    _train(model, opt, data[2:])
    _train(twin, opt_twin, data[2:])
    _assert_same_values(_values(model), _values(twin))


# --- contract 3 ------------------------------------------------------------------------------------

class _Cycling(Policy):
    """A different bit-width (and backward width) every iteration."""

    name = "cycling"

    def decide(self, ctl):
        return Decision.uniform(Precision.cpt(2 + ctl.step_count % 7, 8 - ctl.step_count % 3))


def test_no_recompilation_when_bits_change_every_step() -> None:
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xs = [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))) for _ in range(23)]
    with adaprec.Controller(model, policy=_Cycling(), optimizer=opt) as ctl:
        compiled = torch.compile(model)

        def step(x, y):
            loss = F.cross_entropy(compiled(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for x, y in xs[:3]:  # warm-up: compile the forward and backward once
            step(x, y)
        with torch.compiler.set_stance("fail_on_recompile"):
            for x, y in xs[3:]:
                step(x, y)
            # The compiled program reads the bits from tensors: it quantizes like eager at every width.
            outs = []
            for _ in range(3):
                opt.zero_grad()
                opt.step()  # no gradients: only advances the controller to the next bit-width
                outs.append(compiled(xs[0][0]).detach())
                assert torch.allclose(outs[-1], model(xs[0][0]), rtol=0, atol=1e-5)  # fused, not bitwise
            assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[1] - outs[2]).abs().max() > 1e-3
    assert ctl.step_count == 26
    assert len({h.summary() for h in ctl.history}) >= 15  # bits really did change


# --- contract 5 ------------------------------------------------------------------------------------

class _NeedsSteps(Fixed):
    name = "needs-steps"
    needs_total_steps = True


class _FailsOnAttach(Fixed):
    def attach(self, ctl):
        super().attach(ctl)
        raise RuntimeError("policy attach failed")


_OTHER = nn.Linear(2, 2)

# (case, Controller keyword arguments, error type, message pattern); "{recipe}" is a recipe asking 0 bits.
BAD_INPUTS = [
    ("unknown policy", dict(policy="cptt"), ValueError, r"unknown policy 'cptt'; known policies: \["),
    ("impossible bits", dict(policy="{recipe}"), ValueError, r"bits must be an integer in 1\.\.32"),
    ("policy of wrong type", dict(policy=3.5), TypeError, "policy must be a name"),
    ("needs total_steps", dict(policy=_NeedsSteps()), ValueError, "needs total_steps="),
    ("total_steps zero", dict(total_steps=0), ValueError, "positive integer"),
    ("total_steps float", dict(total_steps=10.0), ValueError, "positive integer"),
    ("total_steps bool", dict(total_steps=True), ValueError, "positive integer"),
    ("optimizer wrong type", dict(optimizer="sgd"), TypeError, "torch.optim.Optimizer"),
    ("optimizer of another model", dict(optimizer=torch.optim.SGD(_OTHER.parameters(), lr=0.1)),
     ValueError, "none of the optimizer's parameters"),
    ("constraint not callable", dict(constraints=[42]), TypeError, "constraints must be callables"),
    ("constraints as a string", dict(constraints="first"), TypeError, "list of callables"),
    ("layer filter matches nothing", dict(layers=["nope*"]), ValueError, "no quantizable layers matching"),
    ("layer filter wrong type", dict(layers=7), TypeError, "layers= takes"),
    ("unknown backend", dict(backend="fpga"), ValueError, r"unknown backend 'fpga'; known"),
    ("guard wrong type", dict(guard="yes"), TypeError, "guard must be"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_loud_and_leaves_the_model_alone(kwargs: dict, exc: type, match: str, tmp_path) -> None:
    if kwargs.get("policy") == "{recipe}":
        recipe = tmp_path / "zero-bits.toml"
        recipe.write_text('policy = "fixed"\n[params]\nbits = 0\n')
        kwargs = {**kwargs, "policy": str(recipe)}
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 2))
    before, values = _snapshot(model), _values(model)
    with pytest.raises(exc, match=match):
        adaprec.Controller(model, **kwargs)
    assert _snapshot(model) == before
    _assert_same_values(_values(model), values)


def test_no_quantizable_layers() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.ReLU())
    with pytest.raises(ValueError, match=r"no quantizable layers; adaprec quantizes .*Conv2d.*Linear"):
        adaprec.Controller(model)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        adaprec.Controller(lambda x: x)


def test_already_compiled_model_is_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3))
    compiled = torch.compile(model)  # lazy: nothing is traced until it is called
    before = _snapshot(model)  # (torch.compile itself marks the module it wraps)
    with pytest.raises(ValueError, match="already torch.compile-d; enter the Controller with the plain"):
        adaprec.Controller(compiled)
    assert _snapshot(model) == before


def test_second_controller_on_the_same_model(tiny_cnn: nn.Module) -> None:
    before = _snapshot(tiny_cnn)
    x = torch.randn(2, 1, 8, 8)
    with adaprec.Controller(tiny_cnn, policy=Fixed(bits=3)) as first:
        inside = tiny_cnn(x)
        with pytest.raises(RuntimeError, match="already active on this model"):
            with adaprec.Controller(tiny_cnn, policy="fp32"):
                pass
        # A controller on a part of the model is refused too.
        with pytest.raises(RuntimeError, match=r"layers \[''\] are already quantized"):
            with adaprec.Controller(tiny_cnn[3], policy="fp32"):
                pass
        assert torch.equal(tiny_cnn(x), inside)  # the first one still works, untouched
        first.step()
    assert _snapshot(tiny_cnn) == before
    with adaprec.Controller(tiny_cnn, policy="fp32"):  # free again after leaving
        pass


def test_failures_while_entering_leave_nothing_behind(tiny_cnn: nn.Module) -> None:
    opt = torch.optim.SGD(tiny_cnn.parameters(), lr=0.1)
    before = _snapshot(tiny_cnn)

    class BadDecision(Policy):
        name = "bad"

        def decide(self, ctl):
            return {"0": Precision.cpt(4, 8)}

    for pol, exc, match in [(BadDecision(), TypeError, "expected an adaprec.Decision"),
                            (_FailsOnAttach(), RuntimeError, "policy attach failed")]:
        with pytest.raises(exc, match=match), adaprec.Controller(tiny_cnn, policy=pol, optimizer=opt):
            pass
        assert _snapshot(tiny_cnn) == before
        assert not opt._optimizer_step_pre_hooks and "step" not in vars(opt)
