"""What the trainer callbacks share: checking the controller options, and the scalars they log."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from ..controller import Controller
from ..policies import make_policy

#: Options the callbacks take from the trainer itself; passing them too would be ambiguous.
FROM_TRAINER = ("optimizer", "scaler")


def check_options(owner: str, policy: Any, options: dict[str, Any]) -> None:
    """Refuse, at the callback's construction, what the Controller would refuse only once training runs:
    an unknown policy and unknown or trainer-owned keyword arguments."""
    for name in FROM_TRAINER:
        if name in options:
            raise TypeError(f"{owner}: {name}= comes from the trainer (its optimizer and its GradScaler); "
                            "do not pass it")
    params = inspect.signature(Controller).parameters
    allowed = [p for p in params if p not in ("model", "policy", *FROM_TRAINER)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{owner}: unknown Controller option(s) {unknown}; the options are {allowed}")
    make_policy(policy)  # an unknown name or a bad recipe fails now, with the registry's message


def follow_steps(owner: str, ctl: Controller, trainer_steps: int, warned: bool) -> bool:
    """Keep the controller's iteration count on the trainer's optimizer-step count; returns ``warned``.

    They agree unless something stepped the optimizer past the controller (or the other way round):
    then say so once, and follow the trainer so that schedules do not drift.
    """
    if ctl.step_count != trainer_steps:
        if not warned:
            warnings.warn(f"{owner}: the controller counted {ctl.step_count} iterations where the trainer "
                          f"counted {trainer_steps} optimizer steps; following the trainer (the cost report "
                          "misses the difference)", stacklevel=3)
            warned = True
        ctl.step_count = trainer_steps
    return warned


def scalars(ctl: Controller) -> dict[str, float]:
    """The controller's figures worth a trainer's logger: mean bit-widths over the quantized layers (FP32
    counts as 32) and the cost so far. Reading the cost syncs with the device: call it every few steps.

    Example:
        >>> import torch, adaprec
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> with adaprec.Controller(model, policy=adaprec.policies.Fixed(bits=6, grad_bits=8)) as ctl:
        ...     model(torch.randn(3, 4)).sum().backward(); ctl.step()
        ...     s = scalars(ctl)
        >>> s["adaprec/weight_bits"], s["adaprec/gradient_bits"], round(s["adaprec/savings_vs_fp32"], 4)
        (6.0, 8.0, 0.959)
    """
    out: dict[str, float] = {}
    current = ctl.current
    if current:
        for role in ("weight", "activation", "gradient"):
            bits = [getattr(p, role).bits for p in current.values()]
            out[f"adaprec/{role}_bits"] = float(sum(bits)) / len(bits)
    if ctl.cost is not None and ctl.cost.steps:
        s = ctl.cost.summary()
        for key in ("gbitops", "savings_vs_fp32", "savings_vs_reference"):
            out[f"adaprec/{key}"] = float(s[key])
    return out
