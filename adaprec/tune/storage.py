"""Where studies live: SQLite by default, any SQLAlchemy database URL, or an Optuna journal file.

:func:`open_storage` turns a user's storage spec into an Optuna storage with a *heartbeat*: every
running trial records that it is alive every ``heartbeat_interval`` seconds, and a trial silent for
``grace_period`` seconds (its worker was killed) is marked failed by the next worker that asks for a
trial, which re-queues it with the same parameters (Optuna's ``RetryHeartbeatStaleTrialCallback``, the
successor of ``RetryFailedTrialCallback``). Completed trials are never touched, so a killed worker only
loses the trial it was running, and that trial is run again.

Specs:

* ``None`` - ``sqlite:///adaprec-studies.db`` in the working directory (re-run the same study name to
  resume it);
* a database URL - ``sqlite:///path.db``, ``postgresql://user:pw@host/db``, ``mysql+pymysql://...``;
* a path ending in ``.log`` or ``.journal`` - an Optuna journal file, safe for several processes on one
  machine or on a shared file system; Optuna has no heartbeat for journals, so this module adds one
  (the trial's system attribute ``adaprec:heartbeat``, wall-clock seconds: the workers' clocks must
  agree to within the grace period);
* a path ending in ``.db``, ``.sqlite`` or ``.sqlite3`` - that SQLite file;
* an ``optuna.storages.BaseStorage`` object - used as given.

Example:
    >>> import tempfile, os
    >>> from adaprec.tune.storage import open_storage, storage_url
    >>> d = tempfile.mkdtemp()
    >>> type(open_storage(os.path.join(d, "studies.journal"))).__name__
    'HeartbeatJournalStorage'
    >>> storage_url(os.path.join(d, "a.db")).startswith("sqlite:///")
    True
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from . import DEFAULT_STORAGE  # defined in the package, so that the CLI shows it without Optuna

__all__ = ["DEFAULT_STORAGE", "StorageError", "open_storage", "storage_url", "redact",
           "HeartbeatJournalStorage"]

_JOURNAL_SUFFIXES = (".log", ".journal")
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
HEARTBEAT_KEY = "adaprec:heartbeat"


class StorageError(RuntimeError):
    """The study storage cannot be opened or reached (the message says which and why).

    Example:
        >>> try:
        ...     open_storage("nosuchdb://host/studies")
        ... except StorageError as exc:
        ...     print(str(exc).split(":")[0])
        cannot open storage 'nosuchdb
    """


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for error messages and logs).

    Example:
        >>> redact("postgresql://bob:secret@db:5432/studies")
        'postgresql://bob:***@db:5432/studies'
    """
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def storage_url(spec: str | Path | None) -> str:
    """Normalise a storage spec to a URL, or to the journal path it names (see the module docstring)."""
    if spec is None:
        return DEFAULT_STORAGE
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"storage must be a database URL or a file path, got {spec!r}")
    if "://" in spec:
        return spec
    if spec.endswith(_JOURNAL_SUFFIXES):
        return spec
    if spec.endswith(_SQLITE_SUFFIXES):
        return "sqlite:///" + str(Path(spec).resolve())
    raise ValueError(f"cannot tell what storage {spec!r} is: give a database URL (sqlite:///file.db, "
                     f"postgresql://user:pw@host/db), a journal file ending in {_JOURNAL_SUFFIXES} or a "
                     f"SQLite file ending in {_SQLITE_SUFFIXES}")


def open_storage(spec: str | Path | BaseStorage | None = None, *, heartbeat_interval: int | None = 10,
                 grace_period: int | None = None, max_retry: int | None = 3) -> BaseStorage:
    """An Optuna storage for ``spec`` with heartbeat and retry of stale trials.

    ``heartbeat_interval`` (seconds, ``None`` to disable), ``grace_period`` (seconds of silence before a
    running trial counts as dead; default twice the interval) and ``max_retry`` (how often one trial's
    parameters are re-queued; ``None`` = forever) configure crash recovery. Raises :class:`StorageError`
    when the database cannot be reached, ``ValueError`` for a spec of no known kind.
    """
    if isinstance(spec, BaseStorage):
        return spec
    for name, v in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ValueError(f"{name} must be a positive number of seconds (int) or None, got {v!r}")
    if max_retry is not None and (isinstance(max_retry, bool) or not isinstance(max_retry, int)
                                  or max_retry < 0):
        raise ValueError(f"max_retry must be a non-negative int or None, got {max_retry!r}")
    url = storage_url(spec)
    with _quiet_experimental():
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry) if heartbeat_interval else None
    if "://" not in url:
        return _open_journal(url, heartbeat_interval, grace_period, retry)
    return _open_rdb(url, heartbeat_interval, grace_period, retry)


def _open_journal(path: str, interval: int | None, grace: int | None,
                  retry: Callable[..., None] | None) -> BaseStorage:
    p = Path(path)
    if not p.parent.is_dir():
        raise StorageError(f"cannot open journal storage {path!r}: folder {str(p.parent)!r} does not exist")
    try:
        backend = JournalFileBackend(str(p))
        return HeartbeatJournalStorage(backend, heartbeat_interval=interval, grace_period=grace,
                                       stale_trial_callback=retry)
    except OSError as exc:
        raise StorageError(f"cannot open journal storage {path!r}: {exc}") from exc


def _open_rdb(url: str, interval: int | None, grace: int | None,
              retry: Callable[..., None] | None) -> BaseStorage:
    import sqlalchemy.exc

    url = _postgres_driver(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "postgres")):
        # Fail in seconds, not after the OS's TCP timeout, when the server is down or unroutable.
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    elif url.startswith("sqlite"):
        # Several processes on one SQLite file: wait for the writer instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 30}
    try:
        with _quiet_experimental():
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
                              grace_period=grace, heartbeat_stale_trial_callback=retry)
    except ImportError as exc:
        missing = getattr(exc.__cause__, "name", None) or str(exc)
        raise StorageError(f"cannot open storage {redact(url)!r}: its database driver is not installed "
                           f"(missing module {missing!r}); e.g. pip install psycopg2-binary for "
                           "PostgreSQL") from None
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageError(f"cannot open storage {redact(url)!r}: unknown database kind "
                           f"{url.split('://', 1)[0]!r}; use sqlite:///, postgresql://, mysql+pymysql:// "
                           f"or a journal file path ending in {_JOURNAL_SUFFIXES}") from None
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise StorageError(f"cannot reach storage {redact(url)!r}: {reason}") from None


def _postgres_driver(url: str) -> str:
    """Pick an installed PostgreSQL driver for a URL that names none.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, while adaprec's test extra installs
    psycopg2; ``postgres://`` (as printed by many hosting services) is not a SQLAlchemy name at all.
    """
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2" + sep + rest
    return "postgresql" + sep + rest


class _quiet_experimental:
    """Heartbeat options are 'experimental' in Optuna; the warning is noise for adaprec users."""

    def __enter__(self) -> None:
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """An Optuna journal storage with the heartbeat Optuna only provides for databases.

    Implementing Optuna's heartbeat protocol lets ``study.optimize`` run its own heartbeat thread and
    stale-trial check unchanged: each running trial stores the time of its last beat as a system
    attribute, and a running trial whose last beat (or start) is older than ``grace_period`` is stale.

    Example:
        >>> import tempfile, os
        >>> from optuna.storages.journal import JournalFileBackend
        >>> path = os.path.join(tempfile.mkdtemp(), "s.log")
        >>> s = HeartbeatJournalStorage(JournalFileBackend(path), heartbeat_interval=5)
        >>> s.get_heartbeat_interval(), s.grace_period
        (5, 10)
    """

    def __init__(self, backend: Any, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> None:
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period or (2 * heartbeat_interval if heartbeat_interval else None)
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
        except (UpdateFinishedTrialError, KeyError):
            # The trial was finished (or failed as stale by another worker) meanwhile: nothing to keep alive.
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if not self.grace_period:
            return []
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            last = t.system_attrs.get(HEARTBEAT_KEY)
            if last is None and t.datetime_start is not None:
                last = t.datetime_start.timestamp()
            if last is not None and now - float(last) > self.grace_period:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.stale_trial_callback
