"""The hardware backend's integer-code route: Linear and convolution layers on the formats' integer codes.

A format with integer codes of at most 8 bits (CPT's min-max grid ``int2``..``int8``, fixed point
``fx2``..``fx8``; :attr:`~adaprec.formats.Format.hardware_dtype` ``torch.int8``) gives, for every tensor,
``codes * scale + offset`` = the simulated backend's quantized value (:meth:`~adaprec.formats.Format.encode`).
A product of two such tensors is then an integer product of codes plus terms made of the scales,
offsets and code sums, which are cheap:

``(sa A + oa)(sb B + ob) = sa sb (A B) + sa ob rowsum(A) + oa sb colsum(B) + K oa ob``

(for convolutions the sums are small convolutions with all-ones tensors, which keep the zero padding
exact). The integer product runs on one of the *code kernels*:

==============  ===========================================================================================
``"int_mm"``    ``torch._int_mm`` on int8 codes, exact int32 sums (Linear only).
``"bf16"``      bf16 products with float32 sums and a float32 result: codes of <= 8 bits are exact in
                bf16 and their products exact in float32. On the CPU this is oneDNN's
                ``fp32_precision="bf16"`` mode applied to float32 code tensors; its output is not rounded.
``"bf16-out"``  plain bf16 matmul/convolution on bf16 codes: the same exact products and float32 sums,
                but the result comes back **rounded to bf16** (8 significant bits) — a documented
                variant, faster (half the operand bytes), with codes centred on zero so that the rounding
                stays relative to the result (docs/methods.md#hardware-integer-codes).
==============  ===========================================================================================

The three products of a training step:

* forward ``Y = X W^T``: activation codes (per tensor) x weight codes (per tensor or per output channel)
  — equal to the simulated backend's numbers up to float32 summation order;
* weight gradient ``dW = G^T X``: the error is quantized by the gradient format (as the simulated
  backend does, same stochastic draws) and multiplied as codes — equal as well;
* input gradient ``dX = G W``: its sum runs over the output channels, along which a per-channel weight
  has its scales, so no integer product of *those* codes gives it. Exact for per-tensor weights (fixed
  point). With per-channel weights, a documented variant: on bf16 kernels the scaled weight codes
  ``s_w[n] Q_w[n, k]`` go into the product and are rounded to bf16 there (the error's codes stay exact);
  on ``int_mm`` the error with each channel's weight scale folded in, ``G * s_w``, is quantized by the
  gradient format *reusing the error's own stochastic-rounding noise* and multiplied as codes (unbiased
  like the simulated product, but another draw). ``input_grad="float32"`` multiplies the dequantized
  tensors in float32 instead (docs/methods.md#hardware-integer-codes).

Example:
    >>> import torch
    >>> from adaprec.formats import Precision
    >>> from adaprec.quant.hardware import HardwareBackend
    >>> lin = torch.nn.Linear(64, 32)
    >>> be = HardwareBackend(codes="bf16")
    >>> be.attach(lin, [("l", lin)])
    ['l']
    >>> be.apply({"l": Precision.cpt(4, 8)})
    >>> be.routes()["l"][0].via, lin(torch.randn(8, 64)).shape
    ('bf16', torch.Size([8, 32]))
    >>> be.detach()
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats.codes import FUSE_MIN, scale_add_, weighted_row_sum
from ..formats.rounding import draw_noise

__all__ = ["CODE_KERNELS", "bf16_accumulate_ok", "codes_matmul", "codes_conv", "CodesLinear", "CodesConv",
           "conv_ok"]

#: The code kernels (module docstring); ``HardwareBackend(codes=...)`` picks one.
CODE_KERNELS: tuple[str, ...] = ("int_mm", "bf16", "bf16-out")


# --- bf16 products with float32 results --------------------------------------------------------------

def _precision(op: str) -> str | None:
    get = getattr(torch._C, "_get_fp32_precision_getter", None)
    return None if get is None else get("mkldnn", op)


def _set_precision(op: str, value: str) -> None:
    torch._C._set_fp32_precision_setter("mkldnn", op, value)


class _Bf16Mode:
    """oneDNN computes float32 matmuls/convolutions with bf16 inputs while this is entered (restored on
    exit). Only code tensors go through it: their values are exact in bf16, so nothing is rounded."""

    def __init__(self, op: str) -> None:
        self.op = op

    def __enter__(self) -> None:
        self.old = _precision(self.op)
        if self.old is not None:
            _set_precision(self.op, "bf16")

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            _set_precision(self.op, self.old)


def _mm_bf16_impl(a: Tensor, b: Tensor) -> Tensor:
    with _Bf16Mode("matmul"):
        return torch.mm(a, b)


def _conv_bf16_impl(x: Tensor, w: Tensor, stride: list[int], padding: list[int], dilation: list[int],
                    groups: int) -> Tensor:
    with _Bf16Mode("conv"):
        return torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False,
                                          [0] * len(stride), groups)


def _conv_bwd_bf16_impl(g: Tensor, x: Tensor, w: Tensor, stride: list[int], padding: list[int],
                        dilation: list[int], groups: int, mask: list[bool]) -> tuple[Tensor, Tensor]:
    with _Bf16Mode("conv"):
        gi, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False,
                                                        [0] * len(stride), groups, mask + [False])
    # Custom ops return tensors: an unrequested gradient comes back empty.
    return (gi if gi is not None else g.new_empty(0)), (gw if gw is not None else g.new_empty(0))


# Opaque ops, so that torch.compile calls them as they are (the mode switch is host state it cannot trace).
_mm_bf16 = torch.library.custom_op("adaprec::mm_bf16", _mm_bf16_impl, mutates_args=())
_mm_bf16.register_fake(lambda a, b: a.new_empty(a.shape[0], b.shape[1]))
_conv_bf16 = torch.library.custom_op("adaprec::conv_bf16", _conv_bf16_impl, mutates_args=())


@_conv_bf16.register_fake
def _(x, w, stride, padding, dilation, groups):
    return torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False, [0] * len(stride),
                                      groups)


_conv_bwd_bf16 = torch.library.custom_op("adaprec::conv_backward_bf16", _conv_bwd_bf16_impl,
                                         mutates_args=())


@_conv_bwd_bf16.register_fake
def _(g, x, w, stride, padding, dilation, groups, mask):
    return (torch.empty_like(x) if mask[0] else g.new_empty(0)), \
        (torch.empty_like(w) if mask[1] else g.new_empty(0))


_BF16_OK: dict[str, bool] = {}


def bf16_accumulate_ok(device: torch.device | str) -> bool:
    """Whether float32 products really run in bf16 in :class:`_Bf16Mode` on ``device`` (probed once: a
    product of values that bf16 must round differs from the float32 one). Where not, the ``"bf16"`` code
    kernel still gives the same exact numbers, at float32 speed, so ``auto`` does not choose it."""
    device = torch.device(device)
    key = str(device)
    if key not in _BF16_OK:
        ok = False
        if device.type == "cpu" and _precision("matmul") is not None:
            try:
                # Sizes where oneDNN (not a small-size fallback) runs; 1 + 2^-12 is not a bf16 number.
                a = torch.full((64, 64), 1.0 + 2.0**-12, device=device)
                x = torch.full((8, 16, 16, 16), 1.0 + 2.0**-12, device=device)
                w = torch.ones(16, 16, 3, 3, device=device)
                ok = not torch.equal(_mm_bf16_impl(a, a), a @ a) and not torch.equal(
                    _conv_bf16_impl(x, w, [1, 1], [1, 1], [1, 1], 1), F.conv2d(x, w, padding=1))
            except Exception:  # noqa: BLE001 - any failure means "not here"
                ok = False
        _BF16_OK[key] = ok
    return _BF16_OK[key]


def codes_dtype(via: str) -> torch.dtype:
    """The dtype code tensors are kept in for a code kernel."""
    return {"int_mm": torch.int8, "bf16": torch.float32, "bf16-out": torch.bfloat16}[via]


def _int_ok(m: int, k: int, n: int, strict: bool) -> bool:
    return not strict or (m > 16 and k % 8 == 0 and n % 8 == 0)


def codes_matmul(a: Tensor, b: Tensor, via: str, strict: bool = False, raw: bool = False) -> Tensor:
    """``a @ b`` for code tensors (``a`` (M, K), ``b`` (K, N)) as float32 on the code kernel ``via``
    (``raw=True``: ``int_mm``'s int32 sums as they are, for :func:`~adaprec.formats.codes.scale_add_` to
    convert in its pass).

    Example:
        >>> a = torch.randint(-128, 128, (4, 8)).float(); b = torch.randint(-128, 128, (8, 3)).float()
        >>> torch.equal(codes_matmul(a, b, "bf16"), a @ b)
        True
    """
    if via == "int_mm":
        if _int_ok(a.shape[0], a.shape[1], b.shape[1], strict):
            acc = torch._int_mm(a, b)
            return acc if raw else acc.float()
        return a.float() @ b.float()
    if via == "bf16":
        return _mm_bf16(a, b)
    return torch.mm(a, b).float()  # bf16-out: the product's result is rounded to bf16


# --- shared pieces -----------------------------------------------------------------------------------

def _encode(q, x: Tensor, lo: Tensor | None, hi: Tensor | None, via: str, noise: Tensor | None = None,
            fmt=None, p: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Codes, scale and offset of ``x`` in quantizer ``q``'s format (or ``fmt``/``p``)."""
    fmt = q.fmt if fmt is None else fmt
    p = q.p if p is None else p
    return fmt.encode(x, p, lo, hi, q.rng if q is not None else 0, centered=via != "int_mm",
                      noise=noise, dtype=codes_dtype(via))


def _row(t: Tensor) -> Tensor:
    """A per-output-channel (N, 1, ...) scale or offset as a (1, N) row (0-d stays 0-d)."""
    return t.reshape(1, -1) if t.dim() else t


def _code_sum(q: Tensor, dim: int | tuple[int, ...], keepdim: bool = False) -> Tensor:
    """Sums of codes along ``dim`` as float32 (exact: integers far below 2^24)."""
    if (q.dtype == torch.int8 and q.dim() == 2 and dim in (0, 1) and q.device.type == "cpu"
            and q.numel() >= FUSE_MIN and not torch.compiler.is_compiling()):
        # Row and column sums of int8 codes as a product with a column of ones on the integer kernel:
        # exact int32 sums, 5-8x faster than torch.sum with a float32 result (measured, 2048 x 2048).
        a = q if dim == 1 else q.t()
        s = torch._int_mm(a, q.new_ones(a.shape[1], 8))[:, 0].float()
        return s.unsqueeze(dim) if keepdim else s
    return q.sum(dim, keepdim=keepdim, dtype=torch.float32)


def _no_create_graph() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(
            "adaprec's hardware 'int8' route does not support higher-order gradients (backward with "
            "create_graph=True, e.g. a gradient penalty): its backward works on integer codes. Use "
            "backend='simulated' for this run, or a precision the layer runs on the 'sim' or 'lowp' route")


def _error_codes(ctx, g: Tensor) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None, Tensor]:
    """The error quantized by the gradient format as the simulated backend does (same draws): codes,
    scale, offset (codes ``None`` when the format has none) and the noise used, plus the dequantized
    error (``None`` when not needed)."""
    gfmt, gp = ctx.gfmt, ctx.gp
    if gfmt.hardware_dtype is torch.int8 and not gfmt.per_channel:
        noise = draw_noise(g, ctx.grng) if gfmt.stochastic else None
        qg, sg, og = gfmt.encode(g, gp, rng=ctx.grng, centered=ctx.via != "int_mm", noise=noise,
                                 dtype=codes_dtype(ctx.via))
        return qg, sg, og, noise, None
    from ..formats import run_kernel

    gdeq = run_kernel(type(gfmt).kernel, g, gp, gfmt.kernel_spec(), None, None, -1, ctx.grng)
    return None, torch.ones(()), torch.zeros(()), None, gdeq


def _keep_for_backward(ctx, codes: tuple, gq, via: str, b: Tensor | None, input_grad: str, x_off: bool,
                       w_off: bool) -> None:
    """What a code layer's backward needs: the operands' codes, scales and offsets, and the error format
    as it is now (the controller may refill the quantizer in place before ``loss.backward()`` runs)."""
    ctx.save_for_backward(*codes, gq.p.clone())
    ctx.gfmt, ctx.grng, ctx.via = gq.fmt, gq.rng, via
    ctx.has_bias, ctx.input_grad = b is not None, input_grad
    ctx.x_off, ctx.w_off = x_off, w_off


# --- Linear ------------------------------------------------------------------------------------------

class CodesLinear(torch.autograd.Function):
    """``y = x_q w_q^T + b`` on integer codes (module docstring); inputs ``x`` (M, K), ``w`` (N, K).

    ``aq``/``wq``/``gq``: the layer's activation, weight and gradient quantizers; ``lo``/``hi``: the
    activation range to use (``None``: the batch's); ``via``: the code kernel; ``input_grad``:
    ``"codes"`` or ``"float32"``.
    """

    @staticmethod
    def forward(ctx, x, w, b, lo, hi, aq, wq, gq, via, strict, input_grad):  # noqa: D102
        qx, sx, ox = _encode(aq, x, lo, hi, via)
        qw, sw, ow = _encode(wq, w, None, None, via)
        k = qx.shape[1]
        x_off, w_off = not aq.fmt.offset_free, not wq.fmt.offset_free
        sw_r, ow_r = _row(sw), _row(ow)
        acc = codes_matmul(qx, qw.t(), via, strict, raw=True)
        add = None if b is None else b.detach()
        col = colw = None
        if x_off or w_off:
            # + sx ow[n] rowsum(Qx)[m] + ox sw[n] rowsum(Qw)[n] + K ox ow[n]
            rw = _code_sum(qw, 1).reshape(1, -1)
            add = ox * sw_r * rw + k * ox * ow_r + (0.0 if add is None else add)
            col, colw = _code_sum(qx, 1, keepdim=True), sx * ow_r
        y = scale_add_(acc, sx * sw_r, add, col, colw)
        if torch.is_grad_enabled() or any(ctx.needs_input_grad):
            _keep_for_backward(ctx, (qx, sx, ox, qw, sw, ow), gq, via, b, input_grad, x_off, w_off)
            ctx.strict = strict
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        _no_create_graph()
        qx, sx, ox, qw, sw, ow, gp = ctx.saved_tensors
        ctx.gp = gp
        g = g.contiguous()
        qg, sg, og, noise, gdeq = _error_codes(ctx, g)
        m = qx.shape[0]
        gx = gw = gb = None
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            ctx.has_bias and ctx.needs_input_grad[2]
        if qg is None:  # an error format without integer codes: products of dequantized tensors
            if need_x:
                gx = gdeq @ (qw.float() * sw + ow)
            if need_w:
                gw = gdeq.t() @ (qx.float() * sx + ox)
            if need_b:
                gb = gdeq.sum(0)
            return gx, gw, gb, None, None, None, None, None, None, None, None
        g_off = not ctx.gfmt.offset_free
        rg = _code_sum(qg, 0) if (need_w and (ctx.x_off or g_off)) or need_b else None   # (N,)
        if need_w:
            # dW = sg sx Qg^T Qx + sg ox colsum(Qg)[n] + og sx colsum(Qx)[k] + M og ox
            acc = codes_matmul(qg.t(), qx, ctx.via, ctx.strict, raw=True)
            if ctx.x_off or g_off:
                gw = scale_add_(acc, sg * sx, og * sx * _code_sum(qx, 0).reshape(1, -1) + m * og * ox,
                                rg.reshape(-1, 1), sg * ox)
            else:
                gw = scale_add_(acc, sg * sx)
        if need_x:
            gx = _linear_input_grad(ctx, g, qg, sg, og, noise, qw, sw, ow, g_off)
        if need_b:
            gb = rg * sg + m * og
        return gx, gw, gb, None, None, None, None, None, None, None, None


def _linear_input_grad(ctx, g, qg, sg, og, noise, qw, sw, ow, g_off: bool) -> Tensor:
    via = ctx.via
    n = qw.shape[0]
    if ctx.input_grad == "float32":
        return (qg.float() * sg + og) @ (qw.float() * sw + ow)
    if sw.dim() == 0:  # a per-tensor weight scale: an exact integer product
        # dX = sg sw Qg Qw + sg ow rowsum(Qg)[m] + og sw colsum(Qw)[k] + N og ow
        acc = codes_matmul(qg, qw, via, ctx.strict, raw=True)
        if ctx.w_off or g_off:
            return scale_add_(acc, sg * sw, og * sw * _code_sum(qw, 0).reshape(1, -1) + n * og * ow,
                              _code_sum(qg, 1, keepdim=True), sg * ow)
        return scale_add_(acc, sg * sw)
    # Per-channel weight scales run along this product's sum (docs/methods.md#hardware-integer-codes).
    if via == "int_mm":
        # Integer kernels: quantize the error with each channel's weight scale folded in (with the noise
        # of the error's own rounding), then multiply codes: dX ~ sh Qh Qw + oh colsum(Qw)[k].
        qh, sh, oh = ctx.gfmt.encode(g * _row(sw), ctx.gp, rng=ctx.grng, centered=False, noise=noise,
                                     dtype=torch.int8)
        acc = codes_matmul(qh, qw, via, ctx.strict, raw=True)
        add = oh * _code_sum(qw, 0).reshape(1, -1) if not ctx.gfmt.offset_free else None
        if ctx.w_off:  # the correction term below, in the same pass
            ow_r = ow.reshape(1, -1)
            add = og * ow_r.sum() + (0.0 if add is None else add)
            return scale_add_(acc, sh, add, weighted_row_sum(qg, ow_r), sg)
        return scale_add_(acc, sh, add)
    else:
        # bf16 kernels: the error's codes are exact, the scaled weight codes sw[n] Qw[n, k] are rounded
        # to bf16 (8 significant bits) by the kernel: dX = sg Qg Ws + og colsum(Ws)[k], Ws = sw * Qw.
        ws = qw.float() * sw
        gx = codes_matmul(qg, ws if via == "bf16" else ws.to(torch.bfloat16), via, ctx.strict).mul_(sg)
        if g_off:
            gx = gx.add_(og * ws.sum(0, keepdim=True))
    if ctx.w_off:  # + sum_n G_q[m, n] ow[n], with the quantized error itself
        # An O(M N) correction term like the code sums (a weighted row sum, not a product of the layer).
        ow_r = ow.reshape(1, -1)
        gx = gx.add_(weighted_row_sum(qg, ow_r).mul_(sg).add_(og * ow_r.sum()))
    return gx


# --- convolutions ------------------------------------------------------------------------------------

def conv_ok(module: nn.Module) -> bool:
    """Convolutions the code route handles: one group, zero padding given as numbers."""
    return (module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and not getattr(module, "transposed", False))


def codes_conv(x: Tensor, w: Tensor, geo: tuple, via: str) -> Tensor:
    """``conv(x, w)`` for code tensors as float32 on the code kernel ``via`` (``"bf16"``/``"bf16-out"``);
    ``geo``: (stride, padding, dilation) lists."""
    stride, padding, dilation = geo
    if via == "bf16":
        return _conv_bf16(x, w, stride, padding, dilation, 1)
    return torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False, [0] * len(stride),
                                      1).float()


def _conv_bwd(g: Tensor, x: Tensor, w: Tensor, geo: tuple, via: str | None, mask: list[bool]
              ) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of a convolution (``mask``: input, weight) on the code kernel ``via`` (``None``: float32)."""
    stride, padding, dilation = geo
    if via == "bf16":
        gi, gw = _conv_bwd_bf16(g, x, w, stride, padding, dilation, 1, mask)
    else:
        gi, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, stride, padding, dilation, False,
                                                        [0] * len(stride), 1, mask + [False])
    return (gi.float() if mask[0] else None), (gw.float() if mask[1] else None)


def _f32_conv(x: Tensor, w: Tensor, geo: tuple) -> Tensor:
    stride, padding, dilation = geo
    return torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False, [0] * len(stride), 1)


# The offset terms need sums of codes over channels, over the batch, and over the taps of a window.
# Reductions over the 16-64 channels of a channels-last tensor run ~10x slower as torch.sum than as a
# matrix-vector product (measured), so sums over memory-contiguous channels go through torch.mv.

def _nhwc(t: Tensor) -> Tensor | None:
    """A channels-last 4-d tensor as its (B*H*W, C) memory, float32 (None for other layouts)."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).float()
    return None


def _chan_sum(t: Tensor, weight: Tensor | None = None) -> Tensor:
    """``sum_c t[:, c] (* weight[c])`` as a (B, 1, *S) float32 tensor."""
    m = _nhwc(t)
    v = t.new_ones(t.shape[1], dtype=torch.float32) if weight is None else weight.reshape(-1).float()
    if m is None:
        w = v.reshape(1, -1, *([1] * (t.dim() - 2)))
        return (t.float() * w).sum(1, keepdim=True) if weight is not None else _code_sum(t, 1, keepdim=True)
    b, _, h, w_ = t.shape
    return torch.mv(m, v).reshape(b, h, w_, 1).permute(0, 3, 1, 2)


def _batch_sum(t: Tensor) -> Tensor:
    """``sum_b t[b]`` as a (1, C, *S) float32 tensor."""
    m = _nhwc(t)
    if m is None:
        return _code_sum(t, 0, keepdim=True)
    b, c, h, w = t.shape
    return torch.mv(m.reshape(b, -1).t(), m.new_ones(b)).reshape(1, h, w, c).permute(0, 3, 1, 2)


def _chan_total(t: Tensor) -> Tensor:
    """``sum over all but the channel dimension`` as a (C,) float32 tensor."""
    m = _nhwc(t)
    if m is None:
        return _code_sum(t, (0,) + tuple(range(2, t.dim())))
    return torch.mv(m.t(), m.new_ones(m.shape[0]))


def _box_impl(t: Tensor, k: list[int], stride: list[int], padding: list[int],
              dilation: list[int]) -> Tensor:
    """``sum_d t[b, 0, p*s + d*dil - pad]`` over the taps of each output window, the input's zero
    padding counting nothing: a one-channel convolution with an all-ones kernel, computed as one
    strided slice-add per tap (exact integer sums; ~10x cheaper than a 1-channel convolution here)."""
    tp = F.pad(t, [p for pad in reversed(padding) for p in (pad, pad)])
    out_sizes = list(_box_sizes(t, k, stride, padding, dilation))
    out = None
    for taps in _taps(k):
        idx = (slice(None), slice(None)) + _window(taps, dilation, out_sizes, stride)
        out = tp[idx].clone(memory_format=torch.contiguous_format) if out is None else out.add_(tp[idx])
    return out


def _window(taps: tuple, dilation: list, sizes: list, stride: list) -> tuple[slice, ...]:
    """Per spatial dimension, the positions tap ``taps[i]`` reads for ``sizes[i]`` outputs."""
    return tuple(slice(d * dl, d * dl + (n - 1) * st + 1, st)
                 for d, dl, n, st in zip(taps, dilation, sizes, stride))


def _box_t_impl(t: Tensor, k: list[int], stride: list[int], padding: list[int], dilation: list[int],
                spatial_in: list[int]) -> Tensor:
    """The transpose of :func:`_box`: ``sum_d t[b, 0, p]`` over the outputs ``p`` whose window holds
    input position ``q`` (``q = p*s + d*dil - pad``), as a (B, 1, *spatial_in) tensor."""
    nd = len(k)
    full = t.new_zeros(t.shape[:2] + tuple(spatial_in[i] + 2 * padding[i] + stride[i] for i in range(nd)))
    for taps in _taps(k):
        full[(slice(None), slice(None)) + _window(taps, dilation, list(t.shape[2:]), stride)] += t
    crop = [slice(None), slice(None)] + [slice(padding[i], padding[i] + spatial_in[i]) for i in range(nd)]
    return full[tuple(crop)].contiguous()


def _box_sizes(t: Tensor, k: list[int], stride: list[int], padding: list[int],
               dilation: list[int]) -> tuple[int, ...]:
    return tuple((t.shape[2 + i] + 2 * padding[i] - dilation[i] * (k[i] - 1) - 1) // stride[i] + 1
                 for i in range(len(k)))


# Opaque ops under torch.compile: traced, the per-tap slice-adds of a padded tensor become nested masked
# loads that Inductor's C++ code generation expands without end (a compiled ResNet-20 on the code route
# had not finished compiling after 25 minutes); called as they are, they cost what they cost eager.
_box_op = torch.library.custom_op("adaprec::box_sum", _box_impl, mutates_args=())
_box_op.register_fake(lambda t, k, stride, padding, dilation:
                      t.new_empty(tuple(t.shape[:2]) + _box_sizes(t, k, stride, padding, dilation)))
_box_t_op = torch.library.custom_op("adaprec::box_sum_t", _box_t_impl, mutates_args=())
_box_t_op.register_fake(lambda t, k, stride, padding, dilation, spatial_in:
                        t.new_empty(tuple(t.shape[:2]) + tuple(spatial_in)))


def _box(t: Tensor, k: tuple, geo: tuple) -> Tensor:
    """``sum_d t[b, 0, p*s + d*dil - pad]`` over the taps of each output window (:func:`_box_impl`)."""
    stride, padding, dilation = geo
    return _box_op(t, list(k), list(stride), list(padding), list(dilation))


def _box_t(t: Tensor, k: tuple, geo: tuple, spatial_in: tuple) -> Tensor:
    """The transpose of :func:`_box` (:func:`_box_t_impl`), as a (B, 1, *spatial_in) tensor."""
    stride, padding, dilation = geo
    return _box_t_op(t, list(k), list(stride), list(padding), list(dilation), list(spatial_in))


def _taps(k: tuple) -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.product(*(range(kk) for kk in k)))


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _ch(t: Tensor, nd: int) -> Tensor:
    """A per-output-channel scale (C, 1, ...) shaped to broadcast over (B, C, *spatial) outputs."""
    return t.reshape(1, -1, *([1] * nd)) if t.dim() else t


def _fast_layout(t: Tensor) -> Tensor:
    """2-d convolution operands in channels-last layout: oneDNN's bf16 convolutions are 2-4x faster in
    it (measured); the layer's output then comes out channels-last too."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.contiguous()


class CodesConv(torch.autograd.Function):
    """``y = conv(x_q, w_q) + b`` on integer codes (module docstring), for :func:`conv_ok` layers.

    Offsets are folded in exactly with small convolutions of all-ones tensors (the padding holds zeros
    of ``x_q``, not its offset), so only the main products run on the code kernel.
    """

    @staticmethod
    def forward(ctx, x, w, b, lo, hi, aq, wq, gq, via, geo, input_grad):  # noqa: D102
        nd = x.dim() - 2
        qx, sx, ox = _encode(aq, x, lo, hi, via)
        qw, sw, ow = _encode(wq, w, None, None, via)
        qx, qw = _fast_layout(qx), _fast_layout(qw)
        x_off, w_off = not aq.fmt.offset_free, not wq.fmt.offset_free
        sw_c, ow_c = _ch(sw, nd), _ch(ow, nd)
        acc = codes_conv(qx, qw, geo, via)
        add = None if b is None else _ch(b.detach(), nd)
        col = colw = None
        if x_off or w_off:
            # + ox sw[o] sum_{i,d} Qw + sx ow[o] sum_{i,d} Qx + ox ow[o] C_in #d, over taps inside the input
            ones_x = x.new_ones((1, 1) + tuple(x.shape[2:]))
            k = tuple(w.shape[2:])
            t_w = _f32_conv(ones_x, _code_sum(qw, 1, keepdim=True), geo)           # (1, C_out, *out)
            t_1 = _box(ones_x, k, geo)                                             # (1, 1, *out)
            add = (ox * sw_c) * t_w + (ox * ow_c * qx.shape[1]) * t_1 + (0.0 if add is None else add)
            if w_off:
                col, colw = _box(_chan_sum(qx), k, geo), sx * ow_c                # (B, 1, *out)
        y = scale_add_(acc, sx * sw_c, add, col, colw)
        if torch.is_grad_enabled() or any(ctx.needs_input_grad):
            _keep_for_backward(ctx, (qx, sx, ox, qw, sw, ow), gq, via, b, input_grad, x_off, w_off)
            ctx.geo = geo
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        _no_create_graph()
        qx, sx, ox, qw, sw, ow, gp = ctx.saved_tensors
        ctx.gp = gp
        via, geo = ctx.via, ctx.geo
        # Codes first, in the error's own layout (the stochastic-rounding noise follows the memory
        # order, as in the simulated backend), then the fast layout for the products.
        qg, sg, og, noise, gdeq = _error_codes(ctx, g.contiguous() if not _dense(g) else g)
        if qg is not None:
            qg = _fast_layout(qg)
        gx = gw = gb = None
        red = (0,) + tuple(range(2, g.dim()))
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            ctx.has_bias and ctx.needs_input_grad[2]
        if qg is None:  # an error format without integer codes: products of dequantized tensors
            gx, gw = _conv_bwd(gdeq, qx.float() * sx + ox, qw.float() * sw + ow, geo, None,
                               [need_x, need_w])
            return gx, gw, gdeq.sum(red) if need_b else None, None, None, None, None, None, None, None, None
        g_off = not ctx.gfmt.offset_free
        spatial_in, spatial_k = tuple(qx.shape[2:]), tuple(qw.shape[2:])
        if need_w:
            _, gw = _conv_bwd(qg, qx, qw, geo, via, [False, True])
            gw = gw.mul_(sg * sx)
            if ctx.x_off or g_off:
                # + sg ox sum_{b,p} Qg[b,o,p] + og sx sum_{b,p} Qx[b,i,p+d] + B og ox #p, inside the input
                ones_x = g.new_ones((1, 1) + spatial_in)
                ones_g = g.new_ones((1, 1) + tuple(g.shape[2:]))
                _, t_g = _conv_bwd(_batch_sum(qg), ones_x,
                                   g.new_empty((g.shape[1], 1) + spatial_k), geo, None, [False, True])
                _, t_x = _conv_bwd(ones_g, _batch_sum(qx),
                                   g.new_empty((1, qx.shape[1]) + spatial_k), geo, None, [False, True])
                _, t_1 = _conv_bwd(ones_g, ones_x, g.new_empty((1, 1) + spatial_k), geo, None,
                                   [False, True])
                gw = gw.add_((sg * ox) * t_g + (og * ox * g.shape[0]) * t_1).add_((og * sx) * t_x)
        if need_x:
            gx = _conv_input_grad(ctx, g, qg, sg, og, noise, qx, qw, sw, ow, g_off)
        if need_b:
            gb = _chan_total(qg) * sg + (g.numel() // g.shape[1]) * og
        return gx, gw, gb, None, None, None, None, None, None, None, None


def _conv_input_grad(ctx, g, qg, sg, og, noise, qx, qw, sw, ow, g_off: bool) -> Tensor:
    via, geo = ctx.via, ctx.geo
    nd = g.dim() - 2
    c_in, c_out = qx.shape[1], qw.shape[0]
    spatial_in, spatial_k = tuple(qx.shape[2:]), tuple(qw.shape[2:])
    if ctx.input_grad == "float32":
        gx, _ = _conv_bwd(qg.float() * sg + og, qx, qw.float() * sw + ow, geo, None, [True, False])
        return gx
    def ones_grad(channels: int) -> Tensor:
        return g.new_ones((1, channels) + tuple(g.shape[2:]))

    def t_w() -> Tensor:  # sum_{o,d} Qw[o,i,d] over the outputs that exist   (1, C_in, *in)
        gi, _ = _conv_bwd(ones_grad(c_out), g.new_zeros((1, c_in) + spatial_in), qw.float(), geo, None,
                          [True, False])
        return gi

    def box(t: Tensor) -> Tensor:  # sum_d t[b,0,q-d] over the outputs that exist   (B, 1, *in)
        return _box_t(t, spatial_k, geo, spatial_in)

    if sw.dim() == 0:  # a per-tensor weight scale: an exact integer product
        gx, _ = _conv_bwd(qg, qx, qw, geo, via, [True, False])
        gx = gx.mul_(sg * sw)
        if ctx.w_off or g_off:
            gx = gx.add_((sg * ow) * box(_chan_sum(qg)))
            gx = gx.add_((og * sw) * t_w() + (og * ow * c_out) * box(ones_grad(1)))
        return gx
    # Per-channel weight scales run along this sum: as in _linear_input_grad.
    if via == "bf16" or via == "bf16-out":
        ws = qw.float() * sw
        gx, _ = _conv_bwd(qg, qx, ws if via == "bf16" else ws.to(torch.bfloat16), geo, via, [True, False])
        gx = gx.mul_(sg)
        if g_off:
            gx = gx.add_(og * _conv_bwd(ones_grad(c_out), g.new_zeros((1, c_in) + spatial_in), ws, geo, None,
                                        [True, False])[0])
    else:
        qh, sh, oh = ctx.gfmt.encode(g * _ch(sw, nd), ctx.gp, rng=ctx.grng, centered=False, noise=noise,
                                     dtype=codes_dtype(via))
        gx, _ = _conv_bwd(_fast_layout(qh), qx, qw, geo, via, [True, False])
        gx = gx.mul_(sh)
        if g_off:
            gx = gx.add_(oh * t_w())
    if ctx.w_off:
        gow = _chan_sum(qg, ow).mul_(sg).add_(og * ow.sum())
        gx = gx.add_(box(gow))
    return gx
