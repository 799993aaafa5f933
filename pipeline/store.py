"""GIS stores for crack maps.  A GeoPackage file is the embedded default.

Every store publishes a scene atomically: the scene's previous rows for the
same survey, model name and model version are replaced by the new ones in one
transaction, so a rerun never duplicates and a failure never leaves half a
scene.  Rows of other model versions are never touched.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from rasterio.crs import CRS

from pipeline import gpkg
from pipeline.errors import StoreError
from pipeline.records import SceneResult

DEFAULT_CRS = CRS.from_epsg(4326)
CRACK_NAMESPACE = uuid.UUID("6f1c8f4e-2b8a-4c1e-9a55-0c7a2c3d9e10")

CRACK_COLUMNS = """crack_id TEXT NOT NULL UNIQUE, survey_id TEXT NOT NULL, scene_id TEXT NOT NULL,
    model_name TEXT NOT NULL, model_version TEXT NOT NULL, model_sha256 TEXT NOT NULL,
    run_id TEXT NOT NULL, length_m REAL NOT NULL, width_mean_mm REAL NOT NULL,
    width_max_mm REAL NOT NULL, orientation_deg REAL NOT NULL, confidence REAL NOT NULL,
    severity TEXT NOT NULL CHECK (severity IN ('low', 'medium', 'high')),
    created_at DATETIME NOT NULL"""
SCENE_COLUMNS = """survey_id TEXT NOT NULL, scene_id TEXT NOT NULL, source_uri TEXT NOT NULL,
    sha256 TEXT, crs TEXT, width INTEGER, height INTEGER, chip_count INTEGER,
    crack_count INTEGER, total_length_m REAL, status TEXT NOT NULL, error TEXT,
    model_name TEXT NOT NULL, model_version TEXT NOT NULL, model_sha256 TEXT NOT NULL,
    run_id TEXT NOT NULL, probability_uri TEXT, processed_at DATETIME NOT NULL,
    UNIQUE (survey_id, scene_id, model_name, model_version)"""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """What every published row is tagged with."""

    survey_id: str
    run_id: str
    model_name: str
    model_version: str
    model_sha256: str


def crack_id(run: RunInfo, scene_id: str, index: int) -> str:
    """A crack's id: the same for the same survey, scene, model version and position."""
    key = f"{run.survey_id}/{scene_id}/{run.model_name}:{run.model_version}/{index}"
    return str(uuid.uuid5(CRACK_NAMESPACE, key))


class CrackStore(Protocol):
    """Where crack maps are published."""

    crs: CRS

    def publish(self, result: SceneResult, run: RunInfo) -> None:
        """Replace the scene's rows for this survey and model version, atomically."""

    def mark_failed(self, uri: str, scene_id: str, run: RunInfo, error: str) -> None:
        """Record that a scene failed; its published cracks, if any, stay as they were."""

    def published_sha256(self, survey_id: str, scene_id: str, model_name: str,
                         model_version: str) -> str | None:
        """The source sha256 (or ETag) a scene was last published from with this model version.

        None if it never was, or if its last attempt failed.
        """

    def close(self) -> None: ...


class GeoPackageStore:
    """Layers ``cracks`` (LineString) and ``scenes`` (footprint Polygon) in one GeoPackage."""

    def __init__(self, path: str | Path, crs: CRS = DEFAULT_CRS) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = gpkg.connect(str(self.path))
            gpkg.init(self._con)  # idempotent; executescript commits as it goes
            self.srs_id = self._layer_srs() or gpkg.add_srs(self._con, crs)
            gpkg.add_layer(self._con, "cracks", "LINESTRING", self.srs_id, CRACK_COLUMNS)
            gpkg.add_layer(self._con, "scenes", "POLYGON", self.srs_id, SCENE_COLUMNS)
            self._con.executescript("""
            CREATE INDEX IF NOT EXISTS cracks_scene ON cracks (survey_id, scene_id, model_name, model_version);
            CREATE INDEX IF NOT EXISTS cracks_model ON cracks (model_name, model_version);
            CREATE INDEX IF NOT EXISTS cracks_severity ON cracks (severity);
            """)
        except Exception as exc:  # sqlite3.Error, or a file that is not a GeoPackage
            raise StoreError(f"{self.path}: cannot open as a crackmap GeoPackage ({exc})") from exc
        self.crs = CRS.from_epsg(self.srs_id)
        if self.crs != crs:
            raise StoreError(f"{self.path} stores EPSG:{self.srs_id}, not {crs.to_string()}; "
                             "publish to a new file or use the store's CRS")

    def _layer_srs(self) -> int | None:
        row = self._con.execute(
            "SELECT srs_id FROM gpkg_geometry_columns WHERE table_name = 'cracks'").fetchone()
        return row[0] if row else None

    def publish(self, result: SceneResult, run: RunInfo) -> None:
        scene = result.scene
        created = gpkg.now()
        rows = [(gpkg.encode(c.geometry, self.srs_id), crack_id(run, scene.scene_id, i),
                 run.survey_id, scene.scene_id, run.model_name, run.model_version, run.model_sha256,
                 run.run_id, c.length_m, c.width_mean_mm, c.width_max_mm, c.orientation_deg,
                 c.confidence, c.severity, created)
                for i, c in enumerate(result.cracks)]
        scene_row = dict(geom=gpkg.encode(result.footprint, self.srs_id), source_uri=scene.uri,
                         sha256=result.sha256, crs=scene.crs.to_string(), width=scene.width,
                         height=scene.height, chip_count=result.chip_count,
                         crack_count=len(rows), total_length_m=result.total_length_m,
                         status="done", error=None, probability_uri=result.probability_path)
        with self._transaction(scene.uri):
            self._con.execute("DELETE FROM cracks WHERE survey_id = ? AND scene_id = ? "
                              "AND model_name = ? AND model_version = ?",
                              (run.survey_id, scene.scene_id, run.model_name, run.model_version))
            self._con.executemany(
                "INSERT INTO cracks (geom, crack_id, survey_id, scene_id, model_name, model_version, "
                "model_sha256, run_id, length_m, width_mean_mm, width_max_mm, orientation_deg, "
                "confidence, severity, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows)
            self._put_scene(scene.scene_id, run, scene_row)
            gpkg.update_extent(self._con, "cracks")
            gpkg.update_extent(self._con, "scenes")

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

    def _put_scene(self, scene_id: str, run: RunInfo, row: dict) -> None:
        row = dict(row, survey_id=run.survey_id, scene_id=scene_id, model_name=run.model_name,
                   model_version=run.model_version, model_sha256=run.model_sha256,
                   run_id=run.run_id, processed_at=gpkg.now())
        self._con.execute("DELETE FROM scenes WHERE survey_id = ? AND scene_id = ? "
                          "AND model_name = ? AND model_version = ?",
                          (run.survey_id, scene_id, run.model_name, run.model_version))
        names = ", ".join(row)
        self._con.execute(f"INSERT INTO scenes ({names}) VALUES ({', '.join('?' * len(row))})",
                          tuple(row.values()))

    def _transaction(self, uri: str):
        return _Transaction(self._con, f"{self.path}: publishing {uri} failed")

    def close(self) -> None:
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
    """Open the store a URL names: a ``.gpkg`` path (created if absent).

    >>> open_store("postgresql://mapper@db/cracks")
    Traceback (most recent call last):
    ...
    pipeline.errors.StoreError: postgresql://mapper@db/cracks: PostGIS stores are not supported yet; use a .gpkg path
    """
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        raise StoreError(f"{text}: PostGIS stores are not supported yet; use a .gpkg path")
    if not text.endswith(".gpkg"):
        raise StoreError(f"{text}: a store is a GeoPackage path ending in .gpkg")
    return GeoPackageStore(text, crs)
