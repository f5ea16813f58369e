"""Precision range test (PRT): find the lowest precision at which training progresses
(docs/methods.md#precision-range-test).

CPT's paper picks the lower bound ``B_min`` of its cycle with a test inspired by the learning-rate
range test: start at a very low forward precision, raise it one bit at a time during the first
iterations, and take the first precision at which training starts to make progress. The paper gives
neither code nor constants, so adaprec fixes them here, as parameters:

* the forward bits go ``start_bits, start_bits + 1, …, max_bits``; each *level* lasts
  ``steps_per_bits`` iterations (backward bits stay at ``grad_bits``);
* a level's *progress* compares the mean of the metric over the level's first ``window`` iterations
  with its mean over the level's last ``window`` iterations — the metric change averaged over a few
  consecutive iterations, as in the paper. For a metric to maximise (training accuracy) progress is
  ``last - first``; for one to minimise (the training loss) it is the relative drop
  ``(first - last) / |first|``;
* the first level whose progress exceeds ``threshold`` gives ``B_min``; ``B_max`` is ``max_bits`` (the
  static baseline's / target inference precision, as in the paper). If no level passes, ``B_min =
  max_bits`` (CPT then trains statically) and a warning says so.

Defaults: ``start_bits=2``, ``steps_per_bits=20``, ``window=5``, ``threshold=0.05`` (5 accuracy
points, or a 5% relative loss drop, within one level).

Two ways to run it:

* :func:`find_bounds` — stand-alone, on a model, a loss function and batches. By default
  (``restore=True``) it gives back the model, the optimizer state and torch's RNG exactly as it found
  them: the test iterations are a measurement, not training. With ``restore=False`` they count as
  training and the model/optimizer keep what they learned.
* ``adaprec.policies.CPT(bits="auto")`` — on the live run: the first iterations of the user's own
  loop are the test (they are training iterations: they update the weights and count in the cost),
  then the policy cycles between the found bounds for the rest of ``total_steps``.

Example:
    >>> rt = RangeTest(start_bits=2, max_bits=4, steps_per_bits=4, window=2, threshold=0.1)
    >>> for acc in [0.1, 0.1, 0.1, 0.1,   0.1, 0.2, 0.4, 0.5]:   # 2 bits: flat; 3 bits: learns
    ...     _ = rt.record(acc)
    >>> rt.done, rt.b_min, [round(lv.progress, 2) for lv in rt.levels]
    (True, 3, [0.0, 0.3])
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RangeTest", "LevelResult", "PRTResult", "find_bounds", "level_progress", "PRT_DEFAULTS"]

#: The documented defaults (docs/methods.md#precision-range-test leaves them open).
PRT_DEFAULTS: dict[str, Any] = {"start_bits": 2, "steps_per_bits": 20, "window": 5, "threshold": 0.05}

_MODES = ("max", "min")


def _int_in(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value


def infer_mode(metric: str) -> str:
    """``"min"`` for loss-like metric names (loss, perplexity, bpc, error), ``"max"`` otherwise.

    Example:
        >>> infer_mode("loss"), infer_mode("train_acc")
        ('min', 'max')
    """
    m = metric.lower()
    return "min" if any(k in m for k in ("loss", "ppl", "perplexity", "bpc", "err")) else "max"


def level_progress(values: list[float], window: int, mode: str) -> tuple[float, float, float]:
    """``(progress, first, last)`` of one level's metric values (see the module docstring).

    Example:
        >>> level_progress([2.0, 2.0, 1.0, 1.0], window=2, mode="min")
        (0.5, 2.0, 1.0)
    """
    first = sum(values[:window]) / window
    last = sum(values[-window:]) / window
    if mode == "max":
        return last - first, first, last
    return (first - last) / max(abs(first), 1e-12), first, last


@dataclass(frozen=True)
class LevelResult:
    """One level of the test: its forward bits, progress, windowed means, and whether it passed."""

    bits: int
    progress: float
    first: float
    last: float
    passed: bool


@dataclass
class PRTResult:
    """What the range test found.

    Attributes:
        b_min, b_max: the bounds (``bounds`` gives both); ``found`` is False when no level passed.
        levels: the measured curve, one :class:`LevelResult` per tested precision.
        values: ``(bits, metric)`` per test iteration.
        metric, mode, threshold, window, steps_per_bits: how it was measured; ``steps``: iterations used.

    Example:
        >>> r = PRTResult(b_min=4, b_max=8, found=True)
        >>> r.bounds, r.to_dict()["bounds"]
        ((4, 8), [4, 8])
    """

    b_min: int
    b_max: int
    found: bool
    levels: list[LevelResult] = field(default_factory=list)
    values: list[tuple[int, float]] = field(default_factory=list)
    metric: str = "metric"
    mode: str = "max"
    threshold: float = PRT_DEFAULTS["threshold"]
    window: int = PRT_DEFAULTS["window"]
    steps_per_bits: int = PRT_DEFAULTS["steps_per_bits"]
    steps: int = 0

    @property
    def bounds(self) -> tuple[int, int]:
        return self.b_min, self.b_max

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bounds"] = [self.b_min, self.b_max]
        d["levels"] = [asdict(lv) for lv in self.levels]
        d["values"] = [list(v) for v in self.values]
        return d


class RangeTest:
    """The test as a state machine: which bits iteration ``i`` uses, and what the recorded metric says.

    Feed one metric value per test iteration to :meth:`record`; iteration ``i`` runs at
    :meth:`bits_at` ``(i)``. With ``full_curve=False`` the test ends at the first passing level,
    otherwise it measures every level up to ``max_bits`` (``b_min`` is still the first passing one).

    Example:
        >>> rt = RangeTest(start_bits=3, max_bits=5, steps_per_bits=2, window=1, threshold=0.5, mode="min")
        >>> [rt.bits_at(i) for i in range(6)]
        [3, 3, 4, 4, 5, 5]
        >>> for loss in [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]:
        ...     _ = rt.record(loss)
        >>> rt.done, rt.found, rt.b_min
        (True, False, 5)
    """

    def __init__(self, *, start_bits: int = PRT_DEFAULTS["start_bits"], max_bits: int = 8,
                 steps_per_bits: int = PRT_DEFAULTS["steps_per_bits"], window: int = PRT_DEFAULTS["window"],
                 threshold: float = PRT_DEFAULTS["threshold"], mode: str = "max",
                 full_curve: bool = False) -> None:
        self.start_bits = _int_in("start_bits", start_bits, 1, 32)
        self.max_bits = _int_in("max_bits", max_bits, 1, 32)
        if self.max_bits < self.start_bits:
            raise ValueError(f"max_bits ({max_bits}) must be >= start_bits ({start_bits})")
        self.steps_per_bits = _int_in("steps_per_bits", steps_per_bits, 2)
        self.window = _int_in("window", window, 1)
        if 2 * self.window > self.steps_per_bits:
            raise ValueError(f"window ({window}) must be at most steps_per_bits / 2 ({steps_per_bits / 2:g}) "
                             "so a level's first and last windows do not overlap")
        if (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                or not math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES} ('max' for accuracy, 'min' for a loss), "
                             f"got {mode!r}")
        self.mode = mode
        self.full_curve = bool(full_curve)
        self.values: list[float] = []
        self.levels: list[LevelResult] = []
        self.b_min: int | None = None
        self.done = False

    @property
    def max_steps(self) -> int:
        """Iterations the test takes when every level is measured."""
        return (self.max_bits - self.start_bits + 1) * self.steps_per_bits

    @property
    def steps(self) -> int:
        """Iterations recorded so far (once ``done``: the length of the test)."""
        return len(self.values)

    @property
    def found(self) -> bool:
        return any(lv.passed for lv in self.levels)

    def bits_at(self, i: int) -> int:
        """Forward bits of test iteration ``i`` (clamped to ``max_bits``)."""
        return min(self.start_bits + i // self.steps_per_bits, self.max_bits)

    @property
    def bits(self) -> int:
        """Forward bits of the next iteration to record."""
        return self.bits_at(len(self.values))

    def record(self, value: float) -> bool:
        """Add the metric of the next test iteration; returns True when this value ended the test."""
        if self.done:
            raise RuntimeError("the range test is over; read b_min / result() instead of recording more")
        self.values.append(float(value))
        n = self.steps_per_bits
        if len(self.values) % n:
            return False
        bits = self.bits_at(len(self.values) - 1)
        prog, first, last = level_progress(self.values[-n:], self.window, self.mode)
        passed = prog > self.threshold  # NaN never passes
        self.levels.append(LevelResult(bits, prog, first, last, passed))
        if passed and self.b_min is None:
            self.b_min = bits
        if (self.b_min is not None and not self.full_curve) or bits >= self.max_bits:
            if self.b_min is None:
                self.b_min = self.max_bits
            self.done = True
        return self.done

    def result(self, metric: str = "metric") -> PRTResult:
        if not self.done:
            raise RuntimeError(f"the range test is not finished ({len(self.values)} of up to "
                               f"{self.max_steps} iterations recorded)")
        vals = [(self.bits_at(i), v) for i, v in enumerate(self.values)]
        return PRTResult(self.b_min, self.max_bits, self.found, list(self.levels), vals, metric, self.mode,
                         self.threshold, self.window, self.steps_per_bits, self.steps)

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "levels": [asdict(lv) for lv in self.levels],
                "b_min": self.b_min, "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"values", "levels", "b_min", "done"} - set(state)
        if missing:
            raise ValueError(f"range-test state is missing {sorted(missing)}")
        self.values = [float(v) for v in state["values"]]
        self.levels = [LevelResult(**lv) for lv in state["levels"]]
        self.b_min = state["b_min"]
        self.done = bool(state["done"])


def _batches_forever(batches: Iterable[Any], needed: int) -> Iterator[Any]:
    n = 0
    while True:
        it = iter(batches)
        got = False
        for b in it:
            got = True
            n += 1
            yield b
        if not got:
            raise ValueError(f"batches ran out after {n} iterations; the range test needs up to {needed}. "
                             "Pass a re-iterable (a list or a DataLoader), not a one-shot iterator, or more "
                             "batches")


def _split_output(out: Any) -> tuple[Tensor, float | None]:
    if isinstance(out, tuple | list):
        if len(out) != 2:
            raise ValueError("fn(model, batch) must return a loss tensor or a (loss, metric) pair, "
                             f"got a sequence of length {len(out)}")
        loss, metric = out
        return loss, float(metric)
    return out, None


def find_bounds(
    model: nn.Module,
    fn: Callable[[nn.Module, Any], Any],
    batches: Iterable[Any],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    start_bits: int = PRT_DEFAULTS["start_bits"],
    max_bits: int = 8,
    grad_bits: int = 8,
    steps_per_bits: int = PRT_DEFAULTS["steps_per_bits"],
    window: int = PRT_DEFAULTS["window"],
    threshold: float = PRT_DEFAULTS["threshold"],
    mode: str | None = None,
    restore: bool = True,
    full_curve: bool = False,
    layers: Any = None,
    lr: float = 0.01,
) -> PRTResult:
    """Run the precision range test on ``model`` and return the bounds with the measured curve.

    Args:
        model: the model to test (in training mode during the test; its mode is restored).
        fn: ``fn(model, batch)`` returning the loss tensor, or ``(loss, metric)`` where ``metric`` is a
            number such as the batch's training accuracy. With a loss only, the test watches the loss.
        batches: re-iterable training batches; cycled if the test needs more iterations.
        optimizer: the optimizer to train with; ``None`` uses ``SGD(lr=lr, momentum=0.9)``.
        start_bits, max_bits: the lowest and the highest forward precision tested; ``max_bits`` is the
            returned ``B_max``.
        grad_bits: the constant backward (error) precision.
        steps_per_bits, window, threshold: see the module docstring.
        mode: ``"max"`` or ``"min"``; default ``"max"`` for a returned metric, ``"min"`` for a loss.
        restore: give back the model's parameters, buffers and ``.grad`` fields, the optimizer's state
            and torch's RNG exactly as before (default). ``False``: the test iterations count as training.
        full_curve: measure every level up to ``max_bits`` instead of stopping at the first pass.
        layers: the controller's layer filter (see :class:`adaprec.Controller`).
        lr: learning rate of the default optimizer.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x = torch.randn(256, 4); y = (x[:, 0] > 0).long()
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> before = [p.clone() for p in model.parameters()]
        >>> def fn(m, batch):
        ...     logits = m(batch[0])
        ...     return F.cross_entropy(logits, batch[1]), (logits.argmax(1) == batch[1]).float().mean()
        >>> batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
        >>> res = find_bounds(model, fn, batches, lr=0.1, max_bits=8, steps_per_bits=10, window=3)
        >>> 2 <= res.b_min <= 8, res.b_max, len(res.levels) >= 1
        (True, 8, True)
        >>> all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        True
    """
    from .controller import Controller  # late: the policies package imports this module
    from .decision import Decision
    from .formats import Precision
    from .policies.base import Policy

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(fn):
        raise TypeError("fn must be callable as fn(model, batch) -> loss or (loss, metric)")
    grad_bits = _int_in("grad_bits", grad_bits, 1, 32)
    if mode is not None and mode not in _MODES:
        raise ValueError(f"mode must be None, 'max' or 'min', got {mode!r}")
    # Validate the test's parameters before touching anything.
    test = RangeTest(start_bits=start_bits, max_bits=max_bits, steps_per_bits=steps_per_bits, window=window,
                     threshold=threshold, mode=mode or "max", full_curve=full_curve)
    if optimizer is None:
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        own_optimizer = True
    else:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        own_optimizer = False

    class _TestPolicy(Policy):
        name = "prt"

        def decide(self, ctl: Any) -> Decision:
            return Decision.uniform(Precision.cpt(test.bits, grad_bits))

    was_training = model.training
    saved_model = copy.deepcopy(model.state_dict()) if restore else None
    saved_opt = copy.deepcopy(optimizer.state_dict()) if restore and not own_optimizer else None
    params = list(model.parameters())
    saved_grads = [None if p.grad is None else p.grad.clone() for p in params] if restore else None
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    metric_name = "metric"
    try:
        with torch.random.fork_rng(devices=cuda, enabled=restore):
            ctl = Controller(model, policy=_TestPolicy(), layers=layers)
            model.train()
            with ctl:
                for batch in _batches_forever(batches, test.max_steps):
                    loss, metric = _split_output(fn(model, batch))
                    if not isinstance(loss, Tensor) or loss.dim() != 0:
                        raise ValueError("fn(model, batch) must return a scalar loss tensor "
                                         "(or (loss, metric))")
                    if metric is None:
                        metric, metric_name = float(loss.detach()), "loss"
                        if mode is None:
                            test.mode = "min"
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    # Record before ctl.step() so the next decision already sees a finished level.
                    done = test.record(metric)
                    ctl.step()
                    if done:
                        break
    finally:
        if restore:
            model.load_state_dict(saved_model)
            if saved_opt is not None:
                optimizer.load_state_dict(saved_opt)
            for p, g in zip(params, saved_grads):
                p.grad = g
        model.train(was_training)
    result = test.result(metric_name)
    if not result.found:
        warnings.warn(f"precision range test: no level from {test.start_bits} to {test.max_bits} bits made "
                      f"progress above threshold {test.threshold:g}; B_min = B_max = {test.max_bits}",
                      stacklevel=2)
    return result
