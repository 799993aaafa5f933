"""GIS stores for crack maps.  A GeoPackage file is the embedded default.

Every store publishes a scene atomically: the scene's previous rows for the
same survey, model name and model version are replaced by the new ones in one
transaction, so a rerun never duplicates and a failure never leaves half a
scene.  Rows of other model versions are never touched.

Each scene has at most one *current* model version (``scenes.is_current``):
publishing makes the version current unless ``promote=False``; ``promote()``
makes an already published version current later.  The view
``current_cracks`` shows, per scene, the cracks of its current version, and
``query()`` reads it unless a model version is asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
import shapely
from pyproj import Transformer
from pyproj.exceptions import CRSError, ProjError
from rasterio.crs import CRS

from pipeline import gpkg, layers
from pipeline.errors import StoreError
from pipeline.records import CrackPositions, SceneResult
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
FRAME_CRACK_COLUMNS = (("gsd_mm", "real"), ("range_m", "real"), ("pos_accuracy_m", "real"),
                       ("source_frames", "text"))
CRACK_COLUMNS = """crack_id TEXT NOT NULL UNIQUE, survey_id TEXT NOT NULL, scene_id TEXT NOT NULL,
    model_name TEXT NOT NULL, model_version TEXT NOT NULL, model_sha256 TEXT NOT NULL,
    run_id TEXT NOT NULL, length_m REAL NOT NULL, width_mean_mm REAL NOT NULL,
    width_max_mm REAL NOT NULL, orientation_deg REAL NOT NULL, confidence REAL NOT NULL,
    severity TEXT NOT NULL CHECK (severity IN ('low', 'medium', 'high')),
    created_at DATETIME NOT NULL, """ + layers.sqlite_columns(layers.CRACK_CONDITION_COLUMNS
                                                             + FRAME_CRACK_COLUMNS)
SCENE_COLUMNS = """survey_id TEXT NOT NULL, scene_id TEXT NOT NULL, source_uri TEXT NOT NULL,
    sha256 TEXT, crs TEXT, width INTEGER, height INTEGER, chip_count INTEGER,
    crack_count INTEGER, total_length_m REAL, status TEXT NOT NULL, error TEXT,
    model_name TEXT NOT NULL, model_version TEXT NOT NULL, model_sha256 TEXT NOT NULL,
    run_id TEXT NOT NULL, probability_uri TEXT, processed_at DATETIME NOT NULL,
    is_current INTEGER NOT NULL DEFAULT 0,
    UNIQUE (survey_id, scene_id, model_name, model_version)"""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What every published row is tagged with."""

    survey_id: str
    run_id: str
    model_name: str
    model_version: str
    model_sha256: str


# What query() yields for each crack, besides its geometry, in both stores.
QUERY_FIELDS = ("crack_id", "survey_id", "scene_id", "model_name", "model_version", "model_sha256",
                "run_id", "length_m", "width_mean_mm", "width_max_mm", "orientation_deg",
                "confidence", "severity", "created_at", *(c for c, _ in layers.CRACK_CONDITION_COLUMNS),
                *(c for c, _ in FRAME_CRACK_COLUMNS))
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
                raise ValueError(f"bbox {' '.join(map(str, self.bbox))}: MINX MINY MAXX MAXY must be "
                                 "four finite numbers in the store CRS")
            minx, miny, maxx, maxy = self.bbox
            if not (minx <= maxx and miny <= maxy):
                raise ValueError(f"bbox {self.bbox} is not MINX MINY MAXX MAXY")


# What scenes() returns for each scene row (one per scene and model version), in both stores.
SCENE_FIELDS = ("survey_id", "scene_id", "model_name", "model_version", "source_uri", "sha256", "status",
                "error", "is_current", "processed_at", "chip_count", "crack_count", "total_length_m")


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
        found = [(column, "=", value) for column in ("survey_id", "model_name", "model_version")
                 if (value := getattr(self, column)) is not None]
        since, until = self.bounds()
        found += [("processed_at", op, value) for op, value in ((">=", since), ("<=", until))
                  if value is not None]
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
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def empty_summary() -> dict:
    """A scene version's crack totals before any crack is counted (see ``scene_summaries``)."""
    return {"status": None, "chip_count": 0, "crack_count": 0, "total_length_m": 0.0,
            "length_m_by_severity": dict.fromkeys(SEVERITIES, 0.0)}


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
    return [head + tails[i:i + 8] for i in range(0, 8 * count, 8)]


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


def check_crs(result: SceneResult, store_crs: CRS, store: str) -> None:
    """Refuse a scene whose CRS cannot be transformed to the store's, or with non-finite coordinates.

    Raises:
        StoreError: naming the scene, both CRSs and what to do.
    """
    scene = result.scene
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
        raise StoreError(f"{scene.uri} is in {scene.crs.to_string()}, which cannot be transformed to "
                         f"{mask_url(store)}'s {store_crs.to_string()}: {problem}. Reproject the scene or "
                         "publish to a store in a CRS it can reach; nothing was written.")


class CrackStore(Protocol):
    """Where crack maps are published."""

    crs: CRS

    def publish(self, result: SceneResult, run: RunInfo, promote: bool = True) -> None:
        """Replace the scene's rows for this survey and model version, atomically.

        The version becomes the scene's current one unless ``promote`` is False.
        """

    def mark_failed(self, uri: str, scene_id: str, run: RunInfo, error: str) -> None:
        """Record that a scene failed; its published cracks, if any, stay as they were."""

    def published_sha256(self, survey_id: str, scene_id: str, model_name: str,
                         model_version: str) -> str | None:
        """The source sha256 (or ETag) a scene was last published from with this model version.

        None if it never was, or if its last attempt failed.
        """

    def promote(self, survey_id: str, scene_ids: Sequence[str] | None, model_name: str,
                model_version: str) -> int:
        """Make a published model version current for these scenes (None: every scene that has it).

        Returns how many scenes were promoted.  Raises StoreError, changing nothing,
        if a named scene has no successful publication of that version.
        """

    def query(self, query: CrackQuery = CrackQuery(), batch_size: int = 10_000) -> Iterator[list[dict]]:
        """The matching cracks in batches of dicts: ``geometry`` (shapely) and QUERY_FIELDS."""

    def scenes(self, selection: SceneSelection = SceneSelection()) -> list[dict]:
        """The matching scene rows as dicts of SCENE_FIELDS, ordered by survey, scene and version."""

    def scene_summaries(self, survey_id: str, model_name: str, model_version: str,
                        scene_ids: Sequence[str] | None = None) -> dict[str, dict]:
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

    def replace_layer(self, layer: str, rows: list[dict], where: dict, keep_previous: bool = False,
                      positions: CrackPositions | None = None,
                      also: Sequence[tuple[str, list[dict], dict]] = ()) -> None:
        """In one transaction: drop the rows matching ``where`` (``keep_previous``: mark them not
        current instead), insert ``rows`` (dicts of the layer's columns and ``geometry``), do the
        same for each (layer, rows, where) of ``also``, and replace the road columns of the
        ``positions`` survey's cracks (cracks not in ``positions`` get none)."""

    def close(self) -> None: ...


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


def missing_scenes(wanted: Sequence[str] | None, found: Sequence[str], survey_id: str,
                   model: str) -> None:
    """Raise StoreError if a scene asked to be promoted has no successful publication."""
    if wanted is not None and (missing := sorted(set(wanted) - set(found))):
        raise StoreError(f"cannot promote {model} in survey {survey_id!r}: "
                         f"{', '.join(missing)} has no successful publication of it; nothing was changed")


def own_layers() -> tuple[str, ...]:
    """The tables and views crackmap writes into a GeoPackage (anything else is another application's)."""
    return ("cracks", "scenes", "current_cracks", *layers.LAYERS, "current_pattern_areas", "current_sections")


class GeoPackageStore:
    """Layers ``cracks`` (LineString) and ``scenes`` (footprint Polygon) in one GeoPackage.

    A new file is built complete under a temporary name and then linked into place,
    so no reader ever sees half a store, and two runs creating it at once both end
    up with the same one.  An existing file is checked, read-only, before anything
    is written to it: a GeoPackage with another application's layers is refused
    untouched.  Writers take turns (SQLite's lock, waiting up to ``gpkg.BUSY_TIMEOUT_S``).
    """

    def __init__(self, path: str | Path, crs: CRS = DEFAULT_CRS) -> None:
        self.path = Path(path)
        try:
            if not self.path.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._create(crs)
            self._check_own()
            self._con = gpkg.connect(str(self.path))
            self.srs_id = self._layer_srs() or crs.to_epsg()
            if self._needs_upgrade():
                with _Transaction(self._con, f"{self.path}: adding crackmap's tables failed"):
                    gpkg.init(self._con)
                    self.srs_id = self._layer_srs() or gpkg.add_srs(self._con, crs)
                    self._add_schema(self.srs_id)
        except StoreError:
            raise
        except Exception as exc:  # sqlite3.Error, or a file that is not a GeoPackage
            raise StoreError(f"{self.path}: cannot open as a crackmap GeoPackage ({exc})") from exc
        self.crs = CRS.from_epsg(self.srs_id)
        if self.crs != crs:
            raise StoreError(f"{self.path} stores EPSG:{self.srs_id}, not {crs.to_string()}; "
                             "publish to a new file or use the store's CRS")

    def _create(self, crs: CRS) -> None:
        """Build the whole schema in a temporary file beside ``path``, then link it into place."""
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.creating")
        try:
            con = gpkg.connect(str(staging))
            try:
                con.execute("BEGIN IMMEDIATE")
                gpkg.init(con)
                self._con = con
                self._add_schema(gpkg.add_srs(con, crs))
                con.execute("COMMIT")
            finally:
                con.close()
            try:
                os.link(staging, self.path)  # fails if another run created it meanwhile: use theirs
            except FileExistsError:
                pass
        finally:
            staging.unlink(missing_ok=True)

    def _check_own(self) -> None:
        """Refuse, without writing, a file that is not a GeoPackage or holds another application's tables."""
        con = gpkg.connect(str(self.path), read_only=True)
        try:
            application_id = con.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        finally:
            con.close()
        if application_id == 0 and not tables:  # an empty file: ours to fill, in one transaction
            return
        if application_id != gpkg.APPLICATION_ID:
            raise StoreError(f"{self.path}: cannot open as a crackmap GeoPackage (it is an SQLite file but "
                             "not a GeoPackage); nothing was written. Choose a new .gpkg file.")
        foreign = sorted(t for t in tables if not t.startswith(("gpkg_", "rtree_", "sqlite_"))
                         and t not in own_layers())
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise StoreError(f"{self.path}: cannot open as a crackmap GeoPackage: it holds another "
                             f"application's layers ({shown}); nothing was written. Choose a new .gpkg file.")

    def _needs_upgrade(self) -> bool:
        names = {r[0] for r in self._con.execute("SELECT name FROM sqlite_master")}
        columns = {r[1] for r in self._con.execute("PRAGMA table_info(scenes)")}
        crack_columns = {r[1] for r in self._con.execute("PRAGMA table_info(cracks)")}
        return not ({*own_layers(), "scenes_one_current", "cracks_scene", "cracks_road"} <= names
                    and "is_current" in columns
                    and {name for name, _ in layers.CRACK_CONDITION_COLUMNS} <= crack_columns
                    and {name for name, _ in FRAME_CRACK_COLUMNS} <= crack_columns)

    def _add_schema(self, srs_id: int) -> None:
        """crackmap's layers, indexes and view, as far as absent; inside the caller's transaction."""
        gpkg.init(self._con)
        gpkg.add_layer(self._con, "cracks", "LINESTRING", srs_id, CRACK_COLUMNS)
        gpkg.add_layer(self._con, "scenes", "POLYGON", srs_id, SCENE_COLUMNS)
        gpkg.run_script(self._con, """
        CREATE INDEX IF NOT EXISTS cracks_scene ON cracks (survey_id, scene_id, model_name, model_version);
        CREATE INDEX IF NOT EXISTS cracks_model ON cracks (model_name, model_version);
        CREATE INDEX IF NOT EXISTS cracks_severity ON cracks (severity);
        """)
        self._add_current_flag()
        gpkg.add_view(self._con, "current_cracks", CURRENT_CRACKS_SQL, "LINESTRING", srs_id)
        self.srs_id = srs_id
        self._add_condition_layers()
        self._add_crack_columns()

    def _add_current_flag(self) -> None:
        """Files written before ``is_current`` existed: the latest successful version is current."""
        columns = {r[1] for r in self._con.execute("PRAGMA table_info(scenes)")}
        if "is_current" not in columns:
            gpkg.run_script(self._con, """
            ALTER TABLE scenes ADD COLUMN is_current INTEGER NOT NULL DEFAULT 0;
            UPDATE scenes SET is_current = 1 WHERE fid IN (
                SELECT (SELECT fid FROM scenes s2 WHERE s2.survey_id = s.survey_id
                        AND s2.scene_id = s.scene_id AND s2.status = 'done'
                        ORDER BY processed_at DESC LIMIT 1)
                FROM scenes s GROUP BY survey_id, scene_id);
            """)
        self._con.execute("CREATE UNIQUE INDEX IF NOT EXISTS scenes_one_current "
                          "ON scenes (survey_id, scene_id) WHERE is_current")

    def _add_condition_layers(self) -> None:
        """Crack typing and road columns (added to older files), and the road-condition layers."""
        have = {r[1] for r in self._con.execute("PRAGMA table_info(cracks)")}
        for name, kind in layers.CRACK_CONDITION_COLUMNS:
            if name not in have:
                self._con.execute(f"ALTER TABLE cracks ADD COLUMN {name} {layers.SQLITE_TYPES[kind]}")
        for name, (geometry_type, spec) in layers.LAYERS.items():
            gpkg.add_layer(self._con, name, geometry_type, self.srs_id, layers.sqlite_columns(spec))
        gpkg.run_script(self._con, """
        CREATE INDEX IF NOT EXISTS cracks_road ON cracks (road_id, chainage_from_m);
        CREATE INDEX IF NOT EXISTS pattern_areas_scene ON pattern_areas (survey_id, scene_id, model_name,
                                                                         model_version);
        CREATE INDEX IF NOT EXISTS sections_survey ON sections (survey_id, is_current);
        CREATE INDEX IF NOT EXISTS section_changes_surveys ON section_changes (from_survey, to_survey);
        CREATE INDEX IF NOT EXISTS crack_changes_surveys ON crack_changes (from_survey, to_survey);
        """)
        gpkg.add_view(self._con, "current_pattern_areas", CURRENT_PATTERN_AREAS_SQL, "MULTIPOLYGON",
                      self.srs_id)
        gpkg.add_view(self._con, "current_sections", CURRENT_SECTIONS_SQL, "POLYGON", self.srs_id)

    def _add_crack_columns(self) -> None:
        """Files written before a crack column existed get it (NULL in their rows)."""
        columns = {r[1] for r in self._con.execute("PRAGMA table_info(cracks)")}
        for name, kind in FRAME_CRACK_COLUMNS:
            if name not in columns:
                self._con.execute(f"ALTER TABLE cracks ADD COLUMN {name} {layers.SQLITE_TYPES[kind]}")

    def _layer_srs(self) -> int | None:
        if not self._con.execute("SELECT 1 FROM sqlite_master WHERE name = 'gpkg_geometry_columns'").fetchone():
            return None
        row = self._con.execute(
            "SELECT srs_id FROM gpkg_geometry_columns WHERE table_name = 'cracks'").fetchone()
        return row[0] if row else None

    def publish(self, result: SceneResult, run: RunInfo, promote: bool = True) -> None:
        check_crs(result, self.crs, str(self.path))
        scene = result.scene
        created = gpkg.now()
        ids = [str(uuid.UUID(bytes=b)) for b in crack_uuid_bytes(run, scene.scene_id, len(result.cracks))]
        rows = [(gpkg.encode(c.geometry, self.srs_id), crack_id,
                 run.survey_id, scene.scene_id, run.model_name, run.model_version, run.model_sha256,
                 run.run_id, c.length_m, c.width_mean_mm, c.width_max_mm, c.orientation_deg,
                 c.confidence, c.severity, created, c.crack_type, c.theta_deg, c.chord_m, c.tortuosity,
                 c.span_ratio, c.pattern_no, c.gsd_mm, c.range_m, c.pos_accuracy_m, frames_text(c.source_frames))
                for crack_id, c in zip(ids, result.cracks)]
        areas = [(gpkg.encode(a.geometry, self.srs_id), run.survey_id, scene.scene_id, run.model_name,
                  run.model_version, no, a.pattern_class, a.area_m2, a.crack_density_m_per_m2,
                  a.width_mean_mm, a.width_max_mm, a.severity, a.piece_m)
                 for no, a in enumerate(result.pattern_areas)]
        scene_row = dict(geom=gpkg.encode(result.footprint, self.srs_id), source_uri=scene.uri,
                         sha256=result.sha256, crs=scene.crs.to_string(), width=scene.width,
                         height=scene.height, chip_count=result.chip_count,
                         crack_count=len(result.counted), total_length_m=result.total_length_m,
                         status="done", error=None, probability_uri=result.probability_path)
        with self._transaction(scene.uri):
            self._con.execute("DELETE FROM cracks WHERE survey_id = ? AND scene_id = ? "
                              "AND model_name = ? AND model_version = ?",
                              (run.survey_id, scene.scene_id, run.model_name, run.model_version))
            self._con.executemany(
                "INSERT INTO cracks (geom, crack_id, survey_id, scene_id, model_name, model_version, "
                "model_sha256, run_id, length_m, width_mean_mm, width_max_mm, orientation_deg, "
                "confidence, severity, created_at, crack_type, theta_deg, chord_m, tortuosity, span_ratio, "
                f"pattern_no, gsd_mm, range_m, pos_accuracy_m, source_frames) VALUES ({', '.join('?' * 25)})",
                rows)
            self._con.execute("DELETE FROM pattern_areas WHERE survey_id = ? AND scene_id = ? "
                              "AND model_name = ? AND model_version = ?",
                              (run.survey_id, scene.scene_id, run.model_name, run.model_version))
            self._con.executemany(
                f"INSERT INTO pattern_areas (geom, {', '.join(map(repr, layers.columns('pattern_areas')))}) "
                f"VALUES ({', '.join('?' * 13)})".replace("'", '"'), areas)
            if promote:
                self._uncurrent_others(run.survey_id, [scene.scene_id], run.model_name, run.model_version)
            self._put_scene(scene.scene_id, run, scene_row, current=True if promote else None)
            gpkg.update_extent(self._con, "cracks")
            gpkg.update_extent(self._con, "scenes")
            gpkg.update_extent(self._con, "pattern_areas")

    def mark_failed(self, uri: str, scene_id: str, run: RunInfo, error: str) -> None:
        with self._transaction(uri):
            old = self._con.execute(
                "SELECT geom, sha256, crs, width, height, chip_count, crack_count, total_length_m, "
                "probability_uri FROM scenes WHERE survey_id = ? AND scene_id = ? AND model_name = ? "
                "AND model_version = ?",
                (run.survey_id, scene_id, run.model_name, run.model_version)).fetchone()
            keys = ("geom", "sha256", "crs", "width", "height", "chip_count", "crack_count",
                    "total_length_m", "probability_uri")
            row = dict(zip(keys, old or (None,) * len(keys)))
            row.update(source_uri=uri, status="failed", error=error)
            self._put_scene(scene_id, run, row)

    def published_sha256(self, survey_id: str, scene_id: str, model_name: str,
                         model_version: str) -> str | None:
        row = self._con.execute(
            "SELECT sha256 FROM scenes WHERE survey_id = ? AND scene_id = ? AND model_name = ? "
            "AND model_version = ? AND status = 'done'",
            (survey_id, scene_id, model_name, model_version)).fetchone()
        return row[0] if row else None

    def promote(self, survey_id: str, scene_ids: Sequence[str] | None, model_name: str,
                model_version: str) -> int:
        model = f"{model_name}:{model_version}"
        with _Transaction(self._con, f"{self.path}: promoting {model} in survey {survey_id!r} failed"):
            found = [r[0] for r in self._con.execute(
                "SELECT scene_id FROM scenes WHERE survey_id = ? AND model_name = ? "
                "AND model_version = ? AND status = 'done'", (survey_id, model_name, model_version))
                if scene_ids is None or r[0] in set(scene_ids)]
            missing_scenes(scene_ids, found, survey_id, model)
            self._uncurrent_others(survey_id, found, model_name, model_version)
            self._con.executemany(
                "UPDATE scenes SET is_current = 1 WHERE survey_id = ? AND scene_id = ? "
                "AND model_name = ? AND model_version = ?",
                [(survey_id, scene_id, model_name, model_version) for scene_id in found])
        return len(found)

    def query(self, query: CrackQuery = CrackQuery(), batch_size: int = 10_000) -> Iterator[list[dict]]:
        where, params = [], []
        for column in ("survey_id", "scene_id", "severity", "model_name", "model_version"):
            if (value := getattr(query, column)) is not None:
                where.append(f"c.{column} = ?")
                params.append(value)
        if query.bbox is not None:  # the R-tree finds candidates, shapely keeps those that intersect
            minx, miny, maxx, maxy = query.bbox
            where.append('c.fid IN (SELECT id FROM "rtree_cracks_geom" WHERE maxx >= ? AND minx <= ? '
                         "AND maxy >= ? AND miny <= ?)")
            params += [minx, maxx, miny, maxy]
            box = shapely.box(*query.bbox)
        table = "cracks" if query.model_version is not None else "current_cracks"
        sql = (f"SELECT c.geom, {', '.join('c.' + f for f in QUERY_FIELDS)} FROM {table} c"
               + (f" WHERE {' AND '.join(where)}" if where else ""))
        cursor = gpkg.connect(str(self.path)).execute(sql, params)  # its own snapshot while streaming
        try:
            while rows := cursor.fetchmany(batch_size):
                geometries = shapely.from_wkb([gpkg.wkb(r[0]) for r in rows])
                keep = shapely.intersects(geometries, box) if query.bbox is not None else None
                batch = [dict(zip(QUERY_FIELDS, r[1:]), geometry=g)
                         for i, (r, g) in enumerate(zip(rows, geometries)) if keep is None or keep[i]]
                if batch:
                    yield batch
        finally:
            cursor.connection.close()

    def scenes(self, selection: SceneSelection = SceneSelection()) -> list[dict]:
        conditions = selection.comparisons()
        where = [f"s.{column} {op} ?" for column, op, _ in conditions]
        params: list = [value for _, _, value in conditions]
        if selection.current_only:
            where.append("s.is_current")
        if selection.bbox is not None:
            minx, miny, maxx, maxy = selection.bbox
            where.append('s.fid IN (SELECT id FROM "rtree_scenes_geom" WHERE maxx >= ? AND minx <= ? '
                         "AND maxy >= ? AND miny <= ?)")
            params += [minx, maxx, miny, maxy]
        sql = (f"SELECT s.geom, {', '.join('s.' + f for f in SCENE_FIELDS)} FROM scenes s"
               + (f" WHERE {' AND '.join(where)}" if where else "")
               + " ORDER BY s.survey_id, s.scene_id, s.model_name, s.model_version")
        found = []
        box = shapely.box(*selection.bbox) if selection.bbox is not None else None
        for geom, *values in self._con.execute(sql, params):
            if box is not None and not shapely.intersects(gpkg.decode(geom), box):
                continue
            row = dict(zip(SCENE_FIELDS, values))
            row["is_current"] = bool(row["is_current"])
            found.append(row)
        return found

    def scene_summaries(self, survey_id: str, model_name: str, model_version: str,
                        scene_ids: Sequence[str] | None = None) -> dict[str, dict]:
        key = (survey_id, model_name, model_version)
        summaries: dict[str, dict] = {}
        for scene_id, status, chips in self._con.execute(
                "SELECT scene_id, status, chip_count FROM scenes WHERE survey_id = ? AND model_name = ? "
                "AND model_version = ?", key):
            if scene_ids is None or scene_id in scene_ids:
                summaries[scene_id] = dict(empty_summary(), status=status, chip_count=chips or 0)
        for scene_id, severity, count, length in self._con.execute(
                "SELECT scene_id, severity, count(*), sum(length_m) FROM cracks WHERE survey_id = ? "
                f"AND model_name = ? AND model_version = ? AND {NOT_JOINT_SQLITE} "
                "GROUP BY scene_id, severity", key):
            if (summary := summaries.get(scene_id)) is not None:
                summary["crack_count"] += count
                summary["total_length_m"] += length
                summary["length_m_by_severity"][severity] = length
        return summaries

    def _uncurrent_others(self, survey_id: str, scene_ids: Sequence[str], model_name: str,
                          model_version: str) -> None:
        self._con.executemany(
            "UPDATE scenes SET is_current = 0 WHERE survey_id = ? AND scene_id = ? AND is_current "
            "AND NOT (model_name = ? AND model_version = ?)",
            [(survey_id, scene_id, model_name, model_version) for scene_id in scene_ids])

    def _put_scene(self, scene_id: str, run: RunInfo, row: dict, current: bool | None = None) -> None:
        """Write the scene row; ``current`` None keeps the row's flag (new rows are not current)."""
        key = (run.survey_id, scene_id, run.model_name, run.model_version)
        if current is None:
            old = self._con.execute("SELECT is_current FROM scenes WHERE survey_id = ? AND scene_id = ? "
                                    "AND model_name = ? AND model_version = ?", key).fetchone()
            current = bool(old and old[0])
        row = dict(row, survey_id=run.survey_id, scene_id=scene_id, model_name=run.model_name,
                   model_version=run.model_version, model_sha256=run.model_sha256,
                   run_id=run.run_id, processed_at=gpkg.now(), is_current=int(current))
        self._con.execute("DELETE FROM scenes WHERE survey_id = ? AND scene_id = ? "
                          "AND model_name = ? AND model_version = ?", key)
        names = ", ".join(row)
        self._con.execute(f"INSERT INTO scenes ({names}) VALUES ({', '.join('?' * len(row))})",
                          tuple(row.values()))

    def _transaction(self, uri: str):
        return _Transaction(self._con, f"{self.path}: publishing {uri} failed")

    def crack_columns(self, survey_id: str, fields: Sequence[str]) -> dict[str, np.ndarray]:
        names = check_fields(fields)
        rows = self._con.execute(f"SELECT geom, {', '.join(names)} FROM current_cracks WHERE survey_id = ? "
                                 "ORDER BY crack_id", (survey_id,)).fetchall()
        return columns_of(rows, names, lambda blobs: shapely.from_wkb([gpkg.wkb(b) for b in blobs]))

    def footprints(self, survey_id: str) -> list[dict]:
        return [{"scene_id": r[1], "model_name": r[2], "model_version": r[3], "geometry": gpkg.decode(r[0])}
                for r in self._con.execute(
                    "SELECT geom, scene_id, model_name, model_version FROM scenes WHERE survey_id = ? "
                    "AND is_current AND geom IS NOT NULL ORDER BY scene_id", (survey_id,))]

    def survey_ids(self) -> list[str]:
        return [r[0] for r in self._con.execute("SELECT DISTINCT survey_id FROM scenes ORDER BY 1")]

    def read_layer(self, layer: str, where: dict) -> list[dict]:
        _, names = check_layer(layer)
        sql = (f'SELECT geom, {", ".join(f"{chr(34)}{n}{chr(34)}" for n in names)} FROM "{layer}"'
               + (" WHERE " + " AND ".join(f'"{check_column(layer, k, names)}" = ?' for k in where)
                  if where else "") + " ORDER BY fid")
        return [dict(zip(names, values), geometry=gpkg.decode(geom) if geom else None)
                for geom, *values in self._con.execute(sql, list(where.values()))]

    def replace_layer(self, layer: str, rows: list[dict], where: dict, keep_previous: bool = False,
                      positions: CrackPositions | None = None,
                      also: Sequence[tuple[str, list[dict], dict]] = ()) -> None:
        with _Transaction(self._con, f"{self.path}: writing {layer} failed"):
            for target, target_rows, target_where, keep in ((layer, rows, where, keep_previous),
                                                              *((*a, False) for a in also)):
                self._replace_rows(target, target_rows, target_where, keep)
            if positions is not None:
                self._put_positions(positions)

    def _put_positions(self, p: CrackPositions) -> None:
        """The road columns on the crack rows themselves (a survey's cracks; SQLite updates in place)."""
        self._con.execute("UPDATE cracks SET road_id = NULL, chainage_from_m = NULL, chainage_to_m = NULL, "
                          "offset_m = NULL WHERE survey_id = ? AND road_id IS NOT NULL", (p.survey_id,))
        span = np.where(np.isnan(p.span_ratio), None, p.span_ratio)
        self._con.executemany(
            "UPDATE cracks SET road_id = ?, chainage_from_m = ?, chainage_to_m = ?, offset_m = ?, crack_type = ?, "
            "theta_deg = ?, span_ratio = ? WHERE crack_id = ?",
            zip(p.road_id, p.chainage_from_m.tolist(), p.chainage_to_m.tolist(), p.offset_m.tolist(),
                p.crack_type, p.theta_deg.tolist(), span.tolist(), p.crack_id))

    def _replace_rows(self, layer: str, rows: list[dict], where: dict, keep_previous: bool) -> None:
        _, names = check_layer(layer)
        condition = " AND ".join(f'"{check_column(layer, k, names)}" = ?' for k in where) or "1"
        quoted = ", ".join(f'"{n}"' for n in names)
        if keep_previous:
            self._con.execute(f'UPDATE "{layer}" SET is_current = 0 WHERE {condition} AND is_current <> 0',
                              list(where.values()))
        else:
            self._con.execute(f'DELETE FROM "{layer}" WHERE {condition}', list(where.values()))
        self._con.executemany(
            f'INSERT INTO "{layer}" (geom, {quoted}) VALUES (?{", ?" * len(names)})',
            ((gpkg.encode(r["geometry"], self.srs_id) if r.get("geometry") is not None else None,
              *(r.get(n) for n in names)) for r in rows))
        gpkg.update_extent(self._con, layer)

    def close(self) -> None:
        if getattr(self, "_con", None) is not None:
            self._con.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK and a StoreError naming what failed."""

    def __init__(self, con, message: str) -> None:
        self._con, self._message = con, message

    def __enter__(self) -> None:
        self._con.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self._con.execute("COMMIT")
            return False
        self._con.execute("ROLLBACK")
        raise StoreError(f"{self._message}; nothing was written ({exc})") from exc


def open_store(url: str | Path, crs: CRS = DEFAULT_CRS) -> CrackStore:
    """Open the store a URL names: a ``.gpkg`` path (created if absent) or a PostGIS URL.

    A PostGIS URL is ``postgresql://user[:password]@host:port/dbname``; libpq's
    ``PG*`` variables and ``~/.pgpass`` fill in what it leaves out.

    >>> open_store("cracks.shp")
    Traceback (most recent call last):
    ...
    pipeline.errors.StoreError: cracks.shp: a store is a GeoPackage path ending in .gpkg or a postgresql:// URL
    """
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        from pipeline.postgis import PostGISStore  # psycopg only when PostGIS is used

        return PostGISStore(text, crs)
    if not text.endswith(".gpkg"):
        raise StoreError(f"{mask_url(text)}: a store is a GeoPackage path ending in .gpkg or a postgresql:// URL")
    return GeoPackageStore(text, crs)
