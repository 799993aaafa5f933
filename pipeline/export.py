"""Writing query results (batches of crack dicts) as GeoJSON, CSV, GeoPackage, GeoParquet or
FlatGeobuf, batch by batch.

Nothing here holds more than one batch: a result of any size streams from the
store's cursor to the file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import shapely
from rasterio.crs import CRS

from pipeline import gpkg
from pipeline.stores.base import CRACK_COLUMNS, QUERY_FIELDS

FORMATS = ("geojson", "csv", "gpkg", "geoparquet", "flatgeobuf")
FILE_FORMATS = ("gpkg", "geoparquet", "flatgeobuf")  # written to a file, never to standard output
SUFFIXES = {
    ".geojson": "geojson",
    ".json": "geojson",
    ".csv": "csv",
    ".gpkg": "gpkg",
    ".parquet": "geoparquet",
    ".geoparquet": "geoparquet",
    ".fgb": "flatgeobuf",
}


def write_geojson(batches: Iterable[list[dict]], out: TextIO, crs: CRS) -> int:
    """A FeatureCollection, one feature per line; returns how many were written.

    Coordinates are in the store CRS; a ``crs`` member names it unless it is EPSG:4326.

    >>> import io; buf = io.StringIO()
    >>> write_geojson([[{"geometry": shapely.LineString([(0, 0), (1, 1)]), "severity": "low"}]],
    ...               buf, CRS.from_epsg(4326))
    1
    >>> json.loads(buf.getvalue())["features"][0]["properties"]
    {'severity': 'low'}
    """
    out.write('{"type": "FeatureCollection",\n')
    if crs != CRS.from_epsg(4326):
        out.write(f'"crs": {{"type": "name", "properties": {{"name": "{crs.to_string()}"}}}},\n')
    out.write('"features": [\n')
    count = 0
    for batch in batches:
        geometries = shapely.to_geojson([row["geometry"] for row in batch])
        for row, geometry in zip(batch, geometries):
            properties = {k: v for k, v in row.items() if k != "geometry"}
            out.write(
                ("," if count else "")
                + '{"type": "Feature", "geometry": '
                + geometry
                + ', "properties": '
                + json.dumps(properties)
                + "}\n"
            )
            count += 1
    out.write("]}\n")
    return count


def write_csv(batches: Iterable[list[dict]], out: TextIO) -> int:
    """One row per crack: QUERY_FIELDS, then the geometry as WKT; returns how many were written."""
    writer = csv.writer(out)
    writer.writerow([*QUERY_FIELDS, "wkt"])
    count = 0
    for batch in batches:
        wkt = shapely.to_wkt([row["geometry"] for row in batch], rounding_precision=-1)
        writer.writerows([*(row[f] for f in QUERY_FIELDS), w] for row, w in zip(batch, wkt))
        count += len(batch)
    return count


def write_gpkg(batches: Iterable[list[dict]], path: Path, crs: CRS) -> int:
    """A new GeoPackage (replacing ``path``) with a ``cracks`` layer; returns how many were written."""
    path.unlink(missing_ok=True)
    con = gpkg.connect(str(path))
    try:
        gpkg.init(con)
        srs_id = gpkg.add_srs(con, crs)
        gpkg.add_layer(con, "cracks", "LINESTRING", srs_id, CRACK_COLUMNS)
        names = ", ".join(QUERY_FIELDS)
        sql = f"INSERT INTO cracks (geom, {names}) VALUES (?{', ?' * len(QUERY_FIELDS)})"
        count = 0
        for batch in batches:
            con.execute("BEGIN")
            con.executemany(
                sql,
                ((gpkg.encode(row["geometry"], srs_id), *(row[f] for f in QUERY_FIELDS)) for row in batch),
            )
            con.execute("COMMIT")
            count += len(batch)
        gpkg.update_extent(con, "cracks")
    finally:
        con.close()
    return count


def _arrow_batches(batches: Iterable[list[dict]]):
    """(schema, record batches) of crack rows: QUERY_FIELDS columns (and any other the store
    returns), then ``geometry`` as WKB.  The schema is the first batch's; later batches follow it.
    """
    import pyarrow as pa

    iterator = iter(batches)
    first = next(iterator, [])
    names = [f for f in QUERY_FIELDS if not first or f in first[0]]
    names += [k for k in (first[0] if first else {}) if k not in names and k != "geometry"]

    def columns(batch: list[dict]) -> dict:
        found = {n: [row.get(n) for row in batch] for n in names}
        found["geometry"] = shapely.to_wkb([row["geometry"] for row in batch], byte_order=1).tolist()
        return found

    first_columns = columns(first)
    fields = []
    for name, values in first_columns.items():
        kind = pa.binary() if name == "geometry" else pa.array(values).type
        fields.append(pa.field(name, pa.string() if kind == pa.null() else kind))
    schema = pa.schema(fields)

    def generate():
        if first:
            yield pa.RecordBatch.from_pydict(first_columns, schema=schema)
        for batch in iterator:
            if batch:
                yield pa.RecordBatch.from_pydict(columns(batch), schema=schema)

    return schema, generate()


def write_geoparquet(batches: Iterable[list[dict]], path: Path, crs: CRS) -> int:
    """A GeoParquet 1.1 file (WKB LineStrings, CRS as PROJJSON, one row group per batch).

    Written by pyarrow's ParquetWriter batch by batch; returns how many cracks were written.
    """
    import pyarrow.parquet as pq
    from pyproj import CRS as ProjCRS

    schema, record_batches = _arrow_batches(batches)
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": ["LineString"],
                "crs": ProjCRS.from_user_input(crs.to_wkt()).to_json_dict(),
            }
        },
    }
    schema = schema.with_metadata({"geo": json.dumps(geo)})
    count = 0
    path.unlink(missing_ok=True)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for record_batch in record_batches:
            writer.write_batch(record_batch.replace_schema_metadata(schema.metadata))
            count += record_batch.num_rows
    return count


def write_flatgeobuf(batches: Iterable[list[dict]], path: Path, crs: CRS) -> int:
    """A FlatGeobuf file with a spatial index, streamed to GDAL (pyogrio) as Arrow batches.

    Returns how many cracks were written.
    """
    import pyarrow as pa
    from pyogrio.raw import write_arrow

    schema, record_batches = _arrow_batches(batches)
    counted = {"rows": 0}

    def counting():
        for record_batch in record_batches:
            counted["rows"] += record_batch.num_rows
            yield record_batch

    path.unlink(missing_ok=True)
    reader = pa.RecordBatchReader.from_batches(schema, counting())
    write_arrow(
        reader,
        str(path),
        layer="cracks",
        driver="FlatGeobuf",
        geometry_name="geometry",
        geometry_type="LineString",
        crs=crs.to_wkt(),
    )
    return counted["rows"]
