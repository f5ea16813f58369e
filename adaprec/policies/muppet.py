"""MuPPET (Rajagopal et al., ICML 2020): climb a precision ladder when gradient diversity says so.

The rule (docs/methods.md#muppet-rule), with every constant a parameter:

* The ladder is ``levels`` — by default 8, 12, 14 and 16-bit dynamic fixed point for weights,
  activations and gradients (:meth:`Precision.fixed_point`), then FP32 (quantization off). On
  ``backend="hardware"`` the default is that backend's ladder, every level on a real kernel:
  ``fx8`` (integer codes) -> bf16 -> FP32 (docs/methods.md#hardware-ladder).
* :class:`~adaprec.observers.GradientDiversity` stores the last minibatch gradient of every epoch; at
  the last epoch ``j`` of each window of ``resolution`` absolute epochs it gives ``Δ_j``, the unweighted
  mean over parameter tensors of Yin's diversity over the window.
* ``maxGD`` is the largest ``Δ`` since the last switch. At a check, ``Δ_j >= maxGD`` updates it;
  otherwise ``p = maxGD / Δ_j`` and ``p > T(j) = alpha + beta * exp(-lam * j)`` (``j`` the absolute
  epoch) counts a violation. At ``patience`` violations the policy moves to the next level, resets
  ``maxGD`` and the count, and fires ``PRECISION_CHANGED`` (through the controller); the new level
  applies from the next iteration. With ``resolution=3, patience=2`` a level lasts at least 9 epochs.

Beyond the paper:

* ``per_layer=True`` — every quantized layer climbs its own ladder from its own diversity (the mean over
  the layer's parameter tensors), answering AdaPT's criticism of one word length for the whole net.
* ``levels`` may hold *hardware* formats (``("fp8_e4m3", "bf16", "fp32")``), so the same rule can drive
  real kernels; any :class:`~adaprec.formats.Precision` is accepted too.
* ``max_epochs_per_level`` forces a switch after that many epochs at one level.
* ``check_every=k`` uses :class:`~adaprec.observers.WindowedDiversity` instead (every ``k`` steps over
  the last ``resolution`` step gradients; ``T`` then uses the current epoch index) for runs with few,
  long epochs.
* ``schedule=[e1, e2, ...]`` replaces the rule by fixed switch epochs (switch at the end of each listed
  epoch; no diversity is computed). It is the control of an ablation: does the rule beat a schedule
  with as many switches? :func:`even_schedule` spaces ``k`` switches evenly over a run and
  :func:`random_schedule` draws them from a seeded generator, keeping the rule's minimum stay.

Departures from the released code: gradients are cloned (the release forgets to, see
docs/methods.md#muppet-rule) and the fixed-point quantizer saturates (see
:func:`adaprec.quant.kernels.fixed_quantize`). Evaluation runs at the precision in force
(``eval_decision`` is ``None``).

Example:
    >>> round(muppet_threshold(2), 3), round(muppet_threshold(29), 3)
    (2.228, 1.083)
    >>> MuPPET().levels_short()
    ['fx8', 'fx12', 'fx14', 'fx16', 'fp32']
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..decision import Decision
from ..events import Event
from ..formats import Format, Precision, parse_format
from .base import Policy

if TYPE_CHECKING:  # pragma: no cover
    from ..controller import Controller

__all__ = ["MuPPET", "muppet_threshold", "level_precision", "DEFAULT_LEVELS", "even_schedule",
           "random_schedule", "min_stay"]

DEFAULT_LEVELS: tuple[int | str, ...] = (8, 12, 14, 16, "fp32")
_GLOBAL = "*"


def muppet_threshold(j: float, alpha: float = 1.0, beta: float = 1.5, lam: float = 0.1) -> float:
    """MuPPET's decaying threshold ``T(j) = alpha + beta * exp(-lam * j)`` at absolute epoch ``j``.

    Example:
        >>> [round(muppet_threshold(j), 3) for j in (2, 8, 14, 29)]
        [2.228, 1.674, 1.37, 1.083]
    """
    return alpha + beta * math.exp(-lam * j)


def min_stay(resolution: int = 3, patience: int = 2) -> int:
    """The fewest epochs the rule keeps a level: one window sets maxGD, ``patience`` more must violate.

    Example:
        >>> min_stay(), min_stay(resolution=2, patience=1)
        (9, 4)
    """
    return resolution * (patience + 1)


def _check_schedule_args(switches: Any, epochs: Any, stay: Any) -> None:
    for name, v, lo in (("switches", switches, 0), ("epochs", epochs, 1), ("min_stay", stay, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if switches and switches * stay > epochs - 1:
        raise ValueError(f"{switches} switches with a minimum stay of {stay} epochs need at least "
                         f"{switches * stay + 1} epochs (each level but the last >= {stay} epochs, the "
                         f"last >= 1), got epochs={epochs}")


def even_schedule(switches: int, epochs: int) -> list[int]:
    """``switches`` switch epochs that split ``epochs`` into ``switches + 1`` levels of (nearly) equal length.

    A switch at epoch ``e`` takes effect from epoch ``e + 1``.

    Example:
        >>> even_schedule(4, 60)
        [11, 23, 35, 47]
    """
    _check_schedule_args(switches, epochs, 1)
    return [round((i + 1) * epochs / (switches + 1)) - 1 for i in range(switches)]


def random_schedule(switches: int, epochs: int, stay: int = 9, seed: int = 0) -> list[int]:
    """``switches`` random switch epochs, every level but the last at least ``stay`` epochs long.

    Drawn uniformly over all such schedules within ``epochs`` (the last level keeps >= 1 epoch) from
    ``random.Random(seed)``, so a seed fixes the schedule. ``stay`` defaults to the rule's minimum
    (:func:`min_stay`), so the control has the same constraint as MuPPET itself.

    Example:
        >>> random_schedule(3, 40, stay=9, seed=1) == random_schedule(3, 40, stay=9, seed=1)
        True
        >>> s = random_schedule(3, 40, stay=9, seed=2)
        >>> len(s), all(b - a >= 9 for a, b in zip([-1] + s, s)), s[-1] <= 38
        (3, True, True)
    """
    import random

    _check_schedule_args(switches, epochs, stay)
    # Shift out the mandatory gaps: the schedules map one-to-one onto k distinct values in 0..free-1.
    free = epochs - 1 - switches * (stay - 1)
    picks = sorted(random.Random(seed).sample(range(free), switches))
    return [p + (i + 1) * (stay - 1) for i, p in enumerate(picks)]


def level_precision(spec: Any) -> Precision:
    """One ladder level as a :class:`Precision`.

    An int ``b`` (2..31) is ``b``-bit dynamic fixed point for weights, activations and gradients (32 is
    FP32); strings: ``"fp32"``, ``"fxB"``, ``"intB"``, ``"bf16"``, ``"fp16"``, ``"fp8_e4m3"``,
    ``"fp8_e5m2"`` (the same format for all three roles; float gradients use stochastic rounding); a
    :class:`Format` or a :class:`Precision` is used as given.

    Example:
        >>> level_precision(12).weight
        FixedPoint(bits=12, rounding='stochastic')
        >>> level_precision("bf16").short()
        'bf16/bf16'
    """
    if isinstance(spec, Precision):
        return spec
    if isinstance(spec, Format):
        return Precision(spec, spec, spec)
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec == 32:
            return Precision.fp32()
        if not 2 <= spec <= 31:
            raise ValueError(f"a MuPPET level given as an int is a fixed-point word length 2..31 (or 32 for "
                             f"FP32), got {spec}")
        return Precision.fixed_point(spec)
    if isinstance(spec, str):
        try:
            parse_format(spec)
        except ValueError:
            raise ValueError(f"cannot read MuPPET level {spec!r}; use a fixed-point word length (8), "
                             "'fxB', 'intB', 'fp32', 'bf16', 'fp16', 'fp8_e4m3', 'fp8_e5m2' or a "
                             "Precision") from None
        return Precision.uniform(spec)
    raise TypeError(f"a MuPPET level must be an int, a string, a Format or a Precision, got "
                    f"{type(spec).__name__}")


@dataclass
class _Ladder:
    """The switching state of one ladder (the whole net, or one layer)."""

    level: int = 0
    max_gd: float | None = None
    violations: int = 0
    start_epoch: int = 0


def _check_number(name: str, v: Any, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")
    return float(v)


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


class MuPPET(Policy):
    """Multi-precision training driven by inter-epoch gradient diversity (see the module docstring).

    Args:
        levels: the ladder, lowest first (ints are fixed-point word lengths; see :func:`level_precision`);
            ``None`` (default): the backend's own ladder when it has one, else :data:`DEFAULT_LEVELS`
            (with ``schedule``, always :data:`DEFAULT_LEVELS`: a schedule is written for one ladder).
        resolution: epochs per diversity window (``r``); with ``check_every``, gradients per window.
        patience: violations that trigger a switch (``y``).
        alpha, beta, lam: the threshold ``T(j) = alpha + beta * exp(-lam * j)``.
        per_layer: one ladder per quantized layer instead of one for the network.
        max_epochs_per_level: switch after this many epochs at a level at the latest (``None``: never).
        check_every: ``None`` (inter-epoch checks, the paper) or ``k``: check every ``k`` steps.
        capture: how the epoch's last gradient is kept, ``"reference"`` or ``"copy"`` (see
            :class:`~adaprec.observers.GradientDiversity`).
        schedule: ``None`` (the rule) or fixed switch epochs, strictly increasing, at most one fewer
            than the levels: the ladder moves up at the end of each listed epoch and no diversity is
            computed (the ablation's control; only for the global ladder without ``check_every``).

    After a run, ``switches`` lists every switch (epoch, step, layer or ``"*"``, from, to, reason) and
    ``trace`` every check (diversity, maxGD, ratio, threshold, violation, level). A policy object starts
    afresh each time a controller is entered.

    Example:
        >>> import torch, adaprec
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> with adaprec.Controller(model, policy="muppet") as ctl:
        ...     for epoch in range(3):
        ...         for x in ctl.epoch([torch.randn(8, 4)] * 2):
        ...             model.zero_grad(); model(x).pow(2).mean().backward(); ctl.step()
        >>> ctl.current["0"].short(), len(ctl.policy.trace), "grad_diversity" in ctl.stats
        ('fx8/fx8', 1, True)
    """

    name = "muppet"

    def __init__(self, levels: Any = None, resolution: int = 3, patience: int = 2,
                 alpha: float = 1.0, beta: float = 1.5, lam: float = 0.1, per_layer: bool = False,
                 max_epochs_per_level: int | None = None, check_every: int | None = None,
                 capture: str = "reference", schedule: Any = None) -> None:
        #: ``levels=None``: the backend's ladder once attached (``backend.muppet_levels``, e.g. the hardware
        #: backend's fx8 -> bf16 -> fp32), else :data:`DEFAULT_LEVELS`. A schedule counts switches on
        #: the ladder it was checked against, so it keeps that one.
        self.default_levels = levels is None and schedule is None
        self._set_levels(DEFAULT_LEVELS if levels is None else levels)
        self.resolution = _check_int("resolution", resolution, 1 if check_every is None else 2)
        self.patience = _check_int("patience", patience, 1)
        self.alpha = _check_number("alpha", alpha)
        self.beta = _check_number("beta", beta)
        self.lam = _check_number("lam", lam, nonneg=True)
        if not isinstance(per_layer, bool):
            raise ValueError(f"per_layer must be True or False, got {per_layer!r}")
        self.per_layer = per_layer
        self.max_epochs_per_level = None if max_epochs_per_level is None else \
            _check_int("max_epochs_per_level", max_epochs_per_level, 1)
        self.check_every = None if check_every is None else _check_int("check_every", check_every, 2)
        if self.check_every is not None and self.resolution > self.check_every:
            raise ValueError(f"with check_every={self.check_every}, resolution ({self.resolution}) is the "
                             "number of step gradients per window and must not exceed check_every")
        if capture not in ("reference", "copy"):
            raise ValueError(f"capture must be 'reference' or 'copy', got {capture!r}")
        self.capture = capture
        self.schedule = None if schedule is None else self._check_schedule(schedule)
        self.ctl = None
        self._reset([])

    def _set_levels(self, levels: Any) -> None:
        if isinstance(levels, str | int) or not hasattr(levels, "__iter__"):
            raise TypeError(f"levels must be a sequence of levels, e.g. (8, 12, 14, 16, 'fp32'), "
                            f"got {levels!r}")
        levels = tuple(levels)
        if not levels:
            raise ValueError("levels must hold at least one level")
        precs = []
        for i, spec in enumerate(levels):
            try:
                precs.append(level_precision(spec))
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"levels[{i}]: {exc}") from None
        costs = [p.relative_cost() for p in precs]
        for i in range(1, len(costs)):
            if costs[i] < costs[i - 1]:
                raise ValueError(f"levels must climb (never get cheaper): level {i} ({precs[i].short()}) has "
                                 f"fewer bits than level {i - 1} ({precs[i - 1].short()})")
        self.levels = levels
        self._precisions = precs

    def _check_schedule(self, schedule: Any) -> tuple[int, ...]:
        if isinstance(schedule, str | bytes) or not hasattr(schedule, "__iter__"):
            raise TypeError(f"schedule must be a sequence of switch epochs, e.g. [8, 17, 26], got "
                            f"{schedule!r}")
        epochs = list(schedule)
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in epochs):
            raise ValueError(f"schedule must hold non-negative int epochs, got {epochs}")
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise ValueError(f"schedule epochs must be strictly increasing, got {epochs}")
        if len(epochs) > len(self._precisions) - 1:
            raise ValueError(f"schedule has {len(epochs)} switches but the ladder {self.levels_short()} "
                             f"allows at most {len(self._precisions) - 1}")
        if self.per_layer or self.check_every is not None or self.max_epochs_per_level is not None:
            raise ValueError("schedule= replaces the diversity rule; it cannot be combined with per_layer, "
                             "check_every or max_epochs_per_level")
        return tuple(epochs)

    # --- configuration --------------------------------------------------------------------------
    def threshold(self, j: float) -> float:
        return muppet_threshold(j, self.alpha, self.beta, self.lam)

    def levels_short(self) -> list[str]:
        """Compact names of the levels (``fx8``, ``bf16``, ``fp32``…)."""
        return [_level_name(p) for p in self._precisions]

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {} if self.default_levels else {"levels": list(self.levels)}  # absent: default
        cfg |= {
            "resolution": self.resolution, "patience": self.patience,
            "alpha": self.alpha, "beta": self.beta, "lam": self.lam, "per_layer": self.per_layer,
        }
        if self.max_epochs_per_level is not None:
            cfg["max_epochs_per_level"] = self.max_epochs_per_level
        if self.check_every is not None:
            cfg["check_every"] = self.check_every
        if self.capture != "reference":
            cfg["capture"] = self.capture
        if self.schedule is not None:
            cfg["schedule"] = list(self.schedule)
        return cfg

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        """Fixed ranges around the paper's setting, for Optuna (``adaprec.tune``)."""
        start = trial.suggest_int("start_level", 0, 3)
        return {
            # start 0: the default ladder (the backend's own where it has one, e.g. the hardware ladder)
            "levels": None if start == 0 else list(DEFAULT_LEVELS[start:]),
            "resolution": trial.suggest_int("resolution", 2, 5),
            "patience": trial.suggest_int("patience", 1, 3),
            "alpha": trial.suggest_float("alpha", 1.0, 1.5),
            "beta": trial.suggest_float("beta", 0.5, 3.0),
            "lam": trial.suggest_float("lam", 0.02, 0.5, log=True),
        }

    # --- wiring ---------------------------------------------------------------------------------
    def _reset(self, units: list[str]) -> None:
        self.ladders: dict[str, _Ladder] = {u: _Ladder() for u in units}
        self.switches: list[dict[str, Any]] = []
        self.trace: list[dict[str, Any]] = []
        self._decision: Decision | None = None
        self._handles: list[Any] = []

    def attach(self, ctl: Controller) -> None:
        from ..observers.diversity import GradientDiversity, WindowedDiversity
        from ..timemodel import TrainingTimeModel, attach_time_model

        self.ctl = ctl
        if self.default_levels:
            self._set_levels(getattr(ctl.backend, "muppet_levels", None) or DEFAULT_LEVELS)
        self._reset(list(ctl.layer_names) if self.per_layer else [_GLOBAL])
        if self.schedule is not None:
            self.observer = None
        elif self.check_every is None:
            self.observer = GradientDiversity(self.resolution, capture=self.capture)
        else:
            self.observer = WindowedDiversity(self.check_every, self.resolution, stat="grad_diversity")
        # Observer first: its handler must have computed Δ before ours reads it.
        if self.observer is not None:
            self.observer.attach(ctl, name="muppet.diversity")
        had_tm = isinstance(ctl.components.get(TrainingTimeModel.name), TrainingTimeModel)
        self._time_model = None if had_tm else attach_time_model(ctl)
        self._handles.append(ctl.on(Event.EPOCH_COMPLETED, self._on_epoch))
        if self.check_every is not None:
            self._handles.append(ctl.on(Event.ITERATION_COMPLETED, self._on_step))
        self._rebuild()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if getattr(self, "observer", None) is not None:
            self.observer.detach()
        if getattr(self, "_time_model", None) is not None:
            self._time_model.detach()
        self.ctl = None

    def decide(self, ctl: Controller) -> Decision:
        if self._decision is None:  # used without a controller (e.g. a recipe check)
            self._decision = Decision.uniform(self._precisions[0])
        return self._decision

    # --- the rule -------------------------------------------------------------------------------
    def _on_epoch(self, ctl: Controller, epoch: int, **_: Any) -> None:
        j = int(epoch)
        changed = False
        if self.schedule is not None:
            lad = self.ladders[_GLOBAL]
            if j in self.schedule and lad.level < len(self._precisions) - 1:
                self._switch(ctl, _GLOBAL, lad, j, "schedule", next_epoch=j + 1)
                self._rebuild()
                ctl.refresh()
            return
        res = self.observer.result
        if self.check_every is None and res is not None and res.epoch == j and res.step == ctl.step_count:
            changed = self._check(ctl, j, res, mid_epoch=False)
        if self.max_epochs_per_level is not None:
            top = len(self._precisions) - 1
            for unit, lad in self.ladders.items():
                if lad.level < top and j - lad.start_epoch + 1 >= self.max_epochs_per_level:
                    self._switch(ctl, unit, lad, j, "max_epochs", next_epoch=j + 1)
                    changed = True
        if changed:
            self._rebuild()
            ctl.refresh()  # the new level applies from the next iteration on

    def _on_step(self, ctl: Controller, step: int, **_: Any) -> None:
        res = self.observer.result
        if res is not None and res.last == int(step) and res.step == ctl.step_count:
            if self._check(ctl, ctl.epoch_index, res, mid_epoch=True):
                self._rebuild()  # decide() hands it out at the next ITERATION_STARTED

    def _check(self, ctl: Controller, j: int, res: Any, mid_epoch: bool) -> bool:
        top = len(self._precisions) - 1
        t = self.threshold(j)
        values = {_GLOBAL: res.value} if not self.per_layer else res.per_layer
        changed = False
        stats: dict[str, float] = {"muppet_threshold": t}
        for unit, lad in self.ladders.items():
            d = values.get(unit, math.nan)
            entry: dict[str, Any] = {"epoch": j, "step": ctl.step_count, "unit": unit, "diversity": d,
                                     "threshold": t, "level": lad.level, "ratio": math.nan,
                                     "violation": False, "switched": False}
            if lad.level == top or math.isnan(d):
                entry["max_gd"] = lad.max_gd
                self.trace.append(entry)
                continue
            if lad.max_gd is None or d >= lad.max_gd:
                lad.max_gd = d
                entry["ratio"] = 1.0
            else:
                p = lad.max_gd / d
                entry["ratio"] = p
                if p > t:
                    lad.violations += 1
                    entry["violation"] = True
            entry["max_gd"] = lad.max_gd
            entry["violations"] = lad.violations
            if lad.violations >= self.patience:
                self._switch(ctl, unit, lad, j, "diversity", next_epoch=j if mid_epoch else j + 1)
                entry["switched"] = True
                changed = True
            entry["level"] = lad.level
            self.trace.append(entry)
            suffix = "" if unit == _GLOBAL else f"/{unit}"
            stats[f"muppet_level{suffix}"] = float(lad.level)
            if not math.isnan(entry["ratio"]):
                stats[f"muppet_ratio{suffix}"] = entry["ratio"]
        ctl.observe(**stats)
        return changed

    def _switch(self, ctl: Controller, unit: str, lad: _Ladder, j: int, reason: str, next_epoch: int) -> None:
        old = lad.level
        lad.level += 1
        lad.max_gd = None
        lad.violations = 0
        lad.start_epoch = next_epoch
        self.switches.append({"epoch": j, "step": ctl.step_count, "unit": unit, "reason": reason,
                              "from": _level_name(self._precisions[old]),
                              "to": _level_name(self._precisions[lad.level]), "level": lad.level})

    def _rebuild(self) -> None:
        levels = {u: lad.level for u, lad in self.ladders.items()}
        if not self.per_layer or len(set(levels.values())) <= 1:
            lv = next(iter(levels.values()), 0)
            self._decision = Decision.uniform(self._precisions[lv])
            return
        base = min(levels.values())
        ov = tuple((u, self._precisions[lv]) for u, lv in levels.items() if lv != base)
        self._decision = Decision(self._precisions[base], ov)

    # --- results and checkpoints ----------------------------------------------------------------
    def switch_epochs(self, unit: str = _GLOBAL) -> list[int]:
        """Epochs at whose end ``unit`` (a layer name, or ``"*"`` for the global ladder) switched up."""
        return [s["epoch"] for s in self.switches if s["unit"] == unit]

    def level_of(self, unit: str = _GLOBAL) -> int:
        return self.ladders[unit].level

    def state_dict(self) -> dict[str, Any]:
        return {"levels": self.levels_short(), "per_layer": self.per_layer,
                "ladders": {u: asdict(lad) for u, lad in self.ladders.items()},
                "switches": [dict(s) for s in self.switches], "trace": [dict(t) for t in self.trace]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "ladders" not in state:
            raise ValueError("not a MuPPET state_dict (no 'ladders')")
        if list(state["levels"]) != self.levels_short():
            raise ValueError(f"MuPPET state has levels {state['levels']}, this policy climbs "
                             f"{self.levels_short()}")
        if bool(state["per_layer"]) != self.per_layer:
            raise ValueError(f"MuPPET state has per_layer={state['per_layer']}, this policy "
                             f"per_layer={self.per_layer}")
        if self.ctl is not None and set(state["ladders"]) != set(self.ladders):
            raise ValueError(f"MuPPET state has ladders for {sorted(state['ladders'])}, this run has "
                             f"{sorted(self.ladders)}")
        self.ladders = {u: _Ladder(**d) for u, d in state["ladders"].items()}
        for u, lad in self.ladders.items():
            if not 0 <= lad.level < len(self._precisions):
                raise ValueError(f"MuPPET state: level {lad.level} of {u!r} is outside the ladder")
        self.switches = [dict(s) for s in state["switches"]]
        self.trace = [dict(t) for t in state["trace"]]
        self._rebuild()


def _level_name(p: Precision) -> str:
    names = {p.weight.short(), p.activation.short(), p.gradient.short()}
    return names.pop() if len(names) == 1 else p.short()
