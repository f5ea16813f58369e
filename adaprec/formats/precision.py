"""A layer's three formats — weight, input activation, output gradient (error) — and the BitOPs of a
training step at them (docs/methods.md, "Training cost").

Example:
    >>> p = Precision.cpt(6, 8)
    >>> (p.weight.bits, p.activation.bits, p.gradient.bits, p.gradient.rounding)
    (6, 6, 8, 'stochastic')
    >>> Precision.cpt(8, 8).bitops_per_mac(), Precision.fp32().is_fp32
    (192.0, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .base import ROLES, Format, parse_format
from .fixed import FixedPoint
from .full import FP32

__all__ = ["Precision", "ceil_log2", "FP32_BITOPS_PER_MAC"]

#: BitOPs per MAC of a training step in FP32: three products at 32 x 32 bits.
FP32_BITOPS_PER_MAC = 3.0 * 32 * 32


@dataclass(frozen=True)
class Precision:
    """The formats of one layer's three roles: weight, input activation and output gradient.

    Anything :func:`~adaprec.formats.parse_format` reads is accepted for each role.

    Example:
        >>> Precision("fx8", "fx8", "fx8").short(), Precision.uniform("mxfp4").gradient.rounding
        ('fx8/fx8', 'stochastic')
    """

    weight: Format = field(default_factory=FP32)
    activation: Format = field(default_factory=FP32)
    gradient: Format = field(default_factory=FP32)

    def __post_init__(self) -> None:
        for role in ROLES:
            v = getattr(self, role)
            if not isinstance(v, Format):
                object.__setattr__(self, role, parse_format(v, role=role))

    @classmethod
    def fp32(cls) -> Precision:
        return cls(FP32(), FP32(), FP32())

    @classmethod
    def cpt(cls, bits: int, grad_bits: int) -> Precision:
        """CPT/SBM conventions: per-channel weights, per-tensor activations, stochastic errors."""
        return cls(parse_format(bits, role="weight"), parse_format(bits, role="activation"),
                   parse_format(grad_bits, role="gradient"))

    @classmethod
    def fixed_point(cls, bits: int) -> Precision:
        """MuPPET: one dynamic fixed-point word length for weights, activations and gradients."""
        f = FixedPoint(bits)
        return cls(f, f, f)

    @classmethod
    def uniform(cls, fmt: Format | str | int) -> Precision:
        """The same format for all three roles (a name follows each role's conventions)."""
        return cls(*(parse_format(fmt, role=r) for r in ROLES))

    def formats(self) -> tuple[Format, Format, Format]:
        return (self.weight, self.activation, self.gradient)

    def map(self, fn: Callable[[Format], Format], roles: Iterable[str] = ROLES) -> Precision:
        """A copy with ``fn`` applied to the formats of ``roles`` (e.g. ``p.map(lambda f: f.up())``)."""
        roles = tuple(roles)
        return Precision(*(fn(getattr(self, r)) if r in roles else getattr(self, r) for r in ROLES))

    @property
    def is_fp32(self) -> bool:
        return all(f.is_identity for f in self.formats())

    @property
    def forward_bits(self) -> int:
        return max(self.weight.bits, self.activation.bits)

    def bitops_per_mac(self) -> float:
        """BitOPs per MAC of the forward product over one training step: the three products with equal
        MAC counts (forward W x A, error back-propagation E x W, weight gradient E x A) at the formats'
        effective bits, ``w*a + g*w + g*a`` — the paper's ``b_fw^2 + 2 b_fw b_bw`` when ``w = a``."""
        w, a, g = (f.cost_bits for f in self.formats())
        return float(w * a + g * w + g * a)

    def relative_cost(self) -> float:
        """BitOPs of one step relative to FP32."""
        return self.bitops_per_mac() / FP32_BITOPS_PER_MAC

    def short(self) -> str:
        w, a, g = (f.short() for f in self.formats())
        return w + "/" + g if w == a else f"w{w}/a{a}/g{g}"


def ceil_log2(n: int) -> int:
    return max(0, math.ceil(math.log2(n)))
