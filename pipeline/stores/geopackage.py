"""The GeoPackage store, the embedded default: one file QGIS opens as it is."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import shapely
from rasterio.crs import CRS

from pipeline import gpkg, layers
from pipeline.errors import StoreError
from pipeline.records import CrackPositions, SceneResult
from pipeline.stores.base import (
    CRACK_COLUMNS,
    CURRENT_CRACKS_SQL,
    CURRENT_PATTERN_AREAS_SQL,
    CURRENT_SECTIONS_SQL,
    DEFAULT_CRS,
    FRAME_CRACK_COLUMNS,
    NOT_JOINT_SQLITE,
    QUERY_FIELDS,
    SCENE_COLUMNS,
    SCENE_FIELDS,
    SURVEY_COLUMNS,
    CrackQuery,
    RunInfo,
    SceneSelection,
    StoreBase,
    check_column,
    check_crs,
    check_fields,
    check_layer,
    columns_of,
    crack_uuid_bytes,
    crack_values,
    empty_summary,
    missing_scenes,
    own_layers,
    store_failure,
)


class GeoPackageStore(StoreBase):
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
            raise store_failure(f"{self.path}: cannot open as a crackmap GeoPackage ({exc})", exc) from exc
        self.crs = CRS.from_epsg(self.srs_id)
        if self.crs != crs:
            raise StoreError(
                f"{self.path} stores EPSG:{self.srs_id}, not {crs.to_string()}; "
                "publish to a new file or use the store's CRS"
            )

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
            with contextlib.suppress(FileExistsError):  # another run created it meanwhile: use theirs
                os.link(staging, self.path)
        finally:
            staging.unlink(missing_ok=True)

    def _check_own(self) -> None:
        """Refuse, without writing, a file that is not a GeoPackage or holds another application's tables."""
        con = gpkg.connect(str(self.path), read_only=True)
        try:
            application_id = con.execute("PRAGMA application_id").fetchone()[0]
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
            }
        finally:
            con.close()
        if application_id == 0 and not tables:  # an empty file: ours to fill, in one transaction
            return
        if application_id != gpkg.APPLICATION_ID:
            raise StoreError(
                f"{self.path}: cannot open as a crackmap GeoPackage (it is an SQLite file but "
                "not a GeoPackage); nothing was written. Choose a new .gpkg file."
            )
        foreign = sorted(
            t for t in tables if not t.startswith(("gpkg_", "rtree_", "sqlite_")) and t not in own_layers()
        )
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise StoreError(
                f"{self.path}: cannot open as a crackmap GeoPackage: it holds another "
                f"application's layers ({shown}); nothing was written. Choose a new .gpkg file."
            )

    def _needs_upgrade(self) -> bool:
        names = {r[0] for r in self._con.execute("SELECT name FROM sqlite_master")}
        columns = {r[1] for r in self._con.execute("PRAGMA table_info(scenes)")}
        crack_columns = {r[1] for r in self._con.execute("PRAGMA table_info(cracks)")}
        return not (
            {*own_layers(), "scenes_one_current", "cracks_scene", "cracks_road"} <= names
            and {"is_current", "inference"} <= columns
            and {name for name, _ in layers.CRACK_CONDITION_COLUMNS} <= crack_columns
            and {name for name, _ in FRAME_CRACK_COLUMNS} <= crack_columns
        )

    def _add_schema(self, srs_id: int) -> None:
        """crackmap's layers, indexes and view, as far as absent; inside the caller's transaction."""
        gpkg.init(self._con)
        gpkg.add_layer(self._con, "cracks", "LINESTRING", srs_id, CRACK_COLUMNS)
        gpkg.add_layer(self._con, "scenes", "POLYGON", srs_id, SCENE_COLUMNS)
        gpkg.run_script(
            self._con,
            """
        CREATE INDEX IF NOT EXISTS cracks_scene ON cracks (survey_id, scene_id, model_name, model_version);
        CREATE INDEX IF NOT EXISTS cracks_model ON cracks (model_name, model_version);
        CREATE INDEX IF NOT EXISTS cracks_severity ON cracks (severity);
        """,
        )
        self._add_current_flag()
        gpkg.add_view(self._con, "current_cracks", CURRENT_CRACKS_SQL, "LINESTRING", srs_id)
        self.srs_id = srs_id
        self._add_condition_layers()
        self._add_crack_columns()
        gpkg.add_table(self._con, "surveys", SURVEY_COLUMNS)

    def _add_current_flag(self) -> None:
        """Files written before ``is_current`` existed: the latest successful version is current."""
        columns = {r[1] for r in self._con.execute("PRAGMA table_info(scenes)")}
        if "is_current" not in columns:
            gpkg.run_script(
                self._con,
                """
            ALTER TABLE scenes ADD COLUMN is_current INTEGER NOT NULL DEFAULT 0;
            UPDATE scenes SET is_current = 1 WHERE fid IN (
                SELECT (SELECT fid FROM scenes s2 WHERE s2.survey_id = s.survey_id
                        AND s2.scene_id = s.scene_id AND s2.status = 'done'
                        ORDER BY processed_at DESC LIMIT 1)
                FROM scenes s GROUP BY survey_id, scene_id);
            """,
            )
        self._con.execute(
            "CREATE UNIQUE INDEX IF NOT EXISTS scenes_one_current "
            "ON scenes (survey_id, scene_id) WHERE is_current"
        )
        if "inference" not in columns:  # files written before it (PostGIS: migration 0007)
            self._con.execute("ALTER TABLE scenes ADD COLUMN inference TEXT")

    def _add_condition_layers(self) -> None:
        """Crack typing and road columns (added to older files), and the road-condition layers."""
        have = {r[1] for r in self._con.execute("PRAGMA table_info(cracks)")}
        for name, kind in layers.CRACK_CONDITION_COLUMNS:
            if name not in have:
                self._con.execute(f"ALTER TABLE cracks ADD COLUMN {name} {layers.SQLITE_TYPES[kind]}")
        for name, (geometry_type, spec) in layers.LAYERS.items():
            gpkg.add_layer(self._con, name, geometry_type, self.srs_id, layers.sqlite_columns(spec))
        gpkg.run_script(
            self._con,
            """
        CREATE INDEX IF NOT EXISTS cracks_road ON cracks (road_id, chainage_from_m);
        CREATE INDEX IF NOT EXISTS pattern_areas_scene ON pattern_areas (survey_id, scene_id, model_name,
                                                                         model_version);
        CREATE INDEX IF NOT EXISTS sections_survey ON sections (survey_id, is_current);
        CREATE INDEX IF NOT EXISTS section_changes_surveys ON section_changes (from_survey, to_survey);
        CREATE INDEX IF NOT EXISTS crack_changes_surveys ON crack_changes (from_survey, to_survey);
        """,
        )
        gpkg.add_view(
            self._con, "current_pattern_areas", CURRENT_PATTERN_AREAS_SQL, "MULTIPOLYGON", self.srs_id
        )
        gpkg.add_view(self._con, "current_sections", CURRENT_SECTIONS_SQL, "POLYGON", self.srs_id)

    def _add_crack_columns(self) -> None:
        """Files written before a crack column existed get it (NULL in their rows)."""
        columns = {r[1] for r in self._con.execute("PRAGMA table_info(cracks)")}
        for name, kind in FRAME_CRACK_COLUMNS:
            if name not in columns:
                self._con.execute(f"ALTER TABLE cracks ADD COLUMN {name} {layers.SQLITE_TYPES[kind]}")

    def _layer_srs(self) -> int | None:
        if not self._con.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'gpkg_geometry_columns'"
        ).fetchone():
            return None
        row = self._con.execute(
            "SELECT srs_id FROM gpkg_geometry_columns WHERE table_name = 'cracks'"
        ).fetchone()
        return row[0] if row else None

    def publish(self, result: SceneResult, run: RunInfo, promote: bool = True) -> None:
        scene_crs = check_crs(result, self.crs, str(self.path))
        scene = result.scene
        created = gpkg.now()
        ids = [str(uuid.UUID(bytes=b)) for b in crack_uuid_bytes(run, scene.scene_id, len(result.cracks))]
        rows = [
            (gpkg.encode(c.geometry, self.srs_id), *crack_values(crack_id, run, scene.scene_id, c, created))
            for crack_id, c in zip(ids, result.cracks)
        ]
        areas = [
            (
                gpkg.encode(a.geometry, self.srs_id),
                run.survey_id,
                scene.scene_id,
                run.model_name,
                run.model_version,
                no,
                a.pattern_class,
                a.area_m2,
                a.crack_density_m_per_m2,
                a.width_mean_mm,
                a.width_max_mm,
                a.severity,
                a.piece_m,
            )
            for no, a in enumerate(result.pattern_areas)
        ]
        scene_row = dict(
            geom=gpkg.encode(result.footprint, self.srs_id),
            source_uri=scene.uri,
            sha256=result.sha256,
            crs=scene_crs.to_string(),
            width=scene.width,
            height=scene.height,
            chip_count=result.chip_count,
            crack_count=len(result.counted),
            total_length_m=result.total_length_m,
            status="done",
            error=None,
            probability_uri=result.probability_path,
            inference=result.inference or None,
        )
        with self._transaction(scene.uri):
            self._con.execute(
                "DELETE FROM cracks WHERE survey_id = ? AND scene_id = ? "
                "AND model_name = ? AND model_version = ?",
                (run.survey_id, scene.scene_id, run.model_name, run.model_version),
            )
            self._con.executemany(
                f"INSERT INTO cracks (geom, {', '.join(QUERY_FIELDS)}) VALUES (?{', ?' * len(QUERY_FIELDS)})",
                rows,
            )
            self._con.execute(
                "DELETE FROM pattern_areas WHERE survey_id = ? AND scene_id = ? "
                "AND model_name = ? AND model_version = ?",
                (run.survey_id, scene.scene_id, run.model_name, run.model_version),
            )
            self._con.executemany(
                f"INSERT INTO pattern_areas (geom, {', '.join(map(repr, layers.columns('pattern_areas')))}) "
                f"VALUES ({', '.join('?' * 13)})".replace("'", '"'),
                areas,
            )
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
                (run.survey_id, scene_id, run.model_name, run.model_version),
            ).fetchone()
            keys = (
                "geom",
                "sha256",
                "crs",
                "width",
                "height",
                "chip_count",
                "crack_count",
                "total_length_m",
                "probability_uri",
            )
            row = dict(zip(keys, old or (None,) * len(keys)))
            row.update(source_uri=uri, status="failed", error=error)
            self._put_scene(scene_id, run, row)

    def published_sha256(
        self, survey_id: str, scene_id: str, model_name: str, model_version: str
    ) -> str | None:
        row = self._con.execute(
            "SELECT sha256 FROM scenes WHERE survey_id = ? AND scene_id = ? AND model_name = ? "
            "AND model_version = ? AND status = 'done'",
            (survey_id, scene_id, model_name, model_version),
        ).fetchone()
        return row[0] if row else None

    def promote(
        self, survey_id: str, scene_ids: Sequence[str] | None, model_name: str, model_version: str
    ) -> int:
        model = f"{model_name}:{model_version}"
        with _Transaction(self._con, f"{self.path}: promoting {model} in survey {survey_id!r} failed"):
            found = [
                r[0]
                for r in self._con.execute(
                    "SELECT scene_id FROM scenes WHERE survey_id = ? AND model_name = ? "
                    "AND model_version = ? AND status = 'done'",
                    (survey_id, model_name, model_version),
                )
                if scene_ids is None or r[0] in set(scene_ids)
            ]
            missing_scenes(scene_ids, found, survey_id, model)
            self._uncurrent_others(survey_id, found, model_name, model_version)
            self._con.executemany(
                "UPDATE scenes SET is_current = 1 WHERE survey_id = ? AND scene_id = ? "
                "AND model_name = ? AND model_version = ?",
                [(survey_id, scene_id, model_name, model_version) for scene_id in found],
            )
        return len(found)

    def query(self, query: CrackQuery = CrackQuery(), batch_size: int = 10_000) -> Iterator[list[dict]]:
        where, params = [], []
        for column in ("survey_id", "scene_id", "severity", "model_name", "model_version"):
            if (value := getattr(query, column)) is not None:
                where.append(f"c.{column} = ?")
                params.append(value)
        if query.bbox is not None:  # the R-tree finds candidates, shapely keeps those that intersect
            minx, miny, maxx, maxy = query.bbox
            where.append(
                'c.fid IN (SELECT id FROM "rtree_cracks_geom" WHERE maxx >= ? AND minx <= ? '
                "AND maxy >= ? AND miny <= ?)"
            )
            params += [minx, maxx, miny, maxy]
            box = shapely.box(*query.bbox)
        table = "cracks" if query.model_version is not None else "current_cracks"
        sql = f"SELECT c.geom, {', '.join('c.' + f for f in QUERY_FIELDS)} FROM {table} c" + (
            f" WHERE {' AND '.join(where)}" if where else ""
        )
        cursor = gpkg.connect(str(self.path)).execute(sql, params)  # its own snapshot while streaming
        try:
            while rows := cursor.fetchmany(batch_size):
                geometries = shapely.from_wkb([gpkg.wkb(r[0]) for r in rows])
                keep = shapely.intersects(geometries, box) if query.bbox is not None else None
                batch = [
                    dict(zip(QUERY_FIELDS, r[1:]), geometry=g)
                    for i, (r, g) in enumerate(zip(rows, geometries))
                    if keep is None or keep[i]
                ]
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
            where.append(
                's.fid IN (SELECT id FROM "rtree_scenes_geom" WHERE maxx >= ? AND minx <= ? '
                "AND maxy >= ? AND miny <= ?)"
            )
            params += [minx, maxx, miny, maxy]
        sql = (
            f"SELECT s.geom, {', '.join('s.' + f for f in SCENE_FIELDS)} FROM scenes s"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY s.survey_id, s.scene_id, s.model_name, s.model_version"
        )
        found = []
        box = shapely.box(*selection.bbox) if selection.bbox is not None else None
        for geom, *values in self._con.execute(sql, params):
            if box is not None and not shapely.intersects(gpkg.decode(geom), box):
                continue
            row = dict(zip(SCENE_FIELDS, values))
            row["is_current"] = bool(row["is_current"])
            found.append(row)
        return found

    def scene_summaries(
        self, survey_id: str, model_name: str, model_version: str, scene_ids: Sequence[str] | None = None
    ) -> dict[str, dict]:
        key = (survey_id, model_name, model_version)
        summaries: dict[str, dict] = {}
        for scene_id, status, chips in self._con.execute(
            "SELECT scene_id, status, chip_count FROM scenes WHERE survey_id = ? AND model_name = ? "
            "AND model_version = ?",
            key,
        ):
            if scene_ids is None or scene_id in scene_ids:
                summaries[scene_id] = dict(empty_summary(), status=status, chip_count=chips or 0)
        for scene_id, severity, count, length in self._con.execute(
            "SELECT scene_id, severity, count(*), sum(length_m) FROM cracks WHERE survey_id = ? "
            f"AND model_name = ? AND model_version = ? AND {NOT_JOINT_SQLITE} "
            "GROUP BY scene_id, severity",
            key,
        ):
            if (summary := summaries.get(scene_id)) is not None:
                summary["crack_count"] += count
                summary["total_length_m"] += length
                summary["length_m_by_severity"][severity] = length
        return summaries

    def _uncurrent_others(
        self, survey_id: str, scene_ids: Sequence[str], model_name: str, model_version: str
    ) -> None:
        self._con.executemany(
            "UPDATE scenes SET is_current = 0 WHERE survey_id = ? AND scene_id = ? AND is_current "
            "AND NOT (model_name = ? AND model_version = ?)",
            [(survey_id, scene_id, model_name, model_version) for scene_id in scene_ids],
        )

    def _put_scene(self, scene_id: str, run: RunInfo, row: dict, current: bool | None = None) -> None:
        """Write the scene row; ``current`` None keeps the row's flag (new rows are not current)."""
        key = (run.survey_id, scene_id, run.model_name, run.model_version)
        if current is None:
            old = self._con.execute(
                "SELECT is_current FROM scenes WHERE survey_id = ? AND scene_id = ? "
                "AND model_name = ? AND model_version = ?",
                key,
            ).fetchone()
            current = bool(old and old[0])
        row = dict(
            row,
            survey_id=run.survey_id,
            scene_id=scene_id,
            model_name=run.model_name,
            model_version=run.model_version,
            model_sha256=run.model_sha256,
            run_id=run.run_id,
            processed_at=gpkg.now(),
            is_current=int(current),
        )
        self._con.execute(
            "DELETE FROM scenes WHERE survey_id = ? AND scene_id = ? "
            "AND model_name = ? AND model_version = ?",
            key,
        )
        names = ", ".join(row)
        self._con.execute(
            f"INSERT INTO scenes ({names}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
        )

    def _transaction(self, uri: str):
        return _Transaction(self._con, f"{self.path}: publishing {uri} failed")

    def crack_columns(self, survey_id: str, fields: Sequence[str]) -> dict[str, np.ndarray]:
        names = check_fields(fields)
        rows = self._con.execute(
            f"SELECT geom, {', '.join(names)} FROM current_cracks WHERE survey_id = ? ORDER BY crack_id",
            (survey_id,),
        ).fetchall()
        return columns_of(rows, names, lambda blobs: shapely.from_wkb([gpkg.wkb(b) for b in blobs]))

    def footprints(self, survey_id: str) -> list[dict]:
        return [
            {"scene_id": r[1], "model_name": r[2], "model_version": r[3], "geometry": gpkg.decode(r[0])}
            for r in self._con.execute(
                "SELECT geom, scene_id, model_name, model_version FROM scenes WHERE survey_id = ? "
                "AND is_current AND geom IS NOT NULL ORDER BY scene_id",
                (survey_id,),
            )
        ]

    def survey_ids(self) -> list[str]:
        return [r[0] for r in self._con.execute("SELECT DISTINCT survey_id FROM scenes ORDER BY 1")]

    def read_layer(self, layer: str, where: dict) -> list[dict]:
        _, names = check_layer(layer)
        sql = (
            f'SELECT geom, {", ".join(f"{chr(34)}{n}{chr(34)}" for n in names)} FROM "{layer}"'
            + (
                " WHERE " + " AND ".join(f'"{check_column(layer, k, names)}" = ?' for k in where)
                if where
                else ""
            )
            + " ORDER BY fid"
        )
        return [
            dict(zip(names, values), geometry=gpkg.decode(geom) if geom else None)
            for geom, *values in self._con.execute(sql, list(where.values()))
        ]

    def replace_layer(
        self,
        layer: str,
        rows: list[dict],
        where: dict,
        keep_previous: bool = False,
        positions: CrackPositions | None = None,
        also: Sequence[tuple[str, list[dict], dict]] = (),
    ) -> None:
        with _Transaction(self._con, f"{self.path}: writing {layer} failed"):
            for target, target_rows, target_where, keep in (
                (layer, rows, where, keep_previous),
                *((*a, False) for a in also),
            ):
                self._replace_rows(target, target_rows, target_where, keep)
            if positions is not None:
                self._put_positions(positions)

    def _put_positions(self, p: CrackPositions) -> None:
        """The road columns on the crack rows themselves (a survey's cracks; SQLite updates in place)."""
        self._con.execute(
            "UPDATE cracks SET road_id = NULL, chainage_from_m = NULL, chainage_to_m = NULL, "
            "offset_m = NULL WHERE survey_id = ? AND road_id IS NOT NULL",
            (p.survey_id,),
        )
        span = np.asarray(p.span_ratio, dtype=float).astype(object)
        span[np.isnan(p.span_ratio)] = None  # NaN -> NULL (numpy's stubs refuse None in np.where)
        self._con.executemany(
            "UPDATE cracks SET road_id = ?, chainage_from_m = ?, chainage_to_m = ?, offset_m = ?, crack_type = ?, "
            "theta_deg = ?, span_ratio = ? WHERE crack_id = ?",
            zip(
                p.road_id,
                p.chainage_from_m.tolist(),
                p.chainage_to_m.tolist(),
                p.offset_m.tolist(),
                p.crack_type,
                p.theta_deg.tolist(),
                span.tolist(),
                p.crack_id,
            ),
        )

    def _replace_rows(self, layer: str, rows: list[dict], where: dict, keep_previous: bool) -> None:
        _, names = check_layer(layer)
        condition = " AND ".join(f'"{check_column(layer, k, names)}" = ?' for k in where) or "1"
        quoted = ", ".join(f'"{n}"' for n in names)
        if keep_previous:
            self._con.execute(
                f'UPDATE "{layer}" SET is_current = 0 WHERE {condition} AND is_current <> 0',
                list(where.values()),
            )
        else:
            self._con.execute(f'DELETE FROM "{layer}" WHERE {condition}', list(where.values()))
        self._con.executemany(
            f'INSERT INTO "{layer}" (geom, {quoted}) VALUES (?{", ?" * len(names)})',
            (
                (
                    gpkg.encode(r["geometry"], self.srs_id) if r.get("geometry") is not None else None,
                    *(r.get(n) for n in names),
                )
                for r in rows
            ),
        )
        gpkg.update_extent(self._con, layer)

    def set_frame_survey(self, survey_id: str, settings: dict | None) -> None:
        with _Transaction(self._con, f"{self.path}: recording survey {survey_id!r} failed"):
            self._con.execute(
                "INSERT INTO surveys (survey_id, frame_survey, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (survey_id) DO UPDATE SET frame_survey = excluded.frame_survey, "
                "updated_at = excluded.updated_at",
                (survey_id, None if settings is None else json.dumps(settings), gpkg.now()),
            )

    def frame_survey(self, survey_id: str) -> dict | None:
        row = self._con.execute(
            "SELECT frame_survey FROM surveys WHERE survey_id = ?", (survey_id,)
        ).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def close(self) -> None:
        if getattr(self, "_con", None) is not None:
            self._con.close()


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK and a StoreError naming what failed."""

    def __init__(self, con, message: str) -> None:
        self._con, self._message = con, message

    def __enter__(self) -> None:
        self._con.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
        if exc_type is None:
            self._con.execute("COMMIT")
            return False
        self._con.execute("ROLLBACK")
        raise store_failure(f"{self._message}; nothing was written ({exc})", exc) from exc
