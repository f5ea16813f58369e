"""A ready-made train function for the built-in tasks (digits, charlm, ...), as the CLI uses it.

Every trial trains the task's model from the same initialisation and batch order (``seed``), so trials
differ only in the policy's knobs. The returned metrics are the final evaluation (``accuracy``,
``val_loss``, ``bpc``, ...), the scalar figures of the controller's report (``gbitops``,
``savings_vs_fp32``, ...) and the run's wall time ``wall_s``.

Example:
    >>> from adaprec.tune.task import task_train_fn
    >>> fn = task_train_fn("digits", epochs=1, batch_size=128)
    >>> from adaprec.policies import Fixed
    >>> metrics = fn(Fixed(bits=8), lambda epoch, m: None)
    >>> sorted(k for k in ("accuracy", "gbitops", "wall_s") if k in metrics)
    ['accuracy', 'gbitops', 'wall_s']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..policies import Policy

__all__ = ["task_train_fn"]


def task_train_fn(task: Any, **train_kwargs: Any) -> Callable[[Policy, Callable[..., Any]], dict[str, float]]:
    """``train_fn(policy, report)`` training ``task`` with :func:`adaprec.tasks.run.train`.

    ``task`` is a registered task name or a Task object (built once, shared by all trials);
    ``train_kwargs`` go to ``train`` (``epochs``, ``batch_size``, ``lr``, ``seed``, ``device``, ...).
    ``report(epoch, metrics)`` is called after each epoch's evaluation.
    """
    from ..tasks import get_task, train

    if "on_epoch" in train_kwargs or "policy" in train_kwargs:
        raise ValueError("task_train_fn sets policy= and on_epoch= itself; pass the other train() arguments")
    built = get_task(task)

    def train_fn(policy: Policy, report: Callable[..., Any]) -> dict[str, float]:
        result = train(built, policy, on_epoch=report, **train_kwargs)
        out: dict[str, float] = {}
        for source in (result.report, result.metrics):
            out.update(_numbers(source))
        out["wall_s"] = float(result.wall_time_s)
        return out

    return train_fn


def _numbers(d: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): float(v) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}
