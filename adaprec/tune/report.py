"""Showing a study: the Pareto table (text or Markdown) and the Pareto plot (PNG).

Example:
    >>> import optuna
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> study = optuna.create_study(directions=["maximize", "minimize"])
    >>> space = {"bits": optuna.distributions.IntDistribution(2, 8)}
    >>> for bits, acc, cost in [(8, 0.9, 2.0), (4, 0.8, 1.0), (6, 0.7, 3.0)]:
    ...     study.add_trial(optuna.trial.create_trial(params={"bits": bits}, distributions=space,
    ...                                               values=[acc, cost]))
    >>> print(pareto_table(study, metrics=("accuracy", "gbitops")))
    | trial | accuracy | gbitops | bits |
    |------:|---------:|--------:|-----:|
    |     0 |      0.9 |       2 |    8 |
    |     1 |      0.8 |       1 |    4 |
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .study import pareto_front, study_info

__all__ = ["pareto_table", "trials_table", "plot_pareto", "dominates"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """Whether objective values ``a`` are at least as good as ``b`` everywhere and better somewhere.

    Example:
        >>> dominates((0.9, 1.0), (0.8, 2.0), ("maximize", "minimize"))
        True
        >>> dominates((0.9, 3.0), (0.8, 2.0), ("maximize", "minimize"))
        False
    """
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    ge = all(s * x >= s * y for s, x, y in zip(signs, a, b))
    gt = any(s * x > s * y for s, x, y in zip(signs, a, b))
    return ge and gt


def trials_table(trials: Sequence[FrozenTrial], metrics: Sequence[str], *, mark_default: bool = True) -> str:
    """A Markdown table of ``trials``: number, objective values and parameters (``*`` = paper default)."""
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    head = ["trial", *metrics, *params]
    rows = []
    for t in trials:
        num = f"{t.number}*" if mark_default and t.user_attrs.get("paper_default") else str(t.number)
        rows.append([num, *(_fmt(v) for v in (t.values or [])), *(_fmt(t.params.get(p, "")) for p in params)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def pareto_table(study: optuna.Study, metrics: Sequence[str] | None = None) -> str:
    """The Pareto front of ``study`` as a Markdown table, best first on the first metric."""
    metrics = (metrics or study_info(study).get("metrics")
               or [f"value{i}" for i in range(len(study.directions))])
    return trials_table(pareto_front(study), metrics)


def plot_pareto(study: optuna.Study, path: str | Path, metrics: Sequence[str] | None = None,
                title: str | None = None) -> Path:
    """Write a PNG: every completed trial, the Pareto front joined by a line, the paper default circled.

    Two metrics: the first on the y axis against the second on the x axis (accuracy vs GBitOPs). One
    metric: the value per trial number with the running best. More than two: the first two.
    """
    # The object-oriented API: no pyplot, so a notebook's backend is left alone.
    from matplotlib.figure import Figure

    metrics = list(metrics or study_info(study).get("metrics")
                   or [f"value{i}" for i in range(len(study.directions))])
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"study {study.study_name!r} has no completed trial to plot")
    front = pareto_front(study)
    defaults = [t for t in complete if t.user_attrs.get("paper_default")]
    fig = Figure(figsize=(6.4, 4.6), dpi=120)
    ax = fig.subplots()
    if len(metrics) == 1:
        xs = [t.number for t in complete]
        ax.plot(xs, [t.values[0] for t in complete], "o", color="0.6", label="trials")
        best, run = [], None
        maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        for t in complete:
            v = t.values[0]
            run = v if run is None else (max(run, v) if maximize else min(run, v))
            best.append(run)
        ax.step(xs, best, where="post", color="C0", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(metrics[0])
        for t in defaults:
            ax.plot([t.number], [t.values[0]], "o", ms=12, mfc="none", mec="C3", label="paper default")
    else:
        xm, ym = 1, 0
        ax.plot([t.values[xm] for t in complete], [t.values[ym] for t in complete], "o", color="0.65",
                label=f"trials ({len(complete)})")
        pts = sorted((t.values[xm], t.values[ym]) for t in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C0",
                label=f"Pareto front ({len(front)})")
        for t in defaults:
            ax.plot([t.values[xm]], [t.values[ym]], "o", ms=13, mfc="none", mec="C3", mew=2,
                    label="paper default")
        ax.set_xlabel(metrics[xm])
        ax.set_ylabel(metrics[ym])
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or f"{study.study_name}: {study_info(study).get('policy', '')}".rstrip(": "))
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out
