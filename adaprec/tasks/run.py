"""The one training loop behind the CLI, the benchmarks and Optuna tuning: ``train(task, policy, ...)``.

It is the loop from the README — a plain PyTorch loop inside ``adaprec.Controller`` — with the chores
done once: seeding, optimizer and learning-rate schedule, per-epoch evaluation in ``model.eval()``,
feeding the controller the loss and the validation metric, timing, and a result object.

Example:
    >>> from adaprec.tasks import get_task, train
    >>> result = train(get_task("digits"), "fixed", epochs=1, batch_size=64, lr=0.05, seed=0)
    >>> result.steps, result.primary_metric, 0.0 <= result.primary <= 1.0
    (23, 'accuracy', True)
    >>> result.report["savings_vs_fp32"] > 0
    True
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .base import Batch, Task
from .registry import get_task

__all__ = ["RunResult", "train", "make_optimizer", "make_lr_schedule", "seed_everything", "OPTIMIZERS",
           "LR_SCHEDULES"]

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "warmup_cosine", "step")

OptimizerFactory = Callable[..., torch.optim.Optimizer]
ScheduleFactory = Callable[[torch.optim.Optimizer, int], Any]


@dataclass
class RunResult:
    """What :func:`train` returns.

    Attributes:
        task, policy: the task's name and the policy's repr.
        metrics: the final evaluation (``task.evaluate``) after the last epoch.
        epoch_metrics: one dict per epoch: ``epoch``, ``train_loss`` (mean over the epoch), the evaluation
            metrics, ``lr`` (at the epoch's end) and ``time_s`` (training + evaluation of that epoch).
        primary_metric, direction: which metric ranks runs and whether larger or smaller is better.
        best: the best primary-metric value over the epochs (NaN epochs ignored).
        report: ``ctl.report()`` (cost in BitOPs, savings, time at each precision, …).
        history: ``ctl.history`` — one entry per precision change.
        steps: optimizer steps taken; wall_time_s: the whole run; config: the hyper-parameters used.
        model: the trained model (plain again: the controller has been left).

    Example:
        >>> r = RunResult(task="t", policy="p", metrics={"accuracy": 0.9}, primary_metric="accuracy")
        >>> r.primary, r.to_dict()["metrics"]
        (0.9, {'accuracy': 0.9})
    """

    task: str
    policy: str
    metrics: dict[str, float]
    primary_metric: str
    direction: str = "maximize"
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)
    best: float = math.nan
    report: dict[str, Any] = field(default_factory=dict)
    history: list[Any] = field(default_factory=list)
    steps: int = 0
    wall_time_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def primary(self) -> float:
        """The final value of the primary metric."""
        return self.metrics[self.primary_metric]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (the model is left out; precisions become short names)."""
        history = [{"step": h.step, "epoch": h.epoch, "summary": h.summary(),
                    "layers": {name: p.short() for name, p in h.layers.items()}} for h in self.history]
        return {
            "task": self.task, "policy": self.policy, "primary_metric": self.primary_metric,
            "direction": self.direction, "metrics": dict(self.metrics), "best": self.best,
            "epoch_metrics": [dict(m) for m in self.epoch_metrics], "steps": self.steps,
            "wall_time_s": self.wall_time_s, "config": dict(self.config),
            "report": _jsonable(dict(self.report)), "history": history,
        }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return str(x)


def make_optimizer(spec: str | OptimizerFactory, params: Any, lr: float, *, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Build the optimizer: ``"sgd"`` (with momentum), ``"adam"``, ``"adamw"``, or ``factory(params, lr=lr)``.

    A factory (e.g. ``functools.partial(adaprec.optim.kahan.KahanSGD, weight_format="bf16")``) receives the
    parameters and ``lr=`` only; it sets its other hyper-parameters itself.

    Example:
        >>> opt = make_optimizer("adam", nn.Linear(2, 2).parameters(), 0.01)
        >>> type(opt).__name__, opt.param_groups[0]["lr"]
        ('Adam', 0.01)
    """
    if callable(spec):
        opt = spec(params, lr=lr)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(opt).__name__}, expected a "
                            "torch.optim.Optimizer")
        return opt
    if spec == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if spec == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if spec == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {spec!r}; use one of {', '.join(OPTIMIZERS)} or a callable "
                     "factory(params, lr=...) -> torch.optim.Optimizer")


def make_lr_schedule(spec: str | ScheduleFactory | None, optimizer: torch.optim.Optimizer,
                     total_steps: int) -> Any:
    """A per-iteration LR scheduler: ``None``/``"constant"``, ``"cosine"`` (to 0 over the run),
    ``"warmup_cosine"`` (linear warm-up over the first 10% of the run, then cosine to 0: what transformers
    need to train stably at a high rate), ``"step"`` (x0.1 at 50% and 75% of the run, the CIFAR ResNet
    recipe), or ``factory(optimizer, total_steps)``.

    Returns ``None`` for a constant rate.

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
        >>> s = make_lr_schedule("step", opt, total_steps=4)
        >>> rates = []
        >>> for _ in range(4):
        ...     opt.step(); s.step(); rates.append(round(opt.param_groups[0]["lr"], 3))
        >>> rates
        [1.0, 0.1, 0.01, 0.01]
        >>> opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
        >>> s = make_lr_schedule("warmup_cosine", opt, total_steps=20)
        >>> rates = [opt.param_groups[0]["lr"]]
        >>> for _ in range(19):
        ...     opt.step(); s.step(); rates.append(opt.param_groups[0]["lr"])
        >>> [round(r, 3) for r in rates[:3]], round(max(rates), 3), round(rates[-1], 3)
        ([0.5, 1.0, 1.0], 1.0, 0.008)
    """
    if spec is None or spec == "constant":
        return None
    if callable(spec):
        return spec(optimizer, total_steps)
    if spec == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if spec == "warmup_cosine":
        warmup = max(1, total_steps // 10)

        def factor(t: int) -> float:
            if t < warmup:
                return (t + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / max(1, total_steps - warmup)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if spec == "step":
        milestones = sorted({max(1, total_steps // 2), max(1, (3 * total_steps) // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    raise ValueError(f"unknown lr_schedule {spec!r}; use None, one of {', '.join(LR_SCHEDULES)}, or a "
                     "callable factory(optimizer, total_steps) -> scheduler")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _positive(name: str, value: Any, kind: type) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or not value > 0 or (kind is float and not math.isfinite(value)):
        raise ValueError(f"{name} must be a positive {'number' if kind is float else 'int'}, got {value!r}")


_RESERVED = ("model", "policy", "optimizer")


def train(
    task: Task | str,
    policy: Any = "fp32",
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    optimizer: str | OptimizerFactory | None = None,
    lr_schedule: str | ScheduleFactory | None = None,
    momentum: float = 0.9,
    weight_decay: float | None = None,
    device: str | torch.device = "cpu",
    logdir: str | None = None,
    controller_kwargs: dict[str, Any] | None = None,
    on_epoch: Callable[[int, dict[str, float]], Any] | None = None,
    on_start: Callable[[Any], Any] | None = None,
) -> RunResult:
    """Train ``task``'s model under ``policy`` and return metrics, the controller's report and history.

    Args:
        task: a :class:`Task` or a registered task name (built with default arguments).
        policy: anything ``adaprec.Controller`` accepts (name, Policy object, recipe path).
        epochs, batch_size, lr, optimizer, lr_schedule, weight_decay: ``None`` takes the task's
            ``defaults`` (then SGD, constant rate, no weight decay).
        seed: seeds Python/NumPy/torch, the model's initialisation and the batch order.
        momentum: SGD momentum.
        device: where the model and batches live (``"cpu"``, ``"cuda"``, ``"cuda:1"``, …).
        logdir: TensorBoard directory, passed to the controller.
        controller_kwargs: further ``Controller`` arguments (``layers=``, ``constraints=``, ``backend=``,
            ``total_steps=`` to override the computed one, …).
        on_epoch: ``on_epoch(epoch, metrics)`` after each epoch's evaluation; may raise (e.g.
            ``optuna.TrialPruned``) to stop the run — the exception propagates after the controller has
            restored the model.
        on_start: ``on_start(ctl)`` once inside the controller's block, before the first epoch (to add
            handlers, e.g. the CLI's progress bar).
    """
    import adaprec  # deferred: adaprec's package import pulls in the controller and policies

    task = get_task(task)
    d = task.defaults
    epochs = d.get("epochs", 10) if epochs is None else epochs
    batch_size = d.get("batch_size", 32) if batch_size is None else batch_size
    lr = d.get("lr", 0.01) if lr is None else lr
    optimizer = d.get("optimizer", "sgd") if optimizer is None else optimizer
    lr_schedule = d.get("lr_schedule") if lr_schedule is None else lr_schedule
    weight_decay = d.get("weight_decay", 0.0) if weight_decay is None else weight_decay
    _positive("epochs", epochs, int)
    _positive("batch_size", batch_size, int)
    _positive("lr", lr, float)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"on_epoch must be callable(epoch, metrics), got {type(on_epoch).__name__}")
    dev = _device(device)
    ckw = dict(controller_kwargs or {})
    bad = [k for k in _RESERVED if k in ckw]
    if bad:
        raise ValueError(f"controller_kwargs may not set {bad}: train() passes the model, the policy and the "
                         "optimizer itself (use its own arguments)")

    seed_everything(seed)
    model = task.build_model(seed).to(dev)
    model.train()
    batches = task.train_batches(batch_size, seed)
    steps_per_epoch = len(batches)
    total_steps = ckw.pop("total_steps", steps_per_epoch * epochs)
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    schedule = make_lr_schedule(lr_schedule, opt, total_steps)
    config = {"task": task.name, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "optimizer": optimizer if isinstance(optimizer, str) else repr(optimizer),
              "lr_schedule": lr_schedule if lr_schedule is None or isinstance(lr_schedule, str)
              else repr(lr_schedule), "momentum": momentum, "weight_decay": weight_decay,
              "device": str(dev), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}

    epoch_metrics: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    ctl = adaprec.Controller(model, policy=policy, optimizer=opt, total_steps=total_steps, logdir=logdir,
                             **ckw)
    with ctl:
        if on_start is not None:
            on_start(ctl)
        for epoch in range(epochs):
            t0 = time.perf_counter()
            # Summed on the device and read once per epoch: no host sync per step.
            loss_sum = torch.zeros((), device=dev)
            n = 0
            for batch in ctl.epoch(batches):
                batch = _to_device(batch, dev)
                loss = task.loss(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()  # the controller's optimizer hooks close the iteration here
                if schedule is not None:
                    schedule.step()
                loss = loss.detach()
                ctl.observe(loss=loss)
                loss_sum += loss
                n += 1
            model.eval()
            try:
                metrics = task.evaluate(model)  # in eval mode, inside the block: eval precision applies
            finally:
                model.train()
            ctl.observe(**{task.observe_key: task.observed_value(metrics)})
            record = {"epoch": epoch, "train_loss": (loss_sum / n).item(), **metrics,
                      "lr": opt.param_groups[0]["lr"], "time_s": time.perf_counter() - t0}
            epoch_metrics.append(record)
            if on_epoch is not None:
                on_epoch(epoch, dict(record))
    wall = time.perf_counter() - start

    values = [m[task.primary_metric] for m in epoch_metrics if not math.isnan(m[task.primary_metric])]
    best = math.nan
    for v in values:
        if math.isnan(best) or task.is_better(v, best):
            best = v
    return RunResult(task=task.name, policy=repr(ctl.policy), metrics=metrics,
                     primary_metric=task.primary_metric, direction=task.direction,
                     epoch_metrics=epoch_metrics, best=best, report=ctl.report(), history=list(ctl.history),
                     steps=ctl.step_count, wall_time_s=wall, config=config, model=model)


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device (use 'cpu', 'cuda', 'cuda:0', ...)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    return dev


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    return tuple(t.to(device, non_blocking=True) for t in batch)
