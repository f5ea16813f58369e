"""Loss statistics for any policy or guard: running mean and variance, trend, spikes, non-finite values.

:class:`LossStats` listens to ``METRICS_OBSERVED`` (``ctl.observe(loss=loss)``) and keeps, per observed
value ``x``:

* an exponential moving mean and variance with decay ``momentum`` (``δ = x - mean``;
  ``mean += (1 - m) δ``; ``var = m (var + (1 - m) δ²)``), started at the first finite value;
* a *trend*: ``(fast - mean) / |mean|`` where ``fast`` is a quicker EMA (decay ``fast_momentum``) —
  negative while the loss falls, positive while it rises, relative so it is scale-free;
* *spikes*: after ``warmup`` finite values, a value above ``mean + spike_sigma * std`` (judged against the
  statistics *before* the value is folded in) counts as a spike;
* *non-finite values* (NaN, ±inf): counted in total and as the current streak, and left out of the
  averages so one bad step does not poison them.

Everything lives in one small float64 tensor on the loss's device and is updated with tensor
operations — no ``.item()`` or host sync per step (DESIGN.md contract 3). ``ctl.stats`` receives 0-d
tensors (``loss_mean``, ``loss_std``, ``loss_trend``, ``loss_spike``, ``loss_spikes``, ``loss_nonfinite``,
``loss_nonfinite_streak``); the properties of the observer return Python numbers (they sync).

Example:
    >>> import math
    >>> s = LossStats(momentum=0.5, fast_momentum=0.25, warmup=2, spike_sigma=3.0)
    >>> for x in [1.0, 1.0, 1.2, 0.8, 9.0, math.nan]:
    ...     s.update(x)
    >>> s.count, s.spikes, s.nonfinite, s.nonfinite_streak
    (5, 1, 1, 1)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..events import Event
from .base import Observer

if TYPE_CHECKING:  # pragma: no cover
    from ..controller import Controller

__all__ = ["LossStats"]

# Slots of the state vector.
_N, _MEAN, _VAR, _FAST, _NONFINITE, _STREAK, _SPIKES, _SPIKE, _LAST = range(9)
_SLOTS = 9


class LossStats(Observer):
    """Running loss statistics (EMA mean/variance, trend, spikes, non-finite counter).

    Args:
        key: which observed statistic to follow (``ctl.observe(loss=…)`` → ``"loss"``).
        momentum: decay of the mean/variance EMA, in (0, 1).
        fast_momentum: decay of the fast EMA used for the trend, in (0, momentum].
        spike_sigma: how many standard deviations above the mean make a spike (> 0).
        warmup: finite values to see before spikes are judged (>= 2).
        prefix: prefix of the names written into ``ctl.stats``.

    Example:
        >>> import torch, adaprec
        >>> model = torch.nn.Linear(2, 1)
        >>> with adaprec.Controller(model) as ctl:
        ...     stats = LossStats().attach(ctl)
        ...     for x in [3.0, 2.0, 1.0]:
        ...         ctl.observe(loss=torch.tensor(x))
        >>> stats.count, stats.trend < 0, float(ctl.stats["loss_nonfinite"])
        (3, True, 0.0)
    """

    name = "loss_stats"

    def __init__(self, key: str = "loss", *, momentum: float = 0.98, fast_momentum: float = 0.9,
                 spike_sigma: float = 4.0, warmup: int = 20, prefix: str = "loss") -> None:
        super().__init__()
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        for nm, v in (("momentum", momentum), ("fast_momentum", fast_momentum)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 < v < 1.0:
                raise ValueError(f"{nm} must be a number in (0, 1), got {v!r}")
        if fast_momentum > momentum:
            raise ValueError(f"fast_momentum ({fast_momentum}) must not exceed momentum ({momentum}): "
                             "the trend compares a faster EMA with the slower mean")
        if isinstance(spike_sigma, bool) or not isinstance(spike_sigma, int | float) or not spike_sigma > 0:
            raise ValueError(f"spike_sigma must be a positive number, got {spike_sigma!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 2:
            raise ValueError(f"warmup must be an integer >= 2, got {warmup!r}")
        self.key, self.prefix = key, prefix
        self.momentum, self.fast_momentum = float(momentum), float(fast_momentum)
        self.spike_sigma, self.warmup = float(spike_sigma), warmup
        self.state: Tensor = torch.zeros(_SLOTS, dtype=torch.float64)

    # --- wiring ---------------------------------------------------------------------------------
    def _subscribe(self, ctl: Controller) -> None:
        self._on(ctl, Event.METRICS_OBSERVED, self._observed)

    def _observed(self, ctl: Controller, stats: dict[str, Any], **_: Any) -> None:
        if self.key not in stats:
            return
        self.update(stats[self.key])
        s, p = self.state, self.prefix
        ctl.stats.update({
            f"{p}_mean": s[_MEAN], f"{p}_std": s[_VAR].sqrt(), f"{p}_trend": self._trend_t(),
            f"{p}_spike": s[_SPIKE] > 0, f"{p}_spikes": s[_SPIKES], f"{p}_nonfinite": s[_NONFINITE],
            f"{p}_nonfinite_streak": s[_STREAK],
        })

    # --- the update -----------------------------------------------------------------------------
    def update(self, value: Tensor | float) -> None:
        """Fold one loss value in (tensor ops on the value's device; no host sync)."""
        x = _as_scalar(value, self.key)
        s = self.state
        if s.device != x.device:
            s = self.state = s.to(x.device)
        x = x.to(torch.float64)
        m, mf = self.momentum, self.fast_momentum
        finite = torch.isfinite(x)
        first = s[_N] == 0
        xf = torch.where(finite, x, s[_MEAN])  # keeps NaN out of every formula below
        delta = xf - s[_MEAN]
        std = s[_VAR].sqrt()
        # std > 0: after identical values any rise would otherwise count as a spike.
        spike = finite & (s[_N] >= self.warmup) & (std > 0) & (delta > self.spike_sigma * std)
        mean = torch.where(first, xf, s[_MEAN] + (1 - m) * delta)
        var = torch.where(first, torch.zeros_like(xf), m * (s[_VAR] + (1 - m) * delta * delta))
        fast = torch.where(first, xf, s[_FAST] + (1 - mf) * (xf - s[_FAST]))
        keep = ~finite
        new = torch.stack([
            s[_N] + finite.to(s.dtype),
            torch.where(keep, s[_MEAN], mean),
            torch.where(keep, s[_VAR], var),
            torch.where(keep, s[_FAST], fast),
            s[_NONFINITE] + keep.to(s.dtype),
            torch.where(keep, s[_STREAK] + 1, torch.zeros_like(xf)),
            s[_SPIKES] + spike.to(s.dtype),
            spike.to(s.dtype),
            x,
        ])
        s.copy_(new)

    def _trend_t(self) -> Tensor:
        s = self.state
        return (s[_FAST] - s[_MEAN]) / s[_MEAN].abs().clamp_min(1e-12)

    # --- reading (these sync) ------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of finite values seen."""
        return int(self.state[_N])

    @property
    def mean(self) -> float:
        return float(self.state[_MEAN]) if self.count else math.nan

    @property
    def var(self) -> float:
        return float(self.state[_VAR]) if self.count else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count else math.nan

    @property
    def trend(self) -> float:
        return float(self._trend_t()) if self.count else math.nan

    @property
    def spikes(self) -> int:
        return int(self.state[_SPIKES])

    @property
    def last_was_spike(self) -> bool:
        return bool(self.state[_SPIKE])

    @property
    def nonfinite(self) -> int:
        return int(self.state[_NONFINITE])

    @property
    def nonfinite_streak(self) -> int:
        """Consecutive non-finite values up to now (0 after a finite one)."""
        return int(self.state[_STREAK])

    @property
    def last(self) -> float:
        return float(self.state[_LAST])

    def summary(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "std": self.std, "trend": self.trend,
                "spikes": self.spikes, "nonfinite": self.nonfinite, "nonfinite_streak": self.nonfinite_streak}

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.clone(), "key": self.key}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        st = d["state"]
        if not isinstance(st, Tensor) or st.shape != (_SLOTS,):
            raise ValueError(f"not a LossStats state: expected a tensor of {_SLOTS} values under 'state'")
        self.state = st.detach().to(torch.float64).clone()


def _as_scalar(value: Any, key: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"LossStats: observed {key!r} must be a scalar, got a tensor of shape "
                             f"{tuple(value.shape)} (reduce it, e.g. loss.mean())")
        return value.detach().reshape(())
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"LossStats: observed {key!r} must be a number or a one-element tensor, got "
                        f"{type(value).__name__}")
    return torch.tensor(float(value), dtype=torch.float64)
