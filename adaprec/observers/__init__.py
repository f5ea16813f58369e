"""Observers: handlers that watch a run and publish statistics into ``ctl.stats``.

* :class:`GradientDiversity` — MuPPET's inter-epoch gradient diversity (docs/methods.md#muppet-rule), per
  tensor, mean and per layer; :class:`WindowedDiversity` — the same every ``k`` steps inside an epoch.
* :class:`LossStats` — EMA mean/variance, trend, spikes and non-finite values of the loss.
* :class:`ErrorRange` — per-layer crest factor of the error at each layer's output (a live range test
  for backward widths).

Each registers itself in ``ctl.components`` so ``ctl.state_dict()`` saves it.

Example:
    >>> import torch, adaprec
    >>> from adaprec.observers import LossStats
    >>> with adaprec.Controller(torch.nn.Linear(2, 1)) as ctl:
    ...     _ = LossStats().attach(ctl); ctl.observe(loss=1.5)
    >>> float(ctl.stats["loss_mean"])
    1.5
"""

from .base import Observer
from .diversity import (
    DiversityAccumulator,
    DiversityResult,
    GradientDiversity,
    WindowedDiversity,
    gradient_diversity,
)
from .error_range import ErrorRange, bits_for_noise
from .loss import LossStats

__all__ = ["Observer", "GradientDiversity", "WindowedDiversity", "DiversityAccumulator",
           "DiversityResult", "gradient_diversity", "LossStats", "ErrorRange", "bits_for_noise"]
