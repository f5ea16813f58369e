"""Full precision: FP32, where quantization is the identity and every ladder ends.

Example:
    >>> import torch
    >>> x = torch.randn(3)
    >>> FP32().quantize(x) is x, FP32().up().short()
    (True, 'fp32')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Format, register_format

__all__ = ["FP32"]


@register_format
@dataclass(frozen=True)
class FP32(Format):
    """Full precision: quantization is the identity.

    Example:
        >>> FP32().bits, FP32().is_identity
        (32, True)
    """

    kind: ClassVar[str] = "fp32"
    bits: int = field(default=32, init=False)

    def short(self) -> str:
        return "fp32"

    @classmethod
    def from_spec(cls, spec: Any, role: str) -> Format | None:
        if spec == 32 and not isinstance(spec, bool) or spec is torch.float32 \
                or spec in ("fp32", "float32", "none"):
            return cls()
        return None

    @classmethod
    def names(cls) -> list[str]:
        return ["fp32"]

    @property
    def is_identity(self) -> bool:
        return True

    def params(self) -> tuple[float, ...]:
        return (0.0,)

    def kernel_spec(self) -> tuple:
        return ()

    @staticmethod
    def kernel(x, p, spec, lo, hi, axis, rng):  # noqa: D102
        return x

    def quantize(self, x: Tensor, *, axis: int = -1, rng: int = 0) -> Tensor:
        return x

    def up(self, bits: int = 1) -> Format:
        return self

    def at_least(self, bits: int) -> Format:
        return self

    @property
    def significand_bits(self) -> int:
        return 24

    def round_stored(self, x: Tensor, state: Tensor | None = None, noise: Tensor | None = None,
                     saturate: bool = True) -> Tensor:
        return x

    def keeps_stored(self, axis: int = -1) -> bool:
        return True

    @property
    def hardware_dtype(self) -> torch.dtype | None:
        return torch.float32
