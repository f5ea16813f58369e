"""adaprec.tune: real small studies, Pareto fronts, tuned policies, resume, crash recovery, bad input."""

from __future__ import annotations

import argparse
import math
import time

import optuna
import pytest
from optuna.trial import TrialState

from adaprec import tune
from adaprec.policies import load_recipe, make_policy
from adaprec.tune.storage import HEARTBEAT_KEY, StorageError, open_storage, redact

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train several times faster on one thread, and the suite shares a few cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic(policy, report):
    """A deterministic stand-in for training: accuracy rises and cost grows with the bits."""
    cfg = policy.config()
    bits, grad = cfg["bits"], cfg.get("grad_bits", cfg["bits"])
    for epoch in range(3):
        report(epoch, {"accuracy": (1 - 0.7 ** bits) * (epoch + 1) / 3})
    return {"accuracy": 1 - 0.7 ** bits - 0.001 * grad, "gbitops": bits * bits + 2.0 * bits * grad}


def _storage_studies(url):
    return optuna.get_all_study_names(storage=url)


# --- a small real study through the CLI -------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``adaprec tune`` on the digits task: CPT, 3 trials of 1 epoch (45 steps), SQLite storage."""
    out = tmp_path_factory.mktemp("cli")
    url = f"sqlite:///{out / 'studies.db'}"
    sub = argparse.ArgumentParser(prog="adaprec").add_subparsers(dest="command")
    parser = tune.add_tune_parser(sub)
    args = parser.parse_args(["--policy", "cpt", "--task", "digits", "--trials", "3", "--storage", url,
                              "--study", "cpt-digits", "--epochs", "1", "--batch-size", "32",
                              "--out", str(out), "--no-progress"])
    rc = args.func(args)
    return rc, out, url


def test_cli_study_completes_and_writes_outputs(cli_run, capsys):
    rc, out, url = cli_run
    assert rc == 0
    study = optuna.load_study(study_name="cpt-digits", storage=url)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 3
    # The paper default (CPT 3-8/8, 32 cosine cycles) runs first and is marked.
    first = study.trials[0]
    assert first.user_attrs["paper_default"] is True
    assert first.user_attrs["policy_config"]["bits"] == [3, 8]
    for t in done:
        acc, cost = t.values
        assert 0.0 < acc <= 1.0 and cost > 0
        assert t.user_attrs["metrics"]["accuracy"] == acc
    assert (out / "cpt-digits-pareto.png").stat().st_size > 1000
    name, params = load_recipe(out / "cpt-digits-best.toml")
    assert name == "cpt"
    assert make_policy(name, **params).config() == tune.policy_from(study).config()


def test_pareto_front_is_non_dominated(cli_run):
    study = optuna.load_study(study_name="cpt-digits", storage=cli_run[2])
    dirs = ("maximize", "minimize")
    front = tune.pareto_front(study)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert front
    for f in front:
        assert not any(tune.dominates(t.values, f.values, dirs) for t in done)
    for t in done:
        if t.number not in {f.number for f in front}:
            assert any(tune.dominates(f.values, t.values, dirs) or f.values == t.values for f in front)
    # best first on the first metric (accuracy)
    accs = [f.values[0] for f in front]
    assert accs == sorted(accs, reverse=True)


def test_tuned_policy_reproduces_its_trial(cli_run):
    """Rebuilding a trial's policy gives the same knobs, and retraining it gives the same metrics."""
    study = optuna.load_study(study_name="cpt-digits", storage=cli_run[2])
    fn = tune.task_train_fn("digits", epochs=1, batch_size=32, seed=0)
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        policy = tune.policy_from(study, t.number)
        assert policy.config() == t.user_attrs["policy_config"]
        assert tune.suggest("cpt", optuna.trial.FixedTrial(t.params))["cycles"] == t.params["cycles"]
    best = tune.choose_trial(study)
    again = fn(tune.policy_from(study, best), lambda epoch, m: None)
    assert again["accuracy"] == pytest.approx(best.values[0], abs=1e-12)
    assert again["gbitops"] == pytest.approx(best.values[1], rel=1e-12)


def test_cli_rerun_resumes_and_stops_at_budget(cli_run, capsys):
    _, out, url = cli_run
    sub = argparse.ArgumentParser(prog="adaprec").add_subparsers(dest="command")
    p = tune.add_tune_parser(sub)
    args = p.parse_args(["--policy", "cpt", "--trials", "3", "--storage", url, "--study", "cpt-digits",
                         "--out", str(out), "--no-progress"])
    assert tune.run_tune(args) == 0  # already 3 finished trials: nothing new runs
    printed = capsys.readouterr().out
    assert "3 finished trial(s)" in printed and "| trial | accuracy | gbitops |" in printed
    study = optuna.load_study(study_name="cpt-digits", storage=url)
    assert len(study.trials) == 3


# --- resume --------------------------------------------------------------------------------------

def test_interrupted_study_resumes_to_n_without_duplicates(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    calls = {"n": 0}

    def interrupted_after_4(policy, report):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the 5th trial
        return synthetic(policy, report)

    study = tune.create_study("resume", url, policy="fixed")
    with pytest.raises(KeyboardInterrupt):
        tune.optimize(study, tune.objective(interrupted_after_4, "fixed"), 10, progress=False)
    before = {t.number: (t.params, t.values) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert len(before) == 4

    # A new process: same name, same storage.
    again = tune.create_study("resume", url, policy="fixed")
    tune.optimize(again, tune.objective(synthetic, "fixed"), 10, progress=False)
    trials = again.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 10
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # the interrupted trial is kept as failed; any other failure is a skipped duplicate proposal
    assert [t.number for t in failed if "duplicate_of" not in t.user_attrs] == [4]
    assert len({t.number for t in trials}) == len(trials)
    assert sum(bool(t.user_attrs.get("paper_default")) for t in trials) == 1  # default not re-queued
    for t in complete:
        if t.number in before:
            assert (t.params, t.values) == before[t.number]
    params = [tuple(sorted(t.params.items())) for t in complete]
    assert len(set(params)) == len(params), "the resumed run repeated earlier points"


def test_journal_storage_retries_a_dead_trial(tmp_path):
    """A worker that dies mid-trial (its heartbeat stops) gets its trial failed and re-run."""
    path = str(tmp_path / "s.journal")
    study = tune.create_study("j", path, policy="fixed", heartbeat_interval=1, grace_period=1)
    tune.optimize(study, tune.objective(synthetic, "fixed"), 2, progress=False)
    with pytest.warns(UserWarning, match="Heartbeat"):  # Optuna: heartbeats are meant for optimize()
        dead = study.ask()  # a trial some worker started and never finished
    dead.suggest_int("bits", 2, 16)
    dead.suggest_int("grad_bits", 4, 16)
    time.sleep(1.5)
    other = tune.create_study("j", path, policy="fixed", heartbeat_interval=1, grace_period=1)
    tune.optimize(other, tune.objective(synthetic, "fixed"), 4, progress=False)
    trials = {t.number: t for t in other.get_trials()}
    assert trials[dead.number].state == TrialState.FAIL
    retried = [t for t in trials.values() if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == trials[dead.number].params
    others = [t for n, t in trials.items() if n != dead.number]
    assert all(t.state == TrialState.COMPLETE or "duplicate_of" in t.user_attrs for t in others)
    assert sum(t.state == TrialState.COMPLETE for t in others) == 4
    assert HEARTBEAT_KEY in retried[0].system_attrs  # the running trial beat while it ran


# --- pruning -------------------------------------------------------------------------------------

def test_single_objective_prunes_and_multi_objective_does_not():
    mem = optuna.storages.InMemoryStorage()
    study = tune.create_study("p", mem, policy="fixed", metrics=("accuracy",), seed=1,
                              pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    tune.optimize(study, tune.objective(synthetic, "fixed", metrics=("accuracy",)), 25, progress=False)
    states = [t.state for t in study.trials]
    assert TrialState.PRUNED in states
    assert all(t.intermediate_values for t in study.trials if t.state == TrialState.COMPLETE)

    multi = tune.create_study("m", mem, policy="fixed", metrics=("accuracy", "gbitops"))
    tune.optimize(multi, tune.objective(synthetic, "fixed"), 3, progress=False)
    assert all(not t.intermediate_values and t.state == TrialState.COMPLETE for t in multi.trials)
    with pytest.raises(ValueError, match="cannot prune"):
        tune.create_study("m2", mem, policy="fixed", pruner=optuna.pruners.MedianPruner())


# --- bad input -----------------------------------------------------------------------------------

def test_unknown_policy_and_policy_without_search_space(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(ValueError, match="unknown policy 'nope'.*fixed"):
        tune.create_study("x", url, policy="nope")
    with pytest.raises(ValueError, match="'fp32' defines no search space.*tunable policies"):
        tune.create_study("x", url, policy="fp32")
    with pytest.raises(ValueError, match="no search space"):
        tune.objective(synthetic, "fp32")
    assert _storage_studies(url) == []  # nothing was created


@pytest.mark.parametrize("metrics, directions, match", [
    (("accuracy", "gbitops"), ("maximize",), "one direction per metric"),
    (("accuracy",), ("minimize",), "always maximized"),
    (("gbitops", "gbitops"), None, "distinct"),
    (("speed",), None, "no known direction"),
    (("speed",), ("up",), "must be one of"),
    ((), None, "one or more"),
])
def test_conflicting_metrics_and_directions(metrics, directions, match):
    with pytest.raises(ValueError, match=match):
        tune.create_study("x", optuna.storages.InMemoryStorage(), policy="fixed", metrics=metrics,
                          directions=directions)


def test_existing_study_is_not_changed_by_conflicting_settings(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = tune.create_study("s", url, policy="fixed")
    tune.optimize(study, tune.objective(synthetic, "fixed"), 2, progress=False)
    snapshot = [(t.number, t.state, t.values) for t in study.trials]
    with pytest.raises(ValueError, match="tunes policy 'fixed' on metrics"):
        tune.create_study("s", url, policy="fixed", metrics=("accuracy",))
    with pytest.raises(ValueError, match="tunes policy 'fixed'"):
        tune.create_study("s", url, policy="cpt")
    with pytest.raises(ValueError, match="already exists"):
        tune.create_study("s", url, policy="fixed", load_if_exists=False)
    with pytest.raises(ValueError, match="but the objective tunes"):
        tune.optimize(study, tune.objective(synthetic, "fixed", metrics=("accuracy",)), 3)
    reloaded = optuna.load_study(study_name="s", storage=url)
    assert [(t.number, t.state, t.values) for t in reloaded.trials] == snapshot
    assert reloaded.user_attrs["adaprec:metrics"] == ["accuracy", "gbitops"]


def test_unreachable_or_unknown_storage(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://bob:secret@127.0.0.1:{port}/studies"
    with pytest.raises(StorageError, match="cannot reach storage") as info:
        tune.create_study("x", url, policy="fixed")
    assert "secret" not in str(info.value) and "bob:***@" in str(info.value)
    with pytest.raises(StorageError, match="cannot reach"):
        open_storage(f"sqlite:///{tmp_path / 'missing' / 's.db'}")
    with pytest.raises(StorageError, match="unknown database kind 'nosuchdb'"):
        open_storage("nosuchdb://host/x")
    with pytest.raises(StorageError, match="does not exist"):
        open_storage(str(tmp_path / "missing" / "s.journal"))
    with pytest.raises(ValueError, match="cannot tell what storage"):
        open_storage(str(tmp_path / "studies.txt"))
    with pytest.raises(ValueError, match="heartbeat_interval"):
        open_storage(None, heartbeat_interval=0)
    assert redact("sqlite:///x.db") == "sqlite:///x.db"


def test_broken_train_functions_fail_clearly_and_keep_the_study(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = tune.create_study("b", url, policy="fixed")
    tune.optimize(study, tune.objective(synthetic, "fixed"), 2, progress=False)
    with pytest.raises(TypeError, match="must return a dict"):
        tune.optimize(study, tune.objective(lambda p, r: 0.5, "fixed"), 3, progress=False)
    with pytest.raises(KeyError, match="returned no \\['gbitops'\\]"):
        tune.optimize(study, tune.objective(lambda p, r: {"accuracy": 0.5}, "fixed"), 3, progress=False)

    def diverges(policy, report):
        if policy.config()["bits"] < 6:
            return {"accuracy": 0.1, "gbitops": math.nan}
        return synthetic(policy, report)

    tune.optimize(study, tune.objective(diverges, "fixed"), 5, progress=False)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 5 and TrialState.FAIL in states
    assert states[:2] == [TrialState.COMPLETE, TrialState.COMPLETE]
    failed = [t for t in study.trials if t.user_attrs.get("fail_reason")]
    assert all("gbitops" in t.user_attrs["fail_reason"] for t in failed)

    def rejects(policy, report):  # a configuration the run cannot take fails only its own trial
        if policy.config()["bits"] % 2:
            raise ValueError("odd bits do not suit this run")
        return synthetic(policy, report)

    tune.optimize(study, tune.objective(rejects, "fixed"), 8, progress=False)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 8
    rejected = [t for t in study.trials if "odd bits" in t.user_attrs.get("fail_reason", "")]
    assert rejected and all(t.state == TrialState.FAIL and t.params["bits"] % 2 for t in rejected)
    with pytest.raises(ValueError, match="not COMPLETE"):
        tune.policy_from(study, study.trials[2].number)
    with pytest.raises(ValueError, match="no trial number 99"):
        tune.policy_from(study, 99)
    with pytest.raises(ValueError, match="positive int"):
        tune.optimize(study, tune.objective(synthetic, "fixed"), 0)


def test_every_tunable_builtin_policy_has_a_working_space_and_default():
    assert {"cpt", "muppet", "fixed"} <= set(tune.tunable_policies())
    for name in ("cpt", "muppet"):  # the enqueued default is exactly the registered default
        params = tune.paper_trial_params(name)
        assert make_policy(name, **tune.suggest(name, optuna.trial.FixedTrial(params))).config() == \
            make_policy(name).config()
    default = optuna.trial.FixedTrial(tune.paper_trial_params("fixed"))
    fixed = make_policy("fixed", **tune.suggest("fixed", default))
    assert fixed.decide(None) == make_policy("fixed", bits=8, grad_bits=8).decide(None)

    def anything(policy, report):
        text = repr(policy.config())
        return {"accuracy": (len(text) % 17) / 17, "gbitops": float(len(text))}

    for name in ("cpt", "muppet"):
        study = tune.create_study(name, optuna.storages.InMemoryStorage(), policy=name)
        tune.optimize(study, tune.objective(anything, name), 4, progress=False)
        assert study.trials[0].user_attrs["paper_default"] is True
        for t in study.get_trials(states=(TrialState.COMPLETE,)):
            assert tune.policy_from(study, t).config() == t.user_attrs["policy_config"]


def test_registered_as_adaprec_subcommand(tmp_path, capsys):
    from adaprec.cli import main

    assert main(["tune", "--policy", "nope", "--trials", "1", "--storage", str(tmp_path / "s.journal")]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err


def test_cli_bad_input_exits_2(tmp_path, capsys):
    sub = argparse.ArgumentParser(prog="adaprec").add_subparsers(dest="command")
    p = tune.add_tune_parser(sub)
    url = f"sqlite:///{tmp_path / 's.db'}"
    cases = [(["--policy", "nope", "--trials", "2"], "unknown policy"),
             (["--policy", "fp32", "--trials", "2"], "no search space"),
             (["--policy", "fixed", "--trials", "2", "--objectives", "accuracy,speed"], "no known direction"),
             (["--policy", "fixed", "--trials", "0"], "--trials must be a positive int"),
             (["--policy", "fixed", "--trials", "2", "--storage", "nosuchdb://x"], "unknown database")]
    for argv, msg in cases:
        args = p.parse_args([*argv, "--storage", url, "--out", str(tmp_path)] if "--storage" not in argv
                            else [*argv, "--out", str(tmp_path)])
        assert tune.run_tune(args) == 2
        assert msg in capsys.readouterr().err
    assert _storage_studies(url) == []
