"""The asymmetric min-max integer grid of CPT/SBM (Banner et al. 2018;
docs/methods.md#sbm-quantizer).

``2**bits`` levels between the tensor's min and max: ``scale = max((max - min) / (2^b - 1), 1e-8)``,
``q = clamp(round((x - min) / scale), 0, 2^b - 1)``, ``x_q = q * scale + min``. Weights take min/max per
output channel (dim 0), activations and errors per tensor; errors round stochastically.

Example:
    >>> import torch
    >>> IntFormat(2).quantize(torch.tensor([0.0, 0.1, 0.5, 1.0])).tolist()
    [0.0, 0.0, 0.6666666865348816, 1.0]
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Format, check_bits, check_rounding, register_format
from .codes import affine_codes, tensor_range
from .rounding import draw_noise, round_

__all__ = ["IntFormat", "batch_range", "int_codes", "int_quantize"]


def batch_range(x: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """Min and max of ``x``: per tensor (0-d results) or per output channel (dim 0, shaped to broadcast)."""
    if per_channel and x.dim() > 1:
        mn, mx = torch.aminmax(x.detach().reshape(x.shape[0], -1), dim=1)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return mn.reshape(shape), mx.reshape(shape)
    return tensor_range(x)


def int_scale(qmax: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The grid step ``max((hi - lo) / qmax, 1e-8)``."""
    return ((hi - lo) / qmax).clamp_min(1e-8)


def int_codes(x: Tensor, qmax: Tensor, lo: Tensor, hi: Tensor, stochastic: bool = False, rng: int = 0,
              clamp_low: bool = True) -> tuple[Tensor, Tensor]:
    """The grid codes ``q`` (float, ``0..qmax``) of ``x`` and the ``scale``: ``q * scale + lo`` is the value.

    The one place this grid's arithmetic lives: the simulated kernel uses it, and
    :meth:`IntFormat.encode` runs the same operations (:func:`adaprec.formats.codes.affine_codes`), so
    the hardware backend's integer kernels agree with it bit for bit. ``clamp_low=False`` skips the
    lower clamp when ``lo`` is ``x``'s own minimum (then ``x - lo >= 0`` and ``floor(v + r) >= 0``).
    """
    scale = int_scale(qmax, lo, hi)
    q = round_(torch.sub(x.detach(), lo).div_(scale), stochastic, rng)
    if clamp_low:
        q = q.clamp_min_(0.0)
    return q.clamp_max_(qmax), scale


def int_quantize(x: Tensor, p: Tensor, per_channel: bool = False, stochastic: bool = False,
                 lo: Tensor | None = None, hi: Tensor | None = None, rng: int = 0) -> Tensor:
    """Min-max quantization of float32 ``x``; ``p[0]`` is ``qmax = 2^b - 1``; ``lo``/``hi`` replace the
    batch range (eval mode's running range)."""
    given = lo is not None and hi is not None
    if not given:
        lo, hi = batch_range(x, per_channel)
    q, scale = int_codes(x, p[0], lo, hi, stochastic, rng, clamp_low=given)
    return q.mul_(scale).add_(lo)


@register_format
@dataclass(frozen=True)
class IntFormat(Format):
    """Asymmetric uniform integer grid between the tensor's min and max (SBM, as in CPT).

    ``2**bits`` levels; ``per_channel=True`` takes min/max per output channel (dim 0);
    ``rounding`` is ``"nearest"`` or ``"stochastic"``.

    Ladder: one level is one bit (``up(n)`` adds ``n``, capped at 16, then FP32). Stored weights use
    fixed point of the same width (a min-max grid moves with the tensor at every call). Codes of up to 8
    bits run on int8 kernels in the hardware backend.

    Example:
        >>> IntFormat(8, per_channel=True).short(), IntFormat(4).up(2).short(), IntFormat(16).up().short()
        ('int8', 'int6', 'fp32')
    """

    bits: int
    per_channel: bool = False
    rounding: str = "nearest"
    kind: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits, "IntFormat"))
        check_rounding(self.rounding, "IntFormat")
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"IntFormat: per_channel must be a bool, got {self.per_channel!r}")

    # naming
    def short(self) -> str:
        return f"int{self.bits}"

    @classmethod
    def from_spec(cls, spec: Any, role: str) -> Format | None:
        bits = None
        if isinstance(spec, int) and spec != 32:
            bits = spec
        elif spec is torch.int8:
            bits = 8
        elif isinstance(spec, str) and spec.startswith("int") and spec[3:].isdigit():
            bits = int(spec[3:])
        if bits is None:
            return None
        return cls(check_bits(bits, f"{role} format"), per_channel=role == "weight",
                   rounding="stochastic" if role == "gradient" else "nearest")

    @classmethod
    def names(cls) -> list[str]:
        return ["intB (B = 1..32)"]

    @property
    def uses_range(self) -> bool:
        return not self.per_channel

    # kernel
    def params(self) -> tuple[float, ...]:
        return (float(2**self.bits - 1),)

    def kernel_spec(self) -> Hashable:
        return (self.per_channel, self.stochastic)

    @staticmethod
    def kernel(x, p, spec, lo, hi, axis, rng):  # noqa: D102
        per_channel, stochastic = spec
        return int_quantize(x, p, per_channel, stochastic, lo, hi, rng)

    # ladder
    def up(self, bits: int = 1) -> Format:
        if self.bits >= 16:
            return super().up(bits)
        return IntFormat(min(16, self.bits + bits), self.per_channel, self.rounding)

    def down(self, bits: int = 1) -> Format:
        return IntFormat(max(1, self.bits - bits), self.per_channel, self.rounding)

    def at_least(self, bits: int) -> Format:
        if self.bits >= bits:
            return self
        if bits >= 32:
            return super().up()
        return IntFormat(bits, self.per_channel, self.rounding)

    def clamp(self, min_bits: int, max_bits: int) -> Format:
        return IntFormat(min(max(self.bits, min_bits), max_bits), self.per_channel, self.rounding)

    # cost
    def exact_in(self) -> dict[str, int]:
        return integer_exact_in(self.bits, magnitude_bits=self.bits)

    # storage: a min-max grid follows the tensor at every call, so stored weights use fixed point
    def storage(self) -> Format:
        from .fixed import FixedPoint

        return FixedPoint(max(self.bits, 2), rounding="nearest")

    @property
    def significand_bits(self) -> int:
        return self.bits

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits <= 8 else torch.int16 if self.bits <= 16 else torch.int32

    @property
    def hardware_dtype(self) -> torch.dtype | None:
        return torch.int8 if self.bits <= 8 else None

    def encode(self, x: Tensor, p: Tensor, lo: Tensor | None = None, hi: Tensor | None = None,
               rng: int = 0, *, centered: bool = False, noise: Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """Codes ``q - shift`` with ``scale`` and ``offset = min + shift * scale`` (``q`` the grid index).

        ``shift = 2^(b-1)`` (signed ``b``-bit codes), or with ``centered=True`` the grid index nearest to
        zero, so that ``|offset| <= scale / 2`` whenever the range holds 0 (codes within
        ``±(2^b - 1)``).
        """
        given = lo is not None and hi is not None
        if not given:
            lo, hi = batch_range(x, self.per_channel)
        qmax = p[0]
        scale = int_scale(qmax, lo, hi)
        if centered:
            shift = torch.minimum(torch.round(torch.neg(lo) / scale).clamp_min(0.0), qmax)
        else:
            shift = (qmax + 1.0) * 0.5
        if self.stochastic and noise is None:
            noise = draw_noise(x, rng)
        q = affine_codes(x.detach(), lo, scale, qmax, shift, noise if self.stochastic else None, given, dtype)
        return q, scale, lo + shift * scale


def integer_exact_in(bits: int, magnitude_bits: int) -> dict[str, int]:
    """Hardware operand types holding every ``bits``-bit integer code exactly, and how many slices each
    needs: an ``n``-bit float significand (implicit bit included) holds integers up to ``2^n``."""
    out: dict[str, int] = {"fp32": 1}
    if bits <= 4:
        out["int4"] = 1
    out["int8"] = -(-bits // 8)
    if magnitude_bits <= 11:
        out["fp16"] = out["tf32"] = 1
    if magnitude_bits <= 8:
        out["bf16"] = 1
    return out
