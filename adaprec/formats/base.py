"""The format protocol, the registry of format kinds, and the one reader of format specs.

A *format kind* is one class (``IntFormat``, ``FixedPoint``, ``FloatFormat``, ``BlockFormat``, ``FP32``,
or one of your own) that owns every rule about its numbers. The rest of adaprec only ever asks a format
object; it never checks which kind it is:

=====================  ==========================================================================
rule                   what the format answers
=====================  ==========================================================================
naming                 :meth:`Format.short` (canonical name) and the classmethod
                       :meth:`Format.from_spec` (read a name, int or torch dtype, or decline)
kernel                 :meth:`Format.params` (numbers, kept in a tensor: change without recompiling),
                       :meth:`Format.kernel_spec` (static options), the staticmethod
                       :meth:`Format.kernel`, :attr:`Format.uses_range` (eval reads a running range)
ladder                 :meth:`Format.up` / :meth:`Format.down` (one level), :meth:`Format.at_least`
                       (lowest level with at least ``b`` bits), :meth:`Format.clamp`
cost                   :attr:`Format.cost_bits` (bits per element incl. scale overhead, for BitOPs),
                       :meth:`Format.exact_in` (hardware operand types that hold it exactly)
storage                :meth:`Format.storage` (the format weights decided in this one are stored in),
                       :attr:`Format.significand_bits`, :attr:`Format.storage_bits`,
                       :meth:`Format.storage_state`, :meth:`Format.round_stored`,
                       :meth:`Format.encode_stored` / :meth:`Format.decode_stored` (compact parts
                       in :attr:`Format.storage_dtype`), :attr:`Format.packs_stored`,
                       :meth:`Format.keeps_stored`
hardware               :attr:`Format.hardware_dtype` (the dtype a real kernel multiplies it in),
                       :meth:`Format.encode` (integer codes, scale, offset), :attr:`Format.offset_free`
=====================  ==========================================================================

Adding a format is one module: subclass :class:`Format` (a frozen dataclass), implement the methods
above, and call :func:`register_format` so that :func:`parse_format` reads its names.

Example:
    >>> from adaprec.formats import parse_format
    >>> [parse_format(s).short() for s in ("int4", "fx8", "bf16", "fp32")]
    ['int4', 'fx8', 'bf16', 'fp32']
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = ["Format", "register_format", "registered_formats", "parse_format", "check_bits",
           "check_rounding", "ROUNDINGS", "ROLES", "run_kernel"]

ROUNDINGS = ("nearest", "stochastic")
ROLES = ("weight", "activation", "gradient")


def check_bits(bits: object, what: str, lo: int = 1, hi: int = 32) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | float) or int(bits) != bits:
        raise ValueError(f"{what}: bits must be an integer in {lo}..{hi}, got {bits!r}")
    bits = int(bits)
    if not lo <= bits <= hi:
        raise ValueError(f"{what}: bits must be an integer in {lo}..{hi}, got {bits}")
    return bits


def check_rounding(rounding: object, what: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"{what}: rounding must be one of {ROUNDINGS}, got {rounding!r}")


_HALF = (torch.float16, torch.bfloat16)


def run_kernel(kernel: Callable[..., Tensor], x: Tensor, p: Tensor, spec: Hashable,
               lo: Tensor | None = None, hi: Tensor | None = None, axis: int = -1, rng: int = 0) -> Tensor:
    """Call a format kernel on ``x``, computing in float32 for 16-bit inputs.

    Why float32: in bf16 the stochastic-rounding noise ``v + U(0, 1)`` is itself rounded (biased by up to
    half a bf16 step of ``v``), and in fp16 an integer grid's codes (``(x - min) / scale`` reaches
    ``2^b - 1``) overflow 65504 for ``b = 16``. The result is cast back to the input's dtype.
    """
    if x.dtype in _HALF:
        # Saturate at the dtype's largest finite value: a value a format rounds up past it (bf16's grid
        # on an fp16 tensor) becomes that value, not inf, as the formats themselves saturate.
        big = torch.finfo(x.dtype).max
        y = kernel(x.float(), p.float(), spec, _f32(lo), _f32(hi), axis, rng)
        return y.clamp_(-big, big).to(x.dtype)
    return kernel(x, p.to(x.dtype) if p.dtype != x.dtype else p, spec, lo, hi, axis, rng)


def _f32(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.dtype == torch.float32 else t.float()


class Format:
    """Base class of all number formats (subclasses are frozen dataclasses that compare by value).

    Subclasses set :attr:`kind` and ``bits`` (element bits) and implement the protocol of the module
    docstring. The defaults here suit a format with no scale state of its own.
    """

    #: the family's registry name (also shown in errors)
    kind: ClassVar[str] = "abstract"
    bits: int

    # -- naming ------------------------------------------------------------------------------------
    def short(self) -> str:
        """The canonical name (``int8``, ``fx12``, ``bf16``, ``mxfp4``…); :func:`parse_format` reads it."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: Any, role: str) -> Format | None:
        """Read ``spec`` (a lower-case string, an int or a torch dtype) as this kind, or return ``None``."""
        return None

    @classmethod
    def names(cls) -> list[str]:
        """Examples of the names this kind reads (for error messages)."""
        return []

    @property
    def stochastic(self) -> bool:
        return getattr(self, "rounding", "nearest") == "stochastic"

    @property
    def per_channel(self) -> bool:
        return False

    @property
    def uses_range(self) -> bool:
        """Whether eval mode quantizes with a running (EMA) range collected in training, passed to the
        kernel as ``lo``/``hi`` (a per-tensor min-max grid does)."""
        return False

    @property
    def is_identity(self) -> bool:
        """True for full precision (nothing to quantize)."""
        return False

    def with_rounding(self, rounding: str) -> Format:
        """The same format with another rounding (formats without a rounding choice return self)."""
        import dataclasses

        if "rounding" in {f.name for f in dataclasses.fields(self)}:  # type: ignore[arg-type]
            return dataclasses.replace(self, rounding=rounding)  # type: ignore[type-var]
        return self

    # -- kernel ------------------------------------------------------------------------------------
    def params(self) -> tuple[float, ...]:
        """The numbers the kernel reads from its parameter tensor (changing them never recompiles)."""
        raise NotImplementedError

    def kernel_spec(self) -> Hashable:
        """The static options of the kernel (Python values; changing them changes the traced program)."""
        return (self.stochastic,)

    @staticmethod
    def kernel(x: Tensor, p: Tensor, spec: Hashable, lo: Tensor | None, hi: Tensor | None, axis: int,
               rng: int) -> Tensor:
        """Quantize float32 ``x``: ``p`` holds :meth:`params`, ``spec`` is :meth:`kernel_spec`, ``lo``/``hi``
        a given range (:attr:`uses_range`), ``axis`` the product's reduction dimension (block formats),
        ``rng`` the stochastic-rounding generator key (:mod:`adaprec.formats.rounding`)."""
        raise NotImplementedError

    def quantize(self, x: Tensor, *, axis: int = -1, rng: int = 0) -> Tensor:
        """Return ``x`` rounded to this format (same dtype)."""
        p = torch.tensor(self.params(), dtype=torch.float32, device=x.device)
        return run_kernel(type(self).kernel, x, p, self.kernel_spec(), None, None, axis, rng)

    # -- ladder ------------------------------------------------------------------------------------
    def up(self, bits: int = 1) -> Format:
        """One level up (integer-like kinds: ``bits`` more bits). Full precision is the top."""
        from .full import FP32

        return FP32()

    def down(self, bits: int = 1) -> Format:
        """One level down (the bottom of a kind's ladder returns itself)."""
        return self

    def at_least(self, bits: int) -> Format:
        """The lowest level at or above this one with at least ``bits`` bits (floors, classifier floor)."""
        f: Format = self
        for _ in range(64):
            if f.bits >= bits:
                return f
            f = f.up(bits - f.bits)
        return f

    def clamp(self, min_bits: int, max_bits: int) -> Format:
        """This format with its width clamped into ``[min_bits, max_bits]`` (kinds without a free width
        return self)."""
        return self

    # -- cost --------------------------------------------------------------------------------------
    @property
    def cost_bits(self) -> float:
        """Bits per element that BitOPs count: element bits plus amortised scale bits."""
        return float(self.bits)

    def exact_in(self) -> dict[str, int]:
        """Hardware operand types that hold every value exactly -> slices needed (time model)."""
        return {"fp32": 1}

    # -- storage -----------------------------------------------------------------------------------
    def storage(self) -> Format:
        """The format a weight decided to be in this format is *stored* in (round to nearest)."""
        return self.with_rounding("nearest")

    @property
    def significand_bits(self) -> int:
        """Bits of resolution relative to a value's own magnitude (sign apart)."""
        return self.bits - 1

    @property
    def storage_bits(self) -> float:
        """Bits one stored element occupies (scale overhead included) — what its bytes are made of."""
        return self.cost_bits

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype that holds this format's stored values (codes or floats)."""
        return torch.float32

    def storage_state(self, w: Tensor, headroom_bits: int = 1, zero_range: float = 1.0) -> Tensor | None:
        """Per-tensor state a *stored* tensor keeps between updates (e.g. a fixed-point fractional
        length); ``None`` when the grid needs none."""
        return None

    def grow_state_(self, state: Tensor | None, target: Tensor) -> None:
        """Widen a stored tensor's kept state in place so that ``target`` fits (no-op without state)."""

    def comp_state(self, weight: Format, weight_state: Tensor | None) -> Tensor | None:
        """The state of this format used as the Kahan *compensation* of a weight stored in ``weight`` with
        ``weight_state``; raises ``ValueError`` when the two cannot be combined."""
        return None

    def grid_step(self, state: Tensor | None) -> float:
        """The constant step of a stored grid with ``state`` (``nan`` when the step varies with the value)."""
        return float("nan")

    def round_stored(self, x: Tensor, state: Tensor | None = None, noise: Tensor | None = None,
                     saturate: bool = True) -> Tensor:
        """Round ``x`` onto the stored grid (nearest-even, or ``floor(v + noise)`` with ``noise`` given).

        ``saturate=False`` skips the clamp to the representable range (a transient sum that is never
        stored). The default quantizes with the format's own kernel.
        """
        if noise is not None:
            raise NotImplementedError(f"{self.short()}: stochastic rounding of stored values")
        return self.with_rounding("nearest").quantize(x)

    def encode_stored(self, x: Tensor, state: Tensor | None = None,
                      noise: Tensor | None = None) -> tuple[Tensor, ...]:
        """Round ``x`` onto the stored grid (as :meth:`round_stored`, saturating) and return the compact
        *parts* that hold the result, in :attr:`storage_dtype` (plus any scales the grid derives from
        the values, such as block scales). ``decode_stored(encode_stored(x, s), s, x.shape)`` equals
        ``round_stored(x, s)`` bit for bit. The default keeps the float32 values (no compact form)."""
        return (self.round_stored(x, state, noise).to(torch.float32),)

    def decode_stored(self, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size) -> Tensor:
        """The float32 values held by :meth:`encode_stored`'s ``parts`` (logical ``shape``)."""
        return parts[0].to(torch.float32).reshape(shape)

    def keeps_stored(self, axis: int = -1) -> bool:
        """Whether quantizing with this format (blocks, if any, along ``axis``) leaves a tensor whose
        values are stored in :meth:`storage` exactly as it is — then a layer whose weights are stored
        needs no weight quantization in its forward. Stochastic rounding never qualifies: ``floor(v + r)``
        of a grid value ``v`` is ``v`` only up to the float rounding of ``v + r``. The default, ``False``,
        is always safe."""
        return False

    @property
    def packs_stored(self) -> bool:
        """Whether stored tensors of this format have a compact form smaller than float32 (then
        weight storage holds them in it: :mod:`adaprec.compact`)."""
        return self.storage_dtype != torch.float32

    # -- hardware ----------------------------------------------------------------------------------
    @property
    def hardware_dtype(self) -> torch.dtype | None:
        """The dtype a real low-precision kernel multiplies this format's values in (``None``: none does).

        ``torch.int8`` means: :meth:`encode` gives signed integer codes of at most 8 bits."""
        return None

    @property
    def offset_free(self) -> bool:
        """Whether :meth:`encode`'s offset is always zero (a grid symmetric around 0, e.g. fixed point):
        integer kernels then skip the offset terms."""
        return False

    def encode(self, x: Tensor, p: Tensor, lo: Tensor | None = None, hi: Tensor | None = None,
               rng: int = 0, *, centered: bool = False, noise: Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """Integer codes of ``x`` for integer kernels: ``(codes, scale, offset)`` with ``codes * scale +
        offset`` equal to :meth:`quantize`'s result (``scale``/``offset`` 0-d, or per output channel shaped
        to broadcast), ``codes`` of ``dtype`` holding integers.

        Codes are signed ``bits``-bit integers (they fit the ``hardware_dtype``); ``centered=True`` may
        shift them by a per-tensor (per-channel) integer so that the offset is as small as possible, at
        up to one more bit of magnitude (still exact in bf16 for ``bits <= 8``: see :meth:`exact_in`).
        ``noise``: ready-drawn stochastic-rounding noise (:func:`~adaprec.formats.rounding.draw_noise`),
        so that two encodings can share one draw; otherwise a stochastic format draws from ``rng``."""
        raise NotImplementedError(f"{self.short()} has no integer codes")


_KINDS: list[type[Format]] = []


def register_format(cls: type[Format]) -> type[Format]:
    """Make :func:`parse_format` read ``cls``'s names (usable as a class decorator).

    Kinds registered later are asked first, so a plugin can claim a name before the built-ins do.
    """
    if not (isinstance(cls, type) and issubclass(cls, Format)):
        raise TypeError(f"register_format takes a Format subclass, got {cls!r}")
    if cls not in _KINDS:
        _KINDS.insert(0, cls)
        # Controller checkpoints hold formats (history, guard floors): allow-list the class so that
        # torch.load's default weights_only=True reads them.
        torch.serialization.add_safe_globals([cls])
    return cls


def registered_formats() -> list[type[Format]]:
    return list(_KINDS)


def parse_format(spec: object, *, role: str = "weight") -> Format:
    """Turn a user spec into a :class:`Format`. One documented meaning for every spec:

    * a :class:`Format`: itself;
    * an int ``b``: CPT's ``b``-bit min-max integer grid (``IntFormat``), per channel for weights, per
      tensor for activations and gradients, stochastic rounding for gradients; ``32`` is FP32;
    * a torch dtype: ``float32`` FP32, ``bfloat16``/``float16`` the 16-bit floats,
      ``float8_e4m3fn``/``float8_e5m2`` per-tensor scaled FP8, ``int8`` as the int ``8``;
    * a name: ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"`` (per-tensor scaled, as
      FP8 is trained on hardware), ``"fp8_e4m3_unscaled"``/``"fp8_e5m2_unscaled"`` (the raw grid),
      ``"intB"`` (as the int ``B``), ``"fxB"``/``"fixedB"`` (MuPPET's dynamic fixed point),
      ``"mxfp8"``/``"mxfp8_e5m2"``/``"mxfp6"``/``"mxfp6_e3m2"``/``"mxfp4"``/``"mxint8"``/``"nvfp4"``
      (block-scaled), and the names of registered plugin formats.
    Names given for the ``gradient`` role round stochastically; for weights and activations to nearest.

    Example:
        >>> parse_format(6, role="gradient")
        IntFormat(bits=6, per_channel=False, rounding='stochastic')
        >>> parse_format(torch.bfloat16).short(), parse_format("fx12").short()
        ('bf16', 'fx12')
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if isinstance(spec, Format):
        return spec
    key: Any = spec
    if isinstance(spec, str):
        key = spec.strip().lower()
    elif isinstance(spec, float) and spec.is_integer():
        key = int(spec)
    if isinstance(key, bool) or not isinstance(key, int | str | torch.dtype):
        raise ValueError(f"cannot read {spec!r} as a {role} format: use a Format, an int bit-width 1..32, a "
                         f"name or a torch dtype")
    for cls in _KINDS:
        fmt = cls.from_spec(key, role)
        if fmt is not None:
            return fmt
    if isinstance(key, int):
        check_bits(key, f"{role} format")  # raises with the allowed range
    known = [n for cls in reversed(_KINDS) for n in cls.names()]
    raise ValueError(f"cannot read {spec!r} as a {role} format; use an int bit-width 1..32, a torch dtype, "
                     f"or a name: {', '.join(known)}")
