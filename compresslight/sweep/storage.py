"""Where a sweep's study lives: opening its storage, and setting it up safely when workers start together.

Optuna creates its tables the first time a storage URL is opened, and two workers that open a new
database at the same moment race on that: on SQLite one fails with "table studies already exists",
on PostgreSQL with a duplicate `studydirection` type. `setup_lock` serializes the set-up (schema,
study, base trial) of all workers of one storage:

| storage | lock |
|---|---|
| `sqlite:///PATH` | a file lock beside the database (`PATH.lock`, the `filelock` package); one machine |
| `postgresql[+driver]://...` | a PostgreSQL advisory lock, held by the server: works across machines |
| anything else | none: start the first worker alone, then the others |

The lock is held for the set-up only (a second or less), never while trials run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import filelock
import optuna
import sqlalchemy

# Any fixed 64-bit number: every worker asks the server for the same advisory lock.
_POSTGRES_LOCK_KEY = 0x636F6D7072657373  # "compress"
_LOCK_TIMEOUT_S = 120.0


@contextlib.contextmanager
def setup_lock(url: str, timeout_s: float = _LOCK_TIMEOUT_S) -> Iterator[None]:
    """Holds the storage's set-up lock (see the module docstring) while the block runs.

    Raises:
        TimeoutError: if another worker held a SQLite file's lock for `timeout_s` seconds.
    """
    if url.startswith("sqlite:///"):
        lock_path = url[len("sqlite:///") :] + ".lock"
        try:
            with filelock.FileLock(lock_path, timeout=timeout_s):
                yield
        except filelock.Timeout as error:
            raise TimeoutError(
                f"Another sweep worker has held {lock_path!r} for {timeout_s:.0f} s while setting up the study; "
                f"if no worker runs, delete that file."
            ) from error
    elif sqlalchemy.engine.make_url(url).get_backend_name() == "postgresql":
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                # A session-level lock: the server releases it when the connection closes, so a
                # worker killed while holding it blocks nobody.
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _POSTGRES_LOCK_KEY})
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _POSTGRES_LOCK_KEY})
        finally:
            engine.dispose()
    else:
        yield


def open_storage(url: str, heartbeat_s: int | None = None) -> optuna.storages.RDBStorage:
    """Opens (creating if needed, under `setup_lock`) the Optuna storage at `url`.

    A SQLite file's folder is created. Heartbeats let a resumed sweep find trials whose worker
    was killed on another machine: they are marked failed and their parameters retried once.

    Raises:
        ValueError: if the URL is malformed, its database driver is missing or it cannot be opened.
    """
    if url.startswith("sqlite:///"):
        database = Path(url[len("sqlite:///") :])
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(
                f"`storage` {url!r} cannot be opened: cannot create the folder {str(database.parent)!r} ({error})."
            ) from error
    try:
        with warnings.catch_warnings():
            # Heartbeats are "experimental" in Optuna since 2.9; the sweep relies on them knowingly.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            heartbeat = {} if heartbeat_s is None else {
                "heartbeat_interval": heartbeat_s,
                "grace_period": 2 * heartbeat_s,
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            }  # fmt: skip
            with setup_lock(url):
                return optuna.storages.RDBStorage(url, **heartbeat)
    except TimeoutError:
        raise
    except Exception as error:  # SQLAlchemy raises ArgumentError, OperationalError, ImportError, ...
        hint = ""
        if isinstance(error, ImportError) and "psycopg" in str(error):
            hint = " PostgreSQL needs its driver: pip install -e '.[sweep]' and a postgresql+psycopg:// URL."
        raise ValueError(
            f"`storage` must be a database URL Optuna can open (e.g. sqlite:///runs/sweeps/NAME.db, "
            f"postgresql+psycopg://user:password@host/db), got {url!r}: {type(error).__name__}: {error}.{hint}"
        ) from error


__all__ = ["open_storage", "setup_lock"]
