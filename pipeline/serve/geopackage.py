"""tipg collections backed by a GeoPackage: the same OGC API routes as on PostGIS.

tipg serves OGC API Features and Tiles from PostGIS only; its routes, HTML pages,
conformance and tile matrix sets work on any ``tipg.collections.Collection``.  This
module is that collection for a GeoPackage layer: rows are read with the standard
library's sqlite3 (the file opened read-only, the layer's R-tree used for bbox and
tile queries), geometries are tested with shapely, CQL2 text is evaluated by the
``cql2`` library tipg itself parses with, and tiles are encoded by
``mapbox-vector-tile``.  No SQLite extension is loaded.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import mapbox_vector_tile
import numpy as np
import shapely
from morecantile import Tile, TileMatrixSet
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from tipg.collections import Catalog, Collection, Column, Feature, ItemList
from tipg.errors import (
    InvalidDatetime,
    InvalidDatetimeColumnName,
    InvalidGeometryColumnName,
    InvalidLimit,
    InvalidPropertyName,
    MissingDatetimeColumn,
)
from tipg.settings import FeaturesSettings, MVTSettings

from pipeline import gpkg
from pipeline.stores.base import utc_text

# SQLite declared types -> the PostgreSQL type names tipg's Column understands.
_TYPES = {
    "TEXT": "text",
    "REAL": "double precision",
    "DOUBLE": "double precision",
    "FLOAT": "double precision",
    "INTEGER": "bigint",
    "INT": "bigint",
    "MEDIUMINT": "integer",
    "SMALLINT": "smallint",
    "TINYINT": "smallint",
    "BOOLEAN": "boolean",
    "DATETIME": "timestamptz",
    "DATE": "date",
    "BLOB": "bytea",
}
_SORT = re.compile(r"^(?P<direction>[+-]?)(?P<column>\w+)$")


class CqlNotSupported(ValueError):
    """A CQL2 filter that cannot be evaluated on a GeoPackage (spatial or temporal operators)."""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _column_type(declared: str) -> str:
    return _TYPES.get(re.sub(r"\(.*", "", declared.strip().upper()), "text")


@dataclass(frozen=True, slots=True)
class GeoPackageReader:
    """What the tipg routes ``acquire()`` from ``app.state.pool``: a GeoPackage to read."""

    path: Path

    def connect(self) -> sqlite3.Connection:
        """A read-only connection (``mode=ro``): serving never writes to the store."""
        return gpkg.connect(str(self.path), read_only=True)


class GeoPackagePool:
    """Stands in for tipg's asyncpg pool: ``async with pool.acquire() as reader``."""

    def __init__(self, path: Path) -> None:
        self.reader = GeoPackageReader(path)

    @asynccontextmanager
    async def acquire(self):
        yield self.reader

    async def close(self) -> None:
        """Nothing to close: each query opens and closes its own connection."""


class GeoPackageCollection(Collection):
    """One feature table or view of a GeoPackage, served like a PostGIS table by tipg."""

    path: Path
    srs_id: int
    rtree: str | None = None  # the layer's own R-tree, None for views

    # -- reading ---------------------------------------------------------------------------
    def _where(self, ids, properties_filter, datetime_filter, dt) -> tuple[list[str], list]:
        where, params = [], []
        if ids:
            if self.id_column is None:
                raise InvalidPropertyName(f"collection {self.id} has no item ids to filter on")
            where.append(f"{_quote(self.id_column.name)} IN ({', '.join('?' * len(ids))})")
            params += [self._typed(self.id_column, i) for i in ids]
        for name, value in properties_filter or []:
            column = self.get_column(name)
            if column is None:
                raise InvalidPropertyName(f"Invalid property name: {name}")
            where.append(f"{_quote(name)} = ?")
            params.append(self._typed(column, value))
        if datetime_filter:
            where += self._datetime_where(datetime_filter, dt, params)
        return where, params

    @staticmethod
    def _typed(column: Column, value: str):
        if column.json_type != "number":
            return value
        try:
            return float(value)
        except ValueError:
            raise InvalidPropertyName(f"{column.name} is a number, not {value!r}") from None

    def _datetime_where(self, interval: list[str], dt: str | None, params: list) -> list[str]:
        if not self.datetime_columns:
            raise MissingDatetimeColumn("Must have a timestamp or date column to filter with datetime.")
        column = self.get_datetime_column(dt)
        if column is None:
            raise InvalidDatetimeColumnName(f"Invalid Datetime Column: {dt}.")
        try:
            bounds = [None if v in ("..", "") else utc_text(v) for v in interval]
        except ValueError as exc:
            raise InvalidDatetime(f"Invalid datetime {'/'.join(interval)!r}: {exc}") from None
        name = _quote(column.name)
        if len(bounds) == 1:
            params.append(bounds[0])
            return [f"{name} = ?"]
        start, end = bounds
        if start is None and end is None:
            raise InvalidDatetime("Double open-ended datetime intervals are not allowed.")
        if start is not None and end is not None and start > end:
            raise InvalidDatetime("Start datetime cannot be before end datetime.")
        where = []
        if start is not None:
            where.append(f"{name} >= ?")
            params.append(start)
        if end is not None:  # the same half-open [start, end) as tipg on PostGIS
            where.append(f"{name} < ?" if start is not None else f"{name} <= ?")
            params.append(end)
        return where

    def _order(self, sortby: str | None) -> str:
        if not sortby:
            key = self.id_column.name if self.id_column else "fid"
            return f"ORDER BY {_quote(key)}"
        terms = []
        for part in sortby.split(","):
            match = _SORT.match(part.strip())
            if not match or not self.get_column(match["column"]):
                raise InvalidPropertyName(f"Property {part.strip()} does not exist.")
            terms.append(_quote(match["column"]) + (" DESC" if match["direction"] == "-" else ""))
        return "ORDER BY " + ", ".join(terms)

    def _rows(
        self,
        reader: GeoPackageReader,
        *,
        where: list[str],
        params: list,
        bbox,
        cql,
        sortby: str | None,
        properties: list[str] | None,
        limit: int,
        offset: int,
        count: bool = True,
    ) -> tuple[list[tuple[Any, shapely.Geometry | None, dict]], int]:
        """The matching rows' (id, geometry in EPSG:4326, properties) for one page, and the match count.

        Without ``count`` (tiles) reading stops at the page's last row and the count is not exact.
        """
        geometry_column = self.geometry_column.name if self.geometry_column else None
        names = self.columns(properties)
        # cql2 needs every property it names, whichever are returned
        wanted = list(self.columns()) if cql is not None else names
        id_sql = _quote(self.id_column.name) if self.id_column else "fid"
        select = [
            id_sql,
            _quote(geometry_column) if geometry_column else "NULL",
            *(_quote(n) for n in wanted),
        ]
        clauses = list(where)
        args = list(params)
        if bbox is not None and self.rtree:
            minx, miny, maxx, maxy = self._store_bounds(bbox)
            clauses.append(
                f"fid IN (SELECT id FROM {_quote(self.rtree)} WHERE maxx >= ? AND minx <= ? "
                "AND maxy >= ? AND miny <= ?)"
            )
            args += [minx, maxx, miny, maxy]
        sql = (
            f"SELECT {', '.join(select)} FROM {_quote(self.table)}"
            + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
            + " "
            + self._order(sortby)
        )
        exact = bbox is not None or cql is not None
        con = reader.connect()
        try:
            if not exact:
                matched = con.execute(
                    f"SELECT count(*) FROM {_quote(self.table)}"
                    + (f" WHERE {' AND '.join(clauses)}" if clauses else ""),
                    args,
                ).fetchone()[0]
                rows = con.execute(f"{sql} LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
                return [self._row(r, names, wanted) for r in rows], matched
            found, matched = [], 0
            for r in con.execute(sql, args):
                item = self._row(r, names, wanted, keep_all=cql is not None)
                if bbox is not None and (item[1] is None or not shapely.intersects(item[1], _box(bbox))):
                    continue
                if cql is not None and not _matches(cql, item[2]):
                    continue
                matched += 1
                if offset < matched <= offset + limit:
                    found.append((item[0], item[1], {n: item[2][n] for n in names}))
                elif not count and matched > offset + limit:
                    break
            return found, matched
        finally:
            con.close()

    def _row(self, row: tuple, names: list[str], wanted: list[str], keep_all: bool = False):
        identifier, blob, *values = row
        geometry = gpkg.decode(blob) if blob is not None else None
        if geometry is not None and self.srs_id != 4326:
            geometry = shapely.transform(geometry, _to_wgs84(self.srs_id), interleaved=False)
        properties = dict(zip(wanted, values))
        if not keep_all:
            properties = {n: properties[n] for n in names}
        return identifier, geometry, properties

    def _store_bounds(self, bbox: list[float]) -> tuple[float, float, float, float]:
        west, south, east, north = _bbox4(bbox)
        if self.srs_id == 4326:
            return west, south, east, north
        transformer = Transformer.from_crs(4326, self.srs_id, always_xy=True)
        return transformer.transform_bounds(west, south, east, north)

    async def features(
        self,
        reader: GeoPackageReader,
        *,
        ids_filter=None,
        bbox_filter=None,
        datetime_filter=None,
        properties_filter=None,
        cql_filter=None,
        sortby=None,
        properties=None,
        geom=None,
        dt=None,
        limit=None,
        offset=None,
        bbox_only=None,
        simplify=None,
        geom_as_wkt=False,
        function_parameters=None,
    ) -> ItemList:
        """Items of the layer, filtered, sorted and paged as tipg does on PostGIS."""
        settings = FeaturesSettings()
        limit = settings.default_features_limit if limit is None else limit
        offset = offset or 0
        if limit > settings.max_features_per_query:
            raise InvalidLimit(f"Limit can not be set higher than {settings.max_features_per_query}")
        if geom and geom.lower() != "none" and not self.get_geometry_column(geom):
            raise InvalidGeometryColumnName(f"Invalid Geometry Column: {geom}.")
        where, params = self._where(ids_filter, properties_filter, datetime_filter, dt)
        rows, matched = await anyio.to_thread.run_sync(
            functools.partial(
                self._rows,
                reader,
                where=where,
                params=params,
                bbox=bbox_filter,
                cql=cql_filter,
                sortby=sortby,
                properties=properties,
                limit=limit,
                offset=offset,
            )
        )
        items = []
        for identifier, geometry, props in rows:
            if geometry is not None and bbox_only:
                geometry = shapely.envelope(geometry)
            elif geometry is not None and simplify:
                geometry = shapely.simplify(geometry, float(simplify), preserve_topology=True)
            if geom and geom.lower() == "none" or geometry is None:
                shape = None
            elif geom_as_wkt:
                shape = shapely.to_wkt(geometry, rounding_precision=-1)
            else:
                shape = json.loads(shapely.to_geojson(geometry))
            items.append(
                Feature(
                    type="Feature",
                    id=identifier,
                    geometry=shape,
                    properties={k: _jsonable(v) for k, v in props.items()},
                )
            )
        returned = len(items)
        return ItemList(
            items=items,
            matched=matched,
            next=offset + returned if matched - returned > offset else None,
            prev=max(offset - limit, 0) if offset else None,
        )

    async def get_tile(
        self,
        reader: GeoPackageReader,
        *,
        tms: TileMatrixSet,
        tile: Tile,
        ids_filter=None,
        bbox_filter=None,
        datetime_filter=None,
        properties_filter=None,
        function_parameters=None,
        cql_filter=None,
        sortby=None,
        properties=None,
        geom=None,
        dt=None,
        limit=None,
        simplify=None,
    ) -> bytes:
        """One Mapbox Vector Tile of the layer (layer name: the table), clipped with tipg's buffer."""
        settings = MVTSettings()
        limit = limit or settings.max_features_per_tile
        if limit > settings.max_features_per_tile:
            raise InvalidLimit(f"Limit can not be set higher than {settings.max_features_per_tile}")
        if not self.get_geometry_column(geom):
            raise InvalidGeometryColumnName(f"Invalid Geometry Column Name {geom}")
        west, south, east, north = tms.bounds(tile)
        if bbox_filter is not None:
            bw, bs, be, bn = _bbox4(bbox_filter)
            west, south, east, north = max(west, bw), max(south, bs), min(east, be), min(north, bn)
            if west > east or south > north:
                return mapbox_vector_tile.encode([{"name": self.table, "features": []}])
        where, params = self._where(ids_filter, properties_filter, datetime_filter, dt)
        rows, _ = await anyio.to_thread.run_sync(
            functools.partial(
                self._rows,
                reader,
                where=where,
                params=params,
                bbox=[west, south, east, north],
                cql=cql_filter,
                sortby=sortby,
                properties=properties,
                limit=limit,
                offset=0,
                count=False,
            )
        )
        return await anyio.to_thread.run_sync(self._encode, rows, tms, tile, simplify, settings)

    def _encode(self, rows, tms: TileMatrixSet, tile: Tile, simplify, settings: MVTSettings) -> bytes:
        bounds = tms.xy_bounds(tile)
        margin = (bounds.right - bounds.left) * settings.tile_buffer / settings.tile_resolution
        geometries = shapely.transform(
            [g for _, g, _ in rows], _from_wgs84(tms.crs.to_wkt()), interleaved=False
        )
        if simplify:
            geometries = shapely.simplify(geometries, float(simplify), preserve_topology=True)
        if settings.tile_clip:
            geometries = shapely.clip_by_rect(
                geometries,
                bounds.left - margin,
                bounds.bottom - margin,
                bounds.right + margin,
                bounds.top + margin,
            )
        # tile pixels (y up; the encoder flips it), rounded as ST_AsMVTGeom does
        origin = np.array([bounds.left, bounds.bottom])
        scale = settings.tile_resolution / np.array([bounds.right - bounds.left, bounds.top - bounds.bottom])
        geometries = shapely.transform(geometries, lambda xy: np.round((xy - origin) * scale))
        features = [
            {"geometry": g, "properties": {k: _jsonable(v) for k, v in p.items() if v is not None}}
            for g, (_, _, p) in zip(geometries, rows)
            if not shapely.is_empty(g)
        ]
        return mapbox_vector_tile.encode(
            [{"name": self.table, "features": features}],
            default_options={"extents": settings.tile_resolution},
        )


def _bbox4(bbox: list[float]) -> tuple[float, float, float, float]:
    if len(bbox) == 6:
        return bbox[0], bbox[1], bbox[3], bbox[4]
    west, south, east, north = bbox
    return west, south, east, north


def _box(bbox: list[float]) -> shapely.Geometry:
    return shapely.box(*_bbox4(bbox))


def _matches(cql, properties: dict) -> bool:
    try:
        return cql.matches(properties)
    except Exception as exc:  # noqa: BLE001  (cql2 raises a bare Exception when it cannot evaluate)
        raise CqlNotSupported(
            f"the filter {cql.to_text()!r} cannot be evaluated on a GeoPackage store ({exc}); "
            "use property comparisons (=, <, >, LIKE, IN, AND, OR, NOT) with properties of this "
            "collection, and bbox/datetime for space and time"
        ) from None


def _jsonable(value):
    return value.isoformat() if isinstance(value, (datetime.date, datetime.datetime)) else value


@functools.lru_cache(maxsize=8)
def _to_wgs84(srs_id: int):
    transformer = Transformer.from_crs(srs_id, 4326, always_xy=True)
    return lambda x, y: transformer.transform(x, y)


@functools.lru_cache(maxsize=8)
def _from_wgs84(target_wkt: str):
    transformer = Transformer.from_crs(ProjCRS.from_epsg(4326), ProjCRS.from_wkt(target_wkt), always_xy=True)
    return lambda x, y: transformer.transform(x, y)


def layers(con: sqlite3.Connection) -> Iterator[tuple[str, str, str, int]]:
    """(table, geometry column, geometry type, srs_id) of every feature layer of a GeoPackage."""
    yield from con.execute(
        "SELECT g.table_name, g.column_name, g.geometry_type_name, g.srs_id "
        "FROM gpkg_geometry_columns g JOIN gpkg_contents c USING (table_name) "
        "WHERE c.data_type = 'features' ORDER BY g.table_name"
    )


def collection(
    con: sqlite3.Connection,
    path: Path,
    table: str,
    geometry_column: str,
    geometry_type: str,
    srs_id: int,
    key: str | None,
) -> GeoPackageCollection:
    """Describe one layer for tipg: columns, key, geometry, datetime column and WGS84 extent."""
    columns = []
    for _, name, declared, *_ in con.execute(f"PRAGMA table_info({_quote(table)})"):
        if name == geometry_column:
            columns.append(
                Column(
                    name=name,
                    type="geometry",
                    geometry_type=geometry_type.upper(),
                    srid=srs_id,
                    bounds=_layer_bounds(con, table, geometry_column, srs_id),
                )
            )
        else:
            columns.append(Column(name=name, type=_column_type(declared or "TEXT")))
    columns.sort(key=lambda c: c.name)  # as tipg lists PostGIS columns
    by_name = {c.name: c for c in columns}
    rtree = f"rtree_{table}_{geometry_column}"
    has_rtree = con.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (rtree,)).fetchone()
    id_column = by_name.get(key) if key else by_name.get("fid")
    properties = [c for c in columns if c.name != "fid" or id_column is not None and id_column.name == "fid"]
    datetime_column = next((c for c in columns if c.is_datetime), None)
    return GeoPackageCollection(
        type="Table" if has_rtree else "View",
        id=table,
        table=table,
        table_columns=columns,
        properties=properties,
        id_column=id_column,
        geometry_column=by_name[geometry_column],
        datetime_column=datetime_column,
        path=path,
        srs_id=srs_id,
        rtree=rtree if has_rtree else None,
    )


def _layer_bounds(con: sqlite3.Connection, table: str, geometry_column: str, srs_id: int) -> list[float]:
    rtree = f"rtree_{table}_{geometry_column}"
    if con.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (rtree,)).fetchone():
        row = con.execute(
            f"SELECT min(minx), min(miny), max(maxx), max(maxy) FROM {_quote(rtree)}"
        ).fetchone()
    else:  # a view: its envelope from the geometry headers (gpkg.connect registers ST_MinX...)
        g = _quote(geometry_column)
        row = con.execute(
            f"SELECT min(ST_MinX({g})), min(ST_MinY({g})), max(ST_MaxX({g})), "
            f"max(ST_MaxY({g})) FROM {_quote(table)}"
        ).fetchone()
    if row is None or row[0] is None:
        return [-180.0, -90.0, 180.0, 90.0]
    if srs_id != 4326:
        return list(Transformer.from_crs(srs_id, 4326, always_xy=True).transform_bounds(*row))
    return list(row)


def catalog(path: Path, tables: list[str], keys: dict[str, str]) -> Catalog:
    """tipg's catalog of the named layers of a GeoPackage (those that exist), in that order."""
    con = gpkg.connect(str(path), read_only=True)
    try:
        found = {row[0]: row for row in layers(con)}
        collections: dict[str, Collection] = {
            name: collection(con, path, *found[name], key=keys.get(name)) for name in tables if name in found
        }
    finally:
        con.close()
    return Catalog(collections=collections, last_updated=datetime.datetime.now())
