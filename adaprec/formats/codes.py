"""Integer codes in one pass over memory: the round, clamp, shift and cast of :meth:`Format.encode`.

A format's integer arithmetic (:func:`~adaprec.formats.integer.int_codes`,
:func:`~adaprec.formats.fixed.fixed_codes`) is a short chain of torch operations, each a pass over the
tensor. The hardware backend turns every activation, weight and error of a quantized layer into codes
at each step, and there those passes cost as much as the low-precision product itself (measured: a
2048 x 512 float32 tensor to bf16 codes takes 3.3 ms op by op, 1.3 ms fused, next to a 3.3 ms bf16
product). So the chain is written once here and, for large CPU tensors, compiled by ``torch.compile``
(Inductor's C++ backend) into one loop: the same operations in the same order, so the codes are the
ones the simulated kernels compute, bit for bit (``tests/test_speed_routes.py`` checks it).

* Below :data:`FUSE_MIN` elements, and while ``torch.compile`` is already tracing (the outer graph fuses
  it anyway), the chain runs as it is.
* ``ADAPREC_FUSED=0`` in the environment, or ``set_fused(False)``, turns compilation off; a compiler
  failure turns it off too (once, with a warning) and the chain runs eagerly from then on.
* Stochastic rounding takes its noise ready-drawn (:func:`~adaprec.formats.rounding.draw_noise`): an
  opaque draw inside a fused loop would keep it from being vectorized.

Example:
    >>> import torch
    >>> x = torch.tensor([0.0, 0.26, 0.5, 1.0])
    >>> lo, scale = torch.tensor(0.0), torch.tensor(1 / 3)
    >>> affine_codes(x, lo, scale, torch.tensor(3.0), torch.tensor(2.0), None, False, torch.int8).tolist()
    [-2, -1, 0, 1]
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .rounding import round_with

__all__ = ["affine_codes", "fixed_point_codes", "set_fused", "fused_enabled", "FUSE_MIN", "tensor_range",
           "scale_add_", "weighted_row_sum"]

#: Tensors with fewer elements run op by op (a compiled call's fixed cost is larger than the saving).
FUSE_MIN = 1 << 15

_STATE = {"enabled": os.environ.get("ADAPREC_FUSED", "1") not in ("0", "false", "no", "off")}
_COMPILED: dict[tuple, Callable[..., Tensor]] = {}


def set_fused(enabled: bool) -> None:
    """Turn the compiled code kernels on or off for this process (default: on unless ``ADAPREC_FUSED=0``)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fused takes True or False, got {enabled!r}")
    _STATE["enabled"] = enabled


def fused_enabled() -> bool:
    return _STATE["enabled"]


def tensor_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.aminmax(x)`` (0-d min and max), reading a dense tensor of any layout in memory order:
    ``torch.aminmax`` first copies a channels-last tensor into a contiguous one (measured: the copy
    costs more than the reduction)."""
    x = x.detach()
    if x.dim() > 1 and not x.is_contiguous() and _is_dense(x):
        x = x.as_strided((x.numel(),), (1,))
    return torch.aminmax(x)


def _is_dense(x: Tensor) -> bool:
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) \
        or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d))


def _affine(x: Tensor, lo: Tensor, scale: Tensor, shift: Tensor, qmax: Tensor, noise: Tensor | None, *,
            clamp_low: bool = False, dtype: torch.dtype = torch.float32) -> Tensor:
    v = torch.sub(x, lo).div_(scale)
    v = v.round_() if noise is None else round_with(v, noise)
    if clamp_low:
        v = v.clamp_min_(0.0)
    return v.clamp_max_(qmax).sub_(shift).to(dtype)


def _fixed(x: Tensor, up: Tensor, half: Tensor, noise: Tensor | None, *,
           dtype: torch.dtype = torch.float32) -> Tensor:
    v = torch.mul(x, up)
    v = v.round_() if noise is None else round_with(v, noise)
    return v.clamp_max_(half - 1.0).clamp_min_(-half).to(dtype)


def _flat(t: Tensor, rows: int) -> Tensor:
    """A dense tensor as a (rows, numel / rows) view of its memory, in memory order (any layout)."""
    return t.as_strided((rows, t.numel() // rows), (t.numel() // rows, 1))


def _dense_rows(x: Tensor, per_row: bool) -> int | None:
    """How many rows the fused kernel sees ``x`` as: 1 (per tensor) or ``x.shape[0]`` (per output
    channel, dim 0 outermost in memory); ``None`` when ``x`` is not a dense block of memory."""
    if not (x.is_contiguous() or _is_dense(x)):
        return None
    if not per_row:
        return 1
    return x.shape[0] if x.is_contiguous() and x.dim() > 1 else None


def _kernel(fn: functools.partial, key: tuple) -> Callable[..., Tensor]:
    compiled = _COMPILED.get(key)
    if compiled is None:
        # A fresh function (own code object, static options as keyword defaults) per variant: torch.compile
        # caches graphs per code object, so variants never crowd each other out of its recompile limit,
        # and shapes and bit-widths (dynamic sizes, values in tensors) never recompile one.
        f = fn.func
        clone = types.FunctionType(f.__code__.replace(co_name=f"{f.__name__}_{len(_COMPILED)}"),
                                   f.__globals__, f"{f.__name__}_{len(_COMPILED)}")
        clone.__kwdefaults__ = dict(fn.keywords)
        compiled = _COMPILED[key] = torch.compile(clone, dynamic=True, fullgraph=True)
    return compiled


def _run(fn: functools.partial, key: tuple, x: Tensor, per_row: bool, scales: tuple[Tensor, ...],
         consts: tuple[Tensor, ...], noise: Tensor | None) -> Tensor:
    """``fn(x, *scales, *consts, noise)`` fused when worthwhile (module docstring), else op by op.

    ``scales`` are 0-d or per-row tensors shaped to broadcast against ``x``; ``consts`` are 0-d.
    """
    rows = None
    if (_STATE["enabled"] and x.device.type == "cpu" and x.numel() >= FUSE_MIN
            and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()):
        rows = _dense_rows(x, per_row)
        if noise is not None and (noise.shape != x.shape or noise.stride() != x.stride()):
            rows = None
    if rows is None:
        return fn(x, *scales, *consts, noise)
    # The kernel sees (rows, n) views of memory with (rows, 1) scales: a fixed rank, so layouts and
    # shapes share one compiled graph; the codes come back in x's own layout.
    flat_scales = tuple(t.reshape(rows, 1) if t.dim() else t.reshape(1, 1) for t in scales)
    args = (_flat(x, rows), *flat_scales, *consts, None if noise is None else _flat(noise, rows))
    try:
        out = _kernel(fn, key + (rows == 1,))(*args)
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, an Inductor bug: fall back, same numbers
        _STATE["enabled"] = False
        warnings.warn(f"adaprec: compiling the fused code kernels failed ({type(exc).__name__}: {exc}); "
                      "they run op by op from now on (same numbers, slower)", stacklevel=3)
        return fn(x, *scales, *consts, noise)
    return out.as_strided(x.shape, x.stride())


def affine_codes(x: Tensor, lo: Tensor, scale: Tensor, qmax: Tensor, shift: Tensor, noise: Tensor | None,
                 clamp_low: bool, dtype: torch.dtype) -> Tensor:
    """``clamp(round((x - lo) / scale), 0, qmax) - shift`` as ``dtype`` (the min-max grid's codes).

    ``lo``/``scale``/``shift``: 0-d, or per output channel (``x.shape[0]``) shaped to broadcast;
    ``noise`` (from :func:`~adaprec.formats.rounding.draw_noise`) rounds stochastically; ``clamp_low``
    also clamps below (needed when ``lo`` is not ``x``'s own minimum).
    """
    per_row = any(t.dim() for t in (lo, scale, shift))
    fn = functools.partial(_affine, clamp_low=clamp_low, dtype=dtype)
    return _run(fn, ("affine", clamp_low, noise is None, dtype), x, per_row, (lo, scale, shift), (qmax,),
                noise)


def fixed_point_codes(x: Tensor, up: Tensor, half: Tensor, noise: Tensor | None,
                      dtype: torch.dtype) -> Tensor:
    """``clamp(round(x * up), -half, half - 1)`` as ``dtype`` (dynamic fixed point's codes; ``up`` 0-d)."""
    fn = functools.partial(_fixed, dtype=dtype)
    return _run(fn, ("fixed", noise is None, dtype), x, False, (up,), (half,), noise)


def _scale_add(acc: Tensor, scale: Tensor, add: Tensor | None, col: Tensor | None,
               colw: Tensor | None) -> Tensor:
    # An integer accumulator (torch._int_mm's int32) becomes float32 here, in the same pass when fused.
    acc = acc.mul_(scale) if acc.dtype == torch.float32 else acc.to(torch.float32).mul_(scale)
    if col is not None:
        acc = acc.addcmul_(col, colw)
    return acc if add is None else acc.add_(add)


def _weighted_row_sum(q: Tensor, w: Tensor) -> Tensor:
    return (q.to(torch.float32) * w).sum(1, keepdim=True)


def _fuse_ok(t: Tensor) -> bool:
    return (_STATE["enabled"] and t.device.type == "cpu" and t.numel() >= FUSE_MIN
            and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack())


def _fused(fn: Callable[..., Tensor], key: tuple, *args: Tensor | None) -> Tensor:
    try:
        return _kernel(functools.partial(fn), key)(*args)
    except Exception as exc:  # noqa: BLE001 - as in _run
        _STATE["enabled"] = False
        warnings.warn(f"adaprec: compiling the fused code kernels failed ({type(exc).__name__}: {exc}); "
                      "they run op by op from now on (same numbers, slower)", stacklevel=3)
        return fn(*args)


def scale_add_(acc: Tensor, scale: Tensor, add: Tensor | None = None, col: Tensor | None = None,
               colw: Tensor | None = None) -> Tensor:
    """``acc * scale + col * colw + add`` (the other tensors broadcast against ``acc``): the epilogue of an
    integer-code product, one pass over memory when fused (``FUSE_MIN`` and the switches of the module
    docstring apply). In place in a float32 ``acc``; an integer ``acc`` (``torch._int_mm``'s int32 sums)
    is converted to float32 in that same pass, into a new tensor."""
    if not _fuse_ok(acc):
        return _scale_add(acc, scale, add, col, colw)
    # Ranks and dtypes in the key: each variant compiles once (sizes stay dynamic inside one).
    key = ("scale_add", acc.dim(), acc.dtype, scale.dim(), None if add is None else add.dim(), col is None)
    out = _fused(_scale_add, key, acc, scale, add, col, colw)
    # A float32 acc is updated in place (the compiled graph writes into its input); an integer one
    # cannot hold the result, which comes back as a new tensor.
    return acc if acc.dtype == torch.float32 else out


def weighted_row_sum(q: Tensor, w: Tensor) -> Tensor:
    """``sum_n q[m, n] * w[n]`` as an (M, 1) float32 tensor, for a 2-d code tensor ``q`` of any dtype and
    a (1, N) float32 ``w``: one pass over the codes when fused (a float32 copy of int8 codes costs
    more than the sum)."""
    if not _fuse_ok(q) or q.dim() != 2:
        return _weighted_row_sum(q, w)
    return _fused(_weighted_row_sum, ("weighted_row_sum", q.dtype), q, w)
