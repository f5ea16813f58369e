"""Loss-guarded cyclic precision: CPT whose lower bound rises when the loss shows it is too low.

CPT (:mod:`adaprec.policies.cpt`) cycles the forward bits between a fixed ``B_min`` and ``B_max``. On
language models the low end of a 3-8 bit cycle costs quality (``benchmarks/results/cpt.md``), while on
small vision tasks it is harmless, so no fixed ``B_min`` suits every model. This policy measures, while
training, how much the low end of the cycle costs, and raises the lower bound until it is affordable:

* **Schedule.** The forward bits (weights and activations) follow a *triangular* cycle (up from the
  lower bound ``L`` to ``B_max`` on the ``profile``'s ramp, then back down mirrored), ``cycles`` times
  over the run (``P = total_steps // cycles`` iterations per cycle, like CPT). Evaluation runs at
  ``B_max``.
* **Backward widths per layer.** The error products are two of a layer's three products, so the
  backward width carries most of the cost, but how few bits a layer's error tolerates depends on how
  spread out it is: a min-max grid is as coarse as the error's largest entries make it. Every layer's
  error crest factor ``(max - min) / rms`` is measured while training
  (:class:`~adaprec.observers.ErrorRange`) and the layer gets the fewest bits in ``grad_bits`` that keep
  the stochastic-rounding noise below ``grad_noise`` of the error's mean square
  (:func:`~adaprec.observers.error_range.bits_for_noise`). Measured: the LSTM's errors (crest about 15)
  need 6 bits, the GPT's ``qkv`` and MLP up projections (40-130) 8 and the digits CNN's convolutions
  (35-110) 7-8; static 6-bit errors cost the GPT character model 0.06 bits per character, 7-bit ones
  did not, while the digits CNN lost nothing at 6 bits. The default range, 6-7 bits, follows: 8-bit
  errors for the GPT's spiky layers bought no measurable quality in a screening run (+0.047 bits per
  character against +0.020 with 7 bits for all), and cost the digits CNN its savings.
* **Measurement.** Every observed training loss (``ctl.observe(loss=...)``, once per iteration) is
  filed under the forward width it was computed at. Within one triangular cycle the steps at ``L`` sit
  at both ends and those at ``B_max`` in the middle, so their mean losses are compared at the same mean
  time: a steady downward trend cancels and the difference is the price of the low width on the
  current model. The sums live on the loss's device and are read once per cycle (one host sync per
  cycle, not per step).
* **Rule.** At the end of each cycle, with ``excess = (mean(L) - mean(B_max)) / mean(B_max)`` and its
  standard error ``se`` from the two samples: if ``excess > tolerance`` and ``excess > z * se`` the
  lower bound rises by one bit for the rest of the run (it never falls, so one noisy cycle costs
  savings, never quality). A second trigger guards against a degrading trend: if the cycle's mean loss
  is higher than the previous cycle's by more than ``tolerance`` and ``z`` standard errors, training
  is going backwards and the lower bound rises as well.

The defaults (``bits=(4, 8)``, ``grad_bits=(6, 7)``, ``grad_noise=0.03``, ``cycles=8``,
``tolerance=0.01``, ``z=2``) were
chosen on the three tasks of ``benchmarks/lm_policy.py`` (digits CNN, character LSTM, GPT character
model); the results and the cases where the goal is missed are in ``benchmarks/results/lm_policy.md``.

Example:
    >>> import torch, adaprec
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> policy = GuardedCPT(bits=(3, 8), grad_bits=6, cycles=3)
    >>> with adaprec.Controller(model, policy=policy, total_steps=60, classifier_floor=False) as ctl:
    ...     for t in range(60):  # a loss 10% higher at the lower bound than elsewhere
    ...         _ = model(torch.randn(2, 4)); ctl.step()
    ...         ctl.observe(loss=torch.tensor(1.1 if policy.bits_at(t) == policy.lower else 1.0))
    >>> [(c["cycle"], c["lower"], round(c["excess"], 2), c["raised"]) for c in policy.trace]
    [(0, 3, 0.1, False), (1, 3, 0.1, True), (2, 4, 0.1, True)]
    >>> policy.lower, sorted({h.layers["0"].weight.bits for h in ctl.history if 40 <= h.step < 60})
    (5, [4, 5, 6, 7, 8])
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..decision import Decision
from ..events import Event
from ..formats import Precision
from .base import Policy
from .cpt import PROFILES, _check_choice, _check_pair, cycle_bits

if TYPE_CHECKING:  # pragma: no cover
    from ..controller import Controller

__all__ = ["GuardedCPT"]

_MAX_BITS = 32


def _check_number(name: str, v: Any, lo: float, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < lo \
            or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be a finite number {rng}, got {v!r}")
    return float(v)


class GuardedCPT(Policy):
    """Cyclic precision whose lower bound rises while the loss says it is too low (module docstring).

    Args:
        bits: ``(L0, B_max)``: the starting lower bound and the upper bound of the forward cycle
            (``1 <= L0 <= B_max <= 32``); evaluation runs at ``B_max``.
        grad_bits: backward (error) bits: an int (the same constant width for every layer) or a
            ``(G_min, G_max)`` pair: every layer starts at ``G_max``; after a few error probes and then
            at every cycle's end each layer gets the fewest bits in that range that keep the noise of
            stochastic rounding below ``grad_noise`` of its error's mean square, from the error's
            measured crest factor (:class:`~adaprec.observers.ErrorRange`, :func:`bits_for_noise`).
        grad_noise: the tolerated noise-to-signal ratio of the quantized errors (> 0).
        probe_every: measure the errors' spread every this many iterations.
        cycles: triangular cycles over ``total_steps``.
        profile: the ramp, ``"cos"`` (CPT's), ``"linear"``, ``"exp"`` or ``"rex"``.
        tolerance: relative loss excess of the low end (and relative rise of the loss from one cycle
            to the next) above which the lower bound rises; ``>= 0``.
        z: how many standard errors the excess must also exceed (``0``: no significance test).
        min_samples: fewest losses per compared group for a decision (fewer: no decision that cycle).
        skip_cycles: the first cycles, which are measured but not judged: at the start of training the
            loss falls steeply and its curve is convex, so the ends of a triangular cycle (the low
            widths) sit above its middle for reasons that have nothing to do with precision (measured:
            a 15-26% "excess" in the first of 8 cycles on both language models, 0-5% afterwards).

    After a run, ``lower`` is the final lower bound and ``trace`` has one entry per cycle (the two
    means, excess, its standard error, the cycle-to-cycle change, whether the bound rose, and why).
    """

    name = "guarded_cpt"
    needs_total_steps = True

    def __init__(self, bits: Any = (4, 8), grad_bits: Any = (6, 7), cycles: int = 8, profile: str = "cos",
                 tolerance: float = 0.01, z: float = 2.0, min_samples: int = 3, skip_cycles: int = 1,
                 grad_noise: float = 0.03, probe_every: int = 10) -> None:
        self.bits = _check_pair("bits", bits)
        self.grad_bits = _check_pair("grad_bits", grad_bits)
        self.grad_noise = _check_number("grad_noise", grad_noise, 0.0)
        if self.grad_noise == 0.0:
            raise ValueError("grad_noise must be > 0 (the tolerated noise-to-signal ratio of the errors)")
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"probe_every must be an int >= 1, got {probe_every!r}")
        self.probe_every = probe_every
        if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
            raise ValueError(f"cycles must be an int >= 1, got {cycles!r}")
        self.cycles = cycles
        self.profile = _check_choice("profile", profile, PROFILES)
        self.tolerance = _check_number("tolerance", tolerance, 0.0)
        self.z = _check_number("z", z, 0.0)
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 2:
            raise ValueError(f"min_samples must be an int >= 2 (a variance needs two), got {min_samples!r}")
        self.min_samples = min_samples
        if isinstance(skip_cycles, bool) or not isinstance(skip_cycles, int) or skip_cycles < 0:
            raise ValueError(f"skip_cycles must be an int >= 0, got {skip_cycles!r}")
        self.skip_cycles = skip_cycles
        self.ctl = None
        self._handles: list[Any] = []
        self._decisions: dict[tuple[int, tuple[int, ...]], Decision] = {}
        self.errors: Any = None
        self._reset()

    # --- state ----------------------------------------------------------------------------------
    def _reset(self) -> None:
        self.lower = self.bits[0]
        self.trace: list[dict[str, Any]] = []
        self.period: int | None = None
        self._cycle = 0  # the cycle whose losses are being collected
        self._lower_of_cycle = self.lower
        self._last_recorded = -1
        self._prev_mean: tuple[float, float, int] | None = None  # (mean, var, n) of the previous cycle
        self._warned = False
        self._sums: torch.Tensor | None = None  # per width: [sum, sum of squares]
        self._counts = [0] * (_MAX_BITS + 1)
        self.layer_grad_bits: dict[str, int] = {}  # empty: every layer at grad_bits[1]
        self._names: list[str] = []

    def attach(self, ctl: Controller) -> None:
        total = getattr(ctl, "total_steps", None)
        if total is None:
            raise ValueError("GuardedCPT needs total_steps (the planned number of iterations, e.g. "
                             "len(loader) * epochs) to lay out its cycles; pass total_steps= to the "
                             "Controller")
        if self.cycles > total:
            raise ValueError(f"cycles ({self.cycles}) must not exceed total_steps ({total}): each cycle "
                             "needs at least one iteration; lower cycles or train longer")
        self._reset()
        self.period = total // self.cycles
        self._names = list(ctl.layer_names)
        super().attach(ctl)
        self._handles = [ctl.on(Event.METRICS_OBSERVED, self._on_metrics)]
        if self.grad_bits[0] < self.grad_bits[1]:
            from ..observers.error_range import ErrorRange

            self.errors = ErrorRange(every=self.probe_every).attach(ctl, name="guarded_cpt.errors")
            self._handles.append(ctl.on(Event.ITERATION_COMPLETED, self._on_iteration))
        ctl.add_report_section("guarded_cpt", self._report)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.errors is not None:
            self.errors.detach()
            self.errors = None
        super().detach()

    # --- the schedule ---------------------------------------------------------------------------
    def bits_at(self, t: int, lower: int | None = None) -> int:
        """Forward bits of iteration ``t`` with lower bound ``lower`` (default: the current one)."""
        if self.period is None:
            raise RuntimeError("GuardedCPT.bits_at needs the run's total_steps: use it inside a Controller")
        lo = self.lower if lower is None else lower
        return cycle_bits(self.period, lo, self.bits[1], self.profile, "triangular")[t % self.period]

    def _decision(self, b: int) -> Decision:
        hi = self.grad_bits[1]
        gs = tuple(self.layer_grad_bits.get(n, hi) for n in self._names)
        d = self._decisions.get((b, gs))
        if d is None:
            common = max(set(gs), key=gs.count) if gs else hi
            over = tuple((n, Precision.cpt(b, g)) for n, g in zip(self._names, gs) if g != common)
            d = self._decisions[(b, gs)] = Decision(Precision.cpt(b, common), over)
        return d

    def _on_iteration(self, ctl: Controller, step: int, **_: Any) -> None:
        # The first backward widths as soon as a few error probes are in (one host sync), then once per
        # cycle with the forward bound (_close_cycle). Runs before the next iteration is decided.
        if not self.layer_grad_bits and self.errors is not None and self.errors.probes >= 3:
            self._update_grad_bits()

    def _update_grad_bits(self) -> None:
        from ..observers.error_range import bits_for_noise

        if self.errors is None:
            return
        lo, hi = self.grad_bits
        crest = self.errors.crest
        self.layer_grad_bits = {n: min(hi, max(lo, bits_for_noise(crest[n], self.grad_noise)))
                                for n in self._names if n in crest}

    def decide(self, ctl: Controller) -> Decision:
        if self.period is None:  # used without a controller (e.g. a recipe check): the cycle's start
            return self._decision(self.lower)
        return self._decision(self.bits_at(ctl.step_count))

    def eval_decision(self, ctl: Controller) -> Decision | None:
        return self._decision(self.bits[1])

    # --- the measurement and the rule -----------------------------------------------------------
    def _on_metrics(self, ctl: Controller, stats: dict[str, Any], **_: Any) -> None:
        if "loss" not in stats or self.period is None:
            return
        # Observed after opt.step() the loss belongs to the iteration just completed, before it to the
        # running one; take the earliest not yet recorded (as CPT's range test does).
        step = ctl.step_count - 1 if ctl.step_count - 1 > self._last_recorded else ctl.step_count
        if step <= self._last_recorded:
            return  # a second loss for the same iteration: the first one counts
        self._last_recorded = step
        cycle = step // self.period
        if cycle != self._cycle:  # a loss of a new cycle without the last one of the old: close it now
            self._close_cycle(ctl)
            self._cycle = cycle
            self._lower_of_cycle = self.lower
        value = stats["loss"]
        x = value.detach().reshape(()).double() if isinstance(value, torch.Tensor) else \
            torch.tensor(float(value), dtype=torch.float64)
        if self._sums is None or self._sums.device != x.device:
            self._sums = torch.zeros(_MAX_BITS + 1, 2, dtype=torch.float64, device=x.device)
        b = self.bits_at(step, self._lower_of_cycle)
        self._sums[b, 0] += x
        self._sums[b, 1] += x * x
        self._counts[b] += 1
        if (step + 1) % self.period == 0:  # the cycle's last iteration: decide for the next cycle
            self._close_cycle(ctl)
            self._cycle = cycle + 1
            self._lower_of_cycle = self.lower
            if ctl.step_count > step:
                ctl.refresh()  # the next iteration was already decided with the old bounds

    def _close_cycle(self, ctl: Controller) -> bool:
        if self._sums is None or sum(self._counts) == 0:
            return False
        sums = self._sums.tolist()  # the one host sync of the cycle
        counts = list(self._counts)
        self._sums.zero_()
        self._counts = [0] * (_MAX_BITS + 1)
        lo, hi = self._lower_of_cycle, self.bits[1]
        entry: dict[str, Any] = {"cycle": self._cycle, "step": ctl.step_count, "lower": lo,
                                 "excess": math.nan, "se": math.nan, "change": math.nan, "raised": False,
                                 "reason": ""}
        lo_stats = _mean_var(sums[lo], counts[lo])
        hi_stats = _mean_var(sums[hi], counts[hi])
        n_all = sum(counts)
        total = [sum(s[0] for s in sums), sum(s[1] for s in sums)]
        all_stats = _mean_var(total, n_all)
        reasons = []
        if lo < hi and counts[lo] >= self.min_samples and counts[hi] >= self.min_samples \
                and abs(hi_stats[0]) > 0:
            ref = abs(hi_stats[0])
            excess = (lo_stats[0] - hi_stats[0]) / ref
            se = math.sqrt(lo_stats[1] / counts[lo] + hi_stats[1] / counts[hi]) / ref
            entry.update(low_mean=lo_stats[0], high_mean=hi_stats[0], excess=excess, se=se)
            if excess > self.tolerance and excess > self.z * se:
                reasons.append("excess")
        if self._prev_mean is not None and n_all >= self.min_samples and abs(self._prev_mean[0]) > 0:
            pm, pv, pn = self._prev_mean
            ref = abs(pm)
            change = (all_stats[0] - pm) / ref
            se = math.sqrt(all_stats[1] / n_all + pv / pn) / ref
            entry["change"] = change
            if change > self.tolerance and change > self.z * se:
                reasons.append("trend")
        if n_all >= self.min_samples:
            self._prev_mean = (all_stats[0], all_stats[1], n_all)
        if self._cycle < self.skip_cycles:
            reasons = []  # the first cycles are not judged (see skip_cycles)
        if reasons and self.lower < hi:
            self.lower += 1
            entry["raised"] = True
            entry["reason"] = "+".join(reasons)
        entry["new_lower"] = self.lower
        if self.errors is not None:
            before = dict(self.layer_grad_bits)
            self._update_grad_bits()
            entry["grad_bits"] = dict(self.layer_grad_bits)
            if self.layer_grad_bits != before:
                entry["grad_changed"] = True
        self.trace.append(entry)
        if not self._warned and n_all < self.min_samples:
            self._warned = True
            warnings.warn("GuardedCPT saw too few losses in a cycle to judge it; call ctl.observe(loss=...) "
                          "once per iteration", stacklevel=3)
        return entry["raised"]

    # --- results, logging, checkpoints ----------------------------------------------------------
    def signals(self) -> dict[str, float]:
        """Scalars for loggers: forward and backward bits now, the lower bound, the last excess."""
        ctl = getattr(self, "ctl", None)
        if ctl is None or self.period is None:
            return {}
        out = {"bits": float(self.bits_at(ctl.step_count)), "lower_bound": float(self.lower)}
        for n in self._names:
            out[f"grad_bits/{n}"] = float(self.layer_grad_bits.get(n, self.grad_bits[1]))
        if self.trace:
            out["low_excess"] = float(self.trace[-1]["excess"])
        return out

    def _report(self) -> dict[str, Any]:
        raised = [(t["cycle"], t["new_lower"]) for t in self.trace if t["raised"]]
        return {"guarded_lower": self.lower, "guarded_raises": raised,
                "guarded_grad_bits": {n: self.layer_grad_bits.get(n, self.grad_bits[1]) for n in self._names}}

    def state_dict(self) -> dict[str, Any]:
        return {"lower": self.lower, "period": self.period, "cycle": self._cycle,
                "lower_of_cycle": self._lower_of_cycle, "last_recorded": self._last_recorded,
                "prev_mean": None if self._prev_mean is None else list(self._prev_mean),
                "sums": None if self._sums is None else self._sums.tolist(),
                "counts": list(self._counts), "warned": self._warned,
                "layer_grad_bits": dict(self.layer_grad_bits), "trace": [dict(t) for t in self.trace]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"lower", "period", "cycle", "lower_of_cycle", "last_recorded", "prev_mean", "sums", "counts",
                "warned", "layer_grad_bits", "trace"}
        if not isinstance(state, dict) or keys - set(state):
            raise ValueError(f"not a GuardedCPT state (missing {sorted(keys - set(state or {}))})")
        lower = int(state["lower"])
        if not self.bits[0] <= lower <= self.bits[1]:
            raise ValueError(f"GuardedCPT state has lower bound {lower}, outside this policy's bits "
                             f"{self.bits}")
        if self.period is not None and state["period"] is not None and int(state["period"]) != self.period:
            raise ValueError(f"GuardedCPT state has cycles of {state['period']} iterations, this run's are "
                             f"{self.period} (total_steps // cycles): resume with the same total_steps and "
                             "cycles")
        self.lower = lower
        self._cycle = int(state["cycle"])
        self._lower_of_cycle = int(state["lower_of_cycle"])
        self._last_recorded = int(state["last_recorded"])
        pm = state["prev_mean"]
        self._prev_mean = None if pm is None else (float(pm[0]), float(pm[1]), int(pm[2]))
        self._sums = None if state["sums"] is None else torch.tensor(state["sums"], dtype=torch.float64)
        self._counts = [int(c) for c in state["counts"]]
        self._warned = bool(state["warned"])
        self.layer_grad_bits = {str(k): int(v) for k, v in state["layer_grad_bits"].items()}
        self.trace = [dict(t) for t in state["trace"]]

    # --- recipes and tuning ---------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        glo, ghi = self.grad_bits
        return {"bits": list(self.bits), "grad_bits": glo if glo == ghi else [glo, ghi],
                "cycles": self.cycles, "profile": self.profile, "tolerance": self.tolerance, "z": self.z,
                "min_samples": self.min_samples, "skip_cycles": self.skip_cycles,
                "grad_noise": self.grad_noise, "probe_every": self.probe_every}

    @classmethod
    def paper_trial_params(cls) -> dict[str, Any]:
        """Trial parameters of the default configuration (enqueued first in every study)."""
        return {"lower": 4, "b_max": 8, "grad_min": 6, "grad_max": 7, "cycles": 8, "profile": "cos",
                "tolerance": 0.01, "z": 2.0, "grad_noise": 0.03}

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        """Starting lower bound 2..6, B_max 6..8, backward range 4..8 to 6..8, cycles {4, 8, 16, 32},
        every profile, tolerance 0.002..0.05 (log), z in {0, 1, 2, 3}, error noise 0.005..0.2 (log)."""
        lo = trial.suggest_int("lower", 2, 6)
        hi = trial.suggest_int("b_max", 6, 8)
        g_lo = trial.suggest_int("grad_min", 4, 8)
        g_hi = trial.suggest_int("grad_max", 6, 8)
        return {
            "bits": (min(lo, hi), hi),
            "grad_bits": (min(g_lo, g_hi), g_hi),
            "grad_noise": trial.suggest_float("grad_noise", 0.005, 0.2, log=True),
            "cycles": trial.suggest_categorical("cycles", [4, 8, 16, 32]),
            "profile": trial.suggest_categorical("profile", list(PROFILES)),
            "tolerance": trial.suggest_float("tolerance", 0.002, 0.05, log=True),
            "z": trial.suggest_categorical("z", [0.0, 1.0, 2.0, 3.0]),
        }


def _mean_var(s: list[float], n: int) -> tuple[float, float]:
    """Mean and unbiased variance from ``[sum, sum of squares]`` of ``n`` values."""
    if n == 0:
        return math.nan, math.nan
    mean = s[0] / n
    var = max(0.0, (s[1] - n * mean * mean) / (n - 1)) if n > 1 else 0.0
    return mean, var
