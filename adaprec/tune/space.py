"""What a study searches: a policy's search space, its paper defaults, and which way each metric goes.

A policy is tunable when its class overrides :meth:`adaprec.policies.Policy.search_space`, a classmethod
that asks an Optuna trial for values and returns constructor keyword arguments. Search spaces use fixed
ranges (a span rather than a range that depends on another parameter) so that Optuna's multivariate TPE
can model the parameters jointly.

The *paper defaults* are the trial parameters that rebuild the configuration a paper published (CPT
3-8/8, MuPPET's ladder, static 8/8); :func:`adaprec.tune.create_study` enqueues them as the first trial
so every study contains the reference point. A policy class can supply them itself with a
``paper_trial_params()`` classmethod; otherwise the table in this module is used.

Example:
    >>> from adaprec.tune.space import policy_class, suggest, metric_directions
    >>> import optuna
    >>> policy_class("fixed").__name__
    'Fixed'
    >>> suggest("fixed", optuna.trial.FixedTrial({"bits": 6, "grad_bits": 8}))
    {'bits': 6, 'grad_bits': 8}
    >>> metric_directions(("accuracy", "gbitops"))
    ('maximize', 'minimize')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from ..policies import Policy, list_policies, make_policy

__all__ = ["policy_class", "policy_name", "has_search_space", "tunable_policies", "suggest",
           "paper_trial_params", "metric_directions", "KNOWN_METRICS"]

#: Metrics whose direction is known; anything else needs an explicit direction.
KNOWN_METRICS: dict[str, str] = {
    "accuracy": "maximize", "acc": "maximize", "val_acc": "maximize", "top1": "maximize",
    "top5": "maximize", "f1": "maximize",
    "gbitops": "minimize", "bitops": "minimize", "loss": "minimize", "val_loss": "minimize",
    "bpc": "minimize", "perplexity": "minimize", "ppl": "minimize", "wall_s": "minimize",
    "time_s": "minimize", "savings_vs_fp32": "maximize", "savings": "maximize",
}

_DIRECTIONS = ("maximize", "minimize")

# Trial parameters of each built-in policy's published configuration, keyed by policy name. The names
# must match the policy's search_space; they are checked by rebuilding the policy (see
# paper_trial_params), so a renamed parameter is reported instead of silently enqueuing nothing.
_PAPER_TRIAL_PARAMS: dict[str, dict[str, Any]] = {
    # static 8-bit forward and backward: the baseline CPT compares against
    "fixed": {"bits": 8, "grad_bits": 8},
    # CPT on CIFAR (Fu et al. 2021): forward 3-8 bits, backward 8, 32 cosine ramps
    "cpt": {"family": "int", "b_min": 3, "span": 5, "grad_bits": 8, "cycles": 32, "profile": "cos",
            "shape": "growth"},
    # MuPPET (Rajagopal et al. 2020): the full 8-12-14-16-FP32 ladder, r = 3, y = 2, T(j) = 1 + 1.5 e^(-0.1 j)
    "muppet": {"start_level": 0, "resolution": 3, "patience": 2, "alpha": 1.0, "beta": 1.5, "lam": 0.1},
}


def policy_class(policy: Any) -> type[Policy]:
    """The Policy class behind a registered name, a Policy subclass or a Policy object.

    Unknown names raise ``ValueError`` listing the registered ones.
    """
    if isinstance(policy, type) and issubclass(policy, Policy):
        return policy
    if isinstance(policy, Policy):
        return type(policy)
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a registered name, a Policy subclass or a Policy object, "
                        f"got {type(policy).__name__}")
    # Building the default instance is the public way to reach the class behind a registered
    # factory; every built-in policy constructs with its paper defaults.
    return type(make_policy(policy))


def policy_name(policy: Any) -> str:
    """The registered name a study records for ``policy`` (its class's ``name`` attribute)."""
    name = policy if isinstance(policy, str) else policy_class(policy).name
    return name


def has_search_space(cls: type[Policy]) -> bool:
    """Whether ``cls`` overrides :meth:`Policy.search_space`."""
    return getattr(cls.search_space, "__func__", None) is not Policy.search_space.__func__


def tunable_policies() -> list[str]:
    """Registered policy names whose class defines a search space."""
    out = []
    for name in list_policies():
        try:
            if has_search_space(policy_class(name)):
                out.append(name)
        except Exception:  # a policy that cannot build with defaults is not tunable by name
            continue
    return out


def _require_space(policy: Any) -> type[Policy]:
    cls = policy_class(policy)
    if not has_search_space(cls):
        raise ValueError(f"policy {policy_name(policy)!r} defines no search space, so it cannot be tuned; "
                         f"tunable policies: {tunable_policies()} (or give a Policy subclass with a "
                         "search_space(trial) classmethod)")
    return cls


def suggest(policy: Any, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
    """Ask ``trial`` for the policy's parameters; returns constructor keyword arguments.

    With an ``optuna.trial.FixedTrial`` this rebuilds the arguments of a finished trial.
    """
    cls = _require_space(policy)
    kwargs = cls.search_space(trial)
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{cls.__name__}.search_space must return a dict of constructor arguments, "
                        f"got {type(kwargs).__name__}")
    return dict(kwargs)


def paper_trial_params(policy: Any) -> dict[str, Any] | None:
    """Trial parameters reproducing the policy's published configuration, or ``None`` if unknown.

    The parameters are validated by building the policy from them; a mismatch with the search space
    raises ``ValueError`` naming the policy (the table or the policy's search space needs fixing).
    """
    cls = _require_space(policy)
    own = getattr(cls, "paper_trial_params", None)
    params = dict(own()) if callable(own) else _PAPER_TRIAL_PARAMS.get(policy_name(policy))
    if params is None:
        return None
    try:
        kwargs = suggest(cls, optuna.trial.FixedTrial(params))
        cls(**kwargs)
    except Exception as exc:
        raise ValueError(f"the paper-default trial parameters of policy {policy_name(policy)!r} "
                         f"({params}) do not fit its search space: {exc}") from exc
    return params


def metric_directions(metrics: Sequence[str], directions: Sequence[str] | None = None) -> tuple[str, ...]:
    """Check metric names and return one Optuna direction per metric.

    Directions default from :data:`KNOWN_METRICS`; an explicit direction that contradicts a known metric
    (``accuracy`` minimized), a length mismatch, a repeated metric or an unknown metric without a
    direction is an error.
    """
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",") if m.strip()]
    metrics = [str(m).strip() for m in metrics]
    if not metrics or any(not m for m in metrics):
        raise ValueError(f"metrics must be one or more non-empty names, got {list(metrics)!r}")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics must be distinct, got {metrics}")
    if directions is None:
        unknown = [m for m in metrics if m not in KNOWN_METRICS]
        if unknown:
            raise ValueError(f"no known direction for metric(s) {unknown}; pass directions= "
                             f"(one of {_DIRECTIONS} per metric) or use known metrics "
                             f"{sorted(KNOWN_METRICS)}")
        return tuple(KNOWN_METRICS[m] for m in metrics)
    if isinstance(directions, str):
        directions = [directions]
    directions = [str(d).lower() for d in directions]
    if len(directions) != len(metrics):
        raise ValueError(f"got {len(metrics)} metric(s) {metrics} but {len(directions)} direction(s) "
                         f"{directions}; give one direction per metric")
    for m, d in zip(metrics, directions):
        if d not in _DIRECTIONS:
            raise ValueError(f"direction for metric {m!r} must be one of {_DIRECTIONS}, got {d!r}")
        if m in KNOWN_METRICS and KNOWN_METRICS[m] != d:
            raise ValueError(f"metric {m!r} is always {KNOWN_METRICS[m]}d, but direction {d!r} was given")
    return tuple(directions)


def finite_metric(name: str, value: Any) -> float:
    """``value`` as a float, or a ``ValueError`` saying which metric was not a finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"metric {name!r} is {v}; the trial diverged or the train function is broken")
    return v
