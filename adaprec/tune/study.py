"""Studies over a policy's knobs: the objective around a user's train function, study defaults, running,
and turning a finished study back into a policy.

The user's train function gets a policy and an :class:`EpochReporter` and returns a dict of metrics::

    def train_fn(policy, report):
        ...train with adaprec.Controller(model, policy=policy, ...)...
        for epoch in range(epochs):
            ...
            report(epoch, {"accuracy": acc})        # lets single-objective studies prune
        return {"accuracy": acc, "gbitops": ctl.report()["gbitops"]}

Multi-objective studies (e.g. maximize accuracy, minimize GBitOPs) cannot prune - Optuna's pruners
compare one intermediate value per step - so there the reporter does nothing; their result is the Pareto
front, ``study.best_trials``.

Example:
    >>> import optuna
    >>> from adaprec.tune import create_study, objective, optimize, pareto_front, policy_from
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> def train_fn(policy, report):   # a stand-in for real training: cost grows with the bits
    ...     bits = policy.config()["bits"]
    ...     return {"accuracy": 1 - 0.5 ** bits, "gbitops": float(bits)}
    >>> study = create_study("doc", storage=optuna.storages.InMemoryStorage(), policy="fixed",
    ...                      metrics=("accuracy", "gbitops"))
    >>> _ = optimize(study, objective(train_fn, policy="fixed"), n_trials=4, progress=False)
    >>> len(study.trials), study.trials[0].params        # the paper default (8/8) runs first
    (4, {'bits': 8, 'grad_bits': 8})
    >>> front = pareto_front(study)
    >>> policy_from(study, front[0]).config() == front[0].user_attrs["policy_config"]
    True
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..policies import Policy, make_policy, write_recipe
from .space import _require_space, finite_metric, metric_directions, paper_trial_params, policy_name, suggest
from .storage import open_storage

__all__ = ["EpochReporter", "Objective", "objective", "create_study", "optimize", "tune", "study_info",
           "pareto_front", "choose_trial", "policy_from", "write_best_recipe", "FINISHED"]

#: Trial states that count towards a study's trial budget.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

_ATTR_POLICY = "adaprec:policy"
_ATTR_METRICS = "adaprec:metrics"


class EpochReporter:
    """Passed to the train function: ``report(epoch, metrics)`` once per epoch.

    In a single-objective study it reports the objective's metric to Optuna and raises
    ``optuna.TrialPruned`` when the pruner stops the trial; in a multi-objective study it does nothing
    (Optuna cannot prune those). ``metrics`` is a dict holding the objective's metric, or the value
    itself. ``reporter.trial`` is the Optuna trial, for train functions that want more.

    Example:
        >>> import optuna
        >>> study = optuna.create_study(direction="maximize")
        >>> trial = study.ask()
        >>> report = EpochReporter(trial, "accuracy", prune=True)
        >>> report(0, {"accuracy": 0.5}); trial.storage.get_trial(trial._trial_id).intermediate_values
        {0: 0.5}
    """

    def __init__(self, trial: optuna.trial.BaseTrial, metric: str, *, prune: bool) -> None:
        self.trial, self.metric, self.prune = trial, metric, prune

    def __call__(self, epoch: int, metrics: Mapping[str, Any] | float) -> None:
        if not self.prune:
            return
        if isinstance(metrics, Mapping):
            if self.metric not in metrics:
                return  # nothing to compare this epoch (e.g. a cost known only at the end)
            metrics = metrics[self.metric]
        value = float(metrics)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{self.metric} is {value} at epoch {epoch}")
        self.trial.report(value, int(epoch))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch} with {self.metric}={value:.6g}")


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


class Objective:
    """An Optuna objective: sample the policy's knobs, train with ``train_fn``, return the metrics.

    Build it with :func:`objective`. Each trial stores the policy's constructor arguments
    (``user_attrs["policy_config"]``), every numeric metric the train function returned
    (``user_attrs["metrics"]``) and which process ran it (``user_attrs["worker"]``). A non-finite
    objective metric fails that trial and the study goes on; a train function that returns no dict or
    misses a metric raises, since every further trial would fail the same way. When the sampler proposes
    the parameters of a trial that already completed, the trial is not trained again: it is recorded as
    failed with ``user_attrs["duplicate_of"]``, so it does not use up the study's budget.

    Example:
        >>> obj = Objective(lambda policy, report: {"val_loss": 1.0}, policy="fixed", metrics=("val_loss",))
        >>> obj.metrics, obj.directions
        (('val_loss',), ('minimize',))
    """

    def __init__(self, train_fn: Callable[[Policy, EpochReporter], Mapping[str, Any]], policy: Any = "cpt",
                 metrics: Sequence[str] = ("accuracy", "gbitops"),
                 directions: Sequence[str] | None = None) -> None:
        if not callable(train_fn):
            raise TypeError(f"train_fn must be callable as train_fn(policy, report), "
                            f"got {type(train_fn).__name__}")
        self.train_fn = train_fn
        self.policy = policy
        self.policy_cls = _require_space(policy)
        self.policy_name = policy_name(policy)
        if isinstance(metrics, str):
            metrics = [m.strip() for m in metrics.split(",") if m.strip()]
        self.directions = metric_directions(metrics, directions)
        self.metrics = tuple(metrics)

    def build_policy(self, kwargs: Mapping[str, Any]) -> Policy:
        if isinstance(self.policy, str):
            return make_policy(self.policy, **kwargs)
        return self.policy_cls(**kwargs)

    def __call__(self, trial: optuna.trial.Trial) -> float | tuple[float, ...]:
        kwargs = suggest(self.policy_cls, trial)
        nan = math.nan if len(self.metrics) == 1 else tuple(math.nan for _ in self.metrics)
        twin = _completed_twin(trial)
        if twin is not None:
            # The sampler proposed a point already evaluated: don't spend a training run on it. A failed
            # trial does not count towards the budget, so the study still gets N distinct points.
            trial.set_user_attr("duplicate_of", twin)
            trial.set_user_attr("fail_reason", f"same parameters as completed trial {twin}; "
                                               "not trained again")
            return nan
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        report = EpochReporter(trial, self.metrics[0], prune=len(self.metrics) == 1)
        try:
            policy = self.build_policy(kwargs)
            trial.set_user_attr("policy_config", _jsonable(policy.config()))
            result = self.train_fn(policy, report)
        except ValueError as exc:
            # Typically a sampled configuration the policy or the run cannot take (e.g. more CPT cycles
            # than iterations); optimize() fails this trial and goes on. The reason stays with the trial.
            trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}")
            raise
        if not isinstance(result, Mapping):
            raise TypeError(f"train_fn must return a dict of metrics (needs {list(self.metrics)}), "
                            f"got {type(result).__name__}")
        missing = [m for m in self.metrics if m not in result]
        if missing:
            raise KeyError(f"train_fn returned no {missing}; it returned {sorted(result)}; "
                           f"the study optimizes {list(self.metrics)}")
        numeric = {str(k): float(v) for k, v in result.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        trial.set_user_attr("metrics", {k: (v if math.isfinite(v) else str(v)) for k, v in numeric.items()})
        try:
            values = tuple(finite_metric(m, result[m]) for m in self.metrics)
        except ValueError as exc:
            trial.set_user_attr("fail_reason", str(exc))
            # Returning NaN makes Optuna record this trial as failed while the study continues.
            return nan
        return values[0] if len(values) == 1 else values


def _completed_twin(trial: optuna.trial.BaseTrial) -> int | None:
    """The number of a completed trial of the same study with the same parameters, if any."""
    study = getattr(trial, "study", None)
    if study is None:  # FixedTrial and friends: no study to compare with
        return None
    number = getattr(trial, "number", None)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == trial.params and t.number != number:
            return t.number
    return None


def objective(train_fn: Callable[[Policy, EpochReporter], Mapping[str, Any]], policy: Any = "cpt",
              metrics: Sequence[str] = ("accuracy", "gbitops"),
              directions: Sequence[str] | None = None) -> Objective:
    """The objective for tuning ``policy`` with ``train_fn(policy, report) -> {metric: value}``.

    ``metrics`` name the values to optimize, in order; their directions come from the metric names
    (accuracy: maximize, gbitops/loss/bpc: minimize) unless ``directions`` says otherwise.
    """
    return Objective(train_fn, policy, metrics, directions)


def study_info(study: optuna.Study) -> dict[str, Any]:
    """The policy name and metric names a study was created with (``{}`` for a plain Optuna study)."""
    attrs = study.user_attrs
    if _ATTR_POLICY not in attrs:
        return {}
    return {"policy": attrs[_ATTR_POLICY], "metrics": tuple(attrs[_ATTR_METRICS])}


def create_study(name: str, storage: Any = None, *, policy: Any = "cpt",
                 metrics: Sequence[str] = ("accuracy", "gbitops"), directions: Sequence[str] | None = None,
                 seed: int | None = 0, enqueue_defaults: bool = True,
                 pruner: optuna.pruners.BasePruner | None = None, load_if_exists: bool = True,
                 heartbeat_interval: int | None = 10, grace_period: int | None = None,
                 max_retry: int | None = 3) -> optuna.Study:
    """Create a study for tuning ``policy``, or load the one of that name to continue it.

    Defaults: storage ``sqlite:///adaprec-studies.db`` (see :func:`adaprec.tune.storage.open_storage` for
    database URLs and journal files), one direction per metric from its name, a multivariate TPE sampler
    seeded with ``seed`` plus the number of trials already in the study (so a resumed study draws new
    points rather than repeating the first run's), the policy's paper default enqueued as the first
    trial, a median pruner for single-objective studies and none for multi-objective ones.

    Everything is checked before the storage is written: an existing study created for another policy,
    other metrics or other directions is refused, not changed.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"study name must be a non-empty string, got {name!r}")
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    metrics = tuple(metrics)
    dirs = metric_directions(metrics, directions)
    _require_space(policy)
    pname = policy_name(policy)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    if len(metrics) > 1 and pruner is not None and not isinstance(pruner, optuna.pruners.NopPruner):
        raise ValueError(f"multi-objective studies ({list(metrics)}) cannot prune: Optuna's pruners compare "
                         "one value per step; drop pruner= or optimize a single metric")
    defaults = paper_trial_params(policy) if enqueue_defaults else None
    st = open_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                      max_retry=max_retry)

    n_existing = 0
    try:
        study_id = st.get_study_id_from_name(name)
    except KeyError:
        study_id = None
    if study_id is not None:
        if not load_if_exists:
            raise ValueError(f"study {name!r} already exists in this storage; pass load_if_exists=True to "
                             "continue it or choose another name")
        _check_existing(name, st, study_id, pname, metrics, dirs)
        n_existing = len(st.get_all_trials(study_id, deepcopy=False))

    if pruner is None:
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1) if len(metrics) == 1
                  else optuna.pruners.NopPruner())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(multivariate=True,
                                             seed=None if seed is None else seed + n_existing)
    study = optuna.create_study(storage=st, sampler=sampler, pruner=pruner, study_name=name,
                                directions=list(dirs), load_if_exists=True)
    if _ATTR_POLICY not in study.user_attrs:
        study.set_user_attr(_ATTR_POLICY, pname)
        study.set_user_attr(_ATTR_METRICS, list(metrics))
    if study.metric_names is None:
        # Optuna's dashboard and plots label the axes with these instead of "Objective 0/1".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(metrics))
    if defaults is not None:
        # skip_if_exists: a resumed study, or a second worker, must not queue the default again.
        study.enqueue_trial(defaults, user_attrs={"paper_default": True}, skip_if_exists=True)
    return study


def _check_existing(name: str, st: optuna.storages.BaseStorage, study_id: int, pname: str,
                    metrics: tuple[str, ...], dirs: tuple[str, ...]) -> None:
    attrs = st.get_study_user_attrs(study_id)
    have_dirs = tuple(d.name.lower() for d in st.get_study_directions(study_id))
    if _ATTR_POLICY in attrs:
        have_policy, have_metrics = attrs[_ATTR_POLICY], tuple(attrs[_ATTR_METRICS])
        if have_policy != pname or have_metrics != metrics:
            raise ValueError(f"study {name!r} tunes policy {have_policy!r} on metrics {list(have_metrics)}, "
                             f"not policy {pname!r} on {list(metrics)}; use those to continue it, or "
                             "choose another study name")
    if have_dirs != dirs:
        raise ValueError(f"study {name!r} has directions {list(have_dirs)}, not {list(dirs)} for metrics "
                         f"{list(metrics)}; choose another study name")


def _n_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class _Progress:
    """A tqdm bar over the study's finished trials (all workers'), updated after each of ours."""

    def __init__(self, total: int, done: int, metrics: Sequence[str]) -> None:
        from tqdm.auto import tqdm

        self.metrics = metrics
        self.bar = tqdm(total=total, initial=done, unit="trial", desc="tuning", dynamic_ncols=True)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.bar.n = min(_n_finished(study), self.bar.total)
        if trial.values is not None:
            self.bar.set_postfix({m: f"{v:.4g}" for m, v in zip(self.metrics, trial.values)}, refresh=False)
        else:
            self.bar.set_postfix_str(f"trial {trial.number} {trial.state.name.lower()}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def optimize(study: optuna.Study, objective: Objective, n_trials: int, *, timeout: float | None = None,
             progress: bool = True, catch: tuple[type[Exception], ...] = (ValueError,)) -> optuna.Study:
    """Run ``objective`` until the study holds ``n_trials`` finished (completed or pruned) trials.

    Counting the study's trials rather than this call's makes re-running continue an interrupted study
    and lets several processes share one budget (they may overshoot it by one trial each). Failed
    trials do not count; this process stops after twice the remaining budget anyway, so a train
    function that keeps failing cannot loop forever. Exceptions of the types in ``catch`` (default
    ``ValueError``: a sampled configuration the run rejects, such as more CPT cycles than iterations)
    fail their trial, with the reason in ``user_attrs["fail_reason"]``, and the study goes on; any other
    exception fails the trial and propagates. ``progress`` shows a tqdm bar when tqdm is installed.
    """
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials <= 0:
        raise ValueError(f"n_trials must be a positive int, got {n_trials!r}")
    if not isinstance(objective, Objective):
        raise TypeError("objective must come from adaprec.tune.objective(...); for a plain function use "
                        "study.optimize directly")
    info = study_info(study)
    if info and (info["policy"] != objective.policy_name or info["metrics"] != objective.metrics):
        raise ValueError(f"study {study.study_name!r} tunes {info['policy']!r} on {list(info['metrics'])}, "
                         f"but the objective tunes {objective.policy_name!r} on {list(objective.metrics)}")
    have = tuple(d.name.lower() for d in study.directions)
    if have != objective.directions:
        raise ValueError(f"study {study.study_name!r} has directions {list(have)} but the objective's "
                         f"metrics {list(objective.metrics)} need {list(objective.directions)}")
    done = _n_finished(study)
    remaining = n_trials - done
    if remaining <= 0:
        return study
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
        optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)]
    bar = None
    if progress:
        try:
            bar = _Progress(n_trials, done, objective.metrics)
            callbacks.append(bar)
        except ImportError:
            bar = None
    try:
        study.optimize(objective, n_trials=2 * remaining, timeout=timeout, callbacks=callbacks, catch=catch)
    finally:
        if bar is not None:
            bar.close()
    return study


def tune(train_fn: Callable[[Policy, EpochReporter], Mapping[str, Any]], policy: Any = "cpt",
         n_trials: int = 30, *, study_name: str | None = None, storage: Any = None,
         metrics: Sequence[str] = ("accuracy", "gbitops"), directions: Sequence[str] | None = None,
         seed: int | None = 0, progress: bool = True, **study_kwargs: Any) -> optuna.Study:
    """:func:`create_study` + :func:`objective` + :func:`optimize` in one call; returns the study.

    ``study_name`` defaults to ``"<policy>"``; re-running with the same name and storage continues it.
    """
    obj = objective(train_fn, policy, metrics, directions)
    study = create_study(study_name or obj.policy_name, storage, policy=policy, metrics=metrics,
                         directions=directions, seed=seed, **study_kwargs)
    return optimize(study, obj, n_trials, progress=progress)


def _sort_key(study: optuna.Study) -> Callable[[FrozenTrial], tuple[float, ...]]:
    signs = [-1.0 if d == optuna.study.StudyDirection.MAXIMIZE else 1.0 for d in study.directions]
    return lambda t: tuple(s * v for s, v in zip(signs, t.values)) + (t.number,)


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The non-dominated completed trials (``study.best_trials``), best first on the first metric."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"study {study.study_name!r} has no completed trial yet")
    return sorted(study.best_trials, key=_sort_key(study))


def choose_trial(study: optuna.Study, trial: FrozenTrial | int | None = None) -> FrozenTrial:
    """A completed trial: the given one (object or number), or by default the best - for a multi-objective
    study the Pareto trial best on the first metric (ties broken by the next metrics)."""
    if trial is None:
        return pareto_front(study)[0]
    if isinstance(trial, FrozenTrial):
        number = trial.number
    elif isinstance(trial, int) and not isinstance(trial, bool):
        number = trial
    else:
        raise TypeError(f"trial must be a FrozenTrial, a trial number or None, got {type(trial).__name__}")
    found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not found:
        raise ValueError(f"study {study.study_name!r} has no trial number {number} "
                         f"(it has {len(study.trials)} trials)")
    if found[0].state != TrialState.COMPLETE:
        raise ValueError(f"trial {number} of study {study.study_name!r} is {found[0].state.name}, "
                         "not COMPLETE; pick a completed trial (see pareto_front)")
    return found[0]


def policy_from(study: optuna.Study, trial: FrozenTrial | int | None = None, *, policy: Any = None) -> Policy:
    """The policy of a finished trial (default: see :func:`choose_trial`), ready for a Controller.

    ``policy`` names or gives the policy class, needed only for a study not created by
    :func:`create_study` or for an unregistered policy class.
    """
    chosen = choose_trial(study, trial)
    spec = policy if policy is not None else study_info(study).get("policy")
    if spec is None:
        raise ValueError(f"study {study.study_name!r} does not record its policy; pass policy=")
    kwargs = suggest(spec, optuna.trial.FixedTrial(chosen.params, chosen.number))
    if isinstance(spec, str):
        return make_policy(spec, **kwargs)
    return _require_space(spec)(**kwargs)


def write_best_recipe(study: optuna.Study, path: str | Path, trial: FrozenTrial | int | None = None, *,
                      policy: Any = None) -> Path:
    """Write the chosen trial's policy (default: the best, see :func:`choose_trial`) as a TOML recipe."""
    chosen = choose_trial(study, trial)
    pol = policy_from(study, chosen, policy=policy)
    metrics = study_info(study).get("metrics") or tuple(f"value{i}" for i in range(len(chosen.values)))
    scores = ", ".join(f"{m}={v:.6g}" for m, v in zip(metrics, chosen.values))
    return write_recipe(path, pol, f"tuned by adaprec.tune: study {study.study_name!r}, "
                                   f"trial {chosen.number}: {scores}")
