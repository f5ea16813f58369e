"""``adaprec tune``: run (or continue) a study over a policy's knobs on a built-in task.

    adaprec tune --policy cpt --task digits --trials 30 --storage sqlite:///studies.db --study cpt-digits \\
        --objectives accuracy,gbitops --epochs 3

Several processes given the same ``--storage`` (a database URL or a ``.journal`` file) and ``--study``
share the work; re-running the command continues the study up to ``--trials`` finished trials. At the
end it prints the Pareto table and writes ``<out>/<study>-pareto.png`` and the best trial's recipe
``<out>/<study>-best.toml`` (train with it: ``adaprec.Controller(model, policy="<that file>")``).

Also runnable as ``python -m adaprec.tune ...``.

Example:
    >>> import argparse
    >>> sub = argparse.ArgumentParser(prog="adaprec").add_subparsers(dest="command")
    >>> p = add_tune_parser(sub)
    >>> args = p.parse_args(["--policy", "fixed", "--trials", "3"])
    >>> args.task, args.study, args.func is run_tune
    ('digits', None, True)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_tune_parser", "run_tune", "main"]


def add_tune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``tune`` sub-command to an ``argparse`` sub-parsers object; returns its parser."""
    from . import DEFAULT_STORAGE

    p = subparsers.add_parser(
        "tune", help="tune a policy's knobs with Optuna (multi-objective, resumable, distributed)",
        description="Run or continue an Optuna study over a policy's search space on a built-in task. "
                    "Several processes with the same --storage and --study share one study.")
    p.add_argument("--policy", required=True,
                   help="policy to tune (one with a search space: cpt, muppet, fixed)")
    p.add_argument("--task", default="digits", help="built-in task (default: digits)")
    p.add_argument("--trials", type=int, required=True,
                   help="finished trials the study should reach (counting earlier runs and other workers)")
    p.add_argument("--storage", default=None,
                   help=f"database URL, or a .journal/.log file for several processes "
                        f"(default {DEFAULT_STORAGE})")
    p.add_argument("--study", default=None, help="study name; re-use it to resume (default <policy>-<task>)")
    p.add_argument("--objectives", default=None,
                   help="comma-separated metrics, in order (default: the task's metric and gbitops, "
                        "e.g. accuracy,gbitops); one metric makes a prunable single-objective study")
    p.add_argument("--directions", default=None,
                   help="comma-separated maximize/minimize per objective (needed only for unknown metrics)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the task's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the task's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--device", default="cpu", help="torch device for training (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the task's, 1 for digits and charlm, else torch's; 1 "
                        "is often fastest for small models and when several workers share a machine)")
    p.add_argument("--train-seed", type=int, default=0,
                   help="model init and batch order, the same for every trial (default 0)")
    p.add_argument("--seed", type=int, default=0,
                   help="sampler seed (default 0); give each concurrent worker its own")
    p.add_argument("--timeout", type=float, default=None, help="stop this process after so many seconds")
    p.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between a running trial's heartbeats (default 10)")
    p.add_argument("--grace", type=int, default=None,
                   help="seconds without heartbeat before a trial counts as dead and is re-queued "
                        "(default 2x heartbeat)")
    p.add_argument("--max-retry", type=int, default=3,
                   help="re-queue a dead trial at most so often (default 3)")
    p.add_argument("--out", default=".", help="folder for the Pareto PNG and the best recipe (default .)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_tune)
    return p


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [x.strip() for x in text.split(",") if x.strip()]


def run_tune(args: argparse.Namespace) -> int:
    """Run the ``tune`` sub-command; returns the exit status (0 ok, 2 bad input or unreachable storage)."""
    import optuna

    from ..tasks import get_task
    from . import report, storage, study

    try:
        if args.trials is None or args.trials <= 0:
            raise ValueError(f"--trials must be a positive int, got {args.trials}")
        task = get_task(args.task)
        metrics = _split(args.objectives) or [task.primary_metric, "gbitops"]
        name = args.study or f"{args.policy}-{task.name}"
        threads = args.threads if args.threads is not None else task.defaults.get("threads")
        if threads is not None:
            if threads <= 0:
                raise ValueError(f"--threads must be a positive int, got {threads}")
            import torch

            torch.set_num_threads(threads)
        out = Path(args.out)
        if not out.is_dir():
            raise ValueError(f"--out folder {str(out)!r} does not exist")
        train_kwargs: dict[str, Any] = {"seed": args.train_seed, "device": args.device}
        for k in ("epochs", "batch_size", "lr"):
            if getattr(args, k) is not None:
                train_kwargs[k] = getattr(args, k)
        from .task import task_train_fn

        obj = study.objective(task_train_fn(task, **train_kwargs), args.policy, metrics,
                              _split(args.directions))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        st = study.create_study(name, args.storage, policy=args.policy, metrics=metrics,
                                directions=_split(args.directions), seed=args.seed,
                                heartbeat_interval=args.heartbeat, grace_period=args.grace,
                                max_retry=args.max_retry)
    except (ValueError, TypeError, storage.StorageError) as exc:
        print(f"adaprec tune: error: {exc}", file=sys.stderr)
        return 2

    goals = ", ".join(f"{m} ({d})" for m, d in zip(metrics, obj.directions))
    print(f"study {name!r} in {storage.redact(str(args.storage or storage.DEFAULT_STORAGE))}: "
          f"tuning {args.policy} on {task.name}, objectives {goals}")
    study.optimize(st, obj, args.trials, timeout=args.timeout, progress=not args.no_progress)

    try:
        front = study.pareto_front(st)
    except ValueError as exc:
        print(f"adaprec tune: {exc}", file=sys.stderr)
        return 1
    n_done = len(st.get_trials(deepcopy=False, states=study.FINISHED))
    print(f"\n{n_done} finished trial(s); Pareto front ({len(front)}), * = paper default:\n")
    print(report.pareto_table(st, metrics))
    png = report.plot_pareto(st, out / f"{name}-pareto.png", metrics)
    recipe = study.write_best_recipe(st, out / f"{name}-best.toml")
    print(f"\nPareto plot: {png}\nbest recipe (trial {study.choose_trial(st).number}): {recipe}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m adaprec.tune ...``: the ``tune`` sub-command on its own."""
    parser = argparse.ArgumentParser(prog="python -m adaprec.tune")
    sub = parser.add_subparsers(dest="command")
    add_tune_parser(sub)
    args = parser.parse_args(["tune", *(sys.argv[1:] if argv is None else argv)])
    return run_tune(args)
