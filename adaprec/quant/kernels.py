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

Stochastic rounding uses ``floor(v + r)`` with ``r ~ U[0, 1)``, which has the same distribution as
``round(v + U(-0.5, 0.5))`` and saves one operation.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quantize", "int_quantize", "fixed_quantize", "float_quantize", "batch_range"]


def _round(v: Tensor, stochastic: bool) -> Tensor:
    if stochastic:
        return torch.floor(v + torch.rand_like(v))
    return torch.round(v)  # half to even, like numpy's rint and the IEEE default


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
    """Asymmetric uniform min-max quantization (SBM / CPT, METHODS.md §1.2).

    ``q = clamp(round((x - min) / scale), 0, qmax)``, ``x_q = q * scale + min`` with
    ``scale = max((max - min) / qmax, 1e-8)``. ``lo``/``hi`` replace the batch range (eval mode).
    """
    if lo is None or hi is None:
        lo, hi = batch_range(x, per_channel)
    qmax = p[0]
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    q = _round((x - lo) / scale, stochastic)
    q = torch.minimum(q.clamp_min(0.0), qmax)
    return q * scale + lo


def fixed_quantize(x: Tensor, p: Tensor, stochastic: bool = True) -> Tensor:
    """Dynamic fixed point with MuPPET's per-tensor power-of-two scale (METHODS.md §2.1), saturating.

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
    q = _round(x * up, stochastic)
    q = torch.maximum(torch.minimum(q, half - 1.0), -half)
    return q / up


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
    ulp = torch.exp2(e - mbits)
    q = _round(x / ulp, stochastic) * ulp
    return torch.maximum(torch.minimum(q, maxval), -maxval)


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
