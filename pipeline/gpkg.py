"""The GeoPackage format, written with the standard library's sqlite3.

A GeoPackage is an SQLite file with a few metadata tables and geometries
stored as a small header plus WKB.  Writing it directly (rather than through
GDAL) gives crackmap real transactions: a scene's rows are replaced in one
``BEGIN ... COMMIT``.  The R-tree spatial index is kept by the same triggers
GDAL creates; the ``ST_*`` functions they call are registered on every
connection this module opens, and GDAL/QGIS provide their own.
"""

from __future__ import annotations

import sqlite3
import struct
from datetime import UTC, datetime
from pathlib import Path

import shapely
from rasterio.crs import CRS
from shapely.geometry.base import BaseGeometry

APPLICATION_ID = 0x47504B47  # "GPKG"
USER_VERSION = 10400  # GeoPackage 1.4
_HEADER = struct.Struct("<2sBBi4d")  # magic, version, flags, srs_id, minx, maxx, miny, maxy
_FLAGS_LE_XY_ENVELOPE = 0b0000_0011
_FLAG_EMPTY = 0b0001_0000


def encode(geometry: BaseGeometry, srs_id: int) -> bytes:
    """GeoPackage binary of a geometry: header with its xy envelope, then little-endian WKB.

    >>> decode(encode(shapely.Point(1, 2), 4326)).wkt
    'POINT (1 2)'
    """
    minx, miny, maxx, maxy = geometry.bounds
    header = _HEADER.pack(b"GP", 0, _FLAGS_LE_XY_ENVELOPE, srs_id, minx, maxx, miny, maxy)
    return header + shapely.to_wkb(geometry, byte_order=1)


def wkb(blob: bytes) -> bytes:
    """The WKB inside a GeoPackage binary (any envelope type).

    >>> wkb(encode(shapely.Point(1, 2), 4326)) == shapely.Point(1, 2).wkb
    True
    """
    envelope_doubles = (0, 4, 6, 6, 8)[(blob[3] >> 1) & 0b111]
    return blob[8 + 8 * envelope_doubles :]


def decode(blob: bytes) -> BaseGeometry:
    """The geometry of a GeoPackage binary (any envelope type)."""
    return shapely.from_wkb(wkb(blob))


def _envelope(blob: bytes | None, index: int) -> float | None:
    """minx, maxx, miny or maxy (by ``index``) of a GeoPackage binary, for the R-tree triggers."""
    if blob is None or blob[3] & _FLAG_EMPTY:
        return None
    if (blob[3] >> 1) & 0b111:  # an envelope is stored: read it from the header
        return struct.unpack_from("<d" if blob[3] & 1 else ">d", blob, 8 + 8 * index)[0]
    minx, miny, maxx, maxy = decode(blob).bounds
    return (minx, maxx, miny, maxy)[index]


BUSY_TIMEOUT_S = 60  # a writer waits this long for another one (runs into one file take turns)


def connect(path: str, read_only: bool = False) -> sqlite3.Connection:
    """Open a GeoPackage with the ``ST_*`` functions its R-tree triggers need.

    ``read_only`` opens the file with ``mode=ro`` (nothing can be written through the
    connection, not even a journal), usable from any thread.
    """
    if read_only:
        con = sqlite3.connect(
            f"{Path(path).resolve().as_uri()}?mode=ro",
            uri=True,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
    else:
        con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)  # explicit BEGIN/COMMIT
    for i, name in enumerate(("ST_MinX", "ST_MaxX", "ST_MinY", "ST_MaxY")):
        con.create_function(name, 1, lambda blob, i=i: _envelope(blob, i), deterministic=True)
    con.create_function(
        "ST_IsEmpty",
        1,
        lambda blob: None if blob is None else int(bool(blob[3] & _FLAG_EMPTY)),
        deterministic=True,
    )
    return con


def now() -> str:
    """The current UTC time as a GeoPackage DATETIME."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def run_script(con: sqlite3.Connection, sql: str) -> None:
    """Run several statements one by one: unlike ``executescript``, inside the caller's transaction.

    >>> con = sqlite3.connect(":memory:", isolation_level=None)
    >>> _ = con.execute("BEGIN")
    >>> run_script(con, "CREATE TABLE t (a); CREATE TRIGGER g AFTER INSERT ON t BEGIN SELECT 1; END;")
    >>> con.in_transaction
    True
    """
    statement = ""
    for part in sql.split(";"):
        statement += part + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \n;"):
                con.execute(statement)
            statement = ""


def init(con: sqlite3.Connection) -> None:
    """Create the GeoPackage metadata tables if absent (in the caller's transaction, if any)."""
    con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    con.execute(f"PRAGMA user_version = {USER_VERSION}")
    run_script(
        con,
        """
    CREATE TABLE IF NOT EXISTS gpkg_spatial_ref_sys (
        srs_name TEXT NOT NULL, srs_id INTEGER PRIMARY KEY, organization TEXT NOT NULL,
        organization_coordsys_id INTEGER NOT NULL, definition TEXT NOT NULL, description TEXT);
    CREATE TABLE IF NOT EXISTS gpkg_contents (
        table_name TEXT NOT NULL PRIMARY KEY, data_type TEXT NOT NULL, identifier TEXT UNIQUE,
        description TEXT DEFAULT '', last_change DATETIME NOT NULL
            DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
        min_x DOUBLE, min_y DOUBLE, max_x DOUBLE, max_y DOUBLE, srs_id INTEGER,
        CONSTRAINT fk_gc_r_srs_id FOREIGN KEY (srs_id) REFERENCES gpkg_spatial_ref_sys(srs_id));
    CREATE TABLE IF NOT EXISTS gpkg_geometry_columns (
        table_name TEXT NOT NULL, column_name TEXT NOT NULL, geometry_type_name TEXT NOT NULL,
        srs_id INTEGER NOT NULL, z TINYINT NOT NULL, m TINYINT NOT NULL,
        CONSTRAINT pk_geom_cols PRIMARY KEY (table_name, column_name));
    CREATE TABLE IF NOT EXISTS gpkg_extensions (
        table_name TEXT, column_name TEXT, extension_name TEXT NOT NULL, definition TEXT NOT NULL,
        scope TEXT NOT NULL, CONSTRAINT ge_tce UNIQUE (table_name, column_name, extension_name));
    INSERT OR IGNORE INTO gpkg_spatial_ref_sys VALUES
        ('Undefined cartesian SRS', -1, 'NONE', -1, 'undefined', 'undefined cartesian coordinate reference system'),
        ('Undefined geographic SRS', 0, 'NONE', 0, 'undefined', 'undefined geographic coordinate reference system');
    """,
    )


def add_srs(con: sqlite3.Connection, crs: CRS) -> int:
    """Register a CRS (must have an EPSG code) and return its srs_id."""
    epsg = crs.to_epsg()
    if epsg is None:
        raise ValueError(f"the store CRS must have an EPSG code, got {crs.to_string()!r}")
    con.execute(
        "INSERT OR IGNORE INTO gpkg_spatial_ref_sys VALUES (?, ?, 'EPSG', ?, ?, NULL)",
        (crs.to_string(), epsg, epsg, crs.to_wkt()),
    )
    return epsg


def add_layer(con: sqlite3.Connection, table: str, geometry_type: str, srs_id: int, columns: str) -> None:
    """Create a feature table with a ``geom`` column and its R-tree, if absent."""
    if con.execute("SELECT 1 FROM gpkg_contents WHERE table_name = ?", (table,)).fetchone():
        return
    rtree = f"rtree_{table}_geom"
    run_script(
        con,
        f"""
    CREATE TABLE "{table}" (fid INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
                            geom {geometry_type}, {columns});
    CREATE VIRTUAL TABLE "{rtree}" USING rtree(id, minx, maxx, miny, maxy);
    CREATE TRIGGER "{rtree}_insert" AFTER INSERT ON "{table}"
      WHEN (new.geom NOT NULL AND NOT ST_IsEmpty(NEW.geom))
      BEGIN INSERT OR REPLACE INTO "{rtree}" VALUES (NEW.fid, ST_MinX(NEW.geom),
            ST_MaxX(NEW.geom), ST_MinY(NEW.geom), ST_MaxY(NEW.geom)); END;
    CREATE TRIGGER "{rtree}_update1" AFTER UPDATE OF geom ON "{table}"
      WHEN OLD.fid = NEW.fid AND (NEW.geom NOTNULL AND NOT ST_IsEmpty(NEW.geom))
      BEGIN INSERT OR REPLACE INTO "{rtree}" VALUES (NEW.fid, ST_MinX(NEW.geom),
            ST_MaxX(NEW.geom), ST_MinY(NEW.geom), ST_MaxY(NEW.geom)); END;
    CREATE TRIGGER "{rtree}_update2" AFTER UPDATE OF geom ON "{table}"
      WHEN OLD.fid = NEW.fid AND (NEW.geom ISNULL OR ST_IsEmpty(NEW.geom))
      BEGIN DELETE FROM "{rtree}" WHERE id = OLD.fid; END;
    CREATE TRIGGER "{rtree}_delete" AFTER DELETE ON "{table}" WHEN old.geom NOT NULL
      BEGIN DELETE FROM "{rtree}" WHERE id = OLD.fid; END;
    """,
    )
    con.execute(
        "INSERT INTO gpkg_contents (table_name, data_type, identifier, srs_id) VALUES (?, 'features', ?, ?)",
        (table, table, srs_id),
    )
    con.execute(
        "INSERT INTO gpkg_geometry_columns VALUES (?, 'geom', ?, ?, 0, 0)", (table, geometry_type, srs_id)
    )
    con.execute(
        "INSERT INTO gpkg_extensions VALUES (?, 'geom', 'gpkg_rtree_index', "
        "'http://www.geopackage.org/spec120/#extension_rtree', 'write-only')",
        (table,),
    )


def add_table(con: sqlite3.Connection, table: str, columns: str) -> None:
    """Create an attributes table (no geometry; GeoPackage data type ``attributes``), if absent."""
    if con.execute("SELECT 1 FROM gpkg_contents WHERE table_name = ?", (table,)).fetchone():
        return
    con.execute(f'CREATE TABLE "{table}" (fid INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, {columns})')
    con.execute(
        "INSERT INTO gpkg_contents (table_name, data_type, identifier) VALUES (?, 'attributes', ?)",
        (table, table),
    )


def add_view(con: sqlite3.Connection, view: str, select: str, geometry_type: str, srs_id: int) -> None:
    """Create a view of a feature table (its ``fid`` and ``geom`` included) as a layer, if absent."""
    if con.execute("SELECT 1 FROM gpkg_contents WHERE table_name = ?", (view,)).fetchone():
        return
    con.execute(f'CREATE VIEW IF NOT EXISTS "{view}" AS {select}')
    con.execute(
        "INSERT INTO gpkg_contents (table_name, data_type, identifier, srs_id) VALUES (?, 'features', ?, ?)",
        (view, view, srs_id),
    )
    con.execute(
        "INSERT INTO gpkg_geometry_columns VALUES (?, 'geom', ?, ?, 0, 0)", (view, geometry_type, srs_id)
    )


def update_extent(con: sqlite3.Connection, table: str) -> None:
    """Refresh a layer's extent in gpkg_contents from its R-tree."""
    con.execute(
        f"""UPDATE gpkg_contents SET last_change = ?,
        (min_x, max_x, min_y, max_y) = (SELECT min(minx), max(maxx), min(miny), max(maxy)
                                        FROM "rtree_{table}_geom")
        WHERE table_name = ?""",
        (now(), table),
    )
