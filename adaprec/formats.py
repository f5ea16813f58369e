"""Immutable, validated descriptions of number formats, and the per-layer :class:`Precision`.

A format knows how to quantize a tensor (:meth:`Format.quantize`) and how to describe itself to the
tensor-parameter kernels of :mod:`adaprec.quant.kernels` (:meth:`Format.params`). Formats compare by
value, so policies can emit new objects every step and the controller notices when nothing changed.

Example:
    >>> import torch
    >>> from adaprec.formats import IntFormat, FixedPoint, FloatFormat, Precision, parse_format
    >>> IntFormat(4).quantize(torch.linspace(0, 1, 100)).unique().numel()
    16
    >>> parse_format("fp8_e4m3")
    FloatFormat(name='fp8_e4m3', rounding='nearest')
    >>> Precision.cpt(4, 8).weight
    IntFormat(bits=4, per_channel=True, rounding='nearest')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "Format",
    "IntFormat",
    "FixedPoint",
    "FloatFormat",
    "FP32",
    "Precision",
    "parse_format",
    "FLOAT_FORMATS",
]

_ROUNDINGS = ("nearest", "stochastic")


def _check_bits(bits: object, what: str, lo: int = 1, hi: int = 32) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | float) or int(bits) != bits:
        raise ValueError(f"{what}: bits must be an integer in {lo}..{hi}, got {bits!r}")
    bits = int(bits)
    if not lo <= bits <= hi:
        raise ValueError(f"{what}: bits must be an integer in {lo}..{hi}, got {bits}")
    return bits


def _check_rounding(rounding: object, what: str) -> None:
    if rounding not in _ROUNDINGS:
        raise ValueError(f"{what}: rounding must be one of {_ROUNDINGS}, got {rounding!r}")


class Format:
    """Base class of all number formats (frozen dataclasses)."""

    kind: ClassVar[str] = "abstract"
    bits: int

    @property
    def stochastic(self) -> bool:
        return getattr(self, "rounding", "nearest") == "stochastic"

    @property
    def per_channel(self) -> bool:
        return False

    def params(self) -> tuple[float, float, float]:
        """The three numbers the kernels read from the format's parameter tensor."""
        raise NotImplementedError

    def quantize(self, x: Tensor) -> Tensor:
        """Return ``x`` rounded to this format (values stay float32)."""
        from .quant import kernels  # late: the quant package imports this module

        p = torch.tensor(self.params(), dtype=x.dtype, device=x.device)
        return kernels.quantize(x, self.kind, p, self.per_channel, self.stochastic)

    def short(self) -> str:
        """A compact name for tables and logs, e.g. ``int8``, ``fx12``, ``bf16``, ``fp32``."""
        raise NotImplementedError


@dataclass(frozen=True)
class IntFormat(Format):
    """Asymmetric uniform integer grid between the tensor's min and max (SBM, as in CPT).

    ``2**bits`` levels; ``per_channel=True`` takes min/max per output channel (dim 0);
    ``rounding`` is ``"nearest"`` or ``"stochastic"``.

    Example:
        >>> IntFormat(8, per_channel=True).short()
        'int8'
    """

    bits: int
    per_channel: bool = False
    rounding: str = "nearest"
    kind: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", _check_bits(self.bits, "IntFormat"))
        _check_rounding(self.rounding, "IntFormat")
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"IntFormat: per_channel must be a bool, got {self.per_channel!r}")

    def params(self) -> tuple[float, float, float]:
        return (float(2**self.bits - 1), 0.0, 0.0)

    def short(self) -> str:
        return f"int{self.bits}"


@dataclass(frozen=True)
class FixedPoint(Format):
    """Dynamic fixed point with a per-tensor power-of-two scale (MuPPET), word length ``bits`` (2..32).

    Saturates to the signed range ``[-2^(bits-1), 2^(bits-1) - 1]`` times the scale. Stochastic
    rounding by default, as in every published MuPPET run.

    Example:
        >>> FixedPoint(8).short()
        'fx8'
    """

    bits: int
    rounding: str = "stochastic"
    kind: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", _check_bits(self.bits, "FixedPoint", lo=2))
        _check_rounding(self.rounding, "FixedPoint")

    def params(self) -> tuple[float, float, float]:
        return (float(2 ** (self.bits - 1)), 0.0, 0.0)

    def short(self) -> str:
        return f"fx{self.bits}"


@dataclass(frozen=True)
class _FloatSpec:
    bits: int
    mantissa: int
    emin: int
    max_value: float
    dtype: str  # name of torch's own dtype, for tests and the hardware backend


FLOAT_FORMATS: dict[str, _FloatSpec] = {
    # E4M3 "fn": no infinities, largest finite 448; E5M2 keeps IEEE-style inf, largest finite 57344.
    "fp8_e4m3": _FloatSpec(8, 3, -6, 448.0, "float8_e4m3fn"),
    "fp8_e5m2": _FloatSpec(8, 2, -14, 57344.0, "float8_e5m2"),
    "fp16": _FloatSpec(16, 10, -14, 65504.0, "float16"),
    "bf16": _FloatSpec(16, 7, -126, float((2 - 2**-7) * 2.0**127), "bfloat16"),
}


@dataclass(frozen=True)
class FloatFormat(Format):
    """A narrow floating-point format: ``fp8_e4m3``, ``fp8_e5m2``, ``bf16`` or ``fp16``.

    Round to nearest even (matches torch's casts) or stochastic; values past the largest finite
    value saturate to it (no inf), NaN stays NaN. Subnormals are kept.

    Example:
        >>> FloatFormat("bf16").bits
        16
    """

    name: str
    rounding: str = "nearest"
    kind: ClassVar[str] = "float"
    bits: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in FLOAT_FORMATS:
            raise ValueError(f"FloatFormat: unknown name {self.name!r}; known: {sorted(FLOAT_FORMATS)}")
        _check_rounding(self.rounding, "FloatFormat")
        object.__setattr__(self, "bits", FLOAT_FORMATS[self.name].bits)

    @property
    def spec(self) -> _FloatSpec:
        return FLOAT_FORMATS[self.name]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.spec.dtype)

    def params(self) -> tuple[float, float, float]:
        s = self.spec
        return (float(s.mantissa), float(s.emin), s.max_value)

    def short(self) -> str:
        return self.name


@dataclass(frozen=True)
class FP32(Format):
    """Full precision: quantization is the identity.

    Example:
        >>> FP32().bits
        32
    """

    kind: ClassVar[str] = "fp32"
    bits: int = field(default=32, init=False)

    def params(self) -> tuple[float, float, float]:
        return (0.0, 0.0, 0.0)

    def quantize(self, x: Tensor) -> Tensor:
        return x

    def short(self) -> str:
        return "fp32"


def parse_format(spec: object, *, role: str = "weight") -> Format:
    """Turn a user spec into a :class:`Format`.

    Accepted: a :class:`Format`; an int ``b`` (uniform integer, per channel for weights, stochastic
    rounding for gradients — the CPT conventions); ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8_e4m3"``,
    ``"fp8_e5m2"``; ``"intB"``; ``"fxB"``/``"fixedB"`` (dynamic fixed point).
    """
    if isinstance(spec, Format):
        return spec
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        bits = _check_bits(spec, f"{role} format")
        if bits == 32:
            return FP32()
        return IntFormat(bits, per_channel=role == "weight",
                         rounding="stochastic" if role == "gradient" else "nearest")
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("fp32", "float32", "none"):
            return FP32()
        if s in FLOAT_FORMATS:
            return FloatFormat(s, rounding="stochastic" if role == "gradient" else "nearest")
        for prefix, make in (("int", None), ("fixed", FixedPoint), ("fx", FixedPoint)):
            if s.startswith(prefix) and s[len(prefix):].isdigit():
                bits = int(s[len(prefix):])
                if make is None:
                    return parse_format(bits, role=role) if bits != 32 else IntFormat(32)
                return FixedPoint(bits)
    raise ValueError(
        f"cannot read {spec!r} as a {role} format; use an int bit-width 1..32, 'intB', 'fxB', "
        f"'fp32', or one of {sorted(FLOAT_FORMATS)}"
    )


@dataclass(frozen=True)
class Precision:
    """The formats of one layer's three roles: weight, input activation and output gradient.

    Example:
        >>> p = Precision.cpt(6, 8)
        >>> (p.weight.bits, p.activation.bits, p.gradient.bits, p.gradient.rounding)
        (6, 6, 8, 'stochastic')
        >>> Precision.fp32().is_fp32
        True
    """

    weight: Format = field(default_factory=FP32)
    activation: Format = field(default_factory=FP32)
    gradient: Format = field(default_factory=FP32)

    def __post_init__(self) -> None:
        for role in ("weight", "activation", "gradient"):
            v = getattr(self, role)
            if not isinstance(v, Format):
                object.__setattr__(self, role, parse_format(v, role=role))

    @classmethod
    def fp32(cls) -> Precision:
        return cls(FP32(), FP32(), FP32())

    @classmethod
    def cpt(cls, bits: int, grad_bits: int) -> Precision:
        """CPT/SBM conventions: per-channel weights, per-tensor activations, stochastic errors."""
        return cls(
            parse_format(bits, role="weight"),
            parse_format(bits, role="activation"),
            parse_format(grad_bits, role="gradient"),
        )

    @classmethod
    def fixed_point(cls, bits: int) -> Precision:
        """MuPPET: one dynamic fixed-point word length for weights, activations and gradients."""
        f = FixedPoint(bits)
        return cls(f, f, f)

    @classmethod
    def uniform(cls, fmt: Format | str | int) -> Precision:
        return cls(parse_format(fmt, role="weight"), parse_format(fmt, role="activation"),
                   parse_format(fmt, role="gradient"))

    @property
    def is_fp32(self) -> bool:
        return all(f.kind == "fp32" for f in (self.weight, self.activation, self.gradient))

    @property
    def forward_bits(self) -> int:
        return max(self.weight.bits, self.activation.bits)

    def relative_cost(self) -> float:
        """BitOPs of one step relative to FP32 (docs/methods.md#bitops, generalised to w != a bits)."""
        w, a, g = self.weight.bits, self.activation.bits, self.gradient.bits
        return (w * a + g * w + g * a) / (3 * 32**2)

    def short(self) -> str:
        w, a, g = self.weight.short(), self.activation.short(), self.gradient.short()
        return w + "/" + g if w == a else f"w{w}/a{a}/g{g}"


def ceil_log2(n: int) -> int:
    return max(0, math.ceil(math.log2(n)))
