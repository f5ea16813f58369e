"""Cyclic Precision Training (CPT, Fu et al., ICLR 2021; METHODS.md §1) and its generalised schedules.

The forward precision (weights and activations) cycles between ``B_min`` and ``B_max`` many times
during training; the backward precision (errors) uses the same formula with its own bounds, which in
every published run are equal, i.e. constant.

Schedule (exactly the released code's, METHODS.md §1.1): ``P = floor(total_steps / cycles)``,
``u = (t mod P) / P`` for the 0-based iteration ``t`` and, for the paper's cosine growth,
``bits(t) = rint(B_min + 0.5 (B_max - B_min)(1 - cos(pi u)))`` with numpy's round-half-to-even.
When ``total_steps`` is not a multiple of ``cycles`` the last ``total_steps - cycles * P`` iterations
start one more (partial) cycle, as in the released code.

Beyond the paper (Wolfe & Kyrillidis 2024): ``profile`` ``"cos"``, ``"linear"``, ``"exp"`` or ``"rex"``
maps ``z`` in [0, 1] to a precision (cos and linear spend equal time on both halves of the range,
exp rises fast and spends more time near ``B_max``, rex stays low and rises steeply at the end);
``shape="growth"`` repeats ramps from ``B_min`` up to ``B_max``
(``z = u``, the paper's form), ``shape="triangular"`` goes up in the first half of each cycle and back
down, mirrored, in the second (``z = 2u`` then ``2 - 2u``), so there is no jump from ``B_max`` to ``B_min``.

Where this differs from the released code, on purpose:

* Evaluation (``model.eval()``) runs at ``B_max`` by default (``eval_bits="max"``), not at whatever
  bit-width the cycle happens to be in; ``eval_bits="current"`` restores the released behaviour, an int
  fixes another width.
* Past ``total_steps`` the schedule keeps cycling with the same period and warns once, instead of
  failing: a run that was planned a little short still trains sensibly.
* ``bits="auto"`` runs the precision range test (:mod:`adaprec.prt`) on the first iterations of the
  live run to pick ``B_min``; those iterations are real training (they update the weights and count in
  the cost). Cycling then starts at the step ``T0`` where the test ended, with
  ``P = floor((total_steps - T0) / cycles)`` and ``u = ((t - T0) mod P) / P``.

Example:
    >>> [cpt_bits(t, 64_000, 32, 3, 8) for t in (0, 500, 1000, 1999, 2000)]
    [3, 4, 6, 8, 3]
    >>> CPT(bits=(3, 8), grad_bits=8).config()
    {'bits': [3, 8], 'grad_bits': 8, 'cycles': 32, 'profile': 'cos', 'shape': 'growth'}
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from ..decision import Decision
from ..events import Event
from ..formats import Format, Precision, parse_format
from ..prt import PRT_DEFAULTS, RangeTest, infer_mode
from .base import Policy

if TYPE_CHECKING:  # pragma: no cover
    from ..controller import Controller

__all__ = ["CPT", "PROFILES", "SHAPES", "EVAL_MODES", "cpt_bits", "cpt_schedule", "cycle_bits",
           "profile_value"]

PROFILES = ("cos", "linear", "exp", "rex")
SHAPES = ("growth", "triangular")
EVAL_MODES = ("max", "current")


def _check_bits(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer bit-width in 1..32, got {value!r}")
    if not 1 <= int(value) <= 32:
        raise ValueError(f"{name} must be an integer bit-width in 1..32, got {value}")
    return int(value)


def _check_pair(name: str, value: Any) -> tuple[int, int]:
    """An int ``b`` (constant, ``(b, b)``) or a ``(low, high)`` pair with ``low <= high``."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        b = _check_bits(name, value)
        return b, b
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{name} must be an int or a (B_min, B_max) pair of ints in 1..32, got {value!r}")
    lo, hi = _check_bits(f"{name}[0] (B_min)", value[0]), _check_bits(f"{name}[1] (B_max)", value[1])
    if lo > hi:
        raise ValueError(f"{name}: B_min ({lo}) must not exceed B_max ({hi})")
    return lo, hi


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return value


def profile_value(z: np.ndarray | float, low: float, high: float, profile: str = "cos") -> np.ndarray:
    """The unrounded precision of a profile at position ``z`` in [0, 1] (0 -> ``low``).

    Example:
        >>> [round(float(profile_value(z, 3, 8, "linear")), 2) for z in (0.0, 0.5, 1.0)]
        [3.0, 5.5, 8.0]
    """
    _check_choice("profile", profile, PROFILES)
    z = np.asarray(z, dtype=np.float64)
    span = high - low
    if profile == "cos":
        return low + 0.5 * span * (1.0 - np.cos(np.pi * z))
    if profile == "linear":
        return low + span * z
    if profile == "exp":
        return high - span * np.exp(-4.0 * z)
    zr = 1.0 - z  # "rex": REX's learning-rate decay turned upside down: stays low, then rises steeply
    return high - span * zr / (0.1 + 0.9 * zr)


@lru_cache(maxsize=64)
def cycle_bits(period: int, low: int, high: int, profile: str = "cos",
               shape: str = "growth") -> tuple[int, ...]:
    """The rounded bits of one whole cycle of ``period`` iterations (cached: the policy looks them up).

    Example:
        >>> cycle_bits(8, 2, 4, "linear", "triangular")
        (2, 2, 3, 4, 4, 4, 3, 2)
    """
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period must be a positive int, got {period!r}")
    _check_choice("shape", shape, SHAPES)
    u = np.arange(period, dtype=np.float64) / period
    z = u if shape == "growth" else np.where(u < 0.5, 2.0 * u, 2.0 - 2.0 * u)
    # np.rint rounds half to even, like the released code.
    vals = np.rint(profile_value(z, low, high, profile))
    return tuple(int(v) for v in np.clip(vals, low, high))


def _period(total_steps: int, cycles: int, start: int) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
        raise ValueError(f"cycles must be an int >= 1, got {cycles!r}")
    if cycles > total_steps - start:
        what = f" = total_steps - {start} range-test steps" if start else ""
        raise ValueError(f"cycles ({cycles}) must not exceed the iterations to cycle over "
                         f"({total_steps - start}{what}): each cycle needs at least one iteration")
    return (total_steps - start) // cycles


def cpt_bits(t: int, total_steps: int, cycles: int, low: int, high: int, profile: str = "cos",
             shape: str = "growth", start: int = 0) -> int:
    """Bits at iteration ``t`` (0-based) of a CPT schedule that starts cycling at iteration ``start``.

    Example:
        >>> cpt_bits(1000, 64_000, 32, 3, 8), cpt_bits(64_000, 64_000, 32, 3, 8)
        (6, 3)
    """
    if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < start:
        raise ValueError(f"t must be an int >= start ({start}), got {t!r}")
    period = _period(total_steps, cycles, start)
    return cycle_bits(period, low, high, profile, shape)[(int(t) - start) % period]


def cpt_schedule(total_steps: int, cycles: int, low: int, high: int, profile: str = "cos",
                 shape: str = "growth", start: int = 0, steps: int | None = None) -> np.ndarray:
    """Bits for iterations ``start .. start + steps - 1`` (default: to ``total_steps``), as an int array.

    Example:
        >>> sched = cpt_schedule(64_000, 32, 3, 8)
        >>> [int((sched == b).sum()) // 32 for b in range(3, 9)]  # iterations per cycle at 3..8 bits
        [410, 329, 261, 262, 329, 409]
    """
    period = _period(total_steps, cycles, start)
    n = total_steps - start if steps is None else steps
    one = np.asarray(cycle_bits(period, low, high, profile, shape), dtype=np.int64)
    return one[np.arange(n) % period]


class _Ladder:
    """The levels a CPT schedule moves over, for one or two roles: integer bit-widths ``lo..hi`` (the
    paper's form; position = bits) or the formats from ``lo`` up to ``hi`` by each format's own
    :meth:`~adaprec.formats.Format.up` (positions ``0..n-1``)."""

    def __init__(self, name: str, value: Any, roles: tuple[str, ...]) -> None:
        self.is_int = _is_int_pair(value)
        if self.is_int:
            lo, hi = _check_pair(name, value)
            self.offset, self.spec = lo, [lo, hi] if lo != hi else lo
            self.levels = {r: [parse_format(b, role=r) for b in range(lo, hi + 1)] for r in roles}
            return
        usage = (f"{name} must be an integer bit-width 1..32, a (B_min, B_max) pair of them, or one format / "
                 f"a (low, high) pair of formats such as ('mxfp4', 'mxfp8')")
        specs = list(value) if isinstance(value, tuple | list) else [value, value]
        if any(isinstance(v, int | float | np.number) for v in specs):
            _check_pair(name, value)  # numbers that are not all integer bit-widths: say which one is wrong
        if len(specs) != 2:
            raise ValueError(f"{usage}; got {value!r}")
        self.offset = 0
        try:
            self.levels = {r: _climb(name, specs[0], specs[1], r) for r in roles}
        except ValueError as e:
            raise ValueError(f"{usage}; got {value!r} ({e})") from None
        n = {len(v) for v in self.levels.values()}
        if len(n) != 1:
            raise ValueError(f"{name}: the ladders of the roles {roles} have different lengths {sorted(n)}")
        first = self.levels[roles[0]]
        lo, hi = first[0].short(), first[-1].short()
        self.spec = lo if lo == hi else [lo, hi]

    @property
    def bounds(self) -> tuple[int, int]:
        n = len(next(iter(self.levels.values())))
        return self.offset, self.offset + n - 1

    def at(self, role: str, pos: int) -> Format:
        return self.levels[role][pos - self.offset]

    def cost_bits(self, role: str, pos: int) -> float:
        return self.at(role, pos).cost_bits


def _is_int_pair(value: Any) -> bool:
    vals = value if isinstance(value, tuple | list) else [value]
    return all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in vals)


def _climb(name: str, lo_spec: Any, hi_spec: Any, role: str) -> list[Format]:
    """``lo``, ``lo.up()``, … up to ``hi`` (which must be on ``lo``'s ladder)."""
    try:
        lo, hi = parse_format(lo_spec, role=role), parse_format(hi_spec, role=role)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    out = [lo]
    while out[-1].short() != hi.short():
        nxt = out[-1].up()
        if nxt.short() == out[-1].short() or len(out) > 64:
            raise ValueError(f"{name}: {hi.short()} is not above {lo.short()} on its ladder "
                             f"({' -> '.join(f.short() for f in out)} ends there); give (low, high) in order")
        out.append(nxt)
    out[-1] = hi  # exactly the format given at the top (same name; the caller's own options)
    return out


class CPT(Policy):
    """Cyclic precision training: forward bits cycle between ``B_min`` and ``B_max`` every iteration.

    Args:
        bits: ``(B_min, B_max)`` forward bit-widths (1..32, ``B_min <= B_max``); ``"auto"`` or
            ``("auto", B_max)`` finds ``B_min`` with the precision range test on the live run
            (``B_max`` default 8). Or a pair of formats, ``("mxfp4", "mxfp8")``: the schedule then moves
            over the levels of the low format's ladder up to the high one (mxfp4 -> mxfp6 -> mxfp8, at
            positions 0..n-1 with the same formula), for weights and activations.
        grad_bits: backward (error) bits: an int (constant, the paper's choice) or a ``(G_min, G_max)``
            pair cycled like the forward bits; or a format (``"fp8_e5m2"``, ``"mxfp8"``) or a pair of
            formats.
        cycles: number of cycles over the run (paper: 32).
        profile: ``"cos"`` (paper), ``"linear"``, ``"exp"`` or ``"rex"``.
        shape: ``"growth"`` (paper: repeated ramps up) or ``"triangular"`` (up, then mirrored down).
        eval_bits: precision in ``model.eval()``: ``None``/``"max"`` (``B_max``), ``"current"`` (the
            cycle's phase, as in the released code) or an int.
        prt_start_bits, prt_steps_per_bits, prt_window, prt_threshold: the range test's parameters
            (``bits="auto"`` only; see :mod:`adaprec.prt`).
        prt_metric: the statistic the range test watches, as passed to ``ctl.observe`` once per
            iteration (default ``"loss"``, which every loop observes; ``"acc"``/training accuracy is the
            paper's choice); ``prt_mode`` ``"min"``/``"max"`` (default: from the name).

    Needs the controller's ``total_steps``. Formats follow the SBM conventions of
    :meth:`Precision.cpt` (per-channel weights, per-tensor activations, stochastic rounding of errors).

    Example:
        >>> import torch, adaprec
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> with adaprec.Controller(model, policy=CPT(bits=(3, 8), cycles=2), total_steps=8) as ctl:
        ...     for _ in range(8):
        ...         _ = model(torch.randn(2, 4)); ctl.step()
        >>> [h.layers["0"].weight.bits for h in ctl.history]
        [3, 4, 6, 7, 3, 4, 6, 7]
        >>> ctl.history[0].layers["2"].weight.bits  # the controller's classifier floor (METHODS.md §3.2)
        4
    """

    name = "cpt"
    needs_total_steps = True

    def __init__(
        self,
        bits: Any = (3, 8),
        grad_bits: Any = 8,
        cycles: int = 32,
        profile: str = "cos",
        shape: str = "growth",
        eval_bits: Any = None,
        *,
        prt_start_bits: int = PRT_DEFAULTS["start_bits"],
        prt_steps_per_bits: int = PRT_DEFAULTS["steps_per_bits"],
        prt_window: int = PRT_DEFAULTS["window"],
        prt_threshold: float = PRT_DEFAULTS["threshold"],
        prt_metric: str = "loss",
        prt_mode: str | None = None,
    ) -> None:
        self.auto = bits == "auto" or (isinstance(bits, tuple | list) and len(bits) == 2
                                       and bits[0] == "auto")
        if self.auto:
            b_max = 8 if bits == "auto" else _check_bits("bits[1] (B_max)", bits[1])
            self.bits: tuple[int | None, int] = (None, b_max)
            self._fw = _Ladder("bits", (1, b_max), ("weight", "activation"))
        else:
            self._fw = _Ladder("bits", bits, ("weight", "activation"))
            self.bits = self._fw.bounds
        self._bw = _Ladder("grad_bits", grad_bits, ("gradient",))
        self.grad_bits = self._bw.bounds
        if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
            raise ValueError(f"cycles must be an int >= 1, got {cycles!r}")
        self.cycles = cycles
        self.profile = _check_choice("profile", profile, PROFILES)
        self.shape = _check_choice("shape", shape, SHAPES)
        if eval_bits is not None and eval_bits not in EVAL_MODES:
            usage = "eval_bits (None, 'max', 'current', an int or a format)"
            if _is_int_pair(eval_bits):
                _check_bits(usage, eval_bits)
            else:
                try:
                    parse_format(eval_bits)
                except ValueError:
                    raise ValueError(f"{usage}: got {eval_bits!r}") from None
        self.eval_bits = eval_bits
        if not isinstance(prt_metric, str) or not prt_metric:
            raise ValueError(f"prt_metric must be the name of an observed statistic, got {prt_metric!r}")
        self.prt_kwargs = {"start_bits": prt_start_bits, "steps_per_bits": prt_steps_per_bits,
                           "window": prt_window, "threshold": prt_threshold}
        self.prt_metric = prt_metric
        self.prt_mode = prt_mode
        if self.auto:  # validate the test's parameters now, not at the first iteration
            self._new_test()
        self._decisions: dict[tuple[int, int], Decision] = {}
        self._handles: list[Any] = []
        self._reset()

    # --- state ----------------------------------------------------------------------------------
    def _new_test(self) -> RangeTest:
        mode = self.prt_mode if self.prt_mode is not None else infer_mode(self.prt_metric)
        return RangeTest(max_bits=self.bits[1], mode=mode, **self.prt_kwargs)

    def _reset(self) -> None:
        self.test: RangeTest | None = self._new_test() if self.auto else None
        self.start = 0  # iteration where cycling starts (after the range test)
        self._last_recorded = -1
        self._warned_past_end = False

    @property
    def bounds(self) -> tuple[int, int] | None:
        """``(B_min, B_max)`` of the forward cycle; ``None`` while the range test is still running."""
        if self.test is not None and not self.test.done:
            return None
        lo = self.test.b_min if self.test is not None else self.bits[0]
        return lo, self.bits[1]

    def attach(self, ctl: Controller) -> None:
        self._reset()
        total = getattr(ctl, "total_steps", None)
        if total is None:
            raise ValueError("CPT needs total_steps (the planned number of iterations, e.g. "
                             "len(loader) * epochs) to lay out its cycles; pass total_steps= to the "
                             "Controller")
        reserve = self.test.max_steps if self.test is not None else 0
        if self.cycles > total - reserve:
            extra = f" minus up to {reserve} range-test iterations" if reserve else ""
            raise ValueError(f"cycles ({self.cycles}) must not exceed total_steps ({total}){extra}: each "
                             "cycle needs at least one iteration; lower cycles or train longer")
        super().attach(ctl)
        self._handles = [ctl.on(Event.ITERATION_COMPLETED, self._on_iteration)]
        if self.test is not None:
            self._handles.append(ctl.on(Event.METRICS_OBSERVED, self._on_metrics))
        ctl.add_report_section("cpt", self._report)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        super().detach()

    # --- decisions ------------------------------------------------------------------------------
    def _decision(self, b: int, g: int) -> Decision:
        d = self._decisions.get((b, g))
        if d is None:
            fw = self._fw
            prec = Precision(fw.at("weight", b), fw.at("activation", b), self._bw.at("gradient", g))
            d = self._decisions[(b, g)] = Decision.uniform(prec)
        return d

    def bits_at(self, t: int, total_steps: int) -> tuple[int, int]:
        """``(forward, backward)`` bits of iteration ``t`` given the state of the range test."""
        if self.test is not None and not self.test.done:
            return self.test.bits_at(min(t, self.test.max_steps - 1)), self.grad_bits[1]
        lo, hi = self.bounds
        t = max(t, self.start)
        b = cpt_bits(t, total_steps, self.cycles, lo, hi, self.profile, self.shape, self.start)
        glo, ghi = self.grad_bits
        g = glo if glo == ghi else cpt_bits(t, total_steps, self.cycles, glo, ghi, self.profile, self.shape,
                                            self.start)
        return b, g

    def decide(self, ctl: Controller) -> Decision:
        if ctl.total_steps is None:
            raise ValueError("CPT needs total_steps; pass total_steps= to the Controller")
        return self._decision(*self.bits_at(ctl.step_count, ctl.total_steps))

    def eval_decision(self, ctl: Controller) -> Decision | None:
        if self.eval_bits == "current":
            return None
        if self.eval_bits in (None, "max"):
            return self._decision(self.bits[1], self.grad_bits[1])
        g = self._bw.at("gradient", self.grad_bits[1])
        if _is_int_pair(self.eval_bits):
            return Decision.uniform(Precision(parse_format(int(self.eval_bits), role="weight"),
                                              parse_format(int(self.eval_bits), role="activation"), g))
        return Decision.uniform(Precision(parse_format(self.eval_bits, role="weight"),
                                          parse_format(self.eval_bits, role="activation"), g))

    # --- the live range test --------------------------------------------------------------------
    def _on_metrics(self, ctl: Controller, stats: dict[str, Any], **_: Any) -> None:
        if self.test is None or self.test.done or self.prt_metric not in stats:
            return
        # The loop may observe after opt.step() (the value belongs to the iteration just completed) or
        # before it (the value belongs to the running one); take the earliest not yet recorded.
        step = ctl.step_count - 1 if ctl.step_count - 1 > self._last_recorded else ctl.step_count
        self._last_recorded = step
        value = stats[self.prt_metric]
        ended = self.test.record(float(value.detach()) if hasattr(value, "detach") else float(value))
        if ended:
            self.start = self.test.steps
            if not self.test.found:
                warnings.warn(f"CPT(bits='auto'): the precision range test found no precision from "
                              f"{self.test.start_bits} to {self.bits[1]} bits where {self.prt_metric!r} "
                              f"improved by more than {self.test.threshold:g}; training at a constant "
                              f"{self.bits[1]} bits", stacklevel=2)
            if ctl.step_count > step:  # the next iteration was already decided with test bits
                ctl.refresh()

    def _on_iteration(self, ctl: Controller, step: int, **_: Any) -> None:
        # Warn when an iteration past the plan actually ran (the controller decides one iteration ahead,
        # so deciding for iteration total_steps alone is normal at the end of every run).
        if step >= ctl.total_steps and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(f"CPT: iteration {step} is past total_steps={ctl.total_steps}; the precision keeps "
                          "cycling with the same period (raise total_steps if the run is meant to be longer)",
                          stacklevel=2)
        if self.test is not None and not self.test.done and self._last_recorded < step - 1:
            raise RuntimeError(f"CPT(bits='auto') runs a precision range test that needs "
                               f"ctl.observe({self.prt_metric}=...) once per iteration; iteration "
                               f"{self._last_recorded + 1} had none (set prt_metric= to a statistic the "
                               "loop observes, or give bits=(B_min, B_max))")

    def signals(self) -> dict[str, float]:
        """Scalars for loggers: forward and backward bits now, and the phase within the cycle (0..1)."""
        ctl = getattr(self, "ctl", None)
        if ctl is None or ctl.total_steps is None:
            return {}
        b, g = self.bits_at(ctl.step_count, ctl.total_steps)
        # Effective bits per element of the current formats (= the bit-width on an integer ladder).
        out = {"bits": self._fw.cost_bits("weight", b), "grad_bits": self._bw.cost_bits("gradient", g)}
        if self.bounds is not None and ctl.step_count >= self.start:
            period = _period(ctl.total_steps, self.cycles, self.start)
            out["cycle_phase"] = ((ctl.step_count - self.start) % period) / period
        return out

    def prt_result(self) -> Any:
        """The range test's :class:`~adaprec.prt.PRTResult` once it has finished, else ``None``."""
        if self.test is None or not self.test.done:
            return None
        return self.test.result(self.prt_metric)

    def _report(self) -> dict[str, Any]:
        b = self.bounds
        if b is not None and not self._fw.is_int:
            bounds = f"{self._fw.at('weight', b[0]).short()}-{self._fw.at('weight', b[1]).short()}"
        else:
            bounds = "searching" if b is None else f"{b[0]}-{b[1]}"
        out: dict[str, Any] = {"cpt_bounds": bounds}
        if self.test is not None:
            out["prt_steps"] = self.test.steps
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "last_recorded": self._last_recorded,
                "warned_past_end": self._warned_past_end,
                "prt": None if self.test is None else self.test.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"start", "last_recorded", "warned_past_end", "prt"} - set(state)
        if missing:
            raise ValueError(f"not a CPT state (missing {sorted(missing)})")
        if (state["prt"] is None) != (self.test is None):
            raise ValueError("the CPT state is for a policy with"
                             f"{'out' if state['prt'] is None else ''} bits='auto', this one differs")
        self.start = int(state["start"])
        self._last_recorded = int(state["last_recorded"])
        self._warned_past_end = bool(state["warned_past_end"])
        if self.test is not None:
            self.test.load_state_dict(state["prt"])

    # --- recipes and tuning ---------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "bits": ["auto", self.bits[1]] if self.auto else (
                list(self.bits) if self._fw.is_int else self._fw.spec),
            "grad_bits": self._bw.spec,
            "cycles": self.cycles, "profile": self.profile, "shape": self.shape,
        }
        if self.eval_bits is not None:
            cfg["eval_bits"] = self.eval_bits
        if self.auto:
            cfg.update({f"prt_{k}": v for k, v in self.prt_kwargs.items()})
            cfg["prt_metric"] = self.prt_metric
            if self.prt_mode is not None:
                cfg["prt_mode"] = self.prt_mode
        return cfg

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        """Integer ladders: B_min 2..6, span 1..6 (B_max = B_min + span), grad bits 6..10; or, with
        ``family="mx"``, the block-scaled ladder from mxfp4 or mxfp6 up to mxfp8 with mxfp8 or fp8_e5m2
        errors; cycles in {1, 2, 4, 8, 16, 32}, every profile and shape."""
        family = trial.suggest_categorical("family", ["int", "mx"])
        if family == "mx":
            bits: Any = (trial.suggest_categorical("mx_low", ["mxfp4", "mxfp6"]), "mxfp8")
            grad: Any = trial.suggest_categorical("mx_grad", ["mxfp8", "fp8_e5m2"])
        else:
            b_min = trial.suggest_int("b_min", 2, 6)
            span = trial.suggest_int("span", 1, 6)
            bits, grad = (b_min, b_min + span), trial.suggest_int("grad_bits", 6, 10)
        return {
            "bits": bits,
            "grad_bits": grad,
            "cycles": trial.suggest_categorical("cycles", [1, 2, 4, 8, 16, 32]),
            "profile": trial.suggest_categorical("profile", list(PROFILES)),
            "shape": trial.suggest_categorical("shape", list(SHAPES)),
        }
