"""Modelled memory of training state: weight + compensation + optimizer state, per parameter.

In simulation every value is a float32 tensor; these figures are what the chosen *formats* would
cost in packed storage: a ``b``-bit format costs ``b / 8`` bytes (8-bit fixed point 1, bf16 2, FP32 4).
Optimizer state buffers (momentum, Adam's moments, …) are counted in ``state_format`` (FP32 by default,
which is how the optimizers here keep them). Per-tensor scalars (step counters, a fixed-point tensor's
fractional length) are negligible and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop

from ._stored import StoredParamsMixin, check_update
from .compensated import Compensated
from .kahan import KahanSGD
from .storage import Storage, storage_format

__all__ = ["MemoryCost", "bytes_per_param", "state_buffers", "optimizer_memory", "MemoryReport"]


@dataclass(frozen=True)
class MemoryCost:
    """Bytes per parameter of each part of the training state.

    Example:
        >>> c = MemoryCost(weight=1.0, compensation=1.0, optimizer_state=4.0)
        >>> c.total, round(c.relative_to(MemoryCost(4.0, 0.0, 4.0)), 2)
        (6.0, 0.75)
    """

    weight: float
    compensation: float
    optimizer_state: float

    @property
    def total(self) -> float:
        return self.weight + self.compensation + self.optimizer_state

    def relative_to(self, other: MemoryCost) -> float:
        """``self.total / other.total`` (e.g. against plain FP32 training with the same optimizer)."""
        return self.total / other.total


def bytes_per_param(
    weight_format: object = "fp32",
    comp_format: object = None,
    *,
    update: str = "kahan",
    state_buffers: int = 0,
    state_format: object = "fp32",
) -> MemoryCost:
    """Modelled bytes per parameter for a storage format, its compensation and ``state_buffers``
    optimizer buffers (1 for SGD momentum, 2 for Adam) held in ``state_format``.

    The compensation counts only with ``update="kahan"``; ``comp_format=None`` is its default (same
    width as the weight).

    Example:
        >>> bytes_per_param("fx8").total                                   # 8-bit weight + 8-bit c
        2.0
        >>> bytes_per_param("bf16", state_buffers=1).total                 # + FP32 momentum
        8.0
        >>> bytes_per_param("fp32", update="nearest", state_buffers=2).total   # plain FP32 Adam
        12.0
    """
    check_update(update)
    if isinstance(state_buffers, bool) or not isinstance(state_buffers, int) or state_buffers < 0:
        raise ValueError(f"state_buffers must be an int >= 0, got {state_buffers!r}")
    storage = Storage(weight_format, comp_format)
    state_bits = storage_format(state_format, role="optimizer state").bits
    return MemoryCost(
        weight=storage.weight.bits / 8.0,
        compensation=storage.comp.bits / 8.0 if update == "kahan" else 0.0,
        optimizer_state=state_buffers * state_bits / 8.0,
    )


def state_buffers(optimizer: Optimizer, group: dict[str, Any]) -> int:
    """Number of parameter-sized state buffers ``optimizer`` keeps for the parameters of ``group``."""
    inner = optimizer.inner if isinstance(optimizer, Compensated) else optimizer
    kind = type(inner)
    if kind in (SGD, KahanSGD):
        return int(group.get("momentum", 0) != 0)
    if kind in (Adam, AdamW):
        return 2 + int(bool(group.get("amsgrad", False)))
    if kind is RMSprop:
        return 1 + int(group.get("momentum", 0) != 0) + int(bool(group.get("centered", False)))
    if kind is Adagrad:
        return 1
    known = "KahanSGD, Compensated, torch.optim.SGD, Adam, AdamW, RMSprop, Adagrad"
    raise TypeError(f"no memory model for optimizer {kind.__name__}; known: {known}")


@dataclass(frozen=True)
class MemoryReport:
    """Modelled bytes of an optimizer's whole training state, and of plain FP32 training with the same
    optimizer (FP32 weights, the same state buffers, no compensation).

    Example:
        >>> r = MemoryReport(params=10, weight=10.0, compensation=10.0, optimizer_state=40.0,
        ...                  fp32_total=80.0)
        >>> r.total, r.per_param, r.savings_vs_fp32
        (60.0, 6.0, 0.25)
    """

    params: int
    weight: float
    compensation: float
    optimizer_state: float
    fp32_total: float

    @property
    def total(self) -> float:
        return self.weight + self.compensation + self.optimizer_state

    @property
    def per_param(self) -> float:
        return self.total / self.params if self.params else 0.0

    @property
    def savings_vs_fp32(self) -> float:
        """Fraction of the FP32 training state saved (0.25 = a quarter less memory)."""
        return 1.0 - self.total / self.fp32_total if self.fp32_total else 0.0


def optimizer_memory(optimizer: Optimizer, *, state_format: object = "fp32") -> MemoryReport:
    """Modelled memory of the parameters and state an optimizer manages.

    Works for :class:`~adaprec.optim.KahanSGD`, :class:`~adaprec.optim.Compensated` (storage formats
    from their groups) and plain ``SGD``/``Adam``/``AdamW``/``RMSprop``/``Adagrad`` (FP32 weights).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(100))
        >>> r = optimizer_memory(KahanSGD([w], lr=0.1, momentum=0.9, weight_format="bf16"))
        >>> r.per_param, r.savings_vs_fp32                # 2 + 2 + 4 bytes against 4 + 4
        (8.0, 0.0)
    """
    n = 0
    weight = comp = state = fp32 = 0.0
    for group in optimizer.param_groups:
        k = state_buffers(optimizer, group)
        if isinstance(optimizer, StoredParamsMixin):
            group_cost = bytes_per_param(group["weight_format"], group["comp_format"], update=group["update"],
                                         state_buffers=k, state_format=state_format)
        else:
            group_cost = bytes_per_param("fp32", update="nearest", state_buffers=k, state_format=state_format)
        base = bytes_per_param("fp32", update="nearest", state_buffers=k, state_format="fp32")
        for p in group["params"]:
            # A parameter may be stored in its own format (set_param_format, e.g. by storage mode).
            own = optimizer.param_format(p) if isinstance(optimizer, StoredParamsMixin) else None
            cost = group_cost if own is None else bytes_per_param(
                own[0], own[1], update=group["update"], state_buffers=k, state_format=state_format)
            m = p.numel()
            n += m
            weight += m * cost.weight
            comp += m * cost.compensation
            state += m * cost.optimizer_state
            fp32 += m * base.total
    return MemoryReport(params=n, weight=weight, compensation=comp, optimizer_state=state, fp32_total=fp32)
