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

from typing import Any as _Any

#: Where studies go when no storage is given: a SQLite file in the current folder. (Defined here, not in
#: :mod:`adaprec.tune.storage`, so that the CLI can show it without importing Optuna.)
DEFAULT_STORAGE = "sqlite:///adaprec-studies.db"

# Names and the sub-module that defines them. They are imported on first use (PEP 562), so that
# ``adaprec tune --help`` and ``import adaprec.tune.cli`` do not load Optuna.
_EXPORTS = {
    "cli": ("add_tune_parser", "run_tune"),
    "report": ("dominates", "pareto_table", "plot_pareto", "trials_table"),
    "space": ("has_search_space", "metric_directions", "paper_trial_params", "suggest", "tunable_policies"),
    "storage": ("StorageError", "open_storage"),
    "study": ("FINISHED", "EpochReporter", "Objective", "choose_trial", "create_study", "objective",
              "optimize", "pareto_front", "policy_from", "study_info", "tune", "write_best_recipe"),
    "task": ("task_train_fn",),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> _Any:
    if name in _WHERE:
        import importlib

        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # later look-ups are plain attribute reads
        return value
    raise AttributeError(f"module 'adaprec.tune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "objective", "Objective", "EpochReporter", "create_study", "optimize", "tune", "study_info",
    "pareto_front", "choose_trial", "policy_from", "write_best_recipe", "pareto_table", "trials_table",
    "plot_pareto", "dominates", "suggest", "has_search_space", "tunable_policies", "paper_trial_params",
    "metric_directions", "open_storage", "StorageError", "DEFAULT_STORAGE", "FINISHED", "task_train_fn",
    "add_tune_parser", "run_tune",
]
