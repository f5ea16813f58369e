"""The Controller: wraps an unchanged training loop, turns it into events, applies policy decisions.

Example:
    >>> import torch, adaprec
    >>> import torch.nn.functional as F
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> data = [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(5)]
    >>> with adaprec.Controller(model, policy="fixed", optimizer=opt) as ctl:
    ...     for epoch in range(2):
    ...         for x, y in ctl.epoch(data):
    ...             loss = F.cross_entropy(model(x), y)
    ...             opt.zero_grad(); loss.backward(); opt.step()
    >>> ctl.step_count, ctl.epoch_index, round(ctl.report()["savings_vs_fp32"], 4)
    (10, 2, 0.9375)
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cost import CostMeter
from .decision import Decision
from .events import Event, EventBus, Handle
from .formats import Precision
from .formats.rounding import RoundingRNG, register_rng, unregister_rng
from .guard import DivergenceGuard
from .policies import Policy, make_policy
from .quant import find_layers, make_backend

__all__ = ["Controller", "HistoryEntry", "Report", "unwrap_optimizer"]

#: The version of ``Controller.state_dict()``; :meth:`Controller.load_state_dict` reads this one.
STATE_VERSION = 1
_STATE_KEYS = ("layer_names", "step", "epoch", "policy", "cost", "backend", "history", "steps_at",
               "components", "rng")

# Models a controller is active on; weak so a forgotten model can still be collected.
_ACTIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()

Constraint = Callable[[dict[str, Precision], "Controller"], dict[str, Precision]]


@dataclass(frozen=True)
class HistoryEntry:
    """A precision change: from ``step`` (0-based iteration) on, ``layers`` are in force."""

    step: int
    epoch: int
    layers: dict[str, Precision]
    eval_layers: dict[str, Precision] | None = None

    def summary(self) -> str:
        vals = list(dict.fromkeys(p.short() for p in self.layers.values()))
        return vals[0] if len(vals) == 1 else "mixed(" + ", ".join(vals) + ")"


def _allow_in_checkpoints() -> None:
    # ctl.state_dict() holds these frozen dataclasses (history, guard floors); allow-listing them lets
    # torch.load's default weights_only=True read a checkpoint that contains it.
    # (Every registered format class is allow-listed by adaprec.formats.register_format.)
    torch.serialization.add_safe_globals([HistoryEntry, Precision])


_allow_in_checkpoints()


class Report(dict):
    """``ctl.report()``: a dict of figures that prints as a small table.

    One convention: every share, saving and ratio is a **fraction of 1** (``savings_vs_fp32 = 0.96``
    means 96 % fewer BitOPs than FP32); nothing is stored as a percentage. The printed table adds the
    percentage next to the fractions of :attr:`FRACTIONS`. Speed-ups are factors (2.0 = twice as fast).

    The keys, by the part of adaprec that adds them (sections appear only when that part is in use):

    ==========================  =========================================================================
    key                         meaning
    ==========================  =========================================================================
    ``policy``                  the policy's repr, with its settings
    ``steps``, ``epochs``       iterations counted (optimizer steps or ``ctl.step()``) and epochs
                                completed (``ctl.epoch()``)
    ``layers``                  number of quantized layers
    ``gbitops``                 training cost so far in 10^9 bit-operations: the products that ran, each
                                at its operands' widths (docs/methods.md#bitops)
    ``gbitops_fp32``            the same products at FP32 (32x32 bits each)
    ``reference``               the static reference (default ``int8/int8``: CPT's static 8/8 baseline)
    ``gbitops_reference``       the same MACs in a static run at ``reference`` *with the same
                                constraints* (the classifier floor included): a run the user can do
    ``savings_vs_fp32``         ``1 - gbitops / gbitops_fp32`` (fraction)
    ``savings_vs_reference``    ``1 - gbitops / gbitops_reference`` (fraction; negative = dearer)
    ``gbitops_reference_ideal``  the formula's idealised reference: every layer at ``reference``,
                                constraints ignored
    ``savings_vs_reference_ideal``  ``1 - gbitops / gbitops_reference_ideal`` (fraction)
    ``gmacs``                   10^9 multiply-accumulates of the quantized layers' forward products
    ``per_layer_gbitops``       ``{layer: gbitops}``
    ``time_at_precision``       ``{precision: fraction of the iterations}``; a precision is
                                ``weight/gradient`` of all layers (``int3/int8``) or, when the layers
                                differ (e.g. the classifier floor holds the last one higher),
                                ``mixed(a, b, ...)`` listing the distinct precisions: ``ctl.history``
                                says which layer had which
    ``precision_changes``       entries in ``ctl.history`` (one per change, never per step)
    ``observed``                ``{name: value}``: the last value of every scalar given to
                                ``ctl.observe()`` (``loss``, ``val_acc``, ...) or published by an
                                observer into ``ctl.stats``
    ``bytes_per_param``         (with ``optimizer=``) measured bytes per parameter of the storages
                                holding the parameters, the Kahan compensation and the optimizer
                                state, each storage counted once (``adaprec.optim.optimizer_memory``);
                                with weight storage held compactly, after the block: as at its end
    ``memory_per_param``        those three parts, ``{"weight", "compensation", "optimizer_state"}``
    ``gradient_bytes_per_param``  bytes per parameter of the gradients held when measured (not in
                                ``bytes_per_param``: they exist between backward and zero_grad)
    ``memory_vs_fp32``          ``bytes_per_param`` over the same parameters and optimizer state in
                                float32 (fraction; 1.0 = the same)
    ``weight_storage``          how the weights are stored (``fp32 master``, or the formats)
    ``cpt_bounds``, ``prt_steps``  (CPT) ``"B_min-B_max"`` or ``"searching"``; range-test iterations
    ``modelled_speedup_vs_fp32``   (MuPPET, or ``adaprec.timemodel``) ``{gpu: factor}``
    ``modelled_seconds``, ``modelled_seconds_fp32``  ``{gpu: seconds}`` of the modelled products
    ==========================  =========================================================================

    Example:
        >>> print(Report({"policy": "fp32", "gbitops": 1.5, "savings_vs_fp32": 0.75}))
        policy           fp32
        gbitops          1.5
        savings_vs_fp32  0.75 (75.0 %)
    """

    #: Keys whose values (or dict values) are fractions of 1; the table shows them as percentages too.
    FRACTIONS = frozenset({"savings_vs_fp32", "savings_vs_reference", "savings_vs_reference_ideal",
                           "time_at_precision"})

    def __str__(self) -> str:
        rows = []
        for k, v in self.items():
            pct = k in self.FRACTIONS
            if isinstance(v, dict):
                if not v:
                    continue
                v = ", ".join(f"{a}: {_fmt(b, pct)}" for a, b in v.items())
            rows.append((k, _fmt(v, pct)))
        w = max((len(k) for k, _ in rows), default=0)
        return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _fmt(v: Any, pct: bool = False) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" + (f" ({100 * v:.1f} %)" if pct else "")
    return str(v)


class Controller:
    """Adaptive-precision training around a user's own loop.

    Args:
        model: the ``nn.Module`` to train (not yet ``torch.compile``-d; compile after entering).
        policy: a registered name (``"fp32"``, ``"fixed"``, …, see ``adaprec.policies.list_policies()``),
            a :class:`~adaprec.policies.Policy` object, or a ``.toml`` recipe path.
        optimizer: optional; when given, its ``step()`` drives the iteration events. Without it call
            :meth:`step` once per iteration. Wrapped optimizers (Lightning's ``LightningOptimizer``,
            Accelerate's ``AcceleratedOptimizer``) are unwrapped to the torch optimizer they hold.
        total_steps: the planned number of iterations (schedules such as CPT need it).
        layers: which quantizable layers to quantize: ``None`` (all), fnmatch patterns (``"!fc"``
            excludes), or a callable ``(name, module) -> bool``.
        filter_fn: instead of ``layers=``, a callable in torchao's argument order, ``(module, fqn) ->
            bool``.
        constraints: callables that post-process each per-layer decision (see
            :mod:`adaprec.constraints`).
        backend: ``"simulated"`` or a backend object.
        reference: the static precision savings are reported against (default CPT's 8/8): a
            :class:`~adaprec.formats.Precision` or a format spec for all three roles (``"int8"``, ``8``,
            ``"fx8"``, ``"bf16"``…). The report compares with a static run at it under the same
            constraints (``savings_vs_reference``) and with the idealised formula
            (``savings_vs_reference_ideal``).
        scaler: the ``torch.amp.GradScaler`` whose ``scaler.step(optimizer)`` the loop calls. An
            iteration whose update the scaler skips (inf/NaN from a too-large loss scale) still counts
            as an iteration, as an LR scheduler stepped once per iteration counts it; without
            ``scaler=`` the controller never hears of skipped iterations and schedules drift.
        logdir: write TensorBoard logs there (see :mod:`adaprec.tensorboard`).
        guard: the divergence guard (:mod:`adaprec.guard`): ``True`` (default settings), a
            :class:`~adaprec.guard.DivergenceGuard`, or ``False``. It needs ``optimizer=``.
        sync_stats: under ``torch.distributed``, average the values given to :meth:`observe` over
            all ranks so that every rank's policy sees the same statistics and decides the same.
        classifier_floor: keep the classifier at ``ceil(log2 C) + 1 + 2`` bits
            (:class:`~adaprec.constraints.ClassifierFloor`, applied before ``constraints``): ``True``
            (default: auto-detected layer), ``False``, or a configured ``ClassifierFloor``.
        weight_storage: store the weights in the decided weight formats, no FP32 master, held in
            their storage types inside the block (:mod:`adaprec.storage_mode`; needs an
            ``adaprec.optim`` optimizer): ``False`` (default), ``True`` or a configured ``StorageMode``.

    Leaving the ``with`` block — normally or by an exception — restores the model exactly. The block
    is sugar over :meth:`start` and :meth:`close`, and :meth:`epoch` over :meth:`begin_epoch` and
    :meth:`end_epoch`, for trainers whose callbacks drive the run.

    Example:
        >>> import torch, adaprec
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2))
        >>> with adaprec.Controller(model, policy=adaprec.policies.Fixed(bits=4, grad_bits=8)) as ctl:
        ...     model(torch.randn(2, 1, 8, 8)).sum().backward(); ctl.step()
        >>> ctl.layer_names, ctl.history[0].summary()
        (['0', '2'], 'int4/int8')
    """

    def __init__(
        self,
        model: nn.Module,
        policy: Any = "fp32",
        *,
        optimizer: torch.optim.Optimizer | None = None,
        total_steps: int | None = None,
        layers: Any = None,
        filter_fn: Callable[[nn.Module, str], bool] | None = None,
        constraints: Iterable[Constraint] = (),
        backend: Any = "simulated",
        reference: Precision | str | int | None = None,
        logdir: str | None = None,
        guard: bool | DivergenceGuard = True,
        sync_stats: bool = True,
        classifier_floor: Any = True,
        weight_storage: Any = False,
        scaler: Any = None,
    ) -> None:
        # Validate everything before touching the model (contract 5: nothing left half-changed).
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if _is_compiled(model):
            raise ValueError("the model is already torch.compile-d; enter the Controller with the plain "
                             "model and compile inside the with block (torch.compile(model))")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}")
        reference = _read_reference(reference)
        self.policy: Policy = make_policy(policy)
        if getattr(self.policy, "needs_total_steps", False) and total_steps is None:
            raise ValueError(f"policy {self.policy.name!r} needs total_steps= (the planned number of "
                             "iterations, e.g. len(loader) * epochs)")
        self._layers = find_layers(model, layers, filter_fn=filter_fn)
        if not self._layers:
            types = ", ".join(sorted({t.__name__ for t in _quantizable_types()}))
            chosen = " matching layers=" if layers is not None else \
                " matching filter_fn=" if filter_fn is not None else ""
            raise ValueError(f"the model has no quantizable layers{chosen}; adaprec quantizes {types} "
                             "(adaprec.register_layer adds types)")
        if optimizer is not None:
            optimizer = unwrap_optimizer(optimizer)
            mine = {id(p) for p in model.parameters()}
            theirs = [p for g in optimizer.param_groups for p in g["params"]]
            if theirs and not any(id(p) in mine for p in theirs):
                raise ValueError("none of the optimizer's parameters belong to the model; build the "
                                 "optimizer from model.parameters()")
        if scaler is not None:
            if optimizer is None:
                raise ValueError("scaler= needs optimizer=: the controller counts the scaler's steps of "
                                 "that optimizer")
            if not (callable(getattr(scaler, "step", None)) and callable(getattr(scaler, "update", None))):
                raise TypeError(f"scaler must be a torch.amp.GradScaler (with step() and update()), got "
                                f"{type(scaler).__name__}")
        if logdir is not None and not isinstance(logdir, str | os.PathLike):
            raise TypeError(f"logdir must be a path (str or os.PathLike) or None, got "
                            f"{type(logdir).__name__}")
        if not isinstance(sync_stats, bool):
            raise TypeError(f"sync_stats must be True or False, got {sync_stats!r}")
        if constraints is None:
            constraints = ()
        elif callable(constraints):  # a single constraint is a common slip for a list of one
            constraints = (constraints,)
        elif isinstance(constraints, str | bytes) or not isinstance(constraints, Iterable):
            raise TypeError("constraints must be a list of callables (layers, ctl) -> layers, e.g. "
                            f"[adaprec.constraints.Floor('first', 8)], got {constraints!r}")
        self.constraints: list[Constraint] = list(constraints)
        for c in self.constraints:
            if not callable(c):
                raise TypeError(f"constraints must be callables (layers, ctl) -> layers, got {c!r}")
        from .constraints import make_classifier_floor
        from .storage_mode import make_storage_mode, memory_section

        self.classifier_floor = make_classifier_floor(classifier_floor)
        if self.classifier_floor is not None:  # first, so that the user's own constraints have the last word
            self.constraints.insert(0, self.classifier_floor)
        self.weight_storage = make_storage_mode(weight_storage)
        if guard is True:
            guard = DivergenceGuard()
        if guard is not False and not isinstance(guard, DivergenceGuard):
            raise TypeError(f"guard must be True, False or a DivergenceGuard, got {guard!r}")
        self.guard: DivergenceGuard | None = guard if (guard and optimizer is not None) else None
        if self.guard is not None:
            self.constraints.append(self.guard)
        self.sync_stats = sync_stats
        self.backend = make_backend(backend)
        self.layer_names = [n for n, _ in self._layers]
        for c in self.constraints:  # names in constraints must be layers of this run (none ignored)
            check = getattr(c, "validate", None)
            if callable(check):
                check(self.layer_names)
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.total_steps = total_steps
        self.reference = reference
        self.logdir = logdir

        self.bus = EventBus()
        self._step = 0
        self._epoch = 0
        self.stats: dict[str, Any] = {}
        self.history: list[HistoryEntry] = []
        self.components: dict[str, Any] = {}  # named stateful helpers (observers, loggers…)
        self._report_sections: dict[str, Callable[[], dict[str, Any]]] = {}
        self._steps_at: dict[str, int] = {}
        self._key = "fp32"  # summary of the precisions in force, kept with the history (not per step)
        self._decision: Decision | None = None
        self._current: dict[str, Precision] | None = None
        self._eval: dict[str, Precision] | None = None
        self._hooks: list[Any] = []
        self._active = False
        self._exited = False
        self._pending_state: dict[str, Any] | None = None  # load_state_dict() before start()
        # The epoch in progress: open?, its iterations, and (ctl.epoch) its owner and batches.
        self._epoch_open = False
        self._epoch_iters = 0  # iterations completed since begin_epoch()
        self._epoch_owner: object | None = None
        self._epoch_batches = 0
        self._epoch_last_done = False  # ctl.epoch(): the last batch's iteration has completed
        self._deferred: BaseException | None = None  # an epoch end's error from a dropped loop
        self._in_scaler_step = False
        self.cost: CostMeter | None = None
        # Stochastic rounding draws from generators of the controller's own, seeded from the user's seed
        # without drawing from torch's stream (a DataLoader shuffles the same with and without adaprec).
        self.rounding_rng = RoundingRNG(torch.initial_seed() + 7919 * _rank())
        self._rng_key = 0
        if optimizer is not None:
            self.add_report_section("memory", memory_section(self))
        if self.weight_storage is not None:
            self.weight_storage.attach(self)

    # --- events ---------------------------------------------------------------------------------
    def on(self, event: Hashable, handler: Callable[..., Any], *, every: int = 1,
           once: int | None = None) -> Handle:
        """Subscribe ``handler(ctl, **data)`` to ``event`` (an :class:`Event` or a custom key)."""
        return self.bus.on(event, handler, every=every, once=once)

    def fire(self, event: Hashable, **data: Any) -> None:
        self.bus.fire(event, self, **data)

    # --- counters ---------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Iterations completed so far (the index of the one in progress). Settable, e.g. from a
        trainer's ``global_step`` when a callback drives the controller; inside a run the current
        iteration's precisions are then decided again for the new count."""
        return self._step

    @step_count.setter
    def step_count(self, value: int) -> None:
        self._step = _count("step_count", value)
        if self._active:
            self._apply(self.policy.decide(self))

    @property
    def epoch_index(self) -> int:
        """Epochs completed so far (the index of the one in progress). Settable like ``step_count``
        (e.g. from a trainer's ``current_epoch``)."""
        return self._epoch

    @epoch_index.setter
    def epoch_index(self, value: int) -> None:
        self._epoch = _count("epoch_index", value)

    # --- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Controller:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)

    def start(self, *, step: int | None = None, epoch: int | None = None) -> Controller:
        """Attach to the model and take the first decision (what entering the ``with`` block does).

        ``step``/``epoch`` set the counters first (a trainer resuming at its ``global_step``). A state
        given to :meth:`load_state_dict` before starting is applied here. Pair with :meth:`close`.
        """
        if self._active or self._exited:
            raise RuntimeError("a Controller can be entered once (or started once); create a new one for "
                               "another run")
        if self.model in _ACTIVE:
            raise RuntimeError("another adaprec.Controller is already active on this model; leave it "
                               "first")
        if step is not None:
            self._step = _count("step", step)
        if epoch is not None:
            self._epoch = _count("epoch", epoch)
        try:
            self.layer_names = self.backend.attach(self.model, self._layers)
            self._rng_key = register_rng(self.rounding_rng)
            # Optional parts of the backend protocol (attach/apply/detach are required).
            if hasattr(self.backend, "set_rng"):
                self.backend.set_rng(self._rng_key)
            bind = getattr(self.backend, "bind", None)  # a backend's own report (hardware: route times)
            if bind is not None:
                bind(self)
            ref = self.reference or Precision.cpt(8, 8)
            ref_layers = self._constrain(Decision.uniform(ref).resolve(self.layer_names), static=True)
            self.cost = CostMeter(self.layer_names, self.backend.macs, ref, scale=_world_size(),
                                  reference_layers=ref_layers)
            self.on(Event.ITERATION_COMPLETED, _fold_cost)
            if self.optimizer is not None:
                self._hooks.append(self.optimizer.register_step_pre_hook(self._pre_step))
                self._hooks.append(self.optimizer.register_step_post_hook(self._post_step))
                if self.guard is not None:
                    self._patch_step()
                    self.components["guard"] = self.guard
                if self.scaler is not None:
                    self._patch_scaler()
            _ACTIVE.add(self.model)
            self._active = True
            self.policy.attach(self)
            if self.logdir is not None:
                self._attach_logger()
            self.fire(Event.FIT_STARTED)
            self._start_iteration()
            if self._pending_state is not None:
                state, self._pending_state = self._pending_state, None
                self.load_state_dict(state)
        except BaseException:
            self._teardown()
            raise
        return self

    def close(self, exc: BaseException | None = None) -> None:
        """Detach and restore the model exactly (what leaving the ``with`` block does).

        ``exc``: the exception the run stopped with, if any (fires ``EXCEPTION_RAISED`` instead of
        ``FIT_COMPLETED``). An epoch still open is ended first on a normal close. Closing twice, or a
        controller that never started, does nothing.
        """
        if not self._active:
            return
        # The controller decides for the next iteration as soon as one completes; after the last one
        # that decision never ran, so it is not part of the run's history.
        if len(self.history) > 1 and self.history[-1].step == self.step_count:
            self.history.pop()
        if exc is None:
            self._warn_if_no_iterations()
        try:
            if exc is None:
                self._raise_deferred()
                if self._epoch_open:
                    self._finish_epoch(self._epoch_batches or self._epoch_iters)
                self.fire(Event.FIT_COMPLETED)
            else:
                self._deferred = None  # the run's own exception is what matters
                self._epoch_open = False
                self.fire(Event.EXCEPTION_RAISED, exception=exc)
        finally:
            self._teardown()

    def _warn_if_no_iterations(self) -> None:
        # Training forwards ran (the backend counts MACs only in training mode) but nothing ever closed
        # an iteration: the report would say 0 steps and 0 GBitOPs, and schedules never moved.
        if self.step_count == 0 and self.cost is not None and bool(self.cost.macs.sum() > 0):
            how = ("its step() was never called" if self.optimizer is not None else
                   "no optimizer= was given and ctl.step() was never called")
            warnings.warn(f"adaprec.Controller: training forward passes ran but no iteration was counted "
                          f"({how}), so ctl.report() shows 0 steps and no cost and the policy never "
                          "advanced; pass optimizer= to the Controller or call ctl.step() once per "
                          "iteration", stacklevel=3)

    def _patch_step(self) -> None:
        # Optimizer hooks cannot cancel a step, so the guard wraps this optimizer's step method
        # (an instance attribute, removed again on exit) the way GradScaler.step(opt) would.
        opt, orig = self.optimizer, self.optimizer.step
        had = "step" in opt.__dict__

        def guarded_step(_opt: Any, *args: Any, **kwargs: Any) -> Any:
            if self._current is None or not self.guard.watching(self._current):
                return orig(*args, **kwargs)
            closure = kwargs.pop("closure", None)
            if args:
                closure, args = args[0], args[1:]
            loss = None
            if closure is not None:
                # The closure computes this step's gradients: check those, not the previous step's.
                # Run it once here; the optimizer's own first call gets its result (LBFGS calls the
                # closure again for its line search: those calls run the real closure).
                with torch.enable_grad():
                    loss = closure()
                first = [True]

                def cached() -> Any:
                    if first[0]:
                        first[0] = False
                        return loss
                    return closure()

                kwargs["closure"] = cached
            if not self.guard.step_ok(self):
                if not self._in_scaler_step:
                    self._complete_iteration()  # the iteration happened; only its update is skipped
                return loss
            return orig(*args, **kwargs)

        # Bound (an LR scheduler made inside the block wraps ``step.__func__``) and carrying the
        # scheduler's mark when ``orig`` had it, so a scheduler made before entering does not warn.
        if hasattr(orig, "_wrapped_by_lr_sched"):
            guarded_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        opt.step = guarded_step.__get__(opt)
        self._hooks.append(_RestoreAttr(opt, "step", had, orig))

    def _patch_scaler(self) -> None:
        # GradScaler.step(opt) skips opt.step() when the scaled gradients overflowed; the iteration
        # still happened. Count it here, once, whether or not the update ran.
        scaler, orig = self.scaler, self.scaler.step
        had = "step" in scaler.__dict__

        def scaled_step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            if unwrap_optimizer(optimizer) is not self.optimizer:
                return orig(optimizer, *args, **kwargs)
            self._in_scaler_step = True
            try:
                out = orig(optimizer, *args, **kwargs)
            finally:
                self._in_scaler_step = False
            self._complete_iteration()
            return out

        scaler.step = scaled_step
        self._hooks.append(_RestoreAttr(scaler, "step", had, orig))

    def _teardown(self) -> None:
        for h in reversed(self._hooks):
            h.remove()
        self._hooks.clear()
        try:
            if self._active:
                self.policy.detach()
        finally:
            if self.weight_storage is not None:  # float32 parameters back before the model is left
                self.weight_storage.release()
            self.backend.detach()
            unregister_rng(self._rng_key)
            _ACTIVE.discard(self.model)
            self._active = False
            self._exited = True

    def _attach_logger(self) -> None:
        from .tensorboard import Logger  # optional component (TensorBoard)

        Logger(self.logdir).attach(self)

    # --- the loop -------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int | None = None) -> None:
        """Start an epoch: fires ``EPOCH_STARTED``. ``epoch`` sets :attr:`epoch_index` first (a
        trainer's ``current_epoch``). An epoch still open is ended first, with a warning."""
        self._require_active("ctl.begin_epoch()")
        if self._epoch_open:
            warnings.warn(f"adaprec: epoch {self.epoch_index} was still open (a ctl.epoch() loop kept alive "
                          "after leaving it early, or begin_epoch() twice); ending it now", stacklevel=2)
            self._finish_epoch(self._epoch_batches or self._epoch_iters)
        if epoch is not None:
            self.epoch_index = epoch
        self._epoch_open = True
        self._epoch_iters = 0
        self._epoch_owner = None
        self._epoch_batches = 0
        self._epoch_last_done = False
        self.fire(Event.EPOCH_STARTED, epoch=self.epoch_index)

    def end_epoch(self, batches: int | None = None) -> None:
        """End the open epoch: fires ``EPOCH_COMPLETED`` (``batches``: default the iterations since
        :meth:`begin_epoch`) and advances :attr:`epoch_index`."""
        self._require_active("ctl.end_epoch()")
        if not self._epoch_open:
            raise RuntimeError("no epoch is open: call ctl.begin_epoch() first (ctl.epoch(loader) does both)")
        if batches is not None:
            batches = _count("batches", batches)
        self._finish_epoch(self._epoch_iters if batches is None else batches)

    def _finish_epoch(self, batches: int) -> None:
        self._epoch_open = False
        self._epoch_owner = None
        self._epoch_last_done = False
        self.fire(Event.EPOCH_COMPLETED, epoch=self.epoch_index, batches=batches)
        self._epoch += 1

    def epoch(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Iterate ``loader`` once between :meth:`begin_epoch` and :meth:`end_epoch`.

        Leaving the loop early — ``break``, ``return``, or an exception in its body — ends the epoch
        there (with the batches seen). An error raised by an ``EPOCH_COMPLETED`` handler at that moment
        is raised at the controller's next call. A checkpoint (:meth:`state_dict`) taken after the
        last batch's step of a loader with ``len()`` includes that epoch's end.
        """
        self._require_active("ctl.epoch()")
        self.begin_epoch()
        me = object()
        self._epoch_owner = me
        try:
            total: int | None = len(loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        n = 0
        try:
            for batch in loader:
                n += 1
                if self._epoch_owner is me:
                    self._epoch_batches = n
                    if n == total:
                        self._epoch_last_done = None  # type: ignore[assignment]  # armed: see _complete_iteration
                yield batch
        except GeneratorExit:
            # Left early (break/return/exception), or the generator was dropped: end the epoch now.
            if self._active and self._epoch_open and self._epoch_owner is me:
                try:
                    self._finish_epoch(n)
                except Exception as err:  # noqa: BLE001 - nowhere to raise inside GeneratorExit
                    self._deferred = err
            raise
        if not (self._active and self._epoch_open and self._epoch_owner is me):
            return  # already ended (a checkpoint after the last batch), or the controller was closed
        if n == 0:
            self._epoch_open = False
            raise ValueError(f"the loader yielded no batches in epoch {self.epoch_index}; "
                             "check the dataset and batch size (drop_last with a small dataset?)")
        self._finish_epoch(n)

    def observe(self, **stats: Any) -> None:
        """Record statistics (``loss=``, ``val_acc=``, …) for policies, observers and loggers."""
        self._require_active("ctl.observe()")
        if not stats:
            raise ValueError("ctl.observe() needs at least one keyword, e.g. ctl.observe(loss=loss)")
        if self.sync_stats and _world_size() > 1:
            stats = _average_over_ranks(stats)
        self.stats.update(stats)
        self.fire(Event.METRICS_OBSERVED, stats=stats)

    def step(self) -> None:
        """Mark the end of one iteration, for loops without an optimizer."""
        self._require_active("ctl.step()")
        if self.optimizer is not None:
            raise RuntimeError("this Controller was given optimizer=; its step() already advances the "
                               "controller, so do not call ctl.step() as well")
        self._complete_iteration()

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self.fire(Event.BEFORE_OPTIMIZER_STEP)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if not self._in_scaler_step:  # GradScaler.step() counts the iteration itself (skipped or not)
            self._complete_iteration()

    def _complete_iteration(self) -> None:
        self._steps_at[self._key] = self._steps_at.get(self._key, 0) + 1
        self.fire(Event.ITERATION_COMPLETED, step=self.step_count)
        self._step += 1
        self._epoch_iters += 1
        if self._epoch_last_done is None:  # the last batch of a ctl.epoch() loop has stepped
            self._epoch_last_done = True
        self._start_iteration()

    def _start_iteration(self) -> None:
        self.fire(Event.ITERATION_STARTED, step=self.step_count)
        self._apply(self.policy.decide(self))

    def _apply(self, decision: Decision, force: bool = False) -> None:
        if not force and (decision is self._decision or decision == self._decision):
            return
        if not isinstance(decision, Decision):
            raise TypeError(f"policy {self.policy.name!r} returned {type(decision).__name__}, "
                            "expected an adaprec.Decision")
        layers = self._constrain(decision.resolve(self.layer_names))
        ev = self.policy.eval_decision(self)
        eval_layers = None if ev is None else self._constrain(ev.resolve(self.layer_names))
        self._decision = decision
        if layers == self._current and eval_layers == self._eval and not force:
            return
        entry = HistoryEntry(self.step_count, self.epoch_index, layers, eval_layers)
        if self.history and self.history[-1].step == self.step_count:
            self.history[-1] = entry  # changed again before the step ran: only the last one counts
        else:
            self.history.append(entry)
        self._put(entry)

    def _put(self, entry: HistoryEntry) -> None:
        """Put ``entry``'s precisions in force (backend, cost meter) and announce the change."""
        old = self._current
        self.backend.apply(entry.layers, entry.eval_layers)
        self.cost.set_precisions(entry.layers)
        self._current, self._eval = entry.layers, entry.eval_layers
        self._key = entry.summary()
        self.fire(Event.PRECISION_CHANGED, old=old, new=entry.layers, step=self.step_count)

    def _constrain(self, layers: dict[str, Precision], static: bool = False) -> dict[str, Precision]:
        """Apply the constraints in order; ``static=True`` leaves out the divergence guard's run-time
        floors (for the static reference run the savings are measured against)."""
        for c in self.constraints:
            if static and c is self.guard:
                continue
            layers = c(layers, self)
            if (not isinstance(layers, dict) or layers.keys() != set(self.layer_names)
                    or not all(isinstance(p, Precision) for p in layers.values())):
                raise TypeError(f"constraint {c!r} must return a dict mapping every quantized layer "
                                f"name to a Precision, got {layers!r}")
        return layers

    def refresh(self, force: bool = False) -> None:
        """Ask the policy again now (e.g. after it changed its mind outside an iteration boundary);
        ``force=True`` re-resolves even an unchanged decision (after a constraint changed)."""
        self._require_active("ctl.refresh()")
        self._apply(self.policy.decide(self), force=force)

    def _require_active(self, what: str) -> None:
        if not self._active:
            raise RuntimeError(f"{what} is only available inside the Controller's with block (or between "
                               "ctl.start() and ctl.close())")
        self._raise_deferred()

    def _raise_deferred(self) -> None:
        if self._deferred is not None:
            err, self._deferred = self._deferred, None
            raise err

    # --- results --------------------------------------------------------------------------------
    @property
    def current(self) -> dict[str, Precision]:
        """The per-layer precisions in force now."""
        return dict(self._current or {})

    def add_report_section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        self._report_sections[name] = fn

    def report(self) -> Report:
        """Cost and precision figures of the run so far (also valid after leaving the block); every key
        is described in :class:`Report`."""
        if not self._active and not self._exited:
            raise RuntimeError("this Controller was never entered, so it measured nothing (and a model "
                               "trained outside it ran in plain FP32): use it as a context manager, "
                               "'with adaprec.Controller(model, ...) as ctl:', and train inside the block")
        r = Report()
        r["policy"] = repr(self.policy)
        r["steps"] = self.step_count
        r["epochs"] = self.epoch_index
        r["layers"] = len(self.layer_names)
        if self.cost is not None:
            s = self.cost.summary()
            per_layer = s.pop("per_layer_gbitops")
            r.update(s)
            r["per_layer_gbitops"] = per_layer
        total = sum(self._steps_at.values())
        r["time_at_precision"] = {k: v / total for k, v in self._steps_at.items()} if total else {}
        r["precision_changes"] = len(self.history)
        r["observed"] = _observed(self.stats)
        for fn in self._report_sections.values():
            r.update(fn())
        return r

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: counters, policy, cost, history, components, RNG state, and the
        last observed values (``ctl.stats``: numbers and tensors).

        Usable before :meth:`start` too (the fresh state). Taken after the last batch's step of a
        :meth:`epoch` loop over a loader with ``len()``, it first ends that epoch (the loop would do so
        a moment later), so that a run resumed from it continues with the next epoch exactly.
        """
        if self._active and self._epoch_open and self._epoch_last_done is True:
            self._finish_epoch(self._epoch_batches)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "version": STATE_VERSION,
            "layer_names": list(self.layer_names),
            "step": self.step_count,
            "epoch": self.epoch_index,
            "policy": self.policy.state_dict(),
            "cost": None if self.cost is None else self.cost.state_dict(),
            "backend": self.backend.state_dict(),
            "history": list(self.history),
            "steps_at": dict(self._steps_at),
            "components": {k: c.state_dict() for k, c in self.components.items()
                           if hasattr(c, "state_dict")},
            "rng": rng,
            "rounding_rng": self.rounding_rng.state_dict(),
            # What ctl.observe() and observers published last: policies may read it when deciding.
            "stats": _saved_stats(self.stats),
            # The precisions decided for the iteration in progress (None before the start).
            "in_force": None if self._current is None else
            HistoryEntry(self.step_count, self.epoch_index, dict(self._current), self._eval),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (restores the global RNG, which stochastic rounding uses).

        Before :meth:`start` the state is checked now and applied when the controller starts (a
        trainer restoring callbacks before fit starts).
        """
        if self._exited:
            raise RuntimeError("ctl.load_state_dict(): this controller has finished; load into a new one")
        _check_state(state, self.layer_names)
        if not self._active:
            self._pending_state = state
            return
        self._raise_deferred()
        self._step = int(state["step"])
        self._epoch = int(state["epoch"])
        self._epoch_open = False
        self.policy.load_state_dict(state["policy"])
        if state["cost"] is not None:
            self.cost.load_state_dict(state["cost"])
        self.backend.load_state_dict(state["backend"])
        self.history = list(state["history"])
        self._steps_at = dict(state["steps_at"])
        for k, st in state.get("components", {}).items():
            if k in self.components and hasattr(self.components[k], "load_state_dict"):
                self.components[k].load_state_dict(st)
        if "rounding_rng" in state:
            self.rounding_rng.load_state_dict(state["rounding_rng"])
        if "stats" in state:
            self.stats = dict(state["stats"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        # Put back the precisions in force at the saved step, as they were: the policy decided them when
        # the previous iteration ended, from what it knew then (asking it again now could answer
        # otherwise). The next iteration asks the policy, as in the uninterrupted run.
        self._decision = None
        hist = list(self.history)  # a copy: _apply appends to self.history
        in_force = state.get("in_force")
        if in_force is not None:
            self._put(in_force)
        else:  # a state from before the start, or from an older adaprec: decide again
            self._apply(self.policy.decide(self), force=True)
            self._key = hist[-1].summary() if hist else "fp32"
        self.history = hist


def _check_state(state: Any, layer_names: list[str]) -> None:
    """Refuse anything that is not a state of this controller's kind, naming what is wrong."""
    if not isinstance(state, dict):
        raise TypeError(f"load_state_dict() takes the dict from ctl.state_dict(), got {type(state).__name__}")
    if "version" not in state:
        raise ValueError("not an adaprec Controller state_dict: it has no 'version' key (was it the "
                         "model's or the optimizer's state_dict?)")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"adaprec Controller state_dict version {state['version']!r} found; this adaprec "
                         f"reads version {STATE_VERSION}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"incomplete adaprec Controller state_dict (version {STATE_VERSION}): missing "
                         f"{missing}")
    if list(state["layer_names"]) != list(layer_names):
        raise ValueError(f"the state is for layers {state['layer_names']}, this controller quantizes "
                         f"{layer_names}")
    if not isinstance(state["rng"], dict) or "cpu" not in state["rng"]:
        raise ValueError("incomplete adaprec Controller state_dict: 'rng' has no 'cpu' generator state")


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _read_reference(spec: Any) -> Precision | None:
    """The controller's ``reference=``: ``None``, a Precision, or a format spec for all three roles."""
    if spec is None or isinstance(spec, Precision):
        return spec
    try:
        return Precision.uniform(spec)
    except (ValueError, TypeError) as e:
        raise ValueError(f"reference= must be an adaprec.Precision or a format spec such as 'int8', 8, "
                         f"'fx8' or 'bf16' (the static run savings are measured against); got {spec!r}: "
                         f"{e}") from None


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _saved_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``ctl.stats`` a checkpoint keeps: numbers, strings and tensors (detached copies),
    which ``torch.load(weights_only=True)`` reads back."""
    out: dict[str, Any] = {}
    for k, v in stats.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
        elif isinstance(v, bool | int | float | str):
            out[k] = v
    return out


def _observed(stats: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of ``ctl.stats`` as plain floats (one host read per value, at report time)."""
    out: dict[str, float] = {}
    for k, v in stats.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v.detach())
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def unwrap_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a trainer's wrapper (Lightning's ``LightningOptimizer``,
    Accelerate's ``AcceleratedOptimizer``), or ``opt`` itself.

    A wrapper is recognised by what it lacks: ``torch.optim.Optimizer.__init__`` never ran on it (no
    step-hook registry of its own), and it holds the real optimizer as ``.optimizer``/``._optimizer``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> class Wrapper(torch.optim.Optimizer):  # like accelerate's: subclass, no super().__init__
        ...     def __init__(self, optimizer):
        ...         self.optimizer = optimizer
        >>> unwrap_optimizer(Wrapper(opt)) is opt, unwrap_optimizer(opt) is opt
        (True, True)
    """
    for _ in range(8):  # wrappers of wrappers, but never a cycle
        d = getattr(opt, "__dict__", None)
        if not d or "_optimizer_step_pre_hooks" in d:
            break
        inner = d.get("optimizer", d.get("_optimizer"))
        if inner is None or inner is opt:
            break
        opt = inner
    if not isinstance(opt, torch.optim.Optimizer) or "_optimizer_step_pre_hooks" not in vars(opt):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a trainer's wrapper holding one as "
                        f".optimizer), got {type(opt).__name__}")
    return opt


class _RestoreAttr:
    """Undo an instance attribute set over a class attribute (a patched ``step``)."""

    def __init__(self, obj: Any, name: str, had: bool, orig: Any) -> None:
        self.obj, self.name, self.had, self.orig = obj, name, had, orig

    def remove(self) -> None:
        if self.had:
            self.obj.__dict__[self.name] = self.orig
        else:
            self.obj.__dict__.pop(self.name, None)


def _fold_cost(ctl: Controller, **_: Any) -> None:
    ctl.cost.step()
    end = getattr(ctl.backend, "end_iteration", None)  # optional in a third-party backend
    if end is not None:
        end()


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _average_over_ranks(stats: dict[str, Any]) -> dict[str, Any]:
    """Average numeric statistics over all ranks (one all_reduce for all of them)."""
    keys = [k for k, v in stats.items()
            if (isinstance(v, int | float) and not isinstance(v, bool))
            or (isinstance(v, torch.Tensor) and v.numel() == 1)]
    if not keys:
        return stats
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    vals = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64).detach().reshape(()).to(device)
                        for k in keys])
    dist.all_reduce(vals)
    vals /= dist.get_world_size()
    out = dict(stats)
    for k, v in zip(keys, vals.cpu().tolist()):
        out[k] = type(stats[k])(v) if isinstance(stats[k], int | float) else \
            torch.as_tensor(v, dtype=stats[k].dtype, device=stats[k].device)
    return out


def _is_compiled(model: nn.Module) -> bool:
    # A compiled model exists only once torch._dynamo has been imported; importing it just to check
    # would cost about a second per process, so look it up instead.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def _quantizable_types():
    from .quant import QUANTIZABLE

    return QUANTIZABLE
