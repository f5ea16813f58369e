"""Narrow floating-point formats: BF16, FP16 and FP8 (E4M3, E5M2), plus the element grids of the
block-scaled formats (FP6 E3M2/E2M3, FP4 E2M1; see :mod:`adaprec.formats.block`).

Rounding is to nearest, ties to even — equal to torch's own casts to ``bfloat16``, ``float16``,
``float8_e4m3fn`` and ``float8_e5m2`` inside their finite range — or stochastic. Values beyond the largest
finite value (and ±inf) saturate to ±max instead of becoming inf/NaN; NaN stays NaN; subnormals are kept.

FP8 means *per-tensor scaled* FP8, as FP8 is trained on hardware: the tensor is divided by
``amax / max_finite`` before rounding and multiplied back after, so its largest magnitude lands on the
grid's top. These are exactly the numbers the hardware backend's ``torch._scaled_mm`` route multiplies.
The raw grid is still available under an explicit name: ``"fp8_e4m3_unscaled"`` / ``"fp8_e5m2_unscaled"``
(``FloatFormat("fp8_e4m3", scaled=False)``).

Example:
    >>> import torch
    >>> x = torch.tensor([1e-3, 2e-3, 3e-3])
    >>> FloatFormat("fp8_e4m3").quantize(x)[2].item() == x[2].item()  # scaled: the top value is exact
    True
    >>> FloatFormat("fp8_e4m3", scaled=False).quantize(x)[0].item()   # raw grid: subnormal territory
    0.001953125
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Format, check_rounding, register_format
from .rounding import round_

__all__ = ["FloatFormat", "FloatSpec", "FLOAT_FORMATS", "ELEMENT_FORMATS", "float_quantize",
           "scaled_codes", "TINY"]


@dataclass(frozen=True)
class FloatSpec:
    """A float grid: total ``bits``, ``mantissa`` bits, minimum normal exponent, largest finite value, and
    torch's own dtype for it (``None`` where torch has none)."""

    bits: int
    mantissa: int
    emin: int
    max_value: float
    dtype: str | None

    @property
    def emax(self) -> int:
        """Exponent of the largest binade (``floor(log2(max_value))``)."""
        import math

        return math.floor(math.log2(self.max_value))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else getattr(torch, self.dtype)


#: The formats usable on their own.
FLOAT_FORMATS: dict[str, FloatSpec] = {
    # E4M3 "fn": no infinities, largest finite 448; E5M2 keeps IEEE-style inf, largest finite 57344.
    "fp8_e4m3": FloatSpec(8, 3, -6, 448.0, "float8_e4m3fn"),
    "fp8_e5m2": FloatSpec(8, 2, -14, 57344.0, "float8_e5m2"),
    "fp16": FloatSpec(16, 10, -14, 65504.0, "float16"),
    "bf16": FloatSpec(16, 7, -126, float((2 - 2**-7) * 2.0**127), "bfloat16"),
}

#: Element grids of the block-scaled formats (OCP MX v1.0: no inf/NaN in FP6/FP4; saturating).
ELEMENT_FORMATS: dict[str, FloatSpec] = {
    "e4m3": FLOAT_FORMATS["fp8_e4m3"],
    "e5m2": FLOAT_FORMATS["fp8_e5m2"],
    "e3m2": FloatSpec(6, 2, -2, 28.0, None),
    "e2m3": FloatSpec(6, 3, 0, 7.5, None),
    "e2m1": FloatSpec(4, 1, 0, 6.0, "float4_e2m1fn_x2"),
}

#: Smallest dequantization scale: keeps an all-zero tensor at zero instead of 0/0.
TINY = float(torch.finfo(torch.float32).tiny)

_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8_e4m3",
           torch.float8_e5m2: "fp8_e5m2"}


def float_quantize(x: Tensor, p: Tensor, stochastic: bool = False, rng: int = 0,
                   noise: Tensor | None = None, saturate: bool = True) -> Tensor:
    """Round float32 ``x`` to the float grid ``p = [mantissa bits, min normal exponent, max]``, saturating.

    The spacing of representable values around ``x`` is ``2^(max(e, emin) - mantissa_bits)`` where
    ``e = floor(log2|x|)``, subnormals included. ``noise`` (``U(0, 1)`` like ``x``) rounds stochastically
    with the caller's draws instead of the generator ``rng``'s.
    """
    mbits, emin, maxval = p[0], p[1], p[2]
    _, exp = torch.frexp(x.detach())  # x = m * 2^exp with |m| in [0.5, 1): floor(log2|x|) = exp - 1
    e = torch.maximum(exp.to(x.dtype) - 1.0, emin)
    ulp = e.sub_(mbits).exp2_()
    v = torch.div(x.detach(), ulp)
    q = (v.add_(noise).floor_() if noise is not None else round_(v, stochastic, rng)).mul_(ulp)
    return q.clamp_max_(maxval).clamp_min_(-maxval) if saturate else q


def scaled_codes(x: Tensor, p: Tensor, stochastic: bool = False, rng: int = 0) -> tuple[Tensor, Tensor]:
    """Per-tensor scaled float: the grid values ``c`` of ``x / scale`` and ``scale = amax / max`` (0-d).

    ``c * scale`` is the quantized value; ``c`` is exactly representable in the grid's dtype, so casting it
    there is lossless (the hardware backend feeds it to ``torch._scaled_mm``).
    """
    scale = (x.detach().abs().amax().float() / p[2]).clamp_min(TINY)
    return float_quantize(x.detach() / scale, p, stochastic, rng), scale


@register_format
@dataclass(frozen=True)
class FloatFormat(Format):
    """A narrow floating-point format: ``fp8_e4m3``, ``fp8_e5m2``, ``bf16`` or ``fp16``.

    ``scaled``: divide by ``amax / max_finite`` per tensor first (``None``: yes for FP8, no for the 16-bit
    formats). Ladder: fp8 -> bf16 -> FP32, fp16 -> FP32 (down: bf16 -> fp8_e4m3, fp16 -> fp8_e5m2).

    Example:
        >>> FloatFormat("bf16").bits, FloatFormat("fp8_e5m2").short(), FloatFormat("fp8_e4m3").up().short()
        (16, 'fp8_e5m2', 'bf16')
    """

    name: str
    rounding: str = "nearest"
    scaled: bool | None = None
    kind: ClassVar[str] = "float"
    bits: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in FLOAT_FORMATS:
            raise ValueError(f"FloatFormat: unknown name {self.name!r}; known: {sorted(FLOAT_FORMATS)}")
        check_rounding(self.rounding, "FloatFormat")
        if self.scaled is None:
            object.__setattr__(self, "scaled", self.name.startswith("fp8"))
        elif not isinstance(self.scaled, bool):
            raise ValueError(f"FloatFormat: scaled must be True, False or None, got {self.scaled!r}")
        if self.scaled and self.spec.max_value > 1e6:
            # amax / max_finite would be a float32 subnormal: a scale there loses precision, not range.
            raise ValueError(f"FloatFormat: {self.name} has the range of float32 and takes no per-tensor "
                             "scale (scaled=False)")
        object.__setattr__(self, "bits", FLOAT_FORMATS[self.name].bits)

    @property
    def spec(self) -> FloatSpec:
        return FLOAT_FORMATS[self.name]

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.spec.torch_dtype

    # naming
    def short(self) -> str:
        default = self.name.startswith("fp8")
        if self.scaled == default:
            return self.name
        return self.name + ("_scaled" if self.scaled else "_unscaled")

    @classmethod
    def from_spec(cls, spec: Any, role: str) -> Format | None:
        rounding = "stochastic" if role == "gradient" else "nearest"
        if isinstance(spec, torch.dtype):
            return cls(_DTYPES[spec], rounding) if spec in _DTYPES else None
        if not isinstance(spec, str):
            return None
        spec = _ALIASES.get(spec, spec)
        for suffix, scaled in (("_unscaled", False), ("_scaled", True), ("", None)):
            if spec.endswith(suffix) and spec[:len(spec) - len(suffix)] in FLOAT_FORMATS:
                return cls(spec[:len(spec) - len(suffix)], rounding, scaled)
        return None

    @classmethod
    def names(cls) -> list[str]:
        return ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp8_e4m3_unscaled", "fp8_e5m2_unscaled"]

    # kernel
    def params(self) -> tuple[float, ...]:
        s = self.spec
        return (float(s.mantissa), float(s.emin), s.max_value)

    def kernel_spec(self) -> Hashable:
        return (self.stochastic, self.scaled)

    @staticmethod
    def kernel(x, p, spec, lo, hi, axis, rng):  # noqa: D102
        stochastic, scaled = spec
        if scaled:
            c, scale = scaled_codes(x, p, stochastic, rng)
            return c.mul_(scale)
        return float_quantize(x, p, stochastic, rng)

    # ladder
    def up(self, bits: int = 1) -> Format:
        if self.bits < 16:
            return FloatFormat("bf16", self.rounding)
        return super().up(bits)

    def down(self, bits: int = 1) -> Format:
        if self.bits < 16:
            return self
        return FloatFormat("fp8_e4m3" if self.name == "bf16" else "fp8_e5m2", self.rounding)

    def at_least(self, bits: int) -> Format:
        if self.bits >= bits:
            return self
        return FloatFormat("bf16", self.rounding) if bits <= 16 else super().up()

    # cost
    def exact_in(self) -> dict[str, int]:
        if self.bits == 8:
            return {"fp8": 1, "fp16": 1, "bf16": 1, "tf32": 1, "fp32": 1}
        return {self.name: 1, "tf32": 1, "fp32": 1}

    # storage: the raw grid of the same element type. (A stored tensor cannot re-pick a per-tensor scale
    # at every update without re-rounding every weight, so stored FP8 weights use the raw FP8 grid.)
    def storage(self) -> Format:
        return FloatFormat(self.name, "nearest", scaled=False)

    @property
    def significand_bits(self) -> int:
        return self.spec.mantissa + 1

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.torch_dtype

    def round_stored(self, x: Tensor, state: Tensor | None = None, noise: Tensor | None = None,
                     saturate: bool = True) -> Tensor:
        # Stored values lie on the raw grid (see storage()), whether or not this format is scaled.
        p = torch.tensor(self.params(), dtype=x.dtype, device=x.device)
        return float_quantize(x, p, noise=noise, saturate=saturate)

    def keeps_stored(self, axis: int = -1) -> bool:
        # The raw grid is stored; an unscaled format quantizes onto that very grid, a scaled one
        # re-scales by the tensor's amax first.
        return not self.scaled and not self.stochastic

    def encode_stored(self, x: Tensor, state: Tensor | None = None,
                      noise: Tensor | None = None) -> tuple[Tensor, ...]:
        """The raw-grid values in torch's own dtype (``bfloat16``, ``float16``, ``float8_e4m3fn``,
        ``float8_e5m2``). To nearest: saturate, then torch's cast (round to nearest even, subnormals
        kept) — the same numbers as :meth:`round_stored`, since rounding is monotonic."""
        if noise is not None:
            v = self.round_stored(x, state, noise)
        else:
            m = self.spec.max_value
            v = x.clamp(-m, m)
        return (v.to(self.torch_dtype),)

    def decode_stored(self, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size) -> Tensor:
        return parts[0].to(torch.float32).reshape(shape)

    # hardware: bf16/fp16 kernels; FP8 on torch._scaled_mm, which needs the per-tensor scale
    @property
    def hardware_dtype(self) -> torch.dtype | None:
        if self.bits == 8 and not self.scaled:
            return None
        return self.torch_dtype
