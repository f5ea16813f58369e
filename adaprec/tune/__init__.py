"""Tune any policy's knobs with Optuna: multi-objective (accuracy vs cost), resumable, distributed.

In a few lines: give a train function that takes a policy and returns metrics, and get a study whose
Pareto front trades accuracy against GBitOPs, then a policy (or recipe file) from the trial you pick::

    from adaprec import tune

    def train_fn(policy, report):            # report(epoch, {"accuracy": acc}) lets 1-metric studies prune
        ...train under adaprec.Controller(model, policy=policy, ...)...
        return {"accuracy": acc, "gbitops": ctl.report()["gbitops"]}

    study = tune.tune(train_fn, "cpt", n_trials=30, study_name="cpt-digits")   # sqlite:///adaprec-studies.db
    print(tune.pareto_table(study))
    policy = tune.policy_from(study)                 # or policy_from(study, trial=<a Pareto trial>)
    tune.write_best_recipe(study, "cpt-tuned.toml")

Pieces: :func:`objective` (the Optuna objective), :func:`create_study` (storage, seeded multivariate TPE,
paper default enqueued first, directions from metric names), :func:`optimize` (runs until the study
holds N finished trials, so re-running resumes and several processes share the budget),
:func:`pareto_front`, :func:`policy_from`, :func:`write_best_recipe`, :func:`plot_pareto`, the storage
helpers in :mod:`adaprec.tune.storage` and the ``adaprec tune`` command in :mod:`adaprec.tune.cli`.

Example:
    >>> import optuna
    >>> from adaprec import tune
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> fn = lambda policy, report: {"val_loss": abs(policy.config()["bits"] - 6) + 0.1}
    >>> study = tune.tune(fn, "fixed", n_trials=5, metrics=("val_loss",), progress=False,
    ...                   storage=optuna.storages.InMemoryStorage())
    >>> tune.policy_from(study).config()["bits"] == study.best_params["bits"]
    True
"""

from .cli import add_tune_parser, run_tune
from .report import dominates, pareto_table, plot_pareto, trials_table
from .space import has_search_space, metric_directions, paper_trial_params, suggest, tunable_policies
from .storage import DEFAULT_STORAGE, StorageError, open_storage
from .study import (
    FINISHED,
    EpochReporter,
    Objective,
    choose_trial,
    create_study,
    objective,
    optimize,
    pareto_front,
    policy_from,
    study_info,
    tune,
    write_best_recipe,
)
from .task import task_train_fn

__all__ = [
    "objective", "Objective", "EpochReporter", "create_study", "optimize", "tune", "study_info",
    "pareto_front", "choose_trial", "policy_from", "write_best_recipe", "pareto_table", "trials_table",
    "plot_pareto", "dominates", "suggest", "has_search_space", "tunable_policies", "paper_trial_params",
    "metric_directions", "open_storage", "StorageError", "DEFAULT_STORAGE", "FINISHED", "task_train_fn",
    "add_tune_parser", "run_tune",
]
