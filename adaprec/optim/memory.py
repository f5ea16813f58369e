"""Measured memory of the training state: the bytes that parameters and optimizer state occupy now.

:func:`optimizer_memory` walks an optimizer's parameters and state and adds up the sizes of the
storages that hold them (``untyped_storage().nbytes()``), each storage once however many tensors view
it. A parameter or buffer held compactly (:class:`~adaprec.compact.StoredTensor`, a torchao low-bit
state, any traceable tensor subclass) counts the storages of its parts: codes, scales, kept state.
Nothing is modelled: a float32 tensor that holds bf16 *values* (the simulation) counts 4 bytes per
element, and state an optimizer creates lazily counts only once it exists (Adam's moments after the
first step).

Four parts are reported: the parameters (``weight``), the Kahan ``compensation`` of
:class:`~adaprec.optim.KahanSGD`/:class:`~adaprec.optim.Compensated`, the rest of the optimizer state
(momentum, moments, step counters, kept fractional lengths), and — separately, since they exist only
between ``backward()`` and ``zero_grad()`` — the ``gradients`` held at the moment of measuring. The
reference ``fp32_total`` is the same parameters and optimizer state in float32 (4 bytes per element;
no compensation, as an FP32 master copy has none): 12 bytes per parameter for Adam.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.optim import Optimizer
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..compact import is_stored, stored_parts
from ._stored import StoredParamsMixin

__all__ = ["MemoryReport", "optimizer_memory", "held_tensors"]


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of an optimizer's parameters and state, measured (module docstring).

    Example:
        >>> r = MemoryReport(params=10, weight=20, compensation=20, optimizer_state=20, gradients=40,
        ...                  fp32_total=120)
        >>> r.total, r.per_param, r.savings_vs_fp32
        (60, 6.0, 0.5)
    """

    params: int
    weight: int
    compensation: int
    optimizer_state: int
    gradients: int
    fp32_total: int

    @property
    def total(self) -> int:
        """Parameters, compensation and optimizer state (gradients apart)."""
        return self.weight + self.compensation + self.optimizer_state

    @property
    def per_param(self) -> float:
        return self.total / self.params if self.params else 0.0

    @property
    def savings_vs_fp32(self) -> float:
        """Fraction of the float32 parameters + state saved (0.5 = half the memory)."""
        return 1.0 - self.total / self.fp32_total if self.fp32_total else 0.0


def held_tensors(t: Tensor) -> list[Tensor]:
    """The plain tensors whose storages hold ``t``: its parts for a stored tensor or another traceable
    tensor subclass (torchao's low-bit states), ``t`` itself otherwise."""
    if is_stored(t):
        return stored_parts(t)
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        out: list[Tensor] = []
        for n in names:
            inner = getattr(t, n)
            if isinstance(inner, Tensor):  # a DTensor also names its device mesh: not a tensor
                out += held_tensors(inner)
        return out
    return [t]


class _Counter:
    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()

    def bytes(self, tensors: Iterable[Tensor]) -> int:
        total = 0
        for t in tensors:
            for part in held_tensors(t):
                s = part.untyped_storage()
                key = (str(part.device), s.data_ptr())
                if s.nbytes() == 0 or key in self.seen:
                    continue
                self.seen.add(key)
                total += s.nbytes()
        return total


def _state_tensors(optimizer: Optimizer) -> Iterator[tuple[str, str, Tensor]]:
    """``(part, key, tensor)`` for every tensor of the optimizer's state, its inner optimizer's included."""
    states: list[tuple[Any, bool]] = [(optimizer.state, isinstance(optimizer, StoredParamsMixin))]
    inner = getattr(optimizer, "inner", None)  # adaprec.optim.Compensated's wrapped optimizer
    if isinstance(inner, Optimizer):
        states.append((inner.state, False))
    for state, ours in states:
        for st in state.values():
            for k, v in _items(st):
                if isinstance(v, Tensor):
                    yield ("compensation" if ours and k == "comp" else "optimizer_state"), k, v


def _items(st: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(st, dict):
        for k, v in st.items():
            if isinstance(v, dict | list | tuple):
                yield from _items(v)
            else:
                yield k, v
    elif isinstance(st, list | tuple):
        for v in st:
            yield from _items(v)


def optimizer_memory(optimizer: Optimizer) -> MemoryReport:
    """Measure the bytes of the parameters an optimizer holds, of its state and of their gradients.

    Example:
        >>> import torch
        >>> from adaprec.optim import Compensated
        >>> w = torch.nn.Parameter(torch.zeros(4096))
        >>> opt = Compensated(torch.optim.Adam([w]), weight_format="bf16", state_format="8bit")
        >>> w.grad = torch.ones(4096); opt.step()
        >>> r = optimizer_memory(opt)   # w float32 here (4 B), comp bf16 (2 B), moments 8-bit (1 B each)
        >>> r.weight, r.compensation, r.optimizer_state, r.fp32_total   # + 2 scales each, + step
        (16384, 8192, 8214, 49156)
    """
    count = _Counter()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    n = sum(p.numel() for p in params)
    weight = count.bytes(params)
    parts = {"compensation": 0, "optimizer_state": 0}
    fp32 = 4 * n
    for part, key, t in _state_tensors(optimizer):
        parts[part] += count.bytes([t])
        if part == "optimizer_state" and key != "w_fl":  # FP32 training keeps no fractional lengths
            fp32 += 4 * t.numel()
    grads = count.bytes([p.grad for p in params if p.grad is not None])
    return MemoryReport(params=n, weight=weight, compensation=parts["compensation"],
                        optimizer_state=parts["optimizer_state"], gradients=grads, fp32_total=fp32)
