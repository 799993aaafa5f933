"""Which failures a flow retries, and how: the one place that decides.

Each crackmap error says whether it is ``transient``, decided where it was
raised: storage errors by ``pipeline.buckets.ERROR_POLICY`` (timeouts, 5xx and
throttling are; a missing object or refused credentials are not), database
errors by their type and code (``pipeline.stores.base.database_transient``: a
lost or refused connection and a locked GeoPackage are; a wrong password, a
missing database or a refused permission are not).  Bad input (a file that is
not a raster, a scene without CRS) never is.

Tasks use it as ``@task(retries=RETRIES, retry_delay_seconds=RETRY_DELAYS_S,
retry_condition_fn=retry_transient)``.
"""

from __future__ import annotations

from pipeline import buckets
from pipeline.errors import PipelineError
from pipeline.stores.base import database_transient

RETRIES = 3
RETRY_DELAYS_S = [10, 60, 300]  # backoff: a restarting database or a throttled bucket needs minutes
RETRY_JITTER = 0.3  # +-30 %, so N workers that failed together do not retry together


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may help, as the code that raised the error decided.

    crackmap's errors carry ``transient`` (``pipeline.errors.PipelineError``); a raw
    storage error is classified by ``buckets.ERROR_POLICY``, a raw database error by
    ``stores.base.database_transient`` (by type and code).  Anything else is not.

    >>> from pipeline.errors import StorageError, SceneReadError
    >>> is_transient(StorageError("s3://b/a.tif", "throttled", transient=True))
    True
    >>> is_transient(SceneReadError("a.tif", "not a readable raster"))
    False
    >>> is_transient(SceneReadError("s3://b/a.tif", "storage temporarily unavailable (503)", transient=True))
    True
    """
    if isinstance(exc, PipelineError):
        return exc.transient
    return buckets.is_transient(exc) or database_transient(exc)


def retry_transient(task, task_run, state) -> bool:
    """A task's ``retry_condition_fn``: retry only when the task failed transiently."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by Prefect
        return is_transient(exc)
    return False
