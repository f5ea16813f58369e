"""Numerics on half-precision dtypes (issue 15, item 3): property tests (hypothesis) of the quantizers
on bf16 and fp16 tensors — the activations and weights of a bf16/fp16 model, and the errors of a
model under ``torch.autocast`` — and of whole layers under the controller.

* **Unbiased.** The quantizers compute in float32 and cast the result back to the tensor's dtype, so
  stochastic rounding of a half-precision value ``v`` is float32 stochastic rounding followed by that
  cast: its mean is ``p·D(b) + (1-p)·D(a)``, where ``a < b`` are the float32 grid neighbours of ``v``,
  ``p = (v - a)/(b - a)`` and ``D`` the cast. Nothing else may bias it (adaprec 0.1 rounded in bf16 and
  was off by ~0.4 grid steps).
* **No overflow.** Every format on finite bf16/fp16 tensors (from zeros up to fp16's largest finite
  value, and bf16 values up to 2^120) gives finite values of the same dtype, forward and backward; a
  layer under the controller is finite wherever the plain layer is.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import adaprec
from adaprec.formats import FLOAT_FORMATS, FP32, FixedPoint, FloatFormat, Format, IntFormat
from adaprec.policies import Fixed
from adaprec.quant.site import Quantizer

HALF = [torch.bfloat16, torch.float16]
STAT = settings(max_examples=25, deadline=None, derandomize=True)
FAST = settings(max_examples=40, deadline=None, derandomize=True)
N = 20_000


def _quantizer(fmt: Format) -> Quantizer:
    q = Quantizer(torch.device("cpu"))
    q.set(fmt)
    return q


def _error_of(q: Quantizer, g: torch.Tensor) -> torch.Tensor:
    """What the backward makes of the error ``g`` arriving at a layer output of ``g``'s dtype."""
    y = torch.zeros_like(g, requires_grad=True)
    q.grad(y).backward(g)
    return y.grad


def _formats(rounding: str) -> st.SearchStrategy[Format]:
    return st.one_of(
        st.builds(IntFormat, st.integers(1, 16), per_channel=st.booleans(), rounding=st.just(rounding)),
        st.builds(FixedPoint, st.integers(2, 24), rounding=st.just(rounding)),
        st.builds(FloatFormat, st.sampled_from(sorted(FLOAT_FORMATS)), rounding=st.just(rounding)),
        st.just(FP32()),
    )


def _check_mean(fmt: Format, dtype: torch.dtype, anchors: list[float], v: float, role: str) -> None:
    """Mean of N stochastic roundings of ``v`` (``anchors`` fix the grid) in ``dtype`` against the
    float32 rounding followed by the cast."""
    x = torch.cat([torch.tensor(anchors), torch.full((N,), v)])
    x = x.to(dtype)
    v = float(x[-1])  # v as the dtype holds it
    q = _quantizer(fmt)
    got = (q(x) if role == "forward" else _error_of(q, x))[len(anchors):]
    assert got.dtype == dtype and torch.isfinite(got).all()
    ref = (q(x.float()) if role == "forward" else _error_of(q, x.float()))[len(anchors):].double()
    a, b = ref.min().item(), ref.max().item()  # the float32 neighbours of v
    if b == a:  # v is (all but) on the grid: float32 rounding never left a in N draws
        da = torch.tensor(a, dtype=torch.float32).to(dtype)
        assert (got != da).sum().item() <= 10
        return
    p = (v - a) / (b - a)
    da, db = (float(torch.tensor(t, dtype=torch.float32).to(dtype)) for t in (a, b))
    want = p * db + (1 - p) * da
    sd = abs(db - da) * math.sqrt(max(p * (1 - p), 1 / N)) / math.sqrt(N)
    assert abs(got.double().mean().item() - want) <= 6 * sd + abs(db - da) * (2.0**-16 + 1e-5)


@STAT
@given(dtype=st.sampled_from(HALF), bits=st.integers(2, 10), lo=st.floats(-4, 0), span=st.floats(0.1, 8),
       u=st.floats(0, 1), role=st.sampled_from(["forward", "backward"]))
def test_int_stochastic_rounding_is_unbiased_in_half(dtype, bits, lo, span, u, role) -> None:
    _check_mean(IntFormat(bits, rounding="stochastic"), dtype, [lo, lo + span], lo + u * span, role)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(dtype=st.sampled_from(HALF), bits=st.integers(2, 10), seed=st.integers(0, 2**16),
       offset=st.floats(-8, 8), log_spread=st.integers(-6, 3), role=st.sampled_from(["forward", "backward"]))
def test_int_stochastic_rounding_of_whole_tensors_is_unbiased_in_half(dtype, bits, seed, offset, log_spread,
                                                                      role) -> None:
    # Many different values in one tensor, as a layer's error is: a narrow range away from zero, where
    # rounding inside the half-precision arithmetic (adaprec 0.1) biased the result by ~0.4 grid steps.
    g = torch.Generator().manual_seed(seed)
    spread = 2.0**log_spread
    x = ((torch.randn(256, generator=g) + offset) * spread).to(dtype)
    fmt = IntFormat(bits, rounding="stochastic")
    q = _quantizer(fmt)
    draws = 200
    got = torch.zeros(x.shape, dtype=torch.float64)
    for _ in range(draws):
        out = q(x) if role == "forward" else _error_of(q, x)
        assert out.dtype == dtype
        got += out.double()
    got /= draws
    # The float32 grid neighbours of every value, with the kernel's own float32 arithmetic.
    x32 = x.float()
    qmax = 2.0**bits - 1
    lo, hi = x32.min(), x32.max()
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    t = (x32 - lo) / scale
    k = t.floor().clamp(max=qmax)
    a, b = k * scale + lo, (k + 1).clamp(max=qmax) * scale + lo
    p = (t - k).double()
    da, db = a.to(dtype).double(), b.to(dtype).double()
    want = p * db + (1 - p) * da
    sd = ((db - da).abs() * (p * (1 - p)).sqrt() / math.sqrt(draws)).square().sum().sqrt() / x.numel()
    bias = (got - want).mean().abs().item()
    assert bias <= 6 * sd.item() + 2e-3 * scale.item(), (bias / scale.item(), sd.item() / scale.item())


@STAT
@given(dtype=st.sampled_from(HALF), bits=st.integers(3, 12), u=st.floats(-1, 1), log_scale=st.integers(-8, 8),
       role=st.sampled_from(["forward", "backward"]))
def test_fixed_point_stochastic_rounding_is_unbiased_in_half(dtype, bits, u, log_scale, role) -> None:
    m = 2.0**log_scale
    _check_mean(FixedPoint(bits, rounding="stochastic"), dtype, [-m, m], u * m, role)


@STAT
@given(dtype=st.sampled_from(HALF), name=st.sampled_from(["fp8_e4m3", "fp8_e5m2"]),
       mant=st.floats(1, 2, exclude_max=True), exp=st.integers(-6, 8), sign=st.sampled_from([-1.0, 1.0]),
       role=st.sampled_from(["forward", "backward"]))
def test_float_stochastic_rounding_is_unbiased_in_half(dtype, name, mant, exp, sign, role) -> None:
    _check_mean(FloatFormat(name, rounding="stochastic"), dtype, [], sign * mant * 2.0**exp, role)


def _extreme(dtype: torch.dtype, seed: int, scale_log2: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # fp16: up to its largest finite value. bf16 reaches float32's own range, where the min-max span
    # (hi - lo) of an integer grid overflows float32 arithmetic as it does for float32 tensors: up to 2^120.
    big = torch.finfo(dtype).max if dtype == torch.float16 else 2.0**120
    x = torch.randn(shape, generator=g) * 2.0**scale_log2
    x = x.clamp(-big, big).to(dtype)
    x.view(-1)[0] = big  # the largest finite value and its negative, and an exact zero
    x.view(-1)[-1] = -big if x.numel() > 1 else big
    if x.numel() > 2:
        x.view(-1)[1] = 0.0
    return x


@FAST
@given(dtype=st.sampled_from(HALF), fmt=st.one_of(_formats("nearest"), _formats("stochastic")),
       seed=st.integers(0, 2**31 - 1), scale_log2=st.integers(-20, 20),
       shape=st.sampled_from([(3,), (16,), (4, 9), (2, 3, 5)]))
def test_no_format_overflows_on_finite_half_tensors(dtype, fmt, seed, scale_log2, shape) -> None:
    x = _extreme(dtype, seed, scale_log2, shape)
    q = _quantizer(fmt)
    for out in (q(x), q(x, False), _error_of(q, x)):
        assert out.dtype == dtype and out.shape == x.shape
        assert torch.isfinite(out).all(), (fmt, out)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(dtype=st.sampled_from(HALF), autocast=st.booleans(),
       bits=st.sampled_from([2, 4, 8, 12, 16, "bf16", "fp16"]),
       grad_bits=st.sampled_from([4, 8, 16, "bf16", "fp16", "fx12"]), scale_log2=st.integers(-4, 12),
       seed=st.integers(0, 2**16))
def test_layers_stay_finite_where_the_plain_layer_is(dtype, autocast, bits, grad_bits, scale_log2,
                                                     seed) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if not autocast:
        model = model.to(dtype)
    x = (torch.randn(6, 8) * 2.0**scale_log2).to(torch.float32 if autocast else dtype)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            y = model(x)
        y.float().pow(2).mean().backward()
        return y.detach(), [p.grad for p in model.parameters()]

    y0, g0 = run()
    with adaprec.Controller(model, policy=Fixed(bits=bits, grad_bits=grad_bits), classifier_floor=False):
        y1, g1 = run()
    assert y1.dtype == y0.dtype
    assert torch.isfinite(y1[torch.isfinite(y0)]).all()
    for a, b in zip(g0, g1):
        if torch.isfinite(a).all():
            assert torch.isfinite(b).all()
