"""Handwritten digits: scikit-learn's bundled 8x8 images (1,797 samples, 10 classes) and a small CNN.

The data ships with scikit-learn, so this task runs anywhere without downloads; it is the vision
workhorse of the tests, the examples and the quick benchmarks.

Example:
    >>> from adaprec.tasks.digits import DigitsTask
    >>> task = DigitsTask(seed=0)
    >>> task.x_train.shape, task.x_test.shape
    (torch.Size([1437, 1, 8, 8]), torch.Size([360, 1, 8, 8]))
    >>> model = task.build_model(seed=0)
    >>> model(task.x_test[:5]).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Batch, Task, TensorBatches, _check_positive_int, _check_seed, evaluate_batches, seeded

__all__ = ["DigitsCNN", "DigitsTask", "load_digits_split"]

NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is an extra, not a core dependency
        raise ImportError("the digits task needs scikit-learn: pip install 'adaprec[extras]'") from e
    bunch = load_digits()
    # Pixel intensities are integers 0..16; scale to [0, 1] so the first layer sees a sane range.
    images = (bunch.images / 16.0).astype(np.float32)
    return images, bunch.target.astype(np.int64)


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The digits as ``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` in [0, 1], int64 labels.

    The split is stratified by class and fixed by ``seed``, so every class keeps its share in both parts
    and the same seed always gives the same split.

    Example:
        >>> x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
        >>> len(y_tr) + len(y_te), float(x_tr.min()), float(x_tr.max())
        (1797, 0.0, 1.0)
    """
    _check_seed(seed)
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    from sklearn.model_selection import train_test_split

    images, labels = _load_digits()
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           random_state=seed, stratify=labels)
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    tr, te = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return x[tr], y[tr], x[te], y[te]


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool and a linear classifier (about 3.8k parameters by default).

    Small enough to train to ~97% test accuracy in a couple of seconds on one CPU core, yet it has both
    layer kinds (Conv2d, Linear) that precision policies treat differently (first/last layer floors).

    Example:
        >>> m = DigitsCNN()
        >>> sum(p.numel() for p in m.parameters())
        3818
        >>> m(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, channels: tuple[int, int] = (8, 16), num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        c1, c2 = (_check_positive_int("channels[i]", c) for c in channels)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4 * 4, _check_positive_int("num_classes", num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class DigitsTask(Task):
    """Classify scikit-learn's 8x8 digits with :class:`DigitsCNN`; metric: test accuracy.

    Args:
        seed: fixes the stratified train/test split (not the model or the batch order).
        test_fraction: share of the samples held out for evaluation.
        channels: the two convolutions' widths.

    Example:
        >>> task = DigitsTask()
        >>> model = task.build_model(seed=0)
        >>> 0.0 <= task.evaluate(model)["accuracy"] <= 1.0
        True
        >>> batch = next(iter(task.train_batches(batch_size=32, seed=0)))
        >>> float(task.loss(model, batch).detach()) > 0
        True
    """

    name: ClassVar[str] = "digits"
    primary_metric: ClassVar[str] = "accuracy"
    direction: ClassVar[str] = "maximize"
    observe_key: ClassVar[str] = "val_acc"
    # threads: the CLI's default; a model this small runs fastest on one CPU thread.
    defaults: ClassVar[dict[str, Any]] = {"epochs": 10, "batch_size": 32, "lr": 0.05, "optimizer": "sgd",
                                          "threads": 1}

    def __init__(self, seed: int = 0, test_fraction: float = 0.2,
                 channels: tuple[int, int] = (8, 16)) -> None:
        self.seed = seed
        self.channels = tuple(channels)
        if len(self.channels) != 2:
            raise ValueError(f"channels must be two ints (conv1, conv2 widths), got {channels!r}")
        self.x_train, self.y_train, self.x_test, self.y_test = load_digits_split(seed, test_fraction)

    def build_model(self, seed: int = 0) -> nn.Module:
        with seeded(seed):
            return DigitsCNN(self.channels)

    def train_batches(self, batch_size: int, seed: int = 0) -> TensorBatches:
        return TensorBatches((self.x_train, self.y_train), batch_size, seed=seed)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        batches = TensorBatches((self.x_test, self.y_test), 512, shuffle=False)
        loss_sum, correct, n = evaluate_batches(model, batches, _loss_and_correct)
        return {"accuracy": correct / n, "val_loss": loss_sum / n}


def _loss_and_correct(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()
