"""The simulated backend: what each quantization site does to forward values and backward errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.decision import Decision
from adaprec.formats import FP32, IntFormat, Precision
from adaprec.formats.integer import int_quantize
from adaprec.policies import Fixed, Policy
from adaprec.quant import find_layers

GRAD_ONLY = Precision(FP32(), FP32(), IntFormat(2, rounding="stochastic"))


def _on_grid(v: torch.Tensor, levels: int) -> bool:
    """Whether ``v`` lies on the min-max grid of ``levels`` levels spanned by its own min and max."""
    lo, hi = v.min(), v.max()
    k = (v - lo) / ((hi - lo) / (levels - 1))
    return bool(torch.allclose(k, k.round(), atol=1e-3)) and v.unique().numel() <= levels


# --- gradients really are quantized ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_weight_gradient_comes_from_error_on_the_grid(kind: str) -> None:
    # With an identity input the weight gradient *is* the error the layer received (W.grad = E^T X).
    n = 16
    if kind == "linear":
        layer, x = nn.Linear(n, n, bias=False), torch.eye(n)
    else:
        layer, x = nn.Conv2d(n, n, 1, bias=False), torch.eye(n).view(n, n, 1, 1)
    model = nn.Sequential(layer)
    err = torch.randn(n, n)
    # classifier_floor=False: a lone Linear would count as a classifier and keep >= 7 bits.
    with adaprec.Controller(model, policy=Fixed(bits=8, grad_bits=3), classifier_floor=False):
        y = model(x.requires_grad_()).view(n, n)
        (y * err).sum().backward()
        seen = layer.weight.grad.view(n, n).t()
        assert _on_grid(seen, 8)
        assert not _on_grid(err, 8)
        assert (seen - err).abs().max() <= (err.max() - err.min()) / 7 + 1e-6  # one grid step at most
        # The same quantized error feeds the input gradient, through the quantized weight.
        wq = IntFormat(8, per_channel=True).quantize(layer.weight.detach()).view(n, n)
        assert torch.allclose(x.grad.view(n, n), seen @ wq, atol=1e-5)


def test_error_quantization_is_unbiased() -> None:
    n, draws = 8, 200
    layer = nn.Linear(n, n, bias=False)
    err = torch.randn(n, n)
    acc = torch.zeros(n, n)
    with adaprec.Controller(nn.Sequential(layer), policy=Fixed(bits=8, grad_bits=2), classifier_floor=False):
        for _ in range(draws):
            layer.weight.grad = None
            (layer(torch.eye(n)) * err).sum().backward()
            acc += layer.weight.grad.t()
    step = (err.max() - err.min()) / 3
    assert (acc / draws - err).abs().max() < 5 * step / draws**0.5  # a 4-level grid, yet mean ~ exact


def _layer_case(kind: str):
    """A module, its inputs, and a function giving its output sequence/tensor."""
    if kind == "mha":
        m = nn.MultiheadAttention(8, 2, batch_first=True)
        q, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
        return m, (q, kv, kv), lambda out: out[0]
    m = nn.Conv1d(3, 5, 3)
    return m, (torch.randn(2, 3, 9),), lambda out: out


@pytest.mark.parametrize("kind", ["mha", "conv1d"])
def test_error_at_layer_output_is_quantized(kind: str) -> None:
    """Inside: error quantized in the backward. Outside: quantize the same error by hand, same RNG.
    (LSTM/GRU/RNN quantize the errors at their products inside the recurrence: tests/test_rnn.py.)"""
    torch.manual_seed(1)
    module, inputs, out_of = _layer_case(kind)
    plain = [t.clone().requires_grad_() for t in inputs]
    inside = [t.clone().requires_grad_() for t in inputs]
    y_plain = out_of(module(*plain))
    err = torch.randn_like(y_plain)
    torch.manual_seed(2)
    y_plain.backward(IntFormat(2, rounding="stochastic").quantize(err))
    want = [t.grad for t in plain] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    policy = adaprec.policies.Fixed(bits="fp32", grad_bits=GRAD_ONLY.gradient)
    with adaprec.Controller(module, policy=policy, classifier_floor=False):
        y = out_of(module(*inside))
        assert torch.equal(y, y_plain)  # forward untouched at FP32 weights and activations
        torch.manual_seed(2)
        y.backward(err)
    got = [t.grad for t in inside] + [p.grad for p in module.parameters()]
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # And it really changed something: the plain backward of the raw error differs.
    for t in plain:
        t.grad = None
    out_of(module(*plain)).backward(err)
    assert not torch.equal(plain[0].grad, want[0])


# --- forward: weights and activations --------------------------------------------------------------

def test_linear_forward_uses_quantized_operands_with_ste() -> None:
    lin = nn.Linear(6, 4)
    x = torch.randn(5, 6)
    with adaprec.Controller(nn.Sequential(lin), policy=Fixed(bits=3, grad_bits=32), classifier_floor=False):
        y = lin(x)
        xq, wq = IntFormat(3).quantize(x), IntFormat(3, per_channel=True).quantize(lin.weight.detach())
        assert torch.equal(y, F.linear(xq, wq, lin.bias))
        err = torch.randn(5, 4)
        y.backward(err)
        # Straight-through: the FP32 master weight gets dL/dW_q, computed with the quantized input.
        assert torch.allclose(lin.weight.grad, err.t() @ xq, atol=1e-6)
        assert torch.allclose(lin.bias.grad, err.sum(0))


def test_conv_forward_uses_quantized_operands() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1, groups=1)
    x = torch.randn(2, 2, 5, 5)
    with adaprec.Controller(nn.Sequential(conv), policy=Fixed(bits=4)):
        y = conv(x)
        wq = IntFormat(4, per_channel=True).quantize(conv.weight.detach())
        assert torch.equal(y, F.conv2d(IntFormat(4).quantize(x), wq, conv.bias, padding=1))
        assert conv(x).requires_grad


def test_eval_uses_running_activation_range() -> None:
    lin = nn.Linear(3, 2)
    a, b = torch.randn(4, 3), torch.randn(4, 3) * 5
    x = torch.randn(4, 3) * 2
    model = nn.Sequential(lin)
    with adaprec.Controller(model, policy=Fixed(bits=3), classifier_floor=False) as ctl:
        model.eval()
        wq = IntFormat(3, per_channel=True).quantize(lin.weight.detach())
        # No training forward yet: eval falls back to the batch range.
        assert torch.equal(model(x), F.linear(IntFormat(3).quantize(x), wq, lin.bias))
        model.train()
        model(a)
        model(b)
        ema = 0.9 * torch.stack(torch.aminmax(a)) + 0.1 * torch.stack(torch.aminmax(b))
        assert torch.allclose(ctl.backend.sites["0"].train.activation.range, ema)
        model.eval()
        p = torch.tensor([7.0, 0.0, 0.0])
        want = F.linear(int_quantize(x, p, lo=ema[0], hi=ema[1]), wq, lin.bias)
        assert torch.allclose(model(x), want, atol=1e-6)


def test_policy_eval_decision_applies_in_eval_mode() -> None:
    class FP32Eval(Policy):
        name = "fp32-eval"

        def decide(self, ctl):
            return Decision.uniform(Precision.cpt(2, 8))

        def eval_decision(self, ctl):
            return Decision.uniform(Precision.fp32())

    model = nn.Sequential(nn.Linear(5, 3))
    x = torch.randn(4, 5)
    plain = model(x)
    with adaprec.Controller(model, policy=FP32Eval()):
        assert not torch.equal(model(x), plain)
        model.eval()
        assert torch.equal(model(x), plain)


def test_bits_change_in_place() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with adaprec.Controller(model, policy=Fixed(bits=4), classifier_floor=False) as ctl:
        q = ctl.backend.sites["0"].train.weight
        p_obj = q.p
        ctl.step()
        ctl.policy._decision = Decision.uniform(Precision.cpt(6, 8))
        ctl.refresh()
        assert q.p is p_obj and q.p[0].item() == 63.0
        assert [(h.step, h.summary()) for h in ctl.history] == [(0, "int4/int4"), (1, "int6/int8")]


# --- regressions: layer kinds and calling conventions ----------------------------------------------

def test_conv_followed_by_inplace_relu_trains() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(27, 2),
                          nn.ReLU(inplace=True))
    with adaprec.Controller(model, policy="fixed"):
        model(torch.randn(2, 1, 5, 5)).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_lstm_accepts_packed_sequences() -> None:
    lstm = nn.LSTM(4, 5)
    packed = nn.utils.rnn.pack_sequence([torch.randn(6, 4), torch.randn(3, 4)])
    with adaprec.Controller(lstm, policy=Fixed(bits=4)) as ctl:
        out, _ = lstm(packed)
        assert isinstance(out, nn.utils.rnn.PackedSequence)
        out.data.sum().backward()
        ctl.step()
    assert lstm.weight_ih_l0.grad is not None
    assert ctl.report()["gmacs"] * 1e9 == pytest.approx(9 * (4 * 5 * 4 + 4 * 5 * 5))  # 9 tokens


def test_transformer_eval_fast_path_is_quantized_too() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        plain = enc(x)
    assert torch.backends.mha.get_fastpath_enabled()
    with adaprec.Controller(enc, policy=Fixed(bits=2)):
        with torch.no_grad():
            fast = enc(x)  # eligible for the fused C++ path, which would skip quantization
        slow = enc(x)
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting is back
    assert torch.allclose(fast, slow, atol=1e-5) and not torch.allclose(fast, plain, atol=1e-2)


def test_mha_out_proj_is_part_of_attention() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16))
    names = [n for n, _ in find_layers(model)]
    assert names == ["0", "1.self_attn", "1.linear1", "1.linear2"]


def test_subclass_forwards_are_quantized_where_they_read_the_weight() -> None:
    # A subclass with its own forward (weight standardisation, LoRA...) computes with the quantized
    # weight and input wherever it reads them; outside its forward it sees the FP32 parameter.
    class Standardised(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
            return self._conv_forward(x, w, self.bias)

    class Plain(nn.Linear):  # inherits torch's forward
        pass

    model = nn.Sequential(Standardised(1, 2, 3), nn.Flatten(), Plain(18, 2))
    x = torch.randn(1, 1, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctl = adaprec.Controller(model, policy=Fixed(bits=4), classifier_floor=False)
    assert ctl.layer_names == ["0", "2"]
    conv = model[0]
    with ctl:
        assert conv.weight is conv._parameters["weight"]  # outside the forward: the parameter
        wq = IntFormat(4, per_channel=True).quantize(conv.weight.detach())
        w = (wq - wq.mean()) / (wq.std() + 1e-5)
        assert torch.equal(conv(x), conv._conv_forward(IntFormat(4).quantize(x), w, conv.bias))


def test_layer_filter_forms() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1), nn.Flatten(), nn.Linear(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [n for n, _ in find_layers(model)] == ["0", "1", "3"]
    assert [n for n, _ in find_layers(model, ["1", "3"])] == ["1", "3"]
    assert [n for n, _ in find_layers(model, "!3")] == ["0", "1"]
    assert [n for n, _ in find_layers(model, ["?", "!0"])] == ["1", "3"]
    assert [n for n, _ in find_layers(model, lambda n, m: isinstance(m, nn.Conv2d))] == ["0", "1"]
    with pytest.raises(ValueError, match="empty list would select no layer"):
        find_layers(model, [])
    with pytest.raises(TypeError, match="list of name patterns"):
        find_layers(model, 3)
    with pytest.raises(TypeError, match="list of name patterns"):
        find_layers(model, ["0", 1])


def test_bits_changed_between_forward_and_backward() -> None:
    # E.g. a policy reacting to ctl.observe(loss=loss) called before loss.backward().
    n = 16
    layer = nn.Linear(n, n, bias=False)
    pol = Fixed(bits=8, grad_bits=3)
    with adaprec.Controller(nn.Sequential(layer), policy=pol, classifier_floor=False) as ctl:
        y = layer(torch.eye(n))
        pol._decision = Decision.uniform(Precision.cpt(8, 12))
        ctl.refresh()
        (y * torch.randn(n, n)).sum().backward()  # no "modified by an inplace operation"
        assert _on_grid(layer.weight.grad, 8)  # the error format of the forward it belongs to
        assert ctl.current["0"].gradient.bits == 12
