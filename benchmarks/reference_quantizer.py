"""A straightforward reimplementation of the CPT authors' quantizer, as a speed baseline for adaprec.

The released CPT code (built on the SBM quantizer of Banner et al.) fakes low precision the direct way,
and this module does the same, written from the description in docs/methods.md#sbm-quantizer rather than
copied:

* the bit-width is a Python ``int`` set from the cosine schedule after every optimizer step, so every
  new bit-width is a new constant for ``torch.compile`` (a recompilation);
* min and max are two separate reductions taken in Python per call — per output channel for weights
  (flatten, ``min(1)``/``max(1)``), per tensor for activations and errors, the per-tensor ones read back
  to Python floats (``float(x.min())``, a host sync on a GPU);
* the tensor is cloned, shifted and scaled in place; stochastic rounding adds
  ``torch.rand_like(x) - 0.5`` before rounding; then clamp, round, and scale back;
* activations keep a running min/max (momentum 0.1) used in eval mode; errors are quantized in the
  backward of an identity placed on each layer's output, with stochastic rounding.

Numerically it is the same SBM grid as ``adaprec.Precision.cpt`` (both quantize with the batch's own
range in training). Only speed is compared (benchmarks/overhead.py, configuration ``cpt-reference``).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with ReferenceCPT(model, opt, bits=(3, 8), grad_bits=8, cycles=2, total_steps=8) as ref:
    ...     for _ in range(3):
    ...         model(torch.randn(2, 3, 6, 6)).sum().backward(); opt.step()
    >>> ref.bits_seen, "forward" in model[0].__dict__
    ([3, 4, 6], False)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReferenceCPT", "reference_quantize", "cpt_bits"]


def cpt_bits(t: int, total_steps: int, cycles: int, low: int, high: int) -> int:
    """CPT's cosine-growth schedule (docs/methods.md#cpt-schedule) with Python numbers; ``round`` is
    half-to-even.

    Example:
        >>> [cpt_bits(t, 64000, 32, 3, 8) for t in (0, 500, 1000, 1999, 2000)]
        [3, 4, 6, 8, 3]
    """
    period = max(total_steps // cycles, 1)
    u = (t % period) / period
    return round(low + 0.5 * (high - low) * (1 - math.cos(math.pi * u)))


def reference_quantize(x: Tensor, bits: int, per_channel: bool = False, stochastic: bool = False,
                       lo: float | Tensor | None = None, hi: float | Tensor | None = None) -> Tensor:
    """Min-max fake quantization to ``2**bits`` levels, the way the released code does it."""
    levels = 2.0**bits - 1.0
    if lo is None or hi is None:
        if per_channel:
            flat = x.detach().flatten(1)
            shape = (-1,) + (1,) * (x.dim() - 1)
            lo, hi = flat.min(1)[0].view(shape), flat.max(1)[0].view(shape)
        else:
            lo, hi = float(x.detach().min()), float(x.detach().max())
    if isinstance(lo, Tensor):
        scale = ((hi - lo) / levels).clamp(min=1e-8)
    else:
        scale = max((hi - lo) / levels, 1e-8)
    out = x.detach().clone()
    out.sub_(lo).div_(scale)
    if stochastic:
        out.add_(torch.rand_like(out) - 0.5)
    out.clamp_(0.0, levels).round_()
    return out.mul_(scale).add_(lo)


class _QuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits, per_channel, lo, hi):  # noqa: D102
        return reference_quantize(x, bits, per_channel, False, lo, hi)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g, None, None, None, None


class _QuantGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, bits):  # noqa: D102
        ctx.bits = bits
        return y.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return reference_quantize(g, ctx.bits, False, True), None


class _RunningRange:
    """Running min/max of a layer's input (momentum 0.1, as in the SBM QuantMeasure)."""

    def __init__(self, momentum: float = 0.1) -> None:
        self.lo: float | None = None
        self.hi: float | None = None
        self.momentum = momentum

    def __call__(self, x: Tensor, training: bool) -> tuple[float, float]:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if training:
            if self.lo is None:
                self.lo, self.hi = lo, hi
            else:
                m = self.momentum
                self.lo = self.lo * (1 - m) + lo * m
                self.hi = self.hi * (1 - m) + hi * m
            return lo, hi
        return (lo, hi) if self.lo is None else (self.lo, self.hi)


class ReferenceCPT:
    """Cyclic precision on every Conv2d and Linear of ``model`` with the reference quantizer.

    Bit-widths follow :func:`cpt_bits` and advance after each ``optimizer.step()``. Leaving the
    ``with`` block removes every trace (instance forwards and the optimizer hook).

    Args:
        model: the model; its ``nn.Conv2d`` and ``nn.Linear`` layers are quantized.
        optimizer: its step post-hook advances the schedule.
        bits: ``(B_min, B_max)`` forward bits; grad_bits: constant error bits.
        cycles, total_steps: the schedule (period ``total_steps // cycles``).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, bits: tuple[int, int] = (3, 8),
                 grad_bits: int = 8, cycles: int = 32, total_steps: int = 64000) -> None:
        low, high = bits
        if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high <= 16):
            raise ValueError(f"bits must be two ints 1 <= B_min <= B_max <= 16, got {bits!r}")
        if not (isinstance(grad_bits, int) and 1 <= grad_bits <= 16):
            raise ValueError(f"grad_bits must be an int in 1..16, got {grad_bits!r}")
        if cycles < 1 or total_steps < cycles:
            raise ValueError(f"need 1 <= cycles <= total_steps, got cycles={cycles}, "
                             f"total_steps={total_steps}")
        self.model, self.optimizer = model, optimizer
        self.low, self.high, self.grad_bits = low, high, grad_bits
        self.cycles, self.total_steps = cycles, total_steps
        self.step = 0
        self.bits = cpt_bits(0, total_steps, cycles, low, high)
        self.bits_seen: list[int] = []
        self._layers = [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
        self._hook = None

    def _advance(self, *_: object) -> None:
        self.step += 1
        self.bits = cpt_bits(self.step, self.total_steps, self.cycles, self.low, self.high)

    def _forward(self, module: nn.Module, rng: _RunningRange, x: Tensor) -> Tensor:
        if module.training and (not self.bits_seen or self._last_step != self.step):
            self.bits_seen.append(self.bits)
            self._last_step = self.step
        lo, hi = rng(x, module.training)
        xq = _QuantSTE.apply(x, self.bits, False, lo, hi)
        wq = _QuantSTE.apply(module.weight, self.bits, True, None, None)
        if isinstance(module, nn.Conv2d):
            y = module._conv_forward(xq, wq, module.bias)
        else:
            y = F.linear(xq, wq, module.bias)
        return _QuantGrad.apply(y, self.grad_bits) if y.requires_grad else y

    def __enter__(self) -> ReferenceCPT:
        self._last_step = -1
        for m in self._layers:
            rng = _RunningRange()
            m.forward = lambda x, m=m, rng=rng: self._forward(m, rng, x)
        self._hook = self.optimizer.register_step_post_hook(self._advance)
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self._layers:
            m.__dict__.pop("forward", None)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
