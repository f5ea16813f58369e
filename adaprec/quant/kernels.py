"""Quantization kernels whose format parameters are tensors.

Every kernel takes the format's numbers (levels, word length, mantissa width…) as a small float tensor
``p`` instead of Python ints, so that changing a bit-width is an in-place ``fill_`` that neither
recompiles a ``torch.compile``-d model nor syncs with the GPU (DESIGN.md contract 3). The Python-level
arguments (``kind``, ``per_channel``, ``stochastic``) describe the *kind* of format; changing them may
cost one recompilation.

Layout of ``p`` (always 3 entries, unused ones ignored):

* ``"int"``:   ``[qmax = 2**bits - 1, 0, 0]``
* ``"fixed"``: ``[half = 2**(bits-1), 0, 0]``
* ``"float"``: ``[mantissa_bits, min_normal_exponent, max_value]``

Stochastic rounding uses ``floor(v + r)`` with ``r ~ U(0, 1)``, which has the same distribution as
``round(v + U(-0.5, 0.5))`` and saves one operation. On the CPU in eager mode ``r`` has 16-bit resolution,
``r = (u + 0.5) / 2^16`` with ``u`` uniform on ``0..2^16-1``, cut from 64-bit random words: four noise
values per generator draw make it about 4x cheaper than ``torch.rand_like``, and the bias it leaves is at
most 2^-17 of a grid step (``rand_like``'s own floats have 24 bits). ``torch.compile`` calls the same
generator (opaque custom ops), so compiled and eager CPU code draw the same noise words (which element
gets which word follows the memory layout, which Inductor may choose differently). On other devices
the noise is ``torch.rand_like`` (fused and cheap there). Both draw from torch's global generator,
so seeding and ``Controller`` resumes reproduce them.

Speed (eager): each kernel allocates one output buffer and then works in place on it; on the CPU every
fresh activation-sized tensor costs page faults, and the allocation-free chain is several times faster.
The in-place steps are all autograd-safe, so a caller that differentiates through a kernel (rather than
through the straight-through wrappers of :mod:`adaprec.quant.site`) gets the same (zero) gradient.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["quantize", "int_quantize", "fixed_quantize", "float_quantize", "batch_range",
           "add_uniform_noise_"]


_NOISE_SCALE = 2.0**-16
_NOISE_OFFSET = 0.5 + 2.0**-17  # int16 lanes are -2^15..2^15-1: shift them to (u + 0.5) / 2^16


def _lanes_stride(like: Tensor) -> tuple[int, ...]:
    # ``like``'s own strides when it is dense (e.g. channels_last conv gradients), else contiguous ones:
    # compiled code then walks noise and values in the same order (a transposed read is not vectorized).
    return torch.empty_like(like, dtype=torch.int16, device="meta").stride()


def _noise_lanes_impl(like: Tensor) -> Tensor:
    n = like.numel()
    # random_(-2^63, None) fills all 64 bits; each word gives four independent 16-bit lanes.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device).random_(-(2**63), None)
    return words.view(torch.int16)[:n].as_strided(like.shape, _lanes_stride(like))


# An opaque op, so that torch.compile calls it as it is instead of inlining it: Inductor's own CPU random
# numbers are generated element by element and made stochastic rounding ~3x slower than eager (ResNet-20
# gradients: ~30 ms vs ~10 ms per 2M values). Compiled and eager code now also draw the same noise.
try:
    _noise_lanes = torch.library.custom_op("adaprec::noise_lanes", _noise_lanes_impl, mutates_args=(),
                                           tags=(torch.Tag.nondeterministic_seeded,))
except TypeError:  # torch < 2.5: no tags argument
    _noise_lanes = torch.library.custom_op("adaprec::noise_lanes", _noise_lanes_impl, mutates_args=())
_noise_lanes.register_fake(lambda like: like.new_empty_strided(like.shape, _lanes_stride(like),
                                                               dtype=torch.int16))


_SCRATCH = threading.local()
_SCRATCH_MAX = 1 << 24  # elements (64 MiB of float32); larger noise converts into a fresh tensor


def _lanes_as_float(lanes: Tensor) -> Tensor:
    """The int16 lanes as float32, in a per-thread scratch buffer reused from call to call.

    Adding int16 to float32 directly makes PyTorch convert into a fresh float32 tensor first; on the CPU
    every fresh activation-sized tensor costs page faults (about 4 ms per 2M values, ~45 ms of a
    ResNet-20 CPT step), while converting into memory already mapped costs ~0.4 ms.
    """
    n = lanes.numel()
    if n > _SCRATCH_MAX or lanes.device.type != "cpu":
        return lanes.to(torch.float32)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buf = torch.empty(n, dtype=torch.float32)
    # The lanes are dense (see _lanes_stride), so their strides address exactly n slots of the buffer.
    return buf.as_strided(lanes.shape, lanes.stride()).copy_(lanes)


def add_uniform_noise_(v: Tensor) -> Tensor:
    """Add ``U(0, 1)`` noise to ``v`` in place (see the module docstring for how it is drawn)."""
    if v.device.type != "cpu":
        return v.add_(torch.rand_like(v))
    return v.add_(_lanes_as_float(_noise_lanes(v)), alpha=_NOISE_SCALE).add_(_NOISE_OFFSET)


def _sr_floor_impl(v: Tensor) -> Tensor:
    out = torch.empty_like(v)
    torch.add(v, _lanes_as_float(_noise_lanes_impl(out)), alpha=_NOISE_SCALE, out=out)
    return out.add_(_NOISE_OFFSET).floor_()


# Compiled CPU code rounds stochastically through this opaque op (same noise as eager). Why not the lanes
# op plus a fused add: Inductor picks the layout of conv gradients (channels_last) *after* tracing, so
# lanes traced as contiguous are read transposed and the fused kernel is not vectorized (~6x slower, about
# 8 ms per 2M-value ResNet-20 gradient); here the noise is cut in the layout the values really have.
try:
    _sr_floor = torch.library.custom_op("adaprec::sr_floor", _sr_floor_impl, mutates_args=(),
                                        tags=(torch.Tag.nondeterministic_seeded,))
except TypeError:  # torch < 2.5: no tags argument
    _sr_floor = torch.library.custom_op("adaprec::sr_floor", _sr_floor_impl, mutates_args=())
_sr_floor.register_fake(lambda v: torch.empty_like(v))


def _round_(v: Tensor, stochastic: bool) -> Tensor:
    """Round ``v`` to integers, in place in eager mode: stochastically, or to nearest (half to even,
    like numpy's rint)."""
    if stochastic:
        if v.device.type == "cpu" and torch.compiler.is_compiling():
            return _sr_floor(v)
        return add_uniform_noise_(v).floor_()
    return v.round_()


def batch_range(x: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """Min and max of ``x``: per tensor (0-d results) or per output channel (dim 0, shaped to broadcast)."""
    if per_channel and x.dim() > 1:
        mn, mx = torch.aminmax(x.detach().reshape(x.shape[0], -1), dim=1)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return mn.reshape(shape), mx.reshape(shape)
    return torch.aminmax(x.detach())


def int_quantize(
    x: Tensor,
    p: Tensor,
    per_channel: bool = False,
    stochastic: bool = False,
    lo: Tensor | None = None,
    hi: Tensor | None = None,
) -> Tensor:
    """Asymmetric uniform min-max quantization (SBM / CPT, docs/methods.md#sbm-quantizer).

    ``q = clamp(round((x - min) / scale), 0, qmax)``, ``x_q = q * scale + min`` with
    ``scale = max((max - min) / qmax, 1e-8)``. ``lo``/``hi`` replace the batch range (eval mode).
    """
    given = lo is not None and hi is not None
    if not given:
        lo, hi = batch_range(x, per_channel)
    qmax = p[0]
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    q = _round_(torch.sub(x, lo).div_(scale), stochastic)
    if given:  # with the batch's own range x - lo >= 0, and floor(v + r) >= 0 too: no lower clamp needed
        q.clamp_min_(0.0)
    return q.clamp_max_(qmax).mul_(scale).add_(lo)


def fixed_quantize(x: Tensor, p: Tensor, stochastic: bool = True) -> Tensor:
    """Dynamic fixed point with MuPPET's per-tensor power-of-two scale, saturating
    (docs/methods.md#dynamic-fixed-point).

    ``s = floor(log2(min(|(2^(WL-1) - 0.5) / max(X)|, |(-2^(WL-1) - 0.5) / min(X)|)))``;
    ``X_q = clamp(round(X * 2^s), -2^(WL-1), 2^(WL-1) - 1) * 2^-s``. Unlike the released code the
    result saturates to the signed WL-bit range (stochastic rounding could otherwise reach 2^(WL-1)).
    An all-zero tensor comes back unchanged.
    """
    half = p[0]
    mn, mx = torch.aminmax(x.detach())
    ratio = torch.minimum(((half - 0.5) / mx).abs(), ((-half - 0.5) / mn).abs())
    s = torch.floor(torch.log2(ratio))
    # All-zero tensors give s = inf; keep the scale representable in float32 either way.
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s)).clamp(-126.0, 126.0)
    up = torch.exp2(s)
    q = _round_(torch.mul(x, up), stochastic)
    return q.clamp_max_(half - 1.0).clamp_min_(-half).div_(up)


def float_quantize(x: Tensor, p: Tensor, stochastic: bool = False) -> Tensor:
    """Round float32 values to a narrower float format, saturating at its largest finite value.

    Works for every (mantissa bits, minimum normal exponent, max) triple, subnormals included: the
    spacing of representable values around ``x`` is ``2^(max(e, emin) - mantissa_bits)`` where
    ``e = floor(log2|x|)``. Nearest rounding is round-half-to-even and matches torch's own casts to
    ``bfloat16``, ``float16``, ``float8_e4m3fn`` and ``float8_e5m2`` inside their finite range.
    Values beyond the largest finite value (and ±inf) saturate to ±max instead of becoming inf/NaN;
    NaN stays NaN.
    """
    mbits, emin, maxval = p[0], p[1], p[2]
    _, exp = torch.frexp(x.detach())  # x = m * 2^exp with |m| in [0.5, 1): floor(log2|x|) = exp - 1
    e = torch.maximum(exp.to(x.dtype) - 1.0, emin)
    ulp = e.sub_(mbits).exp2_()
    q = _round_(torch.div(x, ulp), stochastic).mul_(ulp)
    return q.clamp_max_(maxval).clamp_min_(-maxval)


def quantize(
    x: Tensor,
    kind: str,
    p: Tensor,
    per_channel: bool = False,
    stochastic: bool = False,
    lo: Tensor | None = None,
    hi: Tensor | None = None,
) -> Tensor:
    """Dispatch on the format kind (``"fp32"``, ``"int"``, ``"fixed"``, ``"float"``)."""
    if kind == "fp32":
        return x
    if kind == "int":
        return int_quantize(x, p, per_channel, stochastic, lo, hi)
    if kind == "fixed":
        return fixed_quantize(x, p, stochastic)
    if kind == "float":
        return float_quantize(x, p, stochastic)
    raise ValueError(f"unknown format kind {kind!r}; expected 'fp32', 'int', 'fixed' or 'float'")
