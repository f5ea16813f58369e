"""The divergence guard: skip non-finite low-precision steps and raise the precision of the culprits.

When the gradients of a step are not finite (NaN/Inf — a NaN loss gives NaN gradients too), the guard
skips the optimizer update (as ``torch.amp.GradScaler`` does, so weights and optimizer state are left
exactly as they were), raises the precision of the affected layers by one level, fires
``"divergence"`` on the controller's bus and logs a warning. After ``max_failures`` consecutive
failures — or at once if the affected layers already run in FP32, where quantization cannot be the
cause — it stops with an error that names the layer and its precision.

One level is the format's own :meth:`~adaprec.formats.Format.up`: integer/fixed-point widths grow by
``bits_step`` (capped at 16, then FP32); fp8 → bf16 → FP32; mxfp4 → mxfp6 → mxfp8 → bf16.
The raise is kept as a per-layer floor for the rest of the run (it is part of the controller's
state_dict).

Cost: the check reads one scalar from the device per step (the same host sync ``GradScaler.step``
makes). Pass ``guard=False`` to the controller for a loop with no per-step sync.

Example:
    >>> import torch, adaprec
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> with adaprec.Controller(model, policy="fixed", optimizer=opt,
    ...                         guard=DivergenceGuard(max_failures=3)) as ctl:
    ...     model(torch.randn(2, 4)).sum().backward()
    ...     model[0].weight.grad[0, 0] = float("nan")
    ...     before = model[0].weight.detach().clone()
    ...     opt.step()
    >>> torch.equal(model[0].weight, before), ctl.current["0"].weight.bits
    (True, 10)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from .formats import Format, Precision

if TYPE_CHECKING:  # pragma: no cover
    from .controller import Controller

__all__ = ["DivergenceGuard", "DivergenceError", "raise_one_level"]

log = logging.getLogger("adaprec")
_ROLES = ("weight", "activation", "gradient")


class DivergenceError(RuntimeError):
    """Training keeps producing non-finite values although precision was raised."""


def raise_one_level(p: Precision, bits_step: int = 2) -> Precision:
    """``p`` one level up in every role: each format's :meth:`~adaprec.formats.Format.up` (``bits_step``
    more bits where the width is free)."""
    return p.map(lambda f: f.up(bits_step))


def _at_least(p: Precision, floor: Precision) -> Precision:
    def pick(a: Format, b: Format) -> Format:
        return b if b.cost_bits > a.cost_bits else a

    return Precision(*(pick(getattr(p, r), getattr(floor, r)) for r in _ROLES))


class DivergenceGuard:
    """Skips non-finite steps, raises precision, fails clearly if the problem persists.

    Args:
        max_failures: consecutive non-finite steps tolerated before :class:`DivergenceError`.
        bits_step: bits added per level for integer / fixed-point formats.

    Example:
        >>> DivergenceGuard(max_failures=2).max_failures
        2
    """

    def __init__(self, max_failures: int = 5, bits_step: int = 2) -> None:
        for name, v in (("max_failures", max_failures), ("bits_step", bits_step)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DivergenceGuard: {name} must be a positive integer, got {v!r}")
        self.max_failures = max_failures
        self.bits_step = bits_step
        self.floors: dict[str, Precision] = {}
        self.consecutive = 0
        self.skipped = 0
        self.armed = False  # set at the first step that runs in low precision

    # -- as a constraint: keep the raised layers at least at their floor ----------------------------
    def __call__(self, layers: dict[str, Precision], ctl: Any) -> dict[str, Precision]:
        if not self.floors:
            return layers
        return {n: (_at_least(p, self.floors[n]) if n in self.floors else p) for n, p in layers.items()}

    # -- the check ----------------------------------------------------------------------------------
    def watching(self, layers: dict[str, Precision]) -> bool:
        """Whether to check this step: from the first step with a low-precision layer on, to the end.

        A run that has been FP32 throughout is left alone like plain PyTorch (no per-step sync); once
        low precision was used, FP32 steps are checked too, so a run the guard (or a policy such as
        MuPPET) has raised to FP32 still stops with a clear error instead of applying a NaN update.
        """
        if not self.armed and any(not p.is_fp32 for p in layers.values()):
            self.armed = True
        return self.armed

    def step_ok(self, ctl: Controller) -> bool:
        """True if the gradients are finite; otherwise record the failure and raise precision."""
        grads = [p.grad for p in ctl.model.parameters() if p.grad is not None]
        if not grads:
            return True
        total = torch.stack(torch._foreach_norm(grads)).sum()
        if bool(torch.isfinite(total)):  # the one host sync per step
            self.consecutive = 0
            return True
        self._fail(ctl)
        return False

    def _fail(self, ctl: Controller) -> None:
        bad = self._affected(ctl)
        self.consecutive += 1
        self.skipped += 1
        current = ctl.current
        if all(current[n].is_fp32 for n in bad):
            names = ", ".join(bad)
            raise DivergenceError(
                f"non-finite gradients at step {ctl.step_count} in layer(s) {names} running in FP32: "
                "quantization is not the cause — check the input data (NaN/Inf in the batch?), the loss "
                "and the learning rate")
        if self.consecutive >= self.max_failures:
            worst = next(n for n in bad if not current[n].is_fp32)
            raise DivergenceError(
                f"{self.consecutive} consecutive non-finite steps (up to step {ctl.step_count}); layer "
                f"{worst!r} at {current[worst].short()} still diverges after raising precision. Lower the "
                "learning rate, check the data, or start from a higher precision")
        for n in bad:
            self.floors[n] = raise_one_level(current[n], self.bits_step)
        log.warning("adaprec: non-finite gradients at step %d; skipped the update and raised %s to %s",
                    ctl.step_count, ", ".join(bad), ", ".join(self.floors[n].short() for n in bad))
        ctl.fire("divergence", step=ctl.step_count, layers=bad,
                 precisions={n: self.floors[n] for n in bad})
        # The raise applies from the next iteration (this one ran, and is costed, at the old precision):
        # forgetting the last decision makes the controller re-resolve it, floors included, at the start.
        ctl._decision = None

    @staticmethod
    def _affected(ctl: Controller) -> list[str]:
        bad = []
        for name, site in ctl.backend.sites.items():
            for p in site.module.parameters():
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    bad.append(name)
                    break
        # Non-finite values outside the quantized layers (or everywhere): raise every layer.
        return bad or list(ctl.backend.sites)

    def state_dict(self) -> dict[str, Any]:
        return {"floors": dict(self.floors), "consecutive": self.consecutive, "skipped": self.skipped,
                "armed": self.armed}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.floors = dict(d["floors"])
        self.consecutive = int(d["consecutive"])
        self.skipped = int(d["skipped"])
        self.armed = bool(d.get("armed", self.floors))  # states saved before "armed" existed
