"""Which failures a flow retries, and how: the one place that decides.

Storage errors are classified by ``pipeline.buckets.ERROR_POLICY`` (timeouts,
5xx and throttling are transient; a missing object or refused credentials are
not).  Database errors are classified by ``DATABASE_POLICY`` below: a lost or
refused connection and a locked GeoPackage are transient; a wrong password, a
missing database or a refused permission are not.  Bad input (a file that is
not a raster, a scene without CRS) is never retried.

Tasks use it as ``@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S,
retry_condition_fn=retry_transient)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline import buckets
from pipeline.errors import SceneError

RETRIES = 3
RETRY_DELAYS_S = [10, 60, 300]  # backoff: a restarting database or a throttled bucket needs minutes
RETRY_JITTER = 0.3  # +-30 %, so N workers that failed together do not retry together


@dataclass(frozen=True, slots=True)
class DatabaseRule:
    """A row of ``DATABASE_POLICY``: error class names and message words it matches, and the verdict."""

    class_names: tuple[str, ...]
    words: tuple[str, ...]
    transient: bool


# First matching row wins; an error matches a row by its class name (psycopg's and sqlite3's
# classes, so neither is imported here) or by words in its message (StoreError carries them).
DATABASE_POLICY = (
    DatabaseRule((), ("password authentication failed", "no password supplied", "permission denied",
                      "does not exist", "cannot open as a crackmap", "versions are immutable",
                      "cannot be transformed"), False),
    DatabaseRule(("OperationalError", "InterfaceError", "ConnectionTimeout", "AdminShutdown",
                  "CannotConnectNow", "SerializationFailure", "DeadlockDetected"),
                 ("lost the connection", "Connection refused", "connection refused",
                  "server closed the connection", "timeout expired", "the database system is",
                  "too many clients", "database is locked", "could not connect"), True),
)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def database_transient(exc: BaseException) -> bool | None:
    """``DATABASE_POLICY``'s verdict on an error or its causes; None when no row matches.

    >>> import sqlite3
    >>> database_transient(sqlite3.OperationalError("database is locked"))
    True
    >>> database_transient(ValueError("x"))
    """
    for error in _chain(exc):
        names = {c.__name__ for c in type(error).__mro__}
        text = str(error)
        for rule in DATABASE_POLICY:
            if names & set(rule.class_names) or any(w in text for w in rule.words):
                return rule.transient
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may help: transient storage or database errors, never bad input.

    >>> from pipeline.errors import StorageError, SceneReadError
    >>> is_transient(StorageError("s3://b/a.tif", "throttled", transient=True))
    True
    >>> is_transient(SceneReadError("a.tif", "not a readable raster"))
    False
    >>> throttled = SceneReadError("s3://b/a.tif", "storage temporarily unavailable (503)")
    >>> throttled.transient = True  # as pipeline.raster.read_error sets it for 5xx and throttling
    >>> is_transient(throttled)
    True
    """
    if getattr(exc, "transient", False):  # the raising code knew: a throttled or 5xx read
        return True
    if isinstance(exc, SceneError):  # bad input: retrying reads the same bad bytes
        return False
    if buckets.is_transient(exc):
        return True
    return bool(database_transient(exc))


def retry_transient(task, task_run, state) -> bool:
    """A task's ``retry_condition_fn``: retry only when the task failed transiently."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by Prefect
        return is_transient(exc)
    return False
