"""PostGIS as a crack store: the production store that road-asset managers open in QGIS.

The schema comes from the plain-SQL migrations in ``pipeline/migrations`` (package data; applied
in order, recorded in ``schema_migrations``; ``python -m pipeline.stores.postgis
migrate URL``).  A scene is published in one transaction: its rows for the same
survey and model version are deleted and the new ones bulk-loaded with a
binary COPY of EWKB geometries.  If the connection dies on the way, the server
rolls the transaction back and the next publish reconnects.

Roles (created by the first migration, granted to login users by the database
owner): ``crackmap_writer`` publishes, ``crackmap_reader`` only reads.
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import shapely
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Jsonb
from rasterio.crs import CRS

from pipeline import layers
from pipeline.errors import StoreError
from pipeline.records import CrackPositions, SceneResult
from pipeline.stores.base import (
    DEFAULT_CRS,
    QUERY_FIELDS,
    SCENE_FIELDS,
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
    database_transient,
    empty_summary,
    frames_text,
    missing_scenes,
    store_failure,
)

# Shipped inside the package (package data), so any install, editable or not, has them.
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
MIGRATION_LOCK = 0x6372_6B6D  # "crkm": pg_advisory_xact_lock key, one migrator at a time
# The binary COPY of a crack row: the fixed-size fields, the scene's constant ones, then the
# variable ones.  Geometry travels as EWKB, which is the geometry type's binary input.
CRACK_COPY_COLUMNS = (
    "crack_id",
    "length_m",
    "width_mean_mm",
    "width_max_mm",
    "orientation_deg",
    "confidence",
    "survey_id",
    "scene_id",
    "model_name",
    "model_version",
    "model_sha256",
    "run_id",
    "created_at",
    "severity",
    "geom",
    "crack_type",
    "theta_deg",
    "chord_m",
    "tortuosity",
    "span_ratio",
    "pattern_no",
    "gsd_mm",
    "range_m",
    "pos_accuracy_m",
    "source_frames",
)
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_COPY_FIXED = struct.Struct(">hi16s" + "id" * 5)  # field count, uuid, five float8
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _field(data: bytes) -> bytes:
    return struct.pack(">i", len(data)) + data


_NULL = struct.pack(">i", -1)
_TYPES = {t: _field(t.encode()) for t in ("longitudinal", "transverse", "diagonal", "joint", "pattern")}


def _typing(c) -> bytes:
    """The binary COPY fields of a crack's typing columns (NULL where not typed)."""
    return b"".join(
        (
            _NULL if c.crack_type is None else (_TYPES.get(c.crack_type) or _field(c.crack_type.encode())),
            *(
                _NULL if v is None else struct.pack(">id", 8, v)
                for v in (c.theta_deg, c.chord_m, c.tortuosity, c.span_ratio)
            ),
            _NULL if c.pattern_no is None else struct.pack(">ii", 4, c.pattern_no),
        )
    )


def _optional(value: float | None) -> bytes:
    """A nullable float8 field of a binary COPY row."""
    return _NULL if value is None else struct.pack(">id", 8, value)


def binary_copy(columns: Sequence[tuple[str, np.ndarray]]) -> bytes:
    """Rows of equal-length column arrays as one binary COPY stream, built with numpy (no loop per row).

    Kinds: ``uuid`` (str), ``text`` (str; None is NULL) and ``float8`` (NaN is NULL).
    Rows are grouped by their fields' byte lengths; each group is one structured
    array, so a million rows take a few array operations, not a million ``struct`` calls.
    Rows come out grouped, not in input order.

    >>> data = binary_copy([("text", np.array(["a", None], dtype=object)), ("float8", np.array([1.0, np.nan]))])
    >>> len(data), data[19:29].hex(" "), data[29:36].hex(" ")  # the NULL row's group sorts first
    (50, '00 02 ff ff ff ff ff ff ff ff', '00 02 00 00 00 01 61')
    """
    n = len(columns[0][1])
    sizes, payloads = [], []  # per column: each row's field length (-1: NULL), and the values
    for kind, values in columns:
        if kind == "uuid":
            hexed = "".join(values).replace("-", "")
            payloads.append(np.frombuffer(bytes.fromhex(hexed), dtype="V16") if n else np.zeros(0, "V16"))
            sizes.append(np.full(n, 16))
        elif kind == "float8":
            values = np.asarray(values, dtype=float)
            payloads.append(values.astype(">f8"))
            sizes.append(np.where(np.isnan(values), -1, 8))
        else:  # text: few distinct values (ids, classes), encoded once each
            distinct = list(dict.fromkeys(values))
            code = {v: i for i, v in enumerate(distinct)}
            codes = np.fromiter((code[v] for v in values), dtype=np.int64, count=n)
            encoded = [b"" if v is None else v.encode() for v in distinct]
            payloads.append(np.array(encoded, dtype=object)[codes])
            sizes.append(np.array([-1 if v is None else len(e) for v, e in zip(distinct, encoded)])[codes])
    key = np.zeros(n, dtype=np.int64)  # rows with the same field lengths share a key
    for size in sizes:
        values, inverse = np.unique(size, return_inverse=True)
        key = key * len(values) + inverse.ravel()
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1], True])
    chunks = [_COPY_SIGNATURE]
    for begin, end in zip(bounds[:-1], bounds[1:]):
        rows = order[begin:end]
        shape = [int(size[rows[0]]) for size in sizes]
        fields = [("count", ">i2")]
        for i, ((kind, _), length) in enumerate(zip(columns, shape)):
            fields.append((f"n{i}", ">i4"))
            if length > 0:  # NULL (-1) and '' (0) have no bytes
                fields.append((f"v{i}", {"uuid": "V16", "float8": ">f8"}.get(kind, f"S{length}")))
        block = np.zeros(len(rows), dtype=np.dtype(fields))
        block["count"] = len(columns)
        for i, length in enumerate(shape):
            block[f"n{i}"] = length
            if length > 0:
                values = payloads[i][rows]
                block[f"v{i}"] = values if values.dtype != object else values.astype(f"S{length}")
        chunks.append(block.tobytes())
    chunks.append(_COPY_TRAILER)
    return b"".join(chunks)


def copy_payload(
    result: SceneResult, run: RunInfo, ewkb: np.ndarray, created: datetime, rows_per_chunk: int = 5000
) -> Iterator[bytes]:
    """The binary COPY stream of a scene's crack rows (columns CRACK_COPY_COLUMNS), in chunks.

    Built with ``struct`` rather than row by row through psycopg's dumpers: this
    is what makes the load fast enough (see benchmarks/store_bulk_load.py).
    """
    scene_id = result.scene.scene_id
    micros = (created - _PG_EPOCH) // timedelta(microseconds=1)
    constant = b"".join(
        _field(v.encode())
        for v in (run.survey_id, scene_id, run.model_name, run.model_version, run.model_sha256, run.run_id)
    )
    constant += _field(struct.pack(">q", micros))
    severity = {s: _field(s.encode()) for s in ("low", "medium", "high")}
    ids = crack_uuid_bytes(run, scene_id, len(result.cracks))
    n = len(CRACK_COPY_COLUMNS)
    pack = _COPY_FIXED.pack
    yield _COPY_SIGNATURE
    for start in range(0, len(ids), rows_per_chunk):
        stop = start + rows_per_chunk
        yield b"".join(
            [
                pack(
                    n,
                    16,
                    uid,
                    8,
                    c.length_m,
                    8,
                    c.width_mean_mm,
                    8,
                    c.width_max_mm,
                    8,
                    c.orientation_deg,
                    8,
                    c.confidence,
                )
                + constant
                + (severity.get(c.severity) or _field(c.severity.encode()))  # the CHECK refuses others
                + struct.pack(">i", len(g))
                + g
                + _typing(c)
                + _optional(c.gsd_mm)
                + _optional(c.range_m)
                + _optional(c.pos_accuracy_m)
                + (_field(t.encode()) if (t := frames_text(c.source_frames)) else _NULL)
                for uid, c, g in zip(ids[start:stop], result.cracks[start:stop], ewkb[start:stop])
            ]
        )
    yield _COPY_TRAILER


def display_url(url: str) -> str:
    """A connection URL as it may be shown: user, host, port and database, never the password.

    >>> display_url("postgresql://mapper:s3cret@db:5433/cracks")
    'postgresql://mapper@db:5433/cracks'
    """
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def why(exc: BaseException) -> str:
    """A database error on one line (libpq's messages span several).

    >>> why(OSError("server closed the connection\\n\\tunexpectedly"))
    'server closed the connection unexpectedly'
    """
    return " ".join(str(exc).split()) or type(exc).__name__


def connect(url: str, timeout_s: int | None = None) -> psycopg.Connection:
    """An autocommit connection (transactions are explicit), or a StoreError without the password.

    ``timeout_s`` bounds the wait for a host that drops packets, where PGCONNECT_TIMEOUT
    does not already (libpq waits for the operating system's TCP timeout otherwise).
    """
    extra: dict[str, Any] = {}
    if timeout_s is not None and not os.environ.get("PGCONNECT_TIMEOUT"):
        extra["connect_timeout"] = timeout_s
    try:
        return psycopg.connect(url, autocommit=True, application_name="crackmap", **extra)
    except psycopg.Error as exc:
        problem = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        password = conninfo_to_dict(url).get("password") if "://" in url else None
        if password:
            problem = problem.replace(str(password), "***")
        raise StoreError(
            f"{display_url(url)}: cannot connect ({problem}); check the host, port, "
            "user and password (the URL, PG* variables or ~/.pgpass)",
            transient=database_transient(exc),
        ) from None


def migrations(folder: Path = MIGRATIONS) -> list[tuple[str, Path]]:
    """The migrations in order: (version, file) for every ``NNNN_name.sql``."""
    found = sorted((p.name.split("_", 1)[0], p) for p in folder.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    if not found:
        raise StoreError(
            f"{folder} holds no migrations (NNNN_name.sql): this crackmap installation is "
            "incomplete; reinstall it (pip install crackmap)"
        )
    return found


def migration_sql(path: Path, srid: int) -> str:
    """A migration's SQL with psql-style ``:srid`` replaced (``::`` casts are left alone).

    >>> import tempfile; f = Path(tempfile.mkdtemp()) / "0001_x.sql"
    >>> _ = f.write_text("geometry(Point, :srid), x::text")
    >>> migration_sql(f, 3857)
    'geometry(Point, 3857), x::text'
    """
    return re.sub(r"(?<!:):srid\b", str(int(srid)), path.read_text())


def migrate(con: psycopg.Connection, srid: int = 4326, folder: Path = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded in ``schema_migrations``; returns their versions.

    Each migration runs in its own transaction, under an advisory lock, so
    concurrent callers apply each one once.  ``srid`` only matters for the
    migration that creates the geometry columns.
    """
    applied = []
    for version, path in migrations(folder):
        with con.transaction():
            con.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            if con.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (version,)).fetchone():
                continue
            con.execute(migration_sql(path, srid).encode())
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, path.name))
        applied.append(version)
    return applied


def scalar(con: psycopg.Connection, query: str, params: Sequence[Any] = ()) -> Any:
    """The value of a query that returns one row of one column (an aggregate, a function call)."""
    row = con.execute(query, params).fetchone()
    if row is None:
        raise StoreError(f"{query.split()[0]} returned no row")
    return row[0]


def schema_version(con: psycopg.Connection) -> str | None:
    """The newest applied migration, or None on a database without the schema."""
    if not scalar(con, "SELECT to_regclass('schema_migrations')"):
        return None
    return scalar(con, "SELECT max(version) FROM schema_migrations")


class PostGISStore(StoreBase):
    """Tables ``cracks`` (LineString) and ``scenes`` (footprint Polygon) in a PostGIS database.

    Opening a database without the schema (or with an older one) applies the
    migrations, which needs a role that may create tables; the writer role
    ``crackmap_writer`` publishes into an up-to-date schema.
    """

    def __init__(self, url: str, crs: CRS = DEFAULT_CRS) -> None:
        self.url = url
        self.name = display_url(url)
        self._con = connect(url)
        try:
            self._ensure_schema(crs)
            srid = scalar(self._con, "SELECT Find_SRID('public', 'cracks', 'geom')")
        except psycopg.Error as exc:
            self._con.close()
            raise store_failure(
                f"{self.name}: cannot open as a crackmap store ({why(exc)}). Apply the "
                "migrations as the database owner: python -m pipeline.stores.postgis migrate URL",
                exc,
            ) from exc
        self.srid = int(srid)
        self.crs = CRS.from_epsg(self.srid)
        if self.crs != crs:
            self._con.close()
            raise StoreError(
                f"{self.name} stores EPSG:{self.srid}, not {crs.to_string()}; "
                "publish to a new database or use the store's CRS"
            )

    def _ensure_schema(self, crs: CRS) -> None:
        latest = migrations()[-1][0]
        if schema_version(self._con) != latest:
            epsg = crs.to_epsg()
            if epsg is None:
                raise StoreError(
                    f"{self.name}: the store CRS must have an EPSG code, got {crs.to_string()!r}"
                )
            migrate(self._con, epsg)

    def _connection(self) -> psycopg.Connection:
        """The connection, opened again if the last one was lost (the server rolled it back)."""
        if self._con.closed or self._con.broken:
            self._con = connect(self.url)
        return self._con

    def publish(self, result: SceneResult, run: RunInfo, promote: bool = True) -> None:
        scene_crs = check_crs(result, self.crs, self.name)
        scene = result.scene
        geometries = shapely.set_srid(np.array([c.geometry for c in result.cracks], dtype=object), self.srid)
        ewkb = shapely.to_wkb(geometries, include_srid=True, byte_order=1)
        footprint = shapely.to_wkb(shapely.set_srid(result.footprint, self.srid), include_srid=True)
        created = datetime.now(UTC)
        key = (run.survey_id, scene.scene_id, run.model_name, run.model_version)
        con = self._connection()
        try:
            with con.transaction():
                self._put_run(con, run)
                if promote:
                    self._uncurrent_others(
                        con, run.survey_id, [scene.scene_id], run.model_name, run.model_version
                    )
                con.execute(
                    "INSERT INTO scenes (survey_id, scene_id, model_name, model_version, model_sha256, "
                    "run_id, source_uri, sha256, crs, width, height, chip_count, crack_count, "
                    "total_length_m, status, error, probability_uri, processed_at, is_current, footprint, "
                    "inference) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'done', NULL, %s, "
                    "%s, %s, ST_GeomFromEWKB(%s), %s) "
                    "ON CONFLICT (survey_id, scene_id, model_name, model_version) DO UPDATE SET "
                    "model_sha256 = excluded.model_sha256, run_id = excluded.run_id, "
                    "source_uri = excluded.source_uri, sha256 = excluded.sha256, crs = excluded.crs, "
                    "width = excluded.width, height = excluded.height, chip_count = excluded.chip_count, "
                    "crack_count = excluded.crack_count, total_length_m = excluded.total_length_m, "
                    "status = 'done', error = NULL, probability_uri = excluded.probability_uri, "
                    "processed_at = excluded.processed_at, footprint = excluded.footprint, "
                    "inference = excluded.inference, is_current = excluded.is_current OR scenes.is_current",
                    (
                        *key,
                        run.model_sha256,
                        run.run_id,
                        scene.uri,
                        result.sha256,
                        scene_crs.to_string(),
                        scene.width,
                        scene.height,
                        result.chip_count,
                        len(result.counted),
                        result.total_length_m,
                        result.probability_path,
                        created,
                        promote,
                        footprint,
                        result.inference or None,
                    ),
                )
                con.execute(
                    "DELETE FROM cracks WHERE survey_id = %s AND scene_id = %s "
                    "AND model_name = %s AND model_version = %s",
                    key,
                )
                self._copy_cracks(con, result, run, ewkb, created)
                self._put_pattern_areas(con, result, run)
        except psycopg.OperationalError as exc:
            raise store_failure(
                f"{self.name}: lost the connection while publishing {scene.uri} ({why(exc)}); "
                "the server rolled the scene back, nothing was written; publish it "
                "again",
                exc,
            ) from exc
        except psycopg.Error as exc:
            raise store_failure(
                f"{self.name}: publishing {scene.uri} failed; nothing was written ({why(exc)})", exc
            ) from exc

    def _copy_cracks(
        self, con: psycopg.Connection, result: SceneResult, run: RunInfo, ewkb: np.ndarray, created: datetime
    ) -> None:
        with (
            con.cursor() as cur,
            cur.copy(f"COPY cracks ({', '.join(CRACK_COPY_COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            for chunk in copy_payload(result, run, ewkb, created):
                copy.write(chunk)

    def _put_pattern_areas(self, con: psycopg.Connection, result: SceneResult, run: RunInfo) -> None:
        key = (run.survey_id, result.scene.scene_id, run.model_name, run.model_version)
        con.execute(
            "DELETE FROM pattern_areas WHERE survey_id = %s AND scene_id = %s AND model_name = %s "
            "AND model_version = %s",
            key,
        )
        if result.pattern_areas:
            geometries = shapely.to_wkb(
                shapely.set_srid(
                    np.array([a.geometry for a in result.pattern_areas], dtype=object), self.srid
                ),
                include_srid=True,
            )
            with con.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO pattern_areas ({', '.join(layers.columns('pattern_areas'))}, geom) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, ST_GeomFromEWKB(%s))",
                    [
                        (
                            *key,
                            no,
                            a.pattern_class,
                            a.area_m2,
                            a.crack_density_m_per_m2,
                            a.width_mean_mm,
                            a.width_max_mm,
                            a.severity,
                            a.piece_m,
                            g,
                        )
                        for no, (a, g) in enumerate(zip(result.pattern_areas, geometries))
                    ],
                )

    @staticmethod
    def _put_run(con: psycopg.Connection, run: RunInfo) -> None:
        con.execute("INSERT INTO surveys (survey_id) VALUES (%s) ON CONFLICT DO NOTHING", (run.survey_id,))
        sha256 = scalar(
            con,
            "INSERT INTO models (model_name, model_version, model_sha256) VALUES (%s, %s, %s) "
            "ON CONFLICT (model_name, model_version) DO UPDATE SET model_sha256 = models.model_sha256 "
            "RETURNING model_sha256",
            (run.model_name, run.model_version, run.model_sha256),
        )
        if sha256 != run.model_sha256:
            raise StoreError(
                f"model {run.model_name}:{run.model_version} was published with sha256 "
                f"{sha256}, now {run.model_sha256}; versions are immutable: publish the "
                "changed model as a new version"
            )
        con.execute(
            "INSERT INTO runs (run_id, survey_id, model_name, model_version) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (run.run_id, run.survey_id, run.model_name, run.model_version),
        )

    @staticmethod
    def _uncurrent_others(
        con: psycopg.Connection, survey_id: str, scene_ids: Sequence[str], model_name: str, model_version: str
    ) -> None:
        con.execute(
            "UPDATE scenes SET is_current = false WHERE survey_id = %s AND scene_id = ANY(%s) "
            "AND is_current AND (model_name, model_version) <> (%s, %s)",
            (survey_id, list(scene_ids), model_name, model_version),
        )

    def mark_failed(self, uri: str, scene_id: str, run: RunInfo, error: str) -> None:
        con = self._connection()
        try:
            with con.transaction():
                self._put_run(con, run)
                con.execute(
                    "INSERT INTO scenes (survey_id, scene_id, model_name, model_version, model_sha256, "
                    "run_id, source_uri, status, error, processed_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, 'failed', %s, now()) "
                    "ON CONFLICT (survey_id, scene_id, model_name, model_version) DO UPDATE SET "
                    "model_sha256 = excluded.model_sha256, run_id = excluded.run_id, "
                    "source_uri = excluded.source_uri, status = 'failed', error = excluded.error, "
                    "processed_at = excluded.processed_at, inference = NULL",
                    (
                        run.survey_id,
                        scene_id,
                        run.model_name,
                        run.model_version,
                        run.model_sha256,
                        run.run_id,
                        uri,
                        error,
                    ),
                )
        except psycopg.Error as exc:
            raise store_failure(
                f"{self.name}: recording {uri} as failed did not work ({why(exc)})", exc
            ) from exc

    def published_sha256(
        self, survey_id: str, scene_id: str, model_name: str, model_version: str
    ) -> str | None:
        row = (
            self._connection()
            .execute(
                "SELECT sha256 FROM scenes WHERE survey_id = %s AND scene_id = %s AND model_name = %s "
                "AND model_version = %s AND status = 'done'",
                (survey_id, scene_id, model_name, model_version),
            )
            .fetchone()
        )
        return row[0] if row else None

    def promote(
        self, survey_id: str, scene_ids: Sequence[str] | None, model_name: str, model_version: str
    ) -> int:
        model = f"{model_name}:{model_version}"
        con = self._connection()
        try:
            with con.transaction():
                found = [
                    r[0]
                    for r in con.execute(
                        "SELECT scene_id FROM scenes WHERE survey_id = %s AND model_name = %s "
                        "AND model_version = %s AND status = 'done' AND (%s::text[] IS NULL "
                        "OR scene_id = ANY(%s::text[])) FOR UPDATE",
                        (
                            survey_id,
                            model_name,
                            model_version,
                            scene_ids and list(scene_ids),
                            scene_ids and list(scene_ids),
                        ),
                    )
                ]
                missing_scenes(scene_ids, found, survey_id, model)
                self._uncurrent_others(con, survey_id, found, model_name, model_version)
                con.execute(
                    "UPDATE scenes SET is_current = true WHERE survey_id = %s "
                    "AND scene_id = ANY(%s) AND model_name = %s AND model_version = %s",
                    (survey_id, found, model_name, model_version),
                )
        except psycopg.Error as exc:
            raise store_failure(
                f"{self.name}: promoting {model} in survey {survey_id!r} failed; nothing "
                f"was changed ({why(exc)})",
                exc,
            ) from exc
        return len(found)

    def query(self, query: CrackQuery = CrackQuery(), batch_size: int = 10_000) -> Iterator[list[dict]]:
        where, params = [], []
        for column in ("survey_id", "scene_id", "severity", "model_name", "model_version"):
            if (value := getattr(query, column)) is not None:
                where.append(f"{column} = %s")
                params.append(value)
        if query.bbox is not None:
            where.append("ST_Intersects(geom, ST_MakeEnvelope(%s, %s, %s, %s, %s))")
            params += [*query.bbox, self.srid]
        table = "all_cracks" if query.model_version is not None else "current_cracks"
        fields = [f for f in QUERY_FIELDS if f not in ("crack_id", "created_at")]
        sql = (
            f"SELECT ST_AsBinary(geom), crack_id::text, {', '.join(fields)}, "
            """to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') """
            f"FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "")
        )
        names = ("crack_id", *fields, "created_at")
        # its own connection: a server-side cursor streams while the store goes on publishing
        with connect(self.url) as con, con.transaction(), con.cursor(name="crackmap_query") as cur:
            cur.itersize = batch_size
            try:
                cur.execute(sql, params)
                while rows := cur.fetchmany(batch_size):
                    geometries = shapely.from_wkb([r[0] for r in rows])
                    yield [dict(zip(names, r[1:]), geometry=g) for r, g in zip(rows, geometries)]
            except psycopg.Error as exc:
                raise store_failure(f"{self.name}: the query failed ({why(exc)})", exc) from exc

    def scenes(self, selection: SceneSelection = SceneSelection()) -> list[dict]:
        conditions = selection.comparisons()
        where = [
            f"{column} {op} %s" + ("::timestamptz" if column == "processed_at" else "")
            for column, op, _ in conditions
        ]
        params: list = [value for _, _, value in conditions]
        if selection.current_only:
            where.append("is_current")
        if selection.bbox is not None:
            where.append("ST_Intersects(footprint, ST_MakeEnvelope(%s, %s, %s, %s, %s))")
            params += [*selection.bbox, self.srid]
        fields = [f for f in SCENE_FIELDS if f != "processed_at"]
        sql = (
            f"SELECT {', '.join(fields)}, "
            """to_char(processed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') """
            "FROM scenes"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY survey_id, scene_id, model_name, model_version"
        )
        try:
            rows = self._connection().execute(sql, params).fetchall()
        except psycopg.Error as exc:
            raise store_failure(f"{self.name}: reading scenes failed ({why(exc)})", exc) from exc
        return [dict(zip((*fields, "processed_at"), r)) for r in rows]

    def scene_summaries(
        self, survey_id: str, model_name: str, model_version: str, scene_ids: Sequence[str] | None = None
    ) -> dict[str, dict]:
        key = (survey_id, model_name, model_version)
        con = self._connection()
        summaries: dict[str, dict] = {}
        try:
            for scene_id, status, chips in con.execute(
                "SELECT scene_id, status, chip_count FROM scenes WHERE survey_id = %s "
                "AND model_name = %s AND model_version = %s",
                key,
            ):
                if scene_ids is None or scene_id in scene_ids:
                    summaries[scene_id] = dict(empty_summary(), status=status, chip_count=chips or 0)
            rows = con.execute(
                "SELECT scene_id, severity, count(*), sum(length_m) FROM cracks WHERE survey_id = %s "
                "AND model_name = %s AND model_version = %s AND crack_type IS DISTINCT FROM 'joint' "
                "GROUP BY scene_id, severity",
                key,
            ).fetchall()
        except psycopg.Error as exc:
            raise store_failure(f"{self.name}: reading scene summaries failed ({why(exc)})", exc) from exc
        for scene_id, severity, count, length in rows:
            if (summary := summaries.get(scene_id)) is not None:
                summary["crack_count"] += count
                summary["total_length_m"] += length
                summary["length_m_by_severity"][severity] = length
        return summaries

    def crack_columns(self, survey_id: str, fields: Sequence[str]) -> dict[str, np.ndarray]:
        names = check_fields(fields)
        selected = ", ".join("crack_id::text" if n == "crack_id" else n for n in names)
        try:
            with self._connection().cursor(binary=True) as cur:
                rows = cur.execute(
                    f"SELECT ST_AsBinary(geom), {selected} FROM current_cracks "
                    "WHERE survey_id = %s ORDER BY crack_id",
                    (survey_id,),
                ).fetchall()
        except psycopg.Error as exc:
            raise store_failure(
                f"{self.name}: reading the cracks of {survey_id!r} failed ({why(exc)})", exc
            ) from exc
        return columns_of(rows, names, shapely.from_wkb)

    def footprints(self, survey_id: str) -> list[dict]:
        try:
            rows = (
                self._connection()
                .execute(
                    "SELECT ST_AsBinary(footprint), scene_id, model_name, model_version FROM scenes "
                    "WHERE survey_id = %s AND is_current AND footprint IS NOT NULL ORDER BY scene_id",
                    (survey_id,),
                )
                .fetchall()
            )
        except psycopg.Error as exc:
            raise store_failure(f"{self.name}: reading scene footprints failed ({why(exc)})", exc) from exc
        return [
            {"scene_id": r[1], "model_name": r[2], "model_version": r[3], "geometry": shapely.from_wkb(r[0])}
            for r in rows
        ]

    def survey_ids(self) -> list[str]:
        try:
            return [
                r[0]
                for r in self._connection()
                .execute("SELECT DISTINCT survey_id FROM scenes ORDER BY 1")
                .fetchall()
            ]
        except psycopg.Error as exc:
            raise store_failure(f"{self.name}: reading surveys failed ({why(exc)})", exc) from exc

    def read_layer(self, layer: str, where: dict) -> list[dict]:
        _, names = check_layer(layer)
        sql = (
            f"SELECT ST_AsBinary(geom), {', '.join(f'{chr(34)}{n}{chr(34)}' for n in names)} FROM {layer}"
            + (
                " WHERE " + " AND ".join(f'"{check_column(layer, k, names)}" = %s' for k in where)
                if where
                else ""
            )
            + " ORDER BY fid"
        )
        try:
            rows = self._connection().execute(sql, list(where.values())).fetchall()
        except psycopg.Error as exc:
            raise store_failure(f"{self.name}: reading {layer} failed ({why(exc)})", exc) from exc
        return [
            dict(zip(names, values), geometry=shapely.from_wkb(geom) if geom else None)
            for geom, *values in rows
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
        con = self._connection()
        try:
            with con.transaction(), con.cursor() as cur:
                for target, target_rows, target_where, keep in (
                    (layer, rows, where, keep_previous),
                    *((*a, False) for a in also),
                ):
                    self._replace_rows(cur, target, target_rows, target_where, keep)
                if positions is not None:
                    self._put_positions(cur, positions)
        except psycopg.Error as exc:
            raise store_failure(
                f"{self.name}: writing {layer} failed; nothing was written ({why(exc)})", exc
            ) from exc

    def _replace_rows(
        self, cur: psycopg.Cursor, layer: str, rows: list[dict], where: dict, keep_previous: bool
    ) -> None:
        _, names = check_layer(layer)
        condition = " AND ".join(f'"{check_column(layer, k, names)}" = %s' for k in where) or "true"
        geometries = shapely.to_wkb(
            shapely.set_srid(np.array([r.get("geometry") for r in rows], dtype=object), self.srid),
            include_srid=True,
            hex=True,
        )
        if keep_previous:
            cur.execute(
                f"UPDATE {layer} SET is_current = 0 WHERE {condition} AND is_current <> 0",
                list(where.values()),
            )
        else:
            cur.execute(f"DELETE FROM {layer} WHERE {condition}", list(where.values()))
        quoted = ", ".join(f'"{n}"' for n in names)
        with cur.copy(f"COPY {layer} ({quoted}, geom) FROM STDIN") as copy:
            for row, geometry in zip(rows, geometries):
                copy.write_row([*(_plain(row.get(n)) for n in names), geometry])

    @staticmethod
    def _put_positions(cur: psycopg.Cursor, positions: CrackPositions) -> None:
        """Replace the survey's rows of ``crack_positions``: one DELETE and one binary COPY.

        Not an UPDATE of the crack rows: that writes a new version of every row and
        of its entries in every index of ``cracks`` (migration 0005).
        """
        cur.execute(
            "DELETE FROM crack_positions p USING cracks c WHERE c.survey_id = %s AND p.crack_id = c.crack_id",
            (positions.survey_id,),
        )
        if not len(positions.crack_id):
            return
        p = positions
        payload = binary_copy(
            [
                ("uuid", p.crack_id),
                ("text", np.full(len(p.crack_id), p.survey_id, dtype=object)),
                ("text", p.road_id),
                ("float8", p.chainage_from_m),
                ("float8", p.chainage_to_m),
                ("float8", p.offset_m),
                ("text", p.crack_type),
                ("float8", p.theta_deg),
                ("float8", p.span_ratio),
            ]
        )
        with cur.copy(
            "COPY crack_positions (crack_id, survey_id, road_id, chainage_from_m, chainage_to_m, "
            "offset_m, crack_type, theta_deg, span_ratio) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            for start in range(0, len(payload), 1 << 24):
                copy.write(payload[start : start + (1 << 24)])

    def set_frame_survey(self, survey_id: str, settings: dict | None) -> None:
        con = self._connection()
        try:
            with con.transaction():
                con.execute(
                    "INSERT INTO surveys (survey_id, frame_survey, updated_at) VALUES (%s, %s, now()) "
                    "ON CONFLICT (survey_id) DO UPDATE SET frame_survey = excluded.frame_survey, "
                    "updated_at = excluded.updated_at",
                    (survey_id, None if settings is None else Jsonb(settings)),
                )
        except psycopg.Error as exc:
            raise store_failure(
                f"{self.name}: recording survey {survey_id!r} failed ({why(exc)})", exc
            ) from exc

    def frame_survey(self, survey_id: str) -> dict | None:
        try:
            row = (
                self._connection()
                .execute("SELECT frame_survey FROM surveys WHERE survey_id = %s", (survey_id,))
                .fetchone()
            )
        except psycopg.Error as exc:
            raise store_failure(
                f"{self.name}: reading survey {survey_id!r} failed ({why(exc)})", exc
            ) from exc
        return row[0] if row and row[0] is not None else None

    def close(self) -> None:
        self._con.close()


def _plain(value):
    """A value as COPY takes it: NaN and numpy scalars become None and Python numbers."""
    if value is None:
        return None
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.stores.postgis migrate URL [--srid N]``: bring a database's schema up to date."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.stores.postgis")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("migrate", help="apply the migrations shipped in pipeline/migrations not yet applied")
    up.add_argument("url", help="postgresql://user@host:port/dbname (a role that may create tables)")
    up.add_argument("--srid", type=int, default=4326, help="EPSG code of a new schema's geometries")
    args = parser.parse_args(argv)
    try:
        with connect(args.url) as con:
            applied = migrate(con, args.srid)
    except (StoreError, psycopg.Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{display_url(args.url)}: applied {', '.join(applied) or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
