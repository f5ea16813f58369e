"""The spread of each layer's error (the gradient at its output): a live range test for backward widths.

CPT's errors are quantized per tensor with stochastic rounding on a min-max grid
(docs/methods.md#sbm-quantizer).
The grid's step is ``(max - min) / (2^g - 1)``, so a few large entries coarsen it for every entry; with
stochastic rounding the noise added to an entry has variance up to ``step^2 / 4``, ``step^2 / 6`` on
average over positions within a step. Relative to the error's mean square that is

    NSR(g) = c^2 / (6 (2^g - 1)^2),    c = (max - min) / rms   (the error's *crest factor*),

so the narrowest width that keeps the noise below ``eps`` of the signal is
``g = ceil(log2(1 + c / sqrt(6 eps)))`` (:func:`bits_for_noise`). The crest factor is a property of the
model and the data, not of the precision: measured on the tasks of ``benchmarks/lm_policy.py`` it is
about 15 for the LSTM's errors, 25-40 for the GPT's attention output projection and MLP down
projection, 40-130 for its ``qkv`` and MLP up projections, 35-110 for the digits convolutions.

:class:`ErrorRange` measures ``c`` per quantized layer every ``every`` iterations through torch's
tensor hooks on the layers' outputs (registered with ordinary module forward hooks, removed on
detach) and keeps an exponential moving average on the device (no host sync; read ``crest`` to sync).

Example:
    >>> import torch, adaprec
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> with adaprec.Controller(model) as ctl:
    ...     er = ErrorRange(every=1).attach(ctl)
    ...     for _ in range(3):
    ...         model(torch.randn(16, 4)).pow(2).sum().backward(); ctl.step()
    >>> sorted(er.crest), er.probes, all(c > 1 for c in er.crest.values())
    (['0', '2'], 3, True)
    >>> bits_for_noise(15.0, 0.03), bits_for_noise(86.0, 0.03)
    (6, 8)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ..events import Event
from .base import Observer

if TYPE_CHECKING:  # pragma: no cover
    from ..controller import Controller

__all__ = ["ErrorRange", "bits_for_noise", "crest_factor"]


def crest_factor(x: Tensor) -> Tensor:
    """``(max - min) / rms`` of ``x`` as a 0-d tensor (0 for an all-zero tensor).

    Example:
        >>> round(float(crest_factor(torch.tensor([1.0, -1.0, 1.0, -1.0]))), 3)
        2.0
    """
    x = x.detach().float()
    rms = x.pow(2).mean().sqrt()
    return torch.where(rms > 0, (x.max() - x.min()) / rms.clamp_min(1e-30), torch.zeros_like(rms))


def bits_for_noise(crest: float, eps: float) -> int:
    """Fewest bits ``g`` with ``crest^2 / (6 (2^g - 1)^2) <= eps`` (stochastic rounding on a min-max grid).

    Example:
        >>> bits_for_noise(25.0, 0.03), bits_for_noise(40.0, 0.03)
        (6, 7)
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not math.isfinite(crest) or crest <= 0:
        return 1
    return max(1, math.ceil(math.log2(1.0 + crest / math.sqrt(6.0 * eps))))


class ErrorRange(Observer):
    """Per-layer EMA of the error's crest factor, measured every ``every`` training iterations.

    Args:
        every: measure on iterations ``0, every, 2 every, ...`` (the hooks cost one min, max and mean
            square of each layer's error on those iterations only).
        momentum: EMA decay of the crest factors, in [0, 1) (the first measurement initialises it).

    ``crest`` (a dict layer -> float, syncs) and ``probes`` (how many iterations were measured) give
    the result; ``ctl.stats["error_crest/<layer>"]`` holds the device values.
    """

    name = "error_range"

    def __init__(self, every: int = 10, momentum: float = 0.8) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, int | float) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        self.every, self.momentum = every, float(momentum)
        self.names: list[str] = []
        self.values: Tensor | None = None
        self.seen: list[bool] = []
        self.probes = 0
        self._module_hooks: list[Any] = []
        self._probing = False

    def _subscribe(self, ctl: Controller) -> None:
        modules = dict(ctl.model.named_modules())
        if self.names and self.names != list(ctl.layer_names):
            raise ValueError(f"ErrorRange state is for layers {self.names}, this controller has "
                             f"{list(ctl.layer_names)}")
        self.names = list(ctl.layer_names)
        if not self.seen:
            self.seen = [False] * len(self.names)
        for i, name in enumerate(self.names):
            self._module_hooks.append(modules[name].register_forward_hook(self._forward_hook(i)))
        self._on(ctl, Event.ITERATION_STARTED, self._start)
        self._probing = ctl.step_count % self.every == 0

    def detach(self) -> None:
        for h in self._module_hooks:
            h.remove()
        self._module_hooks.clear()
        super().detach()

    def _start(self, ctl: Controller, step: int, **_: Any) -> None:
        self._probing = step % self.every == 0
        if self._probing:
            self.probes += 1

    def _forward_hook(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            if not (self._probing and module.training):
                return
            y = out[0] if isinstance(out, tuple) else out
            if isinstance(y, PackedSequence):
                y = y.data
            if isinstance(y, Tensor) and y.requires_grad:
                y.register_hook(lambda g: self._record(i, g))
        return hook

    def _record(self, i: int, grad: Tensor) -> None:
        c = crest_factor(grad)
        if self.values is None or self.values.device != c.device:
            self.values = torch.zeros(len(self.names), dtype=torch.float32, device=c.device)
        if self.seen[i]:
            self.values[i].mul_(self.momentum).add_((1.0 - self.momentum) * c)
        else:
            self.values[i] = c
            self.seen[i] = True
        if self.ctl is not None:
            self.ctl.stats[f"error_crest/{self.names[i]}"] = self.values[i]

    @property
    def crest(self) -> dict[str, float]:
        """The measured crest factors (layers not measured yet are left out); reading syncs.

        Under ``torch.distributed`` each rank sees its own errors, so the values are reduced to their
        maximum over ranks first: every rank then reads the same numbers (and takes the same decisions).
        """
        if self.values is None:
            return {}
        vals = self.values
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            vals = vals.clone()
            torch.distributed.all_reduce(vals, op=torch.distributed.ReduceOp.MAX)
        return {n: v for n, v, s in zip(self.names, vals.tolist(), self.seen) if s}

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "values": None if self.values is None else self.values.tolist(),
                "seen": list(self.seen), "probes": self.probes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(f"ErrorRange state is for layers {state['names']}, this one watches "
                             f"{self.names}")
        self.values = None if state["values"] is None else torch.tensor(state["values"], dtype=torch.float32)
        self.seen = [bool(s) for s in state["seen"]]
        self.probes = int(state["probes"])
