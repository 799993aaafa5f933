"""The contract every GIS store keeps (``CrackStore``), and what the stores share: the crack
columns (``CRACK_FIELDS``), crack ids, the checks before writing, and how a database error is
classified (``database_transient``).  What publishing guarantees is in ``pipeline.stores``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import shapely
from pyproj import Transformer
from pyproj.exceptions import CRSError, ProjError
from rasterio.crs import CRS

from pipeline import layers
from pipeline.errors import StoreError
from pipeline.records import CrackLine, CrackPositions, SceneResult
from pipeline.redact import mask_url

DEFAULT_CRS = CRS.from_epsg(4326)
CURRENT_CRACKS_SQL = """SELECT c.* FROM cracks c JOIN scenes s
    ON s.survey_id = c.survey_id AND s.scene_id = c.scene_id
    AND s.model_name = c.model_name AND s.model_version = c.model_version
    WHERE s.is_current"""
CURRENT_PATTERN_AREAS_SQL = CURRENT_CRACKS_SQL.replace("c.* FROM cracks c", "c.* FROM pattern_areas c")
CURRENT_SECTIONS_SQL = "SELECT * FROM sections WHERE is_current"
NOT_JOINT_SQLITE = "crack_type IS NOT 'joint'"  # concrete joints are kept, typed, and never counted
CRACK_NAMESPACE = uuid.UUID("6f1c8f4e-2b8a-4c1e-9a55-0c7a2c3d9e10")

# What a crack of a frame survey records besides (migration 0004); NULL for orthophoto scenes but gsd_mm.
FRAME_CRACK_COLUMNS = (
    ("gsd_mm", "real"),
    ("range_m", "real"),
    ("pos_accuracy_m", "real"),
    ("source_frames", "text"),
)
# Every column of a crack row (its geometry aside), declared once: (name, kind).  The GeoPackage
# table, query(), the exports and both stores' inserts follow it; the PostGIS migrations declare
# the same columns (tests/test_postgis.py checks that they agree; the road columns live in
# crack_positions there, and the views all_cracks / current_cracks show them all, in this order).
# The first REQUIRED are NOT NULL.
CRACK_FIELDS = (
    ("crack_id", "text"),
    ("survey_id", "text"),
    ("scene_id", "text"),
    ("model_name", "text"),
    ("model_version", "text"),
    ("model_sha256", "text"),
    ("run_id", "text"),
    ("length_m", "real"),
    ("width_mean_mm", "real"),
    ("width_max_mm", "real"),
    ("orientation_deg", "real"),
    ("confidence", "real"),
    ("severity", "text"),
    ("created_at", "datetime"),
    *layers.CRACK_CONDITION_COLUMNS,
    *FRAME_CRACK_COLUMNS,
)
REQUIRED_CRACK_FIELDS = 14
CRACK_COLUMNS = ", ".join(
    f"{name} {layers.SQLITE_TYPES[kind]}"
    + (" NOT NULL" if i < REQUIRED_CRACK_FIELDS else "")
    + (" UNIQUE" if name == "crack_id" else "")
    + (" CHECK (severity IN ('low', 'medium', 'high'))" if name == "severity" else "")
    for i, (name, kind) in enumerate(CRACK_FIELDS)
)
SCENE_COLUMNS = """survey_id TEXT NOT NULL, scene_id TEXT NOT NULL, source_uri TEXT NOT NULL,
    sha256 TEXT, crs TEXT, width INTEGER, height INTEGER, chip_count INTEGER,
    crack_count INTEGER, total_length_m REAL, status TEXT NOT NULL, error TEXT,
    model_name TEXT NOT NULL, model_version TEXT NOT NULL, model_sha256 TEXT NOT NULL,
    run_id TEXT NOT NULL, probability_uri TEXT, processed_at DATETIME NOT NULL,
    is_current INTEGER NOT NULL DEFAULT 0, inference TEXT,
    UNIQUE (survey_id, scene_id, model_name, model_version)"""
# One row per survey: what reprocessing needs to map it again (migration 0006); NULL for orthophotos.
SURVEY_COLUMNS = "survey_id TEXT NOT NULL UNIQUE, frame_survey TEXT, updated_at DATETIME NOT NULL"


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What every published row is tagged with."""

    survey_id: str
    run_id: str
    model_name: str
    model_version: str
    model_sha256: str


# What query() yields for each crack, besides its geometry, in both stores.
QUERY_FIELDS = tuple(name for name, _ in CRACK_FIELDS)
SEVERITIES = ("low", "medium", "high")


@dataclass(frozen=True, slots=True)
class CrackQuery:
    """Which cracks ``query()`` returns; every field left None matches everything.

    ``bbox`` (minx, miny, maxx, maxy, in the store CRS) keeps cracks that intersect it.
    Without ``model_version`` the scenes' current versions are read (restricted to
    ``model_name`` if given); with it, that version of every scene that has it.
    """

    bbox: tuple[float, float, float, float] | None = None
    survey_id: str | None = None
    scene_id: str | None = None
    severity: str | None = None
    model_name: str | None = None
    model_version: str | None = None

    def __post_init__(self) -> None:
        if self.severity is not None and self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} is not one of {', '.join(SEVERITIES)}")
        if self.model_version is not None and self.model_name is None:
            raise ValueError("a model version needs a model name (NAME:VERSION)")
        if self.bbox is not None:
            if len(self.bbox) != 4 or not all(np.isfinite(v) for v in self.bbox):
                raise ValueError(
                    f"bbox {' '.join(map(str, self.bbox))}: MINX MINY MAXX MAXY must be "
                    "four finite numbers in the store CRS"
                )
            minx, miny, maxx, maxy = self.bbox
            if not (minx <= maxx and miny <= maxy):
                raise ValueError(f"bbox {self.bbox} is not MINX MINY MAXX MAXY")


# What scenes() returns for each scene row (one per scene and model version), in both stores.
SCENE_FIELDS = (
    "survey_id",
    "scene_id",
    "model_name",
    "model_version",
    "source_uri",
    "sha256",
    "status",
    "error",
    "is_current",
    "processed_at",
    "chip_count",
    "crack_count",
    "total_length_m",
    "inference",
)


@dataclass(frozen=True, slots=True)
class SceneSelection:
    """Which scene rows ``scenes()`` returns; every field left None matches everything.

    ``since``/``until`` bound ``processed_at`` (inclusive; ISO 8601 text or datetime,
    UTC unless it says otherwise); ``bbox`` (store CRS) keeps scenes whose footprint
    intersects it.  With ``current_only`` (the default) only each scene's current
    version is read, so ``model_version`` selects the scenes currently shown from it.
    """

    survey_id: str | None = None
    since: datetime | str | None = None
    until: datetime | str | None = None
    bbox: tuple[float, float, float, float] | None = None
    model_name: str | None = None
    model_version: str | None = None
    current_only: bool = True

    def __post_init__(self) -> None:
        CrackQuery(bbox=self.bbox, model_name=self.model_name, model_version=self.model_version)

    def comparisons(self) -> list[tuple[str, str, str]]:
        """(column, operator, value) of the plain conditions, in every store's terms.

        ``current_only`` and ``bbox`` are left to each store (a flag, a spatial index).

        >>> SceneSelection(survey_id="road-7", since="2026-03-01").comparisons()
        [('survey_id', '=', 'road-7'), ('processed_at', '>=', '2026-03-01T00:00:00.000Z')]
        """
        found = [
            (column, "=", value)
            for column in ("survey_id", "model_name", "model_version")
            if (value := getattr(self, column)) is not None
        ]
        since, until = self.bounds()
        found += [
            ("processed_at", op, value) for op, value in ((">=", since), ("<=", until)) if value is not None
        ]
        return found

    def bounds(self) -> tuple[str | None, str | None]:
        """``since`` and ``until`` as UTC text in the stores' ``processed_at`` format.

        >>> SceneSelection(since="2026-03-01", until="2026-03-01T12:00:00+02:00").bounds()
        ('2026-03-01T00:00:00.000Z', '2026-03-01T10:00:00.000Z')
        """
        return utc_text(self.since), utc_text(self.until)


def utc_text(value: datetime | str | None) -> str | None:
    """A time as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (naive times are UTC); text is parsed as ISO 8601."""
    if value is None:
        return None
    when = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else value
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def empty_summary() -> dict:
    """A scene version's crack totals before any crack is counted (see ``scene_summaries``)."""
    return {
        "status": None,
        "chip_count": 0,
        "crack_count": 0,
        "total_length_m": 0.0,
        "length_m_by_severity": dict.fromkeys(SEVERITIES, 0.0),
    }


def crack_uuid(run: RunInfo, scene_id: str, index: int) -> uuid.UUID:
    """A crack's id: the same for the same survey, scene, model version and position.

    An RFC 9562 version-8 UUID: 8 bytes hashed from the scene version, then the crack's
    index.  A scene's ids are consecutive, so a bulk load appends to one place of the
    primary-key index instead of touching a random leaf per row.
    """
    return uuid.UUID(bytes=_crack_id_prefix(run, scene_id) + _crack_id_tails(index, index + 1))


def crack_uuid_bytes(run: RunInfo, scene_id: str, count: int) -> list[bytes]:
    """The 16 bytes of ``crack_uuid(run, scene_id, i)`` for i in range(count).

    >>> run = RunInfo("s", "r", "m", "1", "x")
    >>> a = crack_uuid(run, "a", 2)
    >>> (a.version, a.variant, crack_uuid_bytes(run, "a", 3)[2] == a.bytes)
    (8, 'specified in RFC 4122', True)
    >>> crack_uuid(run, "a", 3) > a != crack_uuid(run, "b", 2)
    True
    """
    head, tails = _crack_id_prefix(run, scene_id), _crack_id_tails(0, count)
    return [head + tails[i : i + 8] for i in range(0, 8 * count, 8)]


def _crack_id_prefix(run: RunInfo, scene_id: str) -> bytes:
    key = f"{run.survey_id}/{scene_id}/{run.model_name}:{run.model_version}".encode()
    prefix = bytearray(hashlib.sha1(CRACK_NAMESPACE.bytes + key).digest()[:8])
    prefix[6] = (prefix[6] & 0x0F) | 0x80  # version 8
    return bytes(prefix)


def _crack_id_tails(start: int, stop: int) -> bytes:
    """Big-endian indexes start..stop-1 with the RFC variant bits on top, 8 bytes each."""
    return (np.arange(start, stop, dtype=np.uint64) | np.uint64(0b10 << 62)).astype(">u8").tobytes()


def frames_text(frames: tuple[str, ...]) -> str | None:
    """A crack's source frames as stored: a JSON array, or None for a scene's crack.

    >>> frames_text(("f1", "f2")), frames_text(())
    ('["f1", "f2"]', None)
    """
    return json.dumps(list(frames)) if frames else None


def crack_values(crack_id: str, run: RunInfo, scene_id: str, c: CrackLine, created: str) -> tuple:
    """A crack's row in ``QUERY_FIELDS`` order (the GeoPackage insert and every export)."""
    return (
        crack_id,
        run.survey_id,
        scene_id,
        run.model_name,
        run.model_version,
        run.model_sha256,
        run.run_id,
        c.length_m,
        c.width_mean_mm,
        c.width_max_mm,
        c.orientation_deg,
        c.confidence,
        c.severity,
        created,
        c.crack_type,
        c.theta_deg,
        c.chord_m,
        c.tortuosity,
        c.span_ratio,
        c.pattern_no,
        None,
        None,
        None,
        None,  # road_id, chainages and offset: set by road referencing (sections)
        c.gsd_mm,
        c.range_m,
        c.pos_accuracy_m,
        frames_text(c.source_frames),
    )


def check_crs(result: SceneResult, store_crs: CRS, store: str) -> CRS:
    """The scene's CRS; refuses one that is missing or cannot be transformed to the store's, or
    a result with non-finite coordinates.

    Raises:
        StoreError: naming the scene, both CRSs and what to do.
    """
    scene = result.scene
    if scene.crs is None:  # a survey frame's result is placed in the store's CRS before it is published
        raise StoreError(
            f"{scene.uri} has no CRS; only map-placed results can be published to "
            f"{mask_url(store)}; nothing was written."
        )
    problem = None
    try:
        Transformer.from_crs(scene.crs, store_crs, always_xy=True)
    except (CRSError, ProjError) as exc:
        problem = f"there is no transformation ({exc})"
    else:
        geometries = [result.footprint, *(c.geometry for c in result.cracks)]
        if not np.isfinite(shapely.get_coordinates(geometries)).all():
            problem = "its coordinates do not transform to finite values"
    if problem:
        raise StoreError(
            f"{scene.uri} is in {scene.crs.to_string()}, which cannot be transformed to "
            f"{mask_url(store)}'s {store_crs.to_string()}: {problem}. Reproject the scene or "
            "publish to a store in a CRS it can reach; nothing was written."
        )
    return scene.crs


class CrackStore(Protocol):
    """Where crack maps are published."""

    crs: CRS

    def publish(self, result: SceneResult, run: RunInfo, promote: bool = True) -> None:
        """Replace the scene's rows for this survey and model version, atomically.

        The version becomes the scene's current one unless ``promote`` is False.
        """

    def mark_failed(self, uri: str, scene_id: str, run: RunInfo, error: str) -> None:
        """Record that a scene failed; its published cracks, if any, stay as they were."""

    def published_sha256(
        self, survey_id: str, scene_id: str, model_name: str, model_version: str
    ) -> str | None:
        """The source sha256 (or ETag) a scene was last published from with this model version.

        None if it never was, or if its last attempt failed.
        """

    def promote(
        self, survey_id: str, scene_ids: Sequence[str] | None, model_name: str, model_version: str
    ) -> int:
        """Make a published model version current for these scenes (None: every scene that has it).

        Returns how many scenes were promoted.  Raises StoreError, changing nothing,
        if a named scene has no successful publication of that version.
        """

    def query(self, query: CrackQuery = CrackQuery(), batch_size: int = 10_000) -> Iterator[list[dict]]:
        """The matching cracks in batches of dicts: ``geometry`` (shapely) and QUERY_FIELDS."""

    def scenes(self, selection: SceneSelection = SceneSelection()) -> list[dict]:
        """The matching scene rows as dicts of SCENE_FIELDS, ordered by survey, scene and version."""

    def scene_summaries(
        self, survey_id: str, model_name: str, model_version: str, scene_ids: Sequence[str] | None = None
    ) -> dict[str, dict]:
        """Per scene published with this version: status, chip_count, crack_count, total_length_m
        and length_m_by_severity (low/medium/high), counted from its cracks."""

    def crack_columns(self, survey_id: str, fields: Sequence[str]) -> dict[str, np.ndarray]:
        """A survey's current cracks as columns: ``geometry`` and ``fields`` (of QUERY_FIELDS), one array each."""

    def footprints(self, survey_id: str) -> list[dict]:
        """The current scene rows of a survey: scene_id, model_name, model_version and ``geometry``."""

    def survey_ids(self) -> list[str]:
        """Every survey with a published scene, sorted."""

    def read_layer(self, layer: str, where: dict) -> list[dict]:
        """Rows of a road-condition layer or view (``layers.LAYERS``, ``current_*``) matching ``where``."""

    def replace_layer(
        self,
        layer: str,
        rows: list[dict],
        where: dict,
        keep_previous: bool = False,
        positions: CrackPositions | None = None,
        also: Sequence[tuple[str, list[dict], dict]] = (),
    ) -> None:
        """In one transaction: drop the rows matching ``where`` (``keep_previous``: mark them not
        current instead), insert ``rows`` (dicts of the layer's columns and ``geometry``), do the
        same for each (layer, rows, where) of ``also``, and replace the road columns of the
        ``positions`` survey's cracks (cracks not in ``positions`` get none)."""

    def set_frame_survey(self, survey_id: str, settings: dict | None) -> None:
        """Keep a frame survey's settings (``pipeline.frames.FrameSurvey.to_record``; None: not frames)."""

    def frame_survey(self, survey_id: str) -> dict | None:
        """The settings a frame survey was last mapped with; None for a survey of orthophoto scenes."""

    def close(self) -> None: ...

    def __enter__(self) -> CrackStore: ...

    def __exit__(self, *exc: object) -> None: ...


class StoreBase:
    """What every store shares: ``with open_store(url) as store:`` closes it."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# SQLSTATE classes and codes after which the same statement may succeed later: connection
# exceptions (08), the server shutting down or starting (57P01-57P03), serialization failures
# and deadlocks (40001, 40P01), too many connections (53300).
TRANSIENT_SQLSTATES = ("08", "57P01", "57P02", "57P03", "40001", "40P01", "53300")
SQLITE_BUSY, SQLITE_LOCKED = 5, 6


def database_transient(exc: BaseException) -> bool:
    """Whether a database error (sqlite3 or psycopg, or one they caused) may go away if tried again.

    Decided by type and code, never by message: SQLite's busy and locked codes; PostgreSQL's
    SQLSTATE (``TRANSIENT_SQLSTATES``); a psycopg connection-level error without a SQLSTATE
    (refused, reset, timed out) unless libpq says a password is missing or wrong.

    >>> import sqlite3
    >>> locked = sqlite3.OperationalError("database is locked"); locked.sqlite_errorcode = SQLITE_BUSY
    >>> database_transient(locked), database_transient(ValueError("x"))
    (True, False)
    """
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (code := getattr(error, "sqlite_errorcode", None)) is not None:
            return code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)
        if type(error).__module__.startswith("psycopg"):
            state = getattr(error, "sqlstate", None)
            if state is not None:
                return state.startswith(TRANSIENT_SQLSTATES)
            # libpq's client-side failures carry no SQLSTATE: a missing password is not transient
            return type(error).__name__ in (
                "OperationalError",
                "InterfaceError",
                "ConnectionTimeout",
            ) and "password" not in str(error)
        error = error.__cause__ or error.__context__
    return False


def store_failure(message: str, exc: BaseException) -> StoreError:
    """A StoreError whose ``transient`` says whether the database error behind it may go away."""
    return StoreError(message, transient=database_transient(exc))


def check_layer(layer: str) -> tuple[str, tuple[str, ...]]:
    """The geometry type and columns of a layer or its current view; refuses any other name."""
    base = layer.removeprefix("current_")
    if base not in layers.LAYERS:
        raise StoreError(f"{layer!r} is not a road-condition layer; choose one of {', '.join(layers.LAYERS)}")
    return layers.LAYERS[base][0], layers.columns(base)


def check_fields(fields: Sequence[str]) -> list[str]:
    if unknown := sorted(set(fields) - set(QUERY_FIELDS)):
        raise StoreError(f"cracks have no field {', '.join(unknown)}")
    return list(fields)


def columns_of(rows: list[tuple], names: Sequence[str], geometries) -> dict[str, np.ndarray]:
    """Rows of (geometry, *names) as one array per column (``geometries`` decodes the first)."""
    if not rows:
        return {n: np.zeros(0, dtype=object) for n in ("geometry", *names)}
    columns = list(zip(*rows))
    out = {"geometry": np.asarray(geometries(columns[0]), dtype=object)}
    for name, values in zip(names, columns[1:]):
        out[name] = np.array(values, dtype=object)
    return out


def check_column(layer: str, column: str, names: tuple[str, ...]) -> str:
    if column not in names:
        raise StoreError(f"{layer} has no column {column!r}")
    return column


def missing_scenes(wanted: Sequence[str] | None, found: Sequence[str], survey_id: str, model: str) -> None:
    """Raise StoreError if a scene asked to be promoted has no successful publication."""
    if wanted is not None and (missing := sorted(set(wanted) - set(found))):
        raise StoreError(
            f"cannot promote {model} in survey {survey_id!r}: "
            f"{', '.join(missing)} has no successful publication of it; nothing was changed"
        )


def own_layers() -> tuple[str, ...]:
    """The tables and views crackmap writes into a GeoPackage (anything else is another application's)."""
    return (
        "cracks",
        "scenes",
        "surveys",
        "current_cracks",
        *layers.LAYERS,
        "current_pattern_areas",
        "current_sections",
    )
