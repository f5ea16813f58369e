"""The :class:`Task` interface shared by every training task, and a cheap in-memory batcher.

A task bundles a data set, a model family, a loss and an evaluation, so that the one training loop in
:mod:`adaprec.tasks.run` (used by the CLI, the benchmarks and Optuna tuning) works on any of them.

Example:
    >>> import torch
    >>> from adaprec.tasks.base import TensorBatches
    >>> xs, ys = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    >>> batches = TensorBatches((xs, ys), batch_size=4, seed=0)
    >>> len(batches), [b[1].numel() for b in batches]
    (3, [4, 4, 2])
    >>> sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(10))
    True
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Task", "TensorBatches", "Batch", "evaluate_batches", "model_device", "seeded"]

#: A batch is a tuple of tensors; the last one is the target.
Batch = tuple[Tensor, ...]

_DIRECTIONS = ("maximize", "minimize")


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's global CPU RNG seeded, then restore the RNG to its previous state.

    Model construction uses the global RNG for initialisation; forking it keeps ``build_model(seed)``
    deterministic without disturbing whatever the caller's RNG was doing.

    Example:
        >>> with seeded(3):
        ...     a = torch.rand(2)
        >>> with seeded(3):
        ...     b = torch.rand(2)
        >>> torch.equal(a, b)
        True
    """
    _check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters).

    Example:
        >>> model_device(nn.Linear(2, 2)).type
        'cpu'
    """
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class TensorBatches(Sized, Iterable[Batch]):
    """Mini-batches drawn from in-memory tensors; every pass over it is one epoch in a new order.

    The order comes from a private ``torch.Generator`` seeded once, so the sequence of epochs is fixed
    by ``seed`` and does not depend on (or disturb) the global RNG. Cheaper than a ``DataLoader`` for
    small data sets that fit in memory: one index gather per batch, no worker processes.

    Example:
        >>> xs = torch.zeros(6, 2); ys = torch.arange(6)
        >>> a = [b[1].tolist() for b in TensorBatches((xs, ys), batch_size=3, seed=1)]
        >>> b = [b[1].tolist() for b in TensorBatches((xs, ys), batch_size=3, seed=1)]
        >>> a == b
        True
    """

    def __init__(self, tensors: tuple[Tensor, ...], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        if not tensors:
            raise ValueError("TensorBatches needs at least one tensor")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"all tensors must have the same first dimension, got "
                             f"{[tuple(t.shape) for t in tensors]}")
        if n == 0:
            raise ValueError("TensorBatches got empty tensors")
        self.tensors = tensors
        self.batch_size = _check_positive_int("batch_size", batch_size)
        _check_seed(seed)
        self.shuffle, self.drop_last = shuffle, drop_last
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size={batch_size} with drop_last=True leaves no batch from {n} samples")
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = self.tensors[0].shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = self.tensors[0].shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield tuple(t[idx] for t in self.tensors)


class Task(abc.ABC):
    """A data set + model family + loss + evaluation, in the shape :func:`adaprec.tasks.run.train` needs.

    Subclasses set the class attributes and implement the four methods:

    * ``build_model(seed)`` — a fresh model, initialised deterministically from ``seed``;
    * ``train_batches(batch_size, seed)`` — a re-iterable with ``len()``: each pass is one epoch (a new,
      seed-determined order each pass), yielding tuples of tensors on the CPU;
    * ``loss(model, batch)`` — the scalar training loss of one batch (already on the model's device);
    * ``evaluate(model)`` — held-out metrics as plain floats, computed without gradients in eval mode.

    ``primary_metric`` names the key of ``evaluate()`` that ranks runs, ``direction`` says whether
    larger ("maximize") or smaller ("minimize") is better, and ``observe_key`` is the name under which
    the training loop passes the validation value to ``Controller.observe`` (``val_acc``/``val_loss``).
    ``defaults`` holds training hyper-parameters that work for this task (epochs, batch_size, lr, ...) and,
    optionally, ``threads``: the torch CPU threads the command line uses unless told otherwise.

    Example:
        >>> from adaprec.tasks import get_task
        >>> task = get_task("digits")
        >>> task.primary_metric, task.direction, task.observe_key
        ('accuracy', 'maximize', 'val_acc')
        >>> task.is_better(0.9, 0.8)
        True
    """

    name: ClassVar[str] = "task"
    primary_metric: ClassVar[str] = ""
    direction: ClassVar[str] = "maximize"
    observe_key: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    @abc.abstractmethod
    def build_model(self, seed: int = 0) -> nn.Module:
        """A freshly initialised model; the same ``seed`` gives bitwise-identical parameters."""

    @abc.abstractmethod
    def train_batches(self, batch_size: int, seed: int = 0) -> Iterable[Batch]:
        """Training batches; iterate once per epoch (a sized re-iterable)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Scalar training loss of ``batch`` (tensors already on the model's device)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out metrics; must include ``primary_metric`` and the value behind ``observe_key``."""

    def observed_value(self, metrics: dict[str, float]) -> float:
        """The value passed to ``Controller.observe(**{observe_key: value})`` after an evaluation."""
        key = "accuracy" if self.observe_key == "val_acc" else "val_loss"
        return metrics[key]

    def is_better(self, a: float, b: float) -> bool:
        """Whether primary-metric value ``a`` beats ``b`` in this task's direction."""
        if self.direction not in _DIRECTIONS:
            raise ValueError(f"{type(self).__name__}.direction must be one of {_DIRECTIONS}, "
                             f"got {self.direction!r}")
        return a > b if self.direction == "maximize" else a < b

    def describe(self) -> str:
        """One line for logs and the CLI."""
        return f"{self.name}: primary metric {self.primary_metric} ({self.direction})"


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[Batch],
                     fn: Callable[[nn.Module, Batch], tuple[Tensor, Tensor]]) -> tuple[float, float, int]:
    """Sum ``fn(model, batch) -> (loss_sum, correct)`` over batches in eval mode; returns sums and count.

    Shared by the tasks so every evaluation runs with ``model.eval()`` and without autograd, leaves the
    model in the training mode it found, and syncs with the device once at the end rather than per batch.
    ``count`` is the number of targets (elements of each batch's last tensor).
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    try:
        for batch in batches:
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            b_loss, b_correct = fn(model, batch)
            loss_sum += b_loss.double()
            correct += b_correct.double()
            total += batch[-1].numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluation saw no samples")
    return loss_sum.item(), correct.item(), total
