"""How a parameter is *stored* in low precision, and the compensated (Kahan) update of that storage.

A training step that keeps no FP32 master copy must write the updated weight back in its storage
format. Two formats are involved (docs/methods.md#kahan-update):

* the **weight format** ``Q_w``: what forward and backward see — fixed point (``"fx8"``, ``"fx16"``),
  a narrow float (``"bf16"``, ``"fp16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``) or ``"fp32"``;
* the **compensation format** ``Q_c``: the grid of the per-weight residual ``c`` that Kahan summation
  carries from step to step.

Fixed-point storage keeps its scale. :class:`adaprec.formats.FixedPoint` picks a new power-of-two scale
from the tensor's range on every call, which is right for activations but wrong for stored weights: a
weight grid that moves every step re-rounds every weight every step. Here the fractional length ``FL``
(values are ``q * 2**-FL`` with ``q`` a signed ``bits``-bit integer) is chosen **once** per tensor, when
the tensor is split into weight and compensation — at the optimizer's construction and again at every
format change (:func:`resplit`) — and kept in between. The choice is
``FL = floor(log2((2**(bits-1) - 0.5) / max|w|)) - headroom_bits`` (MuPPET's scale rule, minus
``headroom_bits`` bits of room for the weights to grow; an all-zero tensor uses ``max|w| = zero_range``),
except that a tensor already lying exactly on a finer grid that holds it without saturation keeps that
grid, so splitting an already-stored tensor (e.g. after loading a checkpoint) never changes it.
Weights that outgrow the range would saturate, which stalls training (a linear digits classifier
stored in 16-bit fixed point with a frozen range reached 89% instead of 92%). So by default
(``overflow="rescale"``) an update that would overflow lowers ``FL`` just enough for the new values to
fit — the grid only ever coarsens, by powers of two, a handful of times per run, and the compensation
follows it — in the spirit of dynamic fixed point with overflow-triggered scale updates (Courbariaux
et al. 2014). ``overflow="saturate"`` keeps ``FL`` frozen and clamps.
A fixed-point compensation buffer of ``n_c`` bits gets ``FL_c = FL_w + n_c - 1``: it spans one step of
the weight grid at ``n_c - 1`` extra bits of resolution, so ``w + c`` acts like a ``(n_w + n_c - 1)``-bit
number kept in two words.

In simulation all values stay in float32 tensors (float64 parameters are accepted too); the formats
say which values those tensors may hold. Rounding is decided by the update mode, not by a format's
``rounding`` field: ``"kahan"`` and ``"nearest"`` round to nearest (ties to even), ``"stochastic"``
rounds the weight stochastically.

Example:
    >>> import torch
    >>> from adaprec.optim import Storage
    >>> s = Storage("fx8")
    >>> w = torch.tensor([0.5, -0.25, 0.3])
    >>> fl = s.fit(w)                    # kept fractional length: 7 - 1 bit of headroom
    >>> int(fl)
    6
    >>> s.quantize_weight(w, fl)
    tensor([ 0.5000, -0.2500,  0.2969])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..compact import FormatCodec, StoredTensor, is_stored, values
from ..formats import FloatFormat, Format, parse_format

__all__ = ["Storage", "storage_format", "format_name", "significand_bits", "resplit", "UPDATE_MODES",
           "OVERFLOW_MODES", "MASTER_SIGNIFICAND_BITS"]

#: How a step is written back: compensated, plain round-to-nearest (swamps), or stochastic rounding.
UPDATE_MODES = ("kahan", "nearest", "stochastic")

#: What a fixed-point weight does when an update would leave its range: lower FL, or clamp.
OVERFLOW_MODES = ("rescale", "saturate")

#: Significand bits of the FP32 master copy that low-precision storage replaces (and of the float32
#: tensors that simulate it). A compensation format finer than this is refused.
MASTER_SIGNIFICAND_BITS = 24

def storage_format(spec: object, *, role: str = "weight") -> Format:
    """Read a storage format: anything :func:`~adaprec.formats.parse_format` reads, mapped to the format
    that *stores* it (:meth:`~adaprec.formats.Format.storage`, rounding to nearest: the update mode
    decides rounding). A min-max integer grid (``8``, ``"int8"``) follows the tensor at every call, so it
    is stored as fixed point of the same width (``fx8``).

    Example:
        >>> storage_format("fx8"), storage_format(8).short(), storage_format("bf16").short()
        (FixedPoint(bits=8, rounding='nearest'), 'fx8', 'bf16')
    """
    try:
        fmt = parse_format(spec, role="weight")
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot read {spec!r} as a {role} storage format: {e}") from None
    return fmt.storage()


def format_name(fmt: Format) -> str:
    """Canonical short name of a storage format (``"fx8"``, ``"bf16"``, ``"fp32"``), as kept in groups."""
    return fmt.short()


def significand_bits(fmt: Format) -> int:
    """Bits of resolution a format carries (:attr:`~adaprec.formats.Format.significand_bits`).

    Example:
        >>> significand_bits(storage_format("fx16")), significand_bits(storage_format("bf16"))
        (15, 8)
    """
    return fmt.significand_bits


@dataclass(frozen=True)
class Storage:
    """A weight storage format, its compensation format, and the rounding between them.

    ``weight`` and ``comp`` take anything :func:`storage_format` reads. ``comp=None`` picks the
    default: same width as the weight (fixed point ``FL_c = FL_w + n - 1``; the same float format; FP32
    for FP32). Rules, checked here:

    * fixed-point storage needs ``bits <= 25`` and any compensation at most 24 significand bits — the
      values must be exact in the float32 tensors that simulate them, and a compensation finer than
      the FP32 master it replaces would be pointless (:data:`MASTER_SIGNIFICAND_BITS`);
    * a fixed-point compensation needs a fixed-point weight (its grid hangs off the weight's ``FL``).

    ``headroom_bits`` (>= 0), ``zero_range`` (> 0) and ``overflow`` (``"rescale"`` or ``"saturate"``)
    steer a fixed-point tensor's kept fractional length (module docstring). The weight and the
    compensation given to :meth:`add_` and :meth:`resplit_` may be plain float tensors holding values of
    the formats (simulation) or :class:`~adaprec.compact.StoredTensor` objects holding them in the
    formats' compact parts (:meth:`~adaprec.formats.Format.encode_stored`); both give the same numbers.

    Example:
        >>> import torch
        >>> s = Storage("fx8")                      # 8-bit weights, 8-bit compensation
        >>> w = torch.zeros(4); c = torch.zeros(4); fl = s.fit(torch.ones(4))
        >>> for _ in range(10):                     # 10 steps of 1/4 of a grid step each
        ...     s.add_(w, torch.full((4,), 2.0**-8), comp=c, fl=fl)
        >>> w + c                                   # nothing lost
        tensor([0.0391, 0.0391, 0.0391, 0.0391])
    """

    weight: Format = field(default_factory=lambda: FloatFormat("bf16"))
    comp: Format | None = None
    headroom_bits: int = 1
    zero_range: float = 1.0
    overflow: str = "rescale"

    def __post_init__(self) -> None:
        w = storage_format(self.weight, role="weight")
        if w.significand_bits > MASTER_SIGNIFICAND_BITS:
            raise ValueError(
                f"weight storage format {w.short()} is wider than the FP32 master it replaces "
                f"(needs {w.significand_bits} significand bits, float32 holds {MASTER_SIGNIFICAND_BITS}); "
                f"use at most fx{MASTER_SIGNIFICAND_BITS + 1}, or 'fp32'")
        if self.comp is None:
            c = w
        else:
            c = storage_format(self.comp, role="compensation")
        if significand_bits(c) > MASTER_SIGNIFICAND_BITS:
            raise ValueError(
                f"compensation format {format_name(c)} is wider than the FP32 master it replaces: it "
                f"needs {significand_bits(c)} significand bits, float32 holds {MASTER_SIGNIFICAND_BITS}; "
                f"use at most fx{MASTER_SIGNIFICAND_BITS + 1}, a narrower float, or 'fp32'")
        try:  # does the compensation's grid work beside this weight's? (e.g. fixed point needs an FL)
            c.comp_state(w, w.storage_state(torch.ones(1)))
        except ValueError as e:
            raise ValueError(f"compensation {format_name(c)} with weight {format_name(w)}: {e}; use a float "
                             f"compensation ('bf16', 'fp16', 'fp32') or leave comp=None for the default "
                             f"({format_name(w)})") from None
        if isinstance(self.headroom_bits, bool) or not isinstance(self.headroom_bits, int) \
                or not 0 <= self.headroom_bits <= 16:
            raise ValueError(f"headroom_bits must be an int in 0..16, got {self.headroom_bits!r}")
        if isinstance(self.zero_range, bool) or not isinstance(self.zero_range, int | float) \
                or not (math.isfinite(self.zero_range) and self.zero_range > 0):
            raise ValueError(f"zero_range must be a finite number > 0, got {self.zero_range!r}")
        if self.overflow not in OVERFLOW_MODES:
            raise ValueError(f"overflow must be one of {OVERFLOW_MODES}, got {self.overflow!r}")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "comp", c)
        object.__setattr__(self, "zero_range", float(self.zero_range))

    # ------------------------------------------------------------------ description
    def key(self) -> str:
        """A canonical string for this storage, e.g. ``"fx8+fx8/h1/z1.0/rescale"`` (to notice changes)."""
        w, c = format_name(self.weight), format_name(self.comp)
        return f"{w}+{c}/h{self.headroom_bits}/z{self.zero_range!r}/{self.overflow}"

    # ------------------------------------------------------------------ grids
    def fit(self, w: Tensor) -> Tensor | None:
        """The per-tensor state the weight grid keeps for ``w`` (a fixed-point fractional length, a scaled
        format's scale; :meth:`~adaprec.formats.Format.storage_state`), or ``None`` if it keeps none."""
        return self.weight.storage_state(w, self.headroom_bits, self.zero_range)

    def _rescale_(self, fl: Tensor | None, target: Tensor) -> None:
        """``overflow="rescale"``: widen the kept state (in place) just enough to hold ``target``."""
        if fl is not None and self.overflow == "rescale":
            self.weight.grow_state_(fl, target)

    def quantize_weight(self, x: Tensor, fl: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Round ``x`` to the weight grid; ``noise`` (uniform in [0, 1)) makes the rounding stochastic."""
        return self.weight.round_stored(x, fl, noise, saturate=True)

    def quantize_comp(self, x: Tensor, fl: Tensor | None = None, saturate: bool = True) -> Tensor:
        """Round ``x`` to the compensation grid (round to nearest).

        ``saturate=False`` rounds without clamping to the compensation's range: the transient sum
        ``y = Δ + c`` of a Kahan step is not stored, only the residual is.
        """
        cstate = self.comp.comp_state(self.weight, fl)
        return self.comp.round_stored(x, cstate, None, saturate=saturate)

    def comp_ulp(self, fl: Tensor | None = None) -> float:
        """Grid step of a compensation with a fixed grid (``2**-FL_c`` in fixed point); ``nan`` otherwise."""
        return self.comp.grid_step(self.comp.comp_state(self.weight, fl))

    # ------------------------------------------------------------------ compact holding
    def comp_state(self, fl: Tensor | None) -> Tensor | None:
        """The compensation grid's state beside a weight with kept state ``fl`` (``FL_c`` in fixed point)."""
        return self.comp.comp_state(self.weight, fl)

    @staticmethod
    def _round_into(fmt: Format, t: Tensor, x: Tensor, state: Tensor | None,
                    noise: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        """Round ``x`` into ``fmt`` for the tensor ``t`` that will hold it: the values, and the compact
        parts when ``t`` is a stored tensor (encoded from ``x`` itself: no second rounding)."""
        if is_stored(t):
            parts = fmt.encode_stored(x, state, noise)
            return fmt.decode_stored(parts, state, x.shape), parts
        return fmt.round_stored(x, state, noise, saturate=True), None

    @staticmethod
    def _assign(t: Tensor, v: Tensor, parts: tuple[Tensor, ...] | None, state: Tensor | None,
                fmt: Format) -> None:
        if parts is None:
            t.copy_(v)
        else:
            t.set_parts_(parts, state, t.codec if t.codec.name == fmt.short() else _codec(fmt))

    def new_comp(self, x: Tensor, fl: Tensor | None, compact: bool) -> Tensor:
        """``x`` rounded onto the compensation grid: held in the compensation format's compact parts
        when ``compact`` and that format has them (encoded from ``x``: one rounding), else plain."""
        if compact and self.comp.packs_stored and x.dtype == torch.float32:
            cs = self.comp_state(fl)
            return StoredTensor.from_parts(self.comp.encode_stored(x, cs), _codec(self.comp), cs, x.shape)
        return self.quantize_comp(x, fl)

    def hold_comp(self, c: Tensor, fl: Tensor | None) -> Tensor:
        """A compensation ``c`` already on its grid (e.g. loaded from a checkpoint), held compactly when
        that keeps every value (else, or without a compact form, ``c`` itself as a plain tensor)."""
        c = values(c)
        if not self.comp.packs_stored or c.dtype != torch.float32:
            return c
        cs = self.comp_state(fl)
        parts = self.comp.encode_stored(c, cs)
        if not torch.equal(self.comp.decode_stored(parts, cs, c.shape), c):
            return c
        return StoredTensor.from_parts(parts, _codec(self.comp), cs, c.shape)

    # ------------------------------------------------------------------ updates
    def split(self, w_hp: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Split a high-precision tensor into ``(w, c, fl)``: ``w = Q_w(w_hp)``, ``c = Q_c(w_hp - w)``."""
        fl = self.fit(w_hp)
        w = self.quantize_weight(w_hp, fl)
        return w, self.quantize_comp(w_hp - w, fl), fl

    @torch.no_grad()
    def resplit_(self, param: Tensor, comp: Tensor | None = None) -> Tensor | None:
        """Re-split ``param + comp`` in place into this storage; returns the new fractional length.

        ``w_hp = param + comp``; ``param = Q_w(w_hp)``; ``comp = Q_c(w_hp - param)`` (when given), so
        ``param + comp`` is preserved up to the new compensation grid. Without ``comp`` the parameter is
        just rounded to the new weight grid. Plain tensors only (an optimizer re-splits stored ones).
        """
        w_hp = param.detach() + comp if comp is not None else param.detach().clone()
        w, c, fl = self.split(w_hp)
        param.copy_(w)
        if comp is not None:
            comp.copy_(c)
        return fl

    @torch.no_grad()
    def add_(
        self,
        w: Tensor,
        delta: Tensor,
        *,
        comp: Tensor | None = None,
        fl: Tensor | None = None,
        update: str = "kahan",
        generator: torch.Generator | None = None,
        alpha: float = 1.0,
    ) -> None:
        """Write ``w + Δ`` (``Δ = alpha * delta``) back into storage in place (``w``; for Kahan ``comp``).

        * ``"kahan"``: ``y = Q_c(Δ + c)``; ``w' = Q_w(w + y)``; ``c = Q_c(y - (w' - w))``;
        * ``"nearest"``: ``w' = Q_w(w + Δ)`` — steps under half a grid step are lost (swamping);
        * ``"stochastic"``: ``w' = SR_w(w + Δ)``, unbiased; noise from ``generator``.

        With ``overflow="rescale"`` a fixed-point ``fl`` is lowered in place when ``w + Δ`` would leave
        the range. ``alpha`` is applied inside the addition (``torch.add(w, delta, alpha=alpha)``), so
        that FP32 storage with ``update="nearest"`` reproduces ``torch.optim.SGD`` bit for bit. ``w``
        and ``comp`` may be stored tensors (compact parts, class docstring): the same numbers result.
        """
        wv = values(w)
        if update == "kahan":
            if comp is None:
                raise ValueError("update='kahan' needs the compensation buffer `comp`")
            y = self.quantize_comp(torch.add(values(comp), delta, alpha=alpha), fl, saturate=False)
            target = wv + y
            self._rescale_(fl, target)  # a coarser grid (if any) applies to w and c from here on
            w_new, w_parts = self._round_into(self.weight, w, target, fl)
            cs = self.comp_state(fl)
            c_new, c_parts = self._round_into(self.comp, comp, y - (w_new - wv), cs)
            self._assign(comp, c_new, c_parts, cs, self.comp)
            self._assign(w, w_new, w_parts, fl, self.weight)
        elif update == "nearest":
            target = torch.add(wv, delta, alpha=alpha)
            self._rescale_(fl, target)
            self._assign(w, *self._round_into(self.weight, w, target, fl), fl, self.weight)
        elif update == "stochastic":
            if self.weight.is_identity:
                w.add_(delta, alpha=alpha)  # nothing to round to
                return
            target = torch.add(wv, delta, alpha=alpha)
            self._rescale_(fl, target)
            noise = torch.rand(w.shape, generator=generator, device=w.device, dtype=wv.dtype)
            self._assign(w, *self._round_into(self.weight, w, target, fl, noise), fl, self.weight)
        else:
            raise ValueError(f"unknown update mode {update!r}; expected one of {UPDATE_MODES}")


def _codec(fmt: Format) -> FormatCodec:
    return FormatCodec(fmt)


def resplit(
    param: Tensor,
    comp: Tensor | None,
    new_weight_format: object,
    new_comp_format: object = None,
    **options: Any,
) -> Tensor | None:
    """On a precision switch, recombine and re-split a stored weight in place.

    ``w_hp = param + comp``; ``param = Q_w(w_hp)``; ``comp = w_hp - param`` rounded to the new
    compensation grid — so ``param + comp`` is preserved up to that grid. Returns the new kept
    fractional length for fixed-point weights, ``None`` otherwise. ``options`` are the other
    :class:`Storage` fields (``headroom_bits``, ``zero_range``, ``overflow``).

    Example:
        >>> import torch
        >>> w = torch.tensor([0.5, 0.25]); c = torch.tensor([0.001, -0.002])
        >>> fl = resplit(w, c, "fx12")
        >>> bool(((w + c) - torch.tensor([0.501, 0.248])).abs().max() < 2.0**-(int(fl) + 12))
        True
    """
    return Storage(new_weight_format, new_comp_format, **options).resplit_(param, comp)
