"""Exceptions raised by crackmap.

Every error names the input it is about and what is wrong with it, so that a
one-line message is enough to act on.  The classes inherit from the matching
builtin too (``OSError``, ``ValueError``), as rasterio's errors do.
"""

from __future__ import annotations

from models.registry import ModelError  # noqa: F401  (re-exported: raised by the registry)


class PipelineError(Exception):
    """Base class of every error crackmap raises on purpose.

    ``transient`` is decided where the error is raised, by the code that knows
    its cause: True when trying again later may succeed (a throttled or 5xx read,
    a lost database connection, a locked GeoPackage), False for everything a
    retry would only repeat.  The flows' retry policy reads it (``flows.policy``).
    """

    def __init__(self, *args: object, transient: bool = False) -> None:
        super().__init__(*args)
        self.transient = transient

    def __reduce__(self):  # picklable with its attributes, ``transient`` included: Prefect keeps results
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls: type[PipelineError], args: tuple, state: dict) -> PipelineError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class SceneError(PipelineError):
    """A scene cannot be processed; the message names the file and the problem."""

    def __init__(self, uri: str, problem: str, transient: bool = False) -> None:
        super().__init__(f"{uri}: {problem}", transient=transient)
        self.uri = uri
        self.problem = problem


class SceneReadError(SceneError, OSError):
    """The file is missing, is not a raster, or is truncated."""


class SceneContentError(SceneError, ValueError):
    """The raster opened but cannot be mapped: no CRS, all nodata, unsupported bands."""


class FrameError(SceneError, ValueError):
    """A survey frame cannot be placed: no time or GPS in it, a time outside the trajectory."""


class CameraError(SceneError, ValueError):
    """A camera file is missing, unreadable, or holds missing or absurd values."""


class TrajectoryError(SceneError, ValueError):
    """A trajectory file is unreadable, not in time order, or has gaps or impossible speeds."""


class OptionsError(PipelineError, ValueError):
    """A mapping option (threshold, overlap, severity, minimum length, bridging) is unknown or out of range."""


class IdError(PipelineError, ValueError):
    """A survey or scene id that cannot become a file name or object key (``pipeline.ids``)."""


class BackendUnavailableError(PipelineError, RuntimeError):
    """An inference backend was asked for but cannot run here; the message says how to install it."""


class StoreError(PipelineError):
    """The GIS store cannot be opened or written."""


class StorageError(PipelineError, OSError):
    """Object storage refused or failed a request; the message names the URL and the problem.

    ``transient`` is True for errors that may go away (5xx, throttling,
    timeouts); see ``pipeline.buckets.ERROR_POLICY``.
    """

    def __init__(self, uri: str, problem: str, transient: bool = False) -> None:
        super().__init__(f"{uri}: {problem}", transient=transient)
        self.uri = uri
        self.problem = problem


# Errors whose message is meant for the user: a command prints it on one line and exits.
USER_ERRORS = (PipelineError, ModelError)  # NetworkError, ConditionError included


class NetworkError(PipelineError, ValueError):
    """A road network file cannot be used; the message names the file and the problem."""


class ConditionError(PipelineError, ValueError):
    """Sections or change cannot be computed as asked (unknown survey, bad section length, ...)."""
