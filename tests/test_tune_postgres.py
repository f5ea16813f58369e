"""A distributed study on a real PostgreSQL server: two workers, one killed mid-trial, nothing lost.

The test starts its own server (initdb + pg_ctl, loopback only, a free port, a temporary folder; as the
``postgres`` account when run as root, since PostgreSQL refuses to run as root) and always stops it.
It skips, saying why, only where PostgreSQL is not installed or cannot start; ``.ci/run`` installs
Debian's ``postgresql`` package.

The workers run a synthetic train function that sleeps: the point here is the storage, the heartbeat
and the retry of a killed worker's trial, not the training (``test_tune.py`` trains for real).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)

N_TRIALS = 10
ROOT = Path(__file__).resolve().parents[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd)]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server for this module: start it, yield its URL, always stop it."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
                    ".ci/run installs Debian's postgresql package")
    if os.geteuid() == 0:
        try:
            server_user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' account to run the server as "
                        "(PostgreSQL refuses to run as root)")
    base = Path(tempfile.mkdtemp(prefix="adaprec-pg-"))
    data, log = base / "data", base / "server.log"
    if os.geteuid() == 0:
        os.chown(base, server_user.pw_uid, server_user.pw_gid)
    port = _free_port()
    started = False
    try:
        init = subprocess.run(_as_server_user([initdb, "-D", str(data), "-U", "adaprec", "-A", "trust",
                                               "-E", "UTF8", "--no-sync"]),
                              capture_output=True, text=True, timeout=60)
        if init.returncode != 0:
            pytest.skip(f"initdb failed, PostgreSQL cannot run here: {init.stderr.strip()[-400:]}")
        opts = f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off -c max_connections=50"
        start = subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-o", opts, "-l", str(log),
                                                "-w", "-t", "30", "start"]),
                               capture_output=True, text=True, timeout=60)
        started = start.returncode == 0
        if not started:
            detail = log.read_text()[-400:] if log.exists() else start.stderr
            pytest.skip(f"the PostgreSQL server did not start: {detail.strip()}")
        yield f"postgresql://adaprec@127.0.0.1:{port}/postgres"
    finally:
        if data.exists():
            subprocess.run(_as_server_user([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


WORKER = textwrap.dedent("""
    import os, sys, time
    import optuna
    from adaprec import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name, n_trials, role, marker = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    calls = 0

    def announce(path, text):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def train_fn(policy, report):
        global calls
        calls += 1
        if role == "victim" and calls == 1:
            announce(marker + ".first", "")  # lets the survivor start: the two now overlap
        if role == "victim" and calls == 2:
            # Announce which trial it is training, then "train" until it is killed.
            announce(marker, str(report.trial.number))
            time.sleep(120)
        time.sleep(0.5)
        bits, grad = policy.config()["bits"], policy.config()["grad_bits"]
        return {"accuracy": 1 - 0.7 ** bits, "gbitops": bits * (bits + 2 * grad)}

    seed = 1 if role == "victim" else 2
    study = tune.create_study(name, url, policy="fixed", seed=seed, heartbeat_interval=1, grace_period=2)
    if role == "survivor":
        # Start once the victim is training, so the survivor cannot use up the budget before the victim
        # reaches the trial it dies in (imports take a variable time on a busy machine).
        while not os.path.exists(marker + ".first"):
            time.sleep(0.05)
    tune.optimize(study, tune.objective(train_fn, "fixed"), n_trials, progress=False)
""")


def _reader(url: str) -> optuna.storages.RDBStorage:
    """One storage object for all polls (a new one per poll would open a new connection pool each time)."""
    return optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg2://"))


def _trials(storage: optuna.storages.RDBStorage, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def test_killed_worker_loses_no_trial(postgres_url, tmp_path):
    from adaprec import tune

    name = "distributed"
    # Create the study (and queue the paper default) once, as a launcher script would, then start workers.
    tune.create_study(name, postgres_url, policy="fixed", heartbeat_interval=1, grace_period=2)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    marker = tmp_path / "victim-training"
    workers = [subprocess.Popen([sys.executable, str(script), postgres_url, name, str(N_TRIALS), role,
                                 str(marker)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
               for role in ("victim", "survivor")]
    victim, survivor = workers
    reader = _reader(postgres_url)
    try:
        # The victim completes one trial, then announces its second and hangs in it: kill it there.
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert time.monotonic() < deadline, "the victim never started its second trial"
            assert victim.poll() is None, f"the victim exited early:\n{victim.stdout.read()}"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        killed_number = int(marker.read_text())
        tag = f":{victim.pid}"
        after = {t.number: t for t in _trials(reader, name)}
        assert after[killed_number].state == TrialState.RUNNING  # orphaned: nobody will finish it
        assert after[killed_number].user_attrs["worker"].endswith(tag)
        completed_by_victim = {t.number: t.values for t in after.values()
                               if t.state == TrialState.COMPLETE and t.user_attrs["worker"].endswith(tag)}
        assert completed_by_victim, "the victim completed a trial before it was killed"
        out, _ = survivor.communicate(timeout=120)
        assert survivor.returncode == 0, out
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(timeout=10)

    trials = {t.number: t for t in _trials(reader, name)}
    killed = trials[killed_number]
    assert killed.state == TrialState.FAIL  # failed by the survivor's stale-trial check
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1, "the killed trial must be re-queued exactly once"
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == killed.params
    # The victim's completed trials are still there, unchanged.
    for number, values in completed_by_victim.items():
        assert trials[number].state == TrialState.COMPLETE and trials[number].values == values
    # Every trial is accounted for: completed, a skipped duplicate proposal, or failed and retried.
    retried = {t.system_attrs["failed_trial"] for t in trials.values() if "failed_trial" in t.system_attrs}
    for t in trials.values():
        assert (t.state == TrialState.COMPLETE or "duplicate_of" in t.user_attrs
                or (t.state == TrialState.FAIL and t.number in retried)), (t.number, t.state)
    n_complete = sum(t.state == TrialState.COMPLETE for t in trials.values())
    assert N_TRIALS <= n_complete <= N_TRIALS + 1  # one worker may finish a trial past the budget
    assert sum(bool(t.user_attrs.get("paper_default")) for t in trials.values()) == 1
    workers_seen = {t.user_attrs["worker"] for t in trials.values() if "worker" in t.user_attrs}
    assert len(workers_seen) == 2
    reader.remove_session()
    reader.engine.dispose()
