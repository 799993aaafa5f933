"""Writing query results (batches of crack dicts) as GeoJSON, CSV or GeoPackage, batch by batch.

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
from pipeline.store import CRACK_COLUMNS, QUERY_FIELDS

FORMATS = ("geojson", "csv", "gpkg")


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
            out.write(("," if count else "") + '{"type": "Feature", "geometry": ' + geometry
                      + ', "properties": ' + json.dumps(properties) + "}\n")
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
            con.executemany(sql, ((gpkg.encode(row["geometry"], srs_id), *(row[f] for f in QUERY_FIELDS))
                                  for row in batch))
            con.execute("COMMIT")
            count += len(batch)
        gpkg.update_extent(con, "cracks")
    finally:
        con.close()
    return count
