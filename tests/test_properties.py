"""Property tests (hypothesis) of every number format and of the CPT schedule.

Formats: ``IntFormat`` per tensor and per channel, ``FixedPoint``, the four ``FloatFormat``s (raw and
per-tensor scaled) and ``FP32``. Properties: nearest rounding is idempotent, every output lies on the
format's grid inside its representable range (stochastic rounding too), nearest rounding is monotone,
and stochastic rounding is unbiased (a statistical bound: 6 standard deviations plus the
2^-17-of-a-step resolution of the CPU noise, see :mod:`adaprec.formats.rounding`). The example-based
tests of the same formats are in ``test_formats.py``; the
per-cycle bounds of ``cycle_bits`` in ``test_cpt.py``.

Example counts are kept small (the whole file runs in a few seconds); ``derandomize`` makes every run
draw the same examples, so a CI failure reproduces.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaprec.formats import FLOAT_FORMATS, FP32, FixedPoint, FloatFormat, Format, IntFormat
from adaprec.policies.cpt import PROFILES, SHAPES, cpt_bits, cpt_schedule

FAST = settings(max_examples=40, deadline=None, derandomize=True)
STAT = settings(max_examples=15, deadline=None, derandomize=True)

FLOATS = sorted(FLOAT_FORMATS)


def _tensor(seed: int, shape: tuple[int, ...], log_scale: float, shift: float) -> torch.Tensor:
    """Gaussian values of magnitude 10**log_scale around ``shift`` times that magnitude."""
    g = torch.Generator().manual_seed(seed)
    scale = 10.0**log_scale
    return (torch.randn(shape, generator=g) + shift) * scale


tensors = st.builds(
    _tensor,
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(1,), (7,), (64,), (4, 9), (3, 2, 5)]),
    log_scale=st.floats(-6, 6),
    shift=st.floats(-3, 3),
)


def _formats(rounding: str) -> st.SearchStrategy[Format]:
    return st.one_of(
        st.builds(IntFormat, st.integers(1, 16), per_channel=st.booleans(), rounding=st.just(rounding)),
        st.builds(FixedPoint, st.integers(2, 24), rounding=st.just(rounding)),
        st.builds(FloatFormat, st.sampled_from(FLOATS), rounding=st.just(rounding), scaled=st.just(False)),
        st.builds(FloatFormat, st.sampled_from([n for n in FLOATS if n != "bf16"]),
                  rounding=st.just(rounding), scaled=st.just(True)),
        st.just(FP32()),
    )


def _rows(x: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """The groups that share one min-max grid: per output channel (dim 0) or the whole tensor."""
    return x.reshape(x.shape[0], -1) if per_channel and x.dim() > 1 else x.reshape(1, -1)


# --- on the grid, inside the range --------------------------------------------------------------------

def _assert_representable(fmt: Format, x: torch.Tensor, q: torch.Tensor) -> None:
    assert q.shape == x.shape and q.dtype == x.dtype and torch.isfinite(q).all()
    if isinstance(fmt, FP32):
        assert torch.equal(q, x)
    elif isinstance(fmt, IntFormat):
        qmax = 2**fmt.bits - 1
        for xr, qr in zip(_rows(x, fmt.per_channel), _rows(q, fmt.per_channel)):
            lo, hi = xr.min().double(), xr.max().double()
            step = max((hi - lo).item() / qmax, 1e-8)  # the kernel's scale, floored at 1e-8
            codes = (qr.double() - lo) / step
            # On the 2**bits-level grid from the minimum (up to float32 rounding of q itself).
            tol = 1e-4 + 4 * torch.finfo(torch.float32).eps * (lo.abs() + hi.abs()).item() / step
            assert (codes - codes.round()).abs().max() <= tol
            assert codes.min() >= -tol and codes.max() <= qmax + tol
            if (hi - lo).item() >= qmax * 1e-8:  # an unfloored grid ends at the maximum
                span = 4 * torch.finfo(torch.float32).eps * max(abs(lo.item()), abs(hi.item()))
                assert qr.min() >= lo - span and qr.max() <= hi + span
    elif isinstance(fmt, FixedPoint):
        half = 2 ** (fmt.bits - 1)
        mn, mx = x.min().item(), x.max().item()
        ratios = ([abs((half - 0.5) / mx)] if mx else []) + ([abs((-half - 0.5) / mn)] if mn else [])
        s = max(-126, min(126, math.floor(math.log2(min(ratios))))) if ratios else 0
        codes = q.double() * 2.0**s  # METHODS.md §2.1: integers of WL bits times 2^-s
        assert torch.equal(codes, codes.round())
        assert codes.min() >= -half and codes.max() <= half - 1
    elif fmt.scaled:
        # x / (amax / max) on the raw grid, times the scale: within float32 rounding of the product.
        amax = x.abs().max()
        assert q.abs().max() <= amax * (1 + 2**-23)
        s = (amax / fmt.spec.max_value).clamp_min(torch.finfo(torch.float32).tiny)
        c = q / s
        raw = FloatFormat(fmt.name, scaled=False)
        assert ((raw.quantize(c) - c).abs() <= 2**-21 * c.abs()).all()
    else:
        vmax = fmt.spec.max_value
        assert q.abs().max() <= vmax
        assert torch.equal(q.to(fmt.torch_dtype).float(), q)  # exactly a value of the narrow dtype


@FAST
@given(fmt=_formats("nearest"), x=tensors)
def test_nearest_is_representable_and_idempotent(fmt: Format, x: torch.Tensor) -> None:
    q = fmt.quantize(x)
    _assert_representable(fmt, x, q)
    qq = fmt.quantize(q)
    if isinstance(fmt, IntFormat):
        # The second pass re-fits its grid to q's min and max, which equal x's up to float32 rounding:
        # the same levels, each within a tiny fraction of a grid step.
        for a, b in zip(_rows(q, fmt.per_channel), _rows(qq, fmt.per_channel)):
            step = max((a.max() - a.min()).item() / (2**fmt.bits - 1), 1e-8)
            assert (a - b).abs().max().item() <= 1e-3 * step + 4e-7 * a.abs().max().item()
    elif getattr(fmt, "scaled", False):
        # The second pass re-derives its scale from q's amax, equal to x's up to float32 rounding.
        assert ((qq - q).abs() <= 2**-21 * q.abs()).all()
    else:
        assert torch.equal(qq, q)


@FAST
@given(fmt=_formats("stochastic"), x=tensors)
def test_stochastic_rounding_is_representable_too(fmt: Format, x: torch.Tensor) -> None:
    _assert_representable(fmt, x, fmt.quantize(x))


# --- monotone -----------------------------------------------------------------------------------------

@FAST
@given(fmt=_formats("nearest"), x=tensors)
def test_nearest_is_monotone(fmt: Format, x: torch.Tensor) -> None:
    # Sorting along the last dim keeps every channel's (and the tensor's) min and max: the same grid.
    q = fmt.quantize(x.sort(dim=-1).values)
    assert (q.diff(dim=-1) >= 0).all()


# --- unbiased stochastic rounding --------------------------------------------------------------------

N = 20_000


def _unbiased(fmt: Format, anchors: list[float], v: float, step: float) -> None:
    """Mean of N stochastic roundings of ``v`` (with ``anchors`` fixing the grid) against ``v``."""
    x = torch.cat([torch.tensor(anchors), torch.full((N,), v)])
    q = fmt.quantize(x)[len(anchors):].double()
    lo, hi = q.min().item(), q.max().item()
    assert hi - lo <= step * (1 + 1e-6) + 1e-6 * abs(v)  # only the two neighbours of v (float32 values)
    p = (v - lo) / step if hi > lo else 0.0
    sd = step * math.sqrt(max(p * (1 - p), 1 / N)) / math.sqrt(N)
    assert abs(q.mean().item() - v) <= 6 * sd + step * 2.0**-16 + 1e-7 * abs(v)


@STAT
@given(bits=st.integers(1, 10), lo=st.floats(-4, 0), span=st.floats(0.1, 8), u=st.floats(0, 1))
def test_int_stochastic_rounding_is_unbiased(bits: int, lo: float, span: float, u: float) -> None:
    fmt = IntFormat(bits, rounding="stochastic")
    v = lo + u * span
    _unbiased(fmt, [lo, lo + span], v, span / (2**bits - 1))


@STAT
@given(bits=st.integers(2, 16), u=st.floats(-1, 1), log_scale=st.integers(-8, 8))
def test_fixed_point_stochastic_rounding_is_unbiased(bits: int, u: float, log_scale: int) -> None:
    fmt = FixedPoint(bits, rounding="stochastic")
    m = 2.0**log_scale
    # Anchors at ±m fix the scale: s = floor(log2((2^(bits-1) - 0.5) / m)), and v = u*m never saturates.
    s = math.floor(math.log2((2 ** (bits - 1) - 0.5) / m))
    _unbiased(fmt, [-m, m], u * m, 2.0**-s)


@STAT
@given(name=st.sampled_from(FLOATS), mant=st.floats(1, 2, exclude_max=True), exp=st.integers(-20, 20),
       sign=st.sampled_from([-1.0, 1.0]))
def test_float_stochastic_rounding_is_unbiased(name: str, mant: float, exp: int, sign: float) -> None:
    spec = FLOAT_FORMATS[name]
    v = sign * mant * 2.0**exp
    if abs(v) >= spec.max_value:
        v = math.copysign(spec.max_value * 0.75, v)
    e = max(math.floor(math.log2(abs(v))), spec.emin)
    step = 2.0 ** (e - spec.mantissa)  # spacing around v (subnormal spacing below the normal range)
    v = float(torch.tensor(v, dtype=torch.float32))  # what the kernel sees
    _unbiased(FloatFormat(name, rounding="stochastic"), [], v, step)


def test_fp32_is_exact() -> None:
    x = torch.randn(100) * 1e20
    assert FP32().quantize(x) is x


# --- the CPT schedule ---------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None, derandomize=True)
@given(lo=st.integers(1, 32), span=st.integers(0, 31), total=st.integers(1, 5000), data=st.data(),
       profile=st.sampled_from(PROFILES), shape=st.sampled_from(SHAPES))
def test_cpt_schedule_always_within_bounds(lo: int, span: int, total: int, data: st.DataObject,
                                           profile: str, shape: str) -> None:
    hi = min(32, lo + span)
    cycles = data.draw(st.integers(1, total), label="cycles")
    start = data.draw(st.integers(0, total - cycles), label="start")  # range-test steps before cycling
    sched = cpt_schedule(total, cycles, lo, hi, profile, shape, start=start)
    assert len(sched) == total - start
    assert sched.min() >= lo and sched.max() <= hi
    period = (total - start) // cycles
    assert (sched[::period] == lo).all()  # every cycle (and a partial last one) starts at B_min
    # Past total_steps (a run longer than planned) the schedule keeps cycling inside the bounds.
    for t in data.draw(st.lists(st.integers(start, 3 * total + 10), min_size=1, max_size=5), label="t"):
        b = cpt_bits(t, total, cycles, lo, hi, profile, shape, start=start)
        assert lo <= b <= hi and b == sched[(t - start) % period]


@pytest.mark.parametrize("shape", SHAPES)
def test_cpt_schedule_reaches_both_bounds(shape: str) -> None:
    # Within bounds is not enough: a long enough cycle must use the whole range.
    sched = cpt_schedule(1000, 4, 3, 8, "cos", shape)
    assert sched.min() == 3 and sched.max() == 8
