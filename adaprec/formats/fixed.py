"""Dynamic fixed point with a per-tensor power-of-two scale, as MuPPET trains
(docs/methods.md#dynamic-fixed-point).

On every call the scale comes from the tensor's own range:
``s = floor(log2(min(|(2^(WL-1) - 0.5) / max(X)|, |(-2^(WL-1) - 0.5) / min(X)|)))`` and
``X_q = clamp(round(X * 2^s), -2^(WL-1), 2^(WL-1) - 1) * 2^-s``. Unlike MuPPET's released code the
result saturates to the signed WL-bit range (stochastic rounding could otherwise reach 2^(WL-1)); an
all-zero tensor comes back unchanged.

*Stored* fixed-point weights (no FP32 master) cannot re-pick their scale every step — the grid would move
under the weights — so storage keeps a fractional length ``FL`` per tensor (:meth:`FixedPoint.storage_state`),
chosen when the tensor is split into weight and compensation and lowered only when an update would
overflow (:meth:`FixedPoint.grow_state_`).

Example:
    >>> import torch
    >>> FixedPoint(4, rounding="nearest").quantize(torch.tensor([0.3, -1.0, 0.9])).tolist()
    [0.25, -1.0, 0.875]
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Format, check_bits, check_rounding, register_format
from .codes import fixed_point_codes, tensor_range
from .integer import integer_exact_in
from .rounding import draw_noise, round_

__all__ = ["FixedPoint", "fixed_codes", "fixed_quantize", "FL_MIN", "FL_MAX"]

#: Fractional lengths of stored tensors are kept in this range, so that 2**FL and 2**-FL stay normal
#: float32 numbers even after a compensation's extra bits are added.
FL_MIN, FL_MAX = -90.0, 90.0


def fixed_up(x: Tensor, half: Tensor) -> Tensor:
    """``2^s``: MuPPET's power-of-two scale of ``x`` for ``half = 2^(WL-1)`` (the one home of the rule)."""
    mn, mx = tensor_range(x)
    ratio = torch.minimum(((half - 0.5) / mx).abs(), ((-half - 0.5) / mn).abs())
    s = torch.floor(torch.log2(ratio))
    # All-zero tensors give s = inf; keep the scale representable in float32 either way.
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s)).clamp(-126.0, 126.0)
    return torch.exp2(s)


def fixed_codes(x: Tensor, half: Tensor, stochastic: bool = False, rng: int = 0) -> tuple[Tensor, Tensor]:
    """The signed codes ``q`` (float, ``-half..half-1``) of ``x`` and ``up = 2^s``: ``q / up`` is the value.

    The simulated kernel uses it; :meth:`FixedPoint.encode` runs the same operations fused
    (:func:`adaprec.formats.codes.fixed_point_codes`).
    """
    up = fixed_up(x, half)
    q = round_(torch.mul(x.detach(), up), stochastic, rng)
    return q.clamp_max_(half - 1.0).clamp_min_(-half), up


def fixed_quantize(x: Tensor, p: Tensor, stochastic: bool = True, rng: int = 0) -> Tensor:
    """Dynamic fixed point of float32 ``x``; ``p[0]`` is ``half = 2^(WL-1)``."""
    q, up = fixed_codes(x, p[0], stochastic, rng)
    return q.div_(up)


def _exact_frac_bits(x: Tensor) -> Tensor:
    """Smallest ``k`` such that every element of ``x`` times ``2**k`` is an integer (0-d tensor).

    Zeros are ignored (an all-zero tensor gives a very negative number). Works from the binary
    mantissa: ``x = m * 2**e`` with ``M = m * 2**p`` an integer, the last set bit of ``M`` says how many
    fractional bits ``x`` really uses.
    """
    p = 1 - int(math.log2(torch.finfo(x.dtype).eps))  # 24 for float32, 53 for float64
    m, e = torch.frexp(x.detach())
    big = (m * 2.0**p).to(torch.int64)
    low = big & (-big)  # value of the lowest set bit; 0 for zeros
    nz = low != 0
    tz = torch.log2(torch.where(nz, low, torch.ones_like(low)).to(torch.float64))
    k = (p - e.to(torch.float64) - tz).masked_fill(~nz, -1e9)
    return k.max().to(torch.float32) if x.numel() else torch.tensor(-1e9)


@register_format
@dataclass(frozen=True)
class FixedPoint(Format):
    """Dynamic fixed point with a per-tensor power-of-two scale (MuPPET), word length ``bits`` (2..32).

    Saturates to the signed range ``[-2^(bits-1), 2^(bits-1) - 1]`` times the scale. Stochastic rounding
    by default, as in every published MuPPET run. Ladder: one level is one bit, capped at 16, then FP32.

    Example:
        >>> FixedPoint(8).short(), FixedPoint(14).up(2).short(), FixedPoint(16).up().short()
        ('fx8', 'fx16', 'fp32')
    """

    bits: int
    rounding: str = "stochastic"
    kind: ClassVar[str] = "fixed"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits, "FixedPoint", lo=2))
        check_rounding(self.rounding, "FixedPoint")

    # naming
    def short(self) -> str:
        return f"fx{self.bits}"

    @classmethod
    def from_spec(cls, spec: Any, role: str) -> Format | None:
        if not isinstance(spec, str):
            return None
        for prefix in ("fixed", "fx"):
            if spec.startswith(prefix) and spec[len(prefix):].isdigit():
                return cls(check_bits(int(spec[len(prefix):]), f"{role} format (fixed point)", lo=2))
        return None

    @classmethod
    def names(cls) -> list[str]:
        return ["fxB / fixedB (B = 2..32)"]

    # kernel
    def params(self) -> tuple[float, ...]:
        return (float(2 ** (self.bits - 1)),)

    def kernel_spec(self) -> Hashable:
        return (self.stochastic,)

    @staticmethod
    def kernel(x, p, spec, lo, hi, axis, rng):  # noqa: D102
        return fixed_quantize(x, p, spec[0], rng)

    # ladder
    def up(self, bits: int = 1) -> Format:
        if self.bits >= 16:
            return super().up(bits)
        return FixedPoint(min(16, self.bits + bits), self.rounding)

    def down(self, bits: int = 1) -> Format:
        return FixedPoint(max(2, self.bits - bits), self.rounding)

    def at_least(self, bits: int) -> Format:
        if self.bits >= bits:
            return self
        if bits >= 32:
            return super().up()
        return FixedPoint(bits, self.rounding)

    def clamp(self, min_bits: int, max_bits: int) -> Format:
        return FixedPoint(max(2, min(max(self.bits, min_bits), max_bits)), self.rounding)

    # cost
    def exact_in(self) -> dict[str, int]:
        return integer_exact_in(self.bits, magnitude_bits=self.bits - 1)  # signed: one bit is the sign

    # storage: a kept fractional length per tensor
    def storage(self) -> Format:
        return FixedPoint(self.bits, rounding="nearest")

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits <= 8 else torch.int16 if self.bits <= 16 else torch.int32

    def fl_holding(self, amax: Tensor) -> Tensor:
        """Largest fractional length whose ``bits``-bit grid holds ``amax`` (``inf`` for 0)."""
        half = 2.0 ** (self.bits - 1)
        return torch.floor(torch.log2((half - 0.5) / amax.float()))

    def storage_state(self, w: Tensor, headroom_bits: int = 1, zero_range: float = 1.0) -> Tensor:
        """The kept fractional length of a stored tensor: ``FL = floor(log2((2^(b-1) - 0.5) / max|w|)) -
        headroom_bits`` (an all-zero tensor uses ``max|w| = zero_range``), except that a tensor already
        lying exactly on a finer grid that holds it keeps that grid, so re-splitting a stored tensor (e.g.
        after loading a checkpoint) never changes it."""
        w = w.detach()
        amax = w.abs().amax() if w.numel() else torch.zeros((), dtype=w.dtype, device=w.device)
        amax = torch.where(amax > 0, amax, torch.full_like(amax, zero_range))
        fl_fit = self.fl_holding(amax)
        fl = fl_fit - headroom_bits
        exact = _exact_frac_bits(w).to(fl.device)
        fl = torch.where(exact <= fl_fit, torch.maximum(fl, exact), fl)
        return fl.clamp(FL_MIN, FL_MAX)

    def grow_state_(self, state: Tensor | None, target: Tensor) -> None:
        """Lower the kept ``FL`` (in place) just enough for ``target`` to fit (powers of two only)."""
        if state is None or not target.numel():
            return
        state.copy_(torch.minimum(state, self.fl_holding(target.abs().amax()).to(state.device))
                    .clamp_min(FL_MIN))

    def comp_state(self, weight: Format, weight_state: Tensor | None) -> Tensor:
        """As a compensation: ``FL_c = FL_w + bits - 1`` — one step of the weight grid at ``bits - 1``
        extra bits of resolution (kept below :data:`FL_MAX`)."""
        if not isinstance(weight, FixedPoint) or weight_state is None:
            raise ValueError(f"a fixed-point compensation ({self.short()}) needs a fixed-point weight "
                             f"format, got {weight.short()}")
        return (weight_state + (self.bits - 1)).clamp_max(FL_MAX)

    def grid_step(self, state: Tensor | None) -> float:
        return math.nan if state is None else 2.0 ** -float(state)

    def round_stored(self, x: Tensor, state: Tensor | None = None, noise: Tensor | None = None,
                     saturate: bool = True) -> Tensor:
        if state is None:
            raise ValueError("fixed-point storage needs the tensor's kept fractional length")
        up = torch.exp2(state.to(x.dtype))
        v = x * up
        q = torch.round(v) if noise is None else torch.floor(v + noise)
        if saturate:
            half = 2.0 ** (self.bits - 1)
            q = q.clamp(-half, half - 1.0)
        return q / up

    def keeps_stored(self, axis: int = -1) -> bool:
        """Stored ``b``-bit codes at a kept ``FL`` lie on the grid the dynamic scale rule picks for them:
        their largest magnitude is at most ``2^(b-1) 2^-FL``, so the rule's ``s >= FL`` (round to nearest)."""
        return not self.stochastic

    def encode_stored(self, x: Tensor, state: Tensor | None = None,
                      noise: Tensor | None = None) -> tuple[Tensor, ...]:
        """The signed integer codes ``q`` (``int8`` up to 8 bits, ``int16`` up to 16, else ``int32``) of
        ``x`` on the grid ``q * 2^-FL`` kept in ``state``, rounded and saturated as :meth:`round_stored`."""
        if state is None:
            raise ValueError("fixed-point storage needs the tensor's kept fractional length")
        v = x * torch.exp2(state.to(x.dtype))
        q = torch.round(v) if noise is None else torch.floor(v + noise)
        half = 2.0 ** (self.bits - 1)
        return (q.clamp_(-half, half - 1.0).to(self.storage_dtype),)

    def decode_stored(self, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size) -> Tensor:
        if state is None:
            raise ValueError("fixed-point storage needs the tensor's kept fractional length")
        return parts[0].to(torch.float32).div_(torch.exp2(state.to(torch.float32))).reshape(shape)

    @property
    def hardware_dtype(self) -> torch.dtype | None:
        return torch.int8 if self.bits <= 8 else None

    @property
    def offset_free(self) -> bool:
        return True

    def encode(self, x: Tensor, p: Tensor, lo: Tensor | None = None, hi: Tensor | None = None,
               rng: int = 0, *, centered: bool = False, noise: Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """Signed codes with ``scale = 2^-s`` and no offset (``centered`` changes nothing)."""
        half = p[0]
        up = fixed_up(x, half)
        if self.stochastic and noise is None:
            noise = draw_noise(x, rng)
        q = fixed_point_codes(x.detach(), up, half, noise if self.stochastic else None, dtype)
        return q, up.reciprocal(), torch.zeros((), dtype=torch.float32, device=x.device)
