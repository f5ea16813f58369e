"""Block-scaled ("microscaling") formats: OCP MX v1.0 (MXFP8, MXFP6, MXFP4, MXINT8) and NVIDIA's NVFP4
(docs/methods.md#block-scaled-formats).

A block of ``k`` consecutive elements along the product's reduction dimension shares one scale ``X``;
each element is stored in a narrow format and stands for ``X * P_i``.

* **MX** (``k = 32``, scale E8M0 — a bare power of two): ``X = 2^(floor(log2(amax_block)) - emax_elem)``
  (the spec's conversion), ``P_i = round(V_i / X)`` to the element grid, saturating at its largest
  magnitude. Element grids: FP8 E4M3 (emax 8) / E5M2 (15), FP6 E3M2 (4) / E2M3 (2), FP4 E2M1 (2), and
  INT8 with an implicit scale 2^-6 (emax 0; saturating at ±127/64, symmetric).
* **NVFP4** (``k = 16``): E2M1 elements, a per-block scale stored in FP8 E4M3 (rounded to nearest) and one
  FP32 scale per tensor, ``s_t = amax_tensor / (6 * 448)``; block scale ``s_b = E4M3(amax_block / 6 / s_t)``,
  ``P_i = round(V_i / (s_b s_t))``.

Choices made here (documented, tested): blocks run along ``axis`` — the layer's reduction dimension,
which the backend passes (the last dimension for Linear/RNN/attention tensors, the channel dimension 1 for
convolutions); a tail shorter than a block forms a short block with its own scale (as if zero-padded,
since zeros never change a block's amax); an all-zero block stays zero; NaN stays NaN. The E8M0 scale's
exponent is clamped to [-127, 127]. Rounding of the elements is to nearest-even or stochastic; the
NVFP4 block scale always rounds to nearest.

BitOPs and bytes count the *effective* bits per element: element bits plus the block scale's bits spread
over its block (MXFP4: 4 + 8/32 = 4.25; NVFP4: 4 + 8/16 = 4.5; the per-tensor FP32 scale is negligible).

Example:
    >>> import torch
    >>> x = torch.tensor([[0.1, -0.7, 3.2, 100.0]])
    >>> BlockFormat("mxfp4").quantize(x).tolist()   # one block: X = 2^(6 - 2) = 16; P = 0, 0, 0, 6
    [[0.0, -0.0, 0.0, 96.0]]
    >>> BlockFormat("mxfp8").cost_bits, BlockFormat("nvfp4").cost_bits
    (8.25, 4.5)
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Format, check_rounding, register_format
from .floating import ELEMENT_FORMATS, TINY, FloatFormat, FloatSpec, float_quantize
from .rounding import round_

__all__ = ["BlockFormat", "BLOCK_FORMATS", "block_quantize"]


@dataclass(frozen=True)
class _BlockSpec:
    element: str      # key of ELEMENT_FORMATS, or "int8"
    block: int        # elements per block
    scale: str        # "e8m0" (power of two) or "e4m3_tensor" (NVFP4: FP8 block scale x FP32 tensor scale)
    up: str | None    # the next level of the ladder (None: bf16)
    down: str | None  # the level below (None: bottom)


#: name -> definition. ``up``/``down`` give the ladder: mxfp4 -> mxfp6 -> mxfp8 -> bf16 -> fp32.
BLOCK_FORMATS: dict[str, _BlockSpec] = {
    "mxfp8": _BlockSpec("e4m3", 32, "e8m0", None, "mxfp6"),
    "mxfp8_e5m2": _BlockSpec("e5m2", 32, "e8m0", None, "mxfp6_e3m2"),
    "mxfp6": _BlockSpec("e2m3", 32, "e8m0", "mxfp8", "mxfp4"),
    "mxfp6_e3m2": _BlockSpec("e3m2", 32, "e8m0", "mxfp8_e5m2", "mxfp4"),
    "mxfp4": _BlockSpec("e2m1", 32, "e8m0", "mxfp6", None),
    "mxint8": _BlockSpec("int8", 32, "e8m0", None, "mxfp6"),
    "nvfp4": _BlockSpec("e2m1", 16, "e4m3_tensor", "mxfp6", None),
}
_ALIASES = {"mxfp8_e4m3": "mxfp8", "mxfp6_e2m3": "mxfp6", "mxfp4_e2m1": "mxfp4"}

_INT8_ELEMENT = FloatSpec(8, 6, 0, 127.0 / 64.0, None)  # k / 64 for k in -127..127: a fixed step 2^-6


def _element(name: str) -> FloatSpec:
    return _INT8_ELEMENT if name == "int8" else ELEMENT_FORMATS[name]


def _int_grid(v: Tensor, maxval: Tensor, stochastic: bool, rng: int, noise: Tensor | None) -> Tensor:
    v = v.mul(64.0)
    q = v.add_(noise).floor_() if noise is not None else round_(v, stochastic, rng)
    return q.div_(64.0).clamp_(-maxval, maxval)


def _blocks(t: Tensor, axis: int, block: int) -> Tensor:
    """``t`` with ``axis`` moved last, zero-padded to whole blocks and split into ``(..., blocks, block)``."""
    t = t.movedim(axis, -1)
    n = t.shape[-1]
    nb = -(-n // block)
    if nb * block != n:
        t = F.pad(t, (0, nb * block - n))
    return t.reshape(*t.shape[:-1], nb, block)


def _block_codes(xb: Tensor, p: Tensor, scale_kind: str, int_element: bool, stochastic: bool, rng: int,
                 nz: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The element values ``q`` and block ``scale`` of blocked ``xb`` ``(..., blocks, block)``, plus what
    the scale is made of: the E8M0 exponent (MX) or the FP8 block scale and the tensor scale (NVFP4)."""
    amax = xb.abs().amax(-1, keepdim=True)
    if scale_kind == "e8m0":
        _, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1): floor(log2 amax) = e - 1
        exp = (e.to(xb.dtype) - 1.0 - p[3]).clamp_(-127.0, 127.0)
        scale, tensor_scale = torch.exp2(exp), None
    else:  # NVFP4: FP8 E4M3 block scale times one FP32 scale per tensor
        e4m3 = ELEMENT_FORMATS["e4m3"]
        tensor_scale = (amax.amax() / (p[2] * e4m3.max_value)).clamp_min(TINY)
        sp = torch.tensor((e4m3.mantissa, e4m3.emin, e4m3.max_value), dtype=xb.dtype, device=xb.device)
        exp = float_quantize(amax / p[2] / tensor_scale, sp)  # the block scale, on the E4M3 grid
        scale = exp * tensor_scale
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = xb / safe
    if int_element:
        q = _int_grid(v, p[2], stochastic, rng, nz)
    else:
        q = float_quantize(v, p[:3], stochastic, rng, noise=nz)
    return q, scale, exp, tensor_scale


def _unblock(out: Tensor, n: int, axis: int) -> Tensor:
    out = out.reshape(*out.shape[:-2], -1)[..., :n]
    return out.movedim(-1, axis).contiguous()


def block_quantize(x: Tensor, p: Tensor, block: int, scale_kind: str, int_element: bool, stochastic: bool,
                   axis: int = -1, rng: int = 0, noise: Tensor | None = None) -> Tensor:
    """Block-scaled quantization of float32 ``x`` along ``axis`` (module docstring).

    ``p = [element mantissa bits, element min normal exponent, element max, element emax]``; ``noise``
    (``U(0, 1)`` shaped like ``x``) replaces the generator's draws for stochastic rounding.
    """
    if x.dim() == 0:
        return block_quantize(x.reshape(1), p, block, scale_kind, int_element, stochastic, 0, rng,
                              None if noise is None else noise.reshape(1)).reshape(())
    n = x.shape[axis]
    xb = _blocks(x.detach(), axis, block)
    nz = None if noise is None else _blocks(noise, axis, block)
    q, scale, _, _ = _block_codes(xb, p, scale_kind, int_element, stochastic, rng, nz)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    out = (q * safe).masked_fill_(scale == 0, 0.0)
    return _unblock(out, n, axis)


#: E2M1 magnitudes by their 3-bit code (sign in the fourth bit): two elements share one byte.
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _pack_e2m1(q: Tensor) -> Tensor:
    """E2M1 values -> 4-bit codes, two per ``uint8`` (the first element in the low nibble)."""
    table = torch.tensor(_E2M1, dtype=q.dtype, device=q.device)
    code = torch.bucketize(q.abs(), table).to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)
    flat = code.reshape(-1)
    if flat.numel() % 2:
        flat = F.pad(flat, (0, 1))
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_e2m1(packed: Tensor, numel: int) -> Tensor:
    table = torch.tensor(_E2M1, dtype=torch.float32, device=packed.device)
    codes = torch.stack((packed & 15, packed >> 4), dim=1).reshape(-1)[:numel].long()
    mag = table[codes & 7]
    return torch.where((codes & 8) != 0, -mag, mag)


@register_format
@dataclass(frozen=True)
class BlockFormat(Format):
    """A block-scaled format: ``"mxfp8"`` (E4M3), ``"mxfp8_e5m2"``, ``"mxfp6"`` (E2M3), ``"mxfp6_e3m2"``,
    ``"mxfp4"``, ``"mxint8"`` or ``"nvfp4"``; ``rounding`` of the elements ``"nearest"`` or ``"stochastic"``.

    Ladder: mxfp4 -> mxfp6 -> mxfp8 -> bf16 -> fp32 (E5M2/E3M2 variants climb their own side; nvfp4 ->
    mxfp6; mxint8 -> bf16). All MX levels share one kernel, so cycling or climbing between them never
    recompiles; only the numbers in the parameter tensor change.

    Example:
        >>> BlockFormat("mxfp4").up().short(), BlockFormat("mxfp8").up().short(), BlockFormat("mxint8").bits
        ('mxfp6', 'bf16', 8)
    """

    name: str
    rounding: str = "nearest"
    kind: ClassVar[str] = "block"
    bits: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = _ALIASES.get(self.name, self.name)
        if name not in BLOCK_FORMATS:
            raise ValueError(f"BlockFormat: unknown name {self.name!r}; known: {sorted(BLOCK_FORMATS)}")
        object.__setattr__(self, "name", name)
        check_rounding(self.rounding, "BlockFormat")
        object.__setattr__(self, "bits", _element(self.spec.element).bits)

    @property
    def spec(self) -> _BlockSpec:
        return BLOCK_FORMATS[self.name]

    @property
    def element(self) -> FloatSpec:
        return _element(self.spec.element)

    @property
    def block(self) -> int:
        return self.spec.block

    # naming
    def short(self) -> str:
        return self.name

    @classmethod
    def from_spec(cls, spec: Any, role: str) -> Format | None:
        if isinstance(spec, str) and _ALIASES.get(spec, spec) in BLOCK_FORMATS:
            return cls(spec, "stochastic" if role == "gradient" else "nearest")
        return None

    @classmethod
    def names(cls) -> list[str]:
        return sorted(BLOCK_FORMATS)

    # kernel: element numbers in the tensor, block layout static
    def params(self) -> tuple[float, ...]:
        e = self.element
        return (float(e.mantissa), float(e.emin), e.max_value, float(e.emax))

    def kernel_spec(self) -> Hashable:
        s = self.spec
        return (s.block, s.scale, s.element == "int8", self.stochastic)

    @staticmethod
    def kernel(x, p, spec, lo, hi, axis, rng):  # noqa: D102
        block, scale, int_element, stochastic = spec
        return block_quantize(x, p, block, scale, int_element, stochastic, axis, rng)

    # ladder
    def up(self, bits: int = 1) -> Format:
        nxt = self.spec.up
        return BlockFormat(nxt, self.rounding) if nxt else FloatFormat("bf16", self.rounding)

    def down(self, bits: int = 1) -> Format:
        nxt = self.spec.down
        return BlockFormat(nxt, self.rounding) if nxt else self

    # cost: element bits plus the block scale's 8 bits spread over the block
    @property
    def cost_bits(self) -> float:
        return self.bits + 8.0 / self.block

    def exact_in(self) -> dict[str, int]:
        # Hardware with block-scaled tensor cores runs them natively; elsewhere the dequantized values
        # (at most 8 significant bits) are exact in bf16.
        native = "nvfp4" if self.name == "nvfp4" else self.name.split("_")[0]
        return {native: 1, "bf16": 1, "tf32": 1, "fp32": 1}

    # storage: codes plus block scales; the grid follows each block's amax
    @property
    def significand_bits(self) -> int:
        return self.element.mantissa + 1

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.uint8

    def round_stored(self, x: Tensor, state: Tensor | None = None, noise: Tensor | None = None,
                     saturate: bool = True) -> Tensor:
        # ``noise`` (U(0, 1), from the storage's own generator) makes the element rounding stochastic.
        # Stored tensors block along their last dimension.
        p = torch.tensor(self.params(), dtype=x.dtype, device=x.device)
        s = self.spec
        return block_quantize(x, p, s.block, s.scale, s.element == "int8", False, -1, 0, noise=noise)

    def keeps_stored(self, axis: int = -1) -> bool:
        # Stored blocks run along the last dimension; re-quantizing a stored MX block finds the same
        # power-of-two scale and the same elements. NVFP4's value-dependent FP8 scales may move.
        return axis == -1 and self.spec.scale == "e8m0" and not self.stochastic

    def encode_stored(self, x: Tensor, state: Tensor | None = None,
                      noise: Tensor | None = None) -> tuple[Tensor, ...]:
        """Element codes (one per element) and block scales, blocks along the last dimension:

        * elements: ``float8_e4m3fn`` (E4M3, E3M2 and E2M3 values are all E4M3 numbers) or
          ``float8_e5m2``; MXINT8 as ``int8`` codes ``k`` (value ``k / 64``); E2M1 (MXFP4, NVFP4) as
          4-bit codes, two per ``uint8``;
        * MX block scales as their ``int8`` exponent (E8M0); NVFP4 block scales as ``float8_e4m3fn``
          plus the float32 tensor scale.
        """
        if x.dim() == 0:
            x = x.reshape(1)
            noise = None if noise is None else noise.reshape(1)
        p = torch.tensor(self.params(), dtype=torch.float32, device=x.device)
        s = self.spec
        xb = _blocks(x.detach().float(), -1, s.block)
        nz = None if noise is None else _blocks(noise, -1, s.block)
        q, _, exp, tensor_scale = _block_codes(xb, p, s.scale, s.element == "int8", False, 0, nz)
        n = x.shape[-1]
        q = q.reshape(*q.shape[:-2], -1)[..., :n]  # the padding of a short last block is not kept
        if s.element == "int8":
            elems = q.mul(64.0).to(torch.int8)
        elif s.element == "e2m1":
            elems = _pack_e2m1(q)
        else:
            elems = q.to(torch.float8_e5m2 if s.element == "e5m2" else torch.float8_e4m3fn)
        if tensor_scale is None:
            return elems, exp.to(torch.int8)
        return elems, exp.to(torch.float8_e4m3fn), tensor_scale.reshape(())

    def decode_stored(self, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size) -> Tensor:
        s = self.spec
        lead = tuple(shape[:-1]) if len(shape) else ()
        n = shape[-1] if len(shape) else 1
        elems = parts[0]
        if s.element == "e2m1":
            q = _unpack_e2m1(elems, math.prod(lead) * n).reshape(*lead, n)
        elif s.element == "int8":
            q = elems.to(torch.float32).div_(64.0)
        else:
            q = elems.to(torch.float32)
        q = _blocks(q.reshape(*lead, n), -1, s.block)
        if len(parts) == 2:  # MX: a power of two, never zero
            out = q * torch.exp2(parts[1].to(torch.float32))
        else:
            scale = parts[1].to(torch.float32) * parts[2]
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            out = (q * safe).masked_fill_(scale == 0, 0.0)
        return _unblock(out, n, -1).reshape(shape)
