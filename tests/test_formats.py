"""Number formats: grids, rounding, MuPPET's scale rule, agreement with torch's casts, validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from adaprec.formats import (
    FLOAT_FORMATS,
    FP32,
    FixedPoint,
    FloatFormat,
    IntFormat,
    Precision,
    parse_format,
)

# --- uniform integer (CPT / SBM) -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_int_levels_per_bitwidth(bits: int) -> None:
    x = torch.linspace(-3.0, 5.0, 20_000)
    q = IntFormat(bits).quantize(x)
    assert q.unique().numel() == 2**bits
    sr = IntFormat(bits, rounding="stochastic").quantize(x)
    assert sr.unique().numel() <= 2**bits


def test_int_per_channel_levels_and_range() -> None:
    w = torch.randn(5, 3, 4, 4) * torch.arange(1, 6).view(5, 1, 1, 1)
    q = IntFormat(3, per_channel=True).quantize(w)
    for c in range(5):
        assert q[c].unique().numel() <= 8
        # Every channel keeps its own min and max (per-channel grid, not the global one).
        assert q[c].min() == pytest.approx(w[c].min().item(), abs=1e-6)
        assert q[c].max() == pytest.approx(w[c].max().item(), rel=1e-6)
    # One shared grid would have at most 8 levels for the whole tensor.
    assert q.unique().numel() > 8


@pytest.mark.parametrize("fmt", [IntFormat(4), IntFormat(2, rounding="stochastic"),
                                 IntFormat(5, per_channel=True, rounding="stochastic")])
def test_int_values_inside_range(fmt: IntFormat) -> None:
    x = torch.randn(8, 50) * 3
    q = fmt.quantize(x)
    dims = (1,) if fmt.per_channel else (0, 1)
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    tol = 1e-5 * (hi - lo)
    assert bool(((q >= lo - tol) & (q <= hi + tol)).all())


def test_int_nearest_exact_on_grid() -> None:
    lo, hi, qmax = torch.tensor(-1.25), torch.tensor(2.0), 15
    scale = (hi - lo) / qmax
    grid = torch.arange(qmax + 1, dtype=torch.float32) * scale + lo
    x = grid[torch.randint(0, qmax + 1, (500,))]
    x[:2] = torch.stack((lo, grid[-1]))  # make sure min and max are on the tensor
    assert torch.equal(IntFormat(4).quantize(x), x)


def test_int_constant_tensor_unchanged() -> None:
    x = torch.full((10,), 0.37)
    assert torch.equal(IntFormat(2).quantize(x), x)


def test_int_stochastic_unbiased() -> None:
    # Grid 0, 1/3, 2/3, 1; 0.3 rounds to 1/3 w.p. 0.9 and to 0 w.p. 0.1: mean 0.3, sd 0.1 per draw.
    n = 200_000
    x = torch.cat([torch.tensor([0.0, 1.0]), torch.full((n,), 0.3)])
    q = IntFormat(2, rounding="stochastic").quantize(x)[2:]
    assert q.unique().numel() == 2 and q.unique().tolist() == pytest.approx([0.0, 1 / 3])
    assert abs(q.mean().item() - 0.3) < 5 * 0.1 / math.sqrt(n)
    nearest = IntFormat(2).quantize(x)[2:]
    assert abs(nearest.mean().item() - 0.3) > 0.03  # nearest rounding is biased here


# --- dynamic fixed point (MuPPET) ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("wl", "values", "expected"),
    [
        # min(|127.5/1|, |-128.5/-1|) = 127.5 -> s = floor(6.99) = 6: already on the 2^-6 grid.
        (8, [-1.0, 0.5, 1.0], [-1.0, 0.5, 1.0]),
        # min(127.5/0.3 = 425, 128.5/0.05 = 2570) -> s = floor(log2 425) = 8; 76.8 -> 77, -12.8 -> -13.
        (8, [0.3, -0.05], [77 / 256, -13 / 256]),
        # WL 4: min(7.5/1, 8.5/3 = 2.83) -> s = 1: the negative end sets the scale.
        (4, [-3.0, 1.0, 0.2], [-3.0, 1.0, 0.0]),
        # tiny values get a large scale: 127.5/1e-3 -> s = 16; 65.536 -> 66.
        (8, [1e-3], [66 / 65536]),
        # large values a negative one: 127.5/1001 -> s = -3; 1001/8 = 125.125 -> 125.
        (8, [1001.0, -8.0], [1000.0, -8.0]),
    ],
)
def test_fixed_point_muppet_scale_examples(wl: int, values: list[float], expected: list[float]) -> None:
    q = FixedPoint(wl, rounding="nearest").quantize(torch.tensor(values))
    assert q.tolist() == pytest.approx(expected, abs=0, rel=1e-7)


def _muppet_scale(x: torch.Tensor, wl: int) -> int:
    half = 2 ** (wl - 1)
    mx, mn = x.max().item(), x.min().item()
    cands = [abs((half - 0.5) / mx)] if mx else []
    cands += [abs((-half - 0.5) / mn)] if mn else []
    return math.floor(math.log2(min(cands)))


@pytest.mark.parametrize("wl", [4, 8, 12, 16])
def test_fixed_point_grid_levels_and_range(wl: int) -> None:
    x = torch.randn(4000) * 3 + 1
    s = _muppet_scale(x, wl)
    for rounding in ("nearest", "stochastic"):
        q = FixedPoint(wl, rounding=rounding).quantize(x)
        codes = q * 2.0**s
        assert torch.equal(codes, codes.round())  # on the 2^-s grid
        assert codes.min() >= -(2 ** (wl - 1)) and codes.max() <= 2 ** (wl - 1) - 1
        assert codes.unique().numel() <= 2**wl


def test_fixed_point_saturates_stochastic_rounding() -> None:
    # 7.5 is the largest value the scale rule allows at WL 4 (s = 0); SR would reach 8 without saturation.
    x = torch.cat([torch.zeros(1), torch.full((5000,), 7.5)])
    q = FixedPoint(4).quantize(x)
    assert q.max().item() == 7.0
    assert set(q[1:].unique().tolist()) == {7.0}


def test_fixed_point_all_zero_unchanged_and_unbiased() -> None:
    z = torch.zeros(7)
    assert torch.equal(FixedPoint(8).quantize(z), z)
    n = 200_000
    x = torch.cat([torch.tensor([1.0]), torch.full((n,), 0.3)])  # s = 6: 0.3 * 64 = 19.2
    q = FixedPoint(8).quantize(x)[1:]
    assert set(q.unique().tolist()) == {19 / 64, 20 / 64}
    assert abs(q.mean().item() - 0.3) < 5 * (0.4 / 64) / math.sqrt(n)


# --- floats ----------------------------------------------------------------------------------------

def _all_finite_values(dtype: torch.dtype) -> torch.Tensor:
    if dtype.itemsize == 1:
        bits = torch.arange(256, dtype=torch.int16).to(torch.uint8)
    else:
        bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    v = bits.view(dtype).float()
    return torch.unique(v[torch.isfinite(v)])


@pytest.mark.parametrize("name", sorted(FLOAT_FORMATS))
def test_float_nearest_matches_torch_cast(name: str) -> None:
    fmt = FloatFormat(name)
    dtype, vmax = fmt.torch_dtype, fmt.spec.max_value
    grid = _all_finite_values(dtype)
    assert grid.max().item() == vmax
    ties = (grid[1:] + grid[:-1]) / 2  # exact in float32; round-half-to-even decides them
    g = torch.Generator().manual_seed(1)
    rand = (torch.rand(50_000, generator=g) * 2 - 1) * torch.exp2(
        torch.randint(-150, 130, (50_000,), generator=g).float())
    subnormal_min = 2.0 ** (fmt.spec.emin - fmt.spec.mantissa)
    small = torch.linspace(-8, 8, 4001) * subnormal_min  # around and below the smallest subnormal
    x = torch.cat([grid, ties, grid * (1 + 2**-20), grid * (1 - 2**-20), rand, small])
    x = x[x.abs() <= vmax]
    q = fmt.quantize(x)
    assert torch.equal(q, x.to(dtype).float())
    assert torch.equal(fmt.quantize(grid), grid)  # exact on its own grid


@pytest.mark.parametrize("name", sorted(FLOAT_FORMATS))
def test_float_saturates_instead_of_overflowing(name: str) -> None:
    fmt = FloatFormat(name, scaled=False)  # the raw grid (FP8's default is per-tensor scaled)
    vmax = fmt.spec.max_value
    x = torch.tensor([vmax * 1.5, float("inf"), -float("inf"), -vmax * 4, float("nan")])
    q = fmt.quantize(x)
    assert q[:4].tolist() == [vmax, vmax, -vmax, -vmax]
    assert math.isnan(q[4].item())
    assert FloatFormat(name, rounding="stochastic", scaled=False).quantize(x[:4]).abs().max().item() == vmax


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e5])
def test_scaled_fp8_maps_amax_to_the_grid_top(name: str, magnitude: float) -> None:
    """Scaled FP8 (the default meaning of "fp8_*"): ``x / (amax / max)`` on the raw grid, times the scale —
    the tensor's largest magnitude is exact, nothing overflows or underflows to zero at any magnitude."""
    fmt = FloatFormat(name)
    assert fmt.scaled and fmt.short() == name
    assert FloatFormat(name, scaled=False).short() == name + "_unscaled"
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * magnitude
    q = fmt.quantize(x)
    amax = x.abs().max()
    assert q.abs().max() == amax and torch.isfinite(q).all()
    scale = amax / fmt.spec.max_value
    raw = FloatFormat(name, scaled=False).quantize(x / scale) * scale
    assert torch.equal(q, raw)
    assert (q == 0).sum() == (x == 0).sum() or magnitude > 1  # a scaled grid keeps small tensors


def test_float_stochastic_unbiased_between_neighbours() -> None:
    n = 200_000
    v = 1 + 2**-10  # between the bf16 neighbours 1 and 1 + 2^-7, an eighth of the way up
    q = FloatFormat("bf16", rounding="stochastic").quantize(torch.full((n,), v))
    assert set(q.unique().tolist()) == {1.0, 1 + 2**-7}
    assert abs(q.mean().item() - v) < 5 * 2**-7 * math.sqrt(1 / 8 * 7 / 8) / math.sqrt(n)


# --- FP32 and validation ---------------------------------------------------------------------------

def test_fp32_is_identity() -> None:
    x = torch.randn(10)
    assert FP32().quantize(x) is x
    assert Precision.fp32().is_fp32 and Precision.fp32().relative_cost() == 1.0


@pytest.mark.parametrize("bad", [0, 33, -1, 2.5, True, "8", None])
def test_int_bits_validated(bad: object) -> None:
    with pytest.raises(ValueError, match=r"1\.\.32"):
        IntFormat(bad)  # type: ignore[arg-type]


def test_other_validation_errors() -> None:
    with pytest.raises(ValueError, match=r"2\.\.32"):
        FixedPoint(1)
    with pytest.raises(ValueError, match="rounding must be one of"):
        IntFormat(8, rounding="up")
    with pytest.raises(ValueError, match="per_channel must be a bool"):
        IntFormat(8, per_channel=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="known:.*bf16"):
        FloatFormat("fp4")
    with pytest.raises(ValueError, match="use an int bit-width"):
        parse_format("int-eight")
    with pytest.raises(ValueError, match=r"1\.\.32"):
        parse_format("int0")
    with pytest.raises(ValueError, match=r"1\.\.32"):
        Precision.cpt(40, 8)


def test_formats_are_immutable_and_compare_by_value() -> None:
    f = IntFormat(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.bits = 5  # type: ignore[misc]
    assert IntFormat(4) == f and hash(IntFormat(4)) == hash(f)
    assert IntFormat(4) != IntFormat(4, rounding="stochastic")
    assert FloatFormat("bf16") == parse_format("bf16")


def test_parse_format_conventions() -> None:
    assert parse_format(6, role="weight") == IntFormat(6, per_channel=True)
    assert parse_format(6, role="activation") == IntFormat(6)
    assert parse_format(6, role="gradient") == IntFormat(6, rounding="stochastic")
    assert parse_format(32) == FP32() and parse_format("fp32") == FP32()
    assert parse_format("fx12") == FixedPoint(12) == parse_format("fixed12")
    assert parse_format("fp8_e5m2", role="gradient").rounding == "stochastic"
    p = Precision.cpt(3, 8)
    assert p.short() == "int3/int8"
    assert p.relative_cost() == pytest.approx((9 + 2 * 3 * 8) / (3 * 1024))
