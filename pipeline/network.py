"""The road network: centrelines with a road id, read from any vector file pyogrio reads.

``read_network`` is the only function here that opens a file.  It checks the
file before anything is computed or written: the id field exists and is
unique and non-empty, every feature is a single line of non-zero length (a
multi-part line that merges into one is accepted), and the CRS can be
transformed to the metric CRS sections are measured in.  Optional fields:
``width_m`` (road width) or ``lanes`` (times ``lane_width_m``); else
``default_width_m``.

``direction`` (optional; ``direction_field``) says which way traffic runs,
relative to the direction the line is digitized in.  Chainage runs in the
direction of travel, and ``offset_m`` is positive to the left of it:

* two-way (also when there is no field, or the value is empty): chainage runs
  in the digitized direction;
* one-way, with the digitized direction: the same;
* one-way, against the digitized direction: the line is reversed, so chainage 0
  is where traffic enters the road and a crack left of the traffic has a
  positive offset.  A dual carriageway digitized as two lines, each with its
  direction, gets chainages that run with the traffic on both.

The values of the common network formats are understood (case aside):
``DIRECTION_VALUES`` (OSM ``oneway``, HERE ``DIR_TRAVEL``, TomTom ``ONEWAY``,
OS MasterMap Highways ``directionality``, plain words); any other value is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from pyproj.exceptions import CRSError, ProjError

from pipeline import projection
from pipeline.errors import NetworkError

# What a direction field may hold -> which way chainage runs: both (two-way), forward (one-way
# with the digitized direction) or backward (one-way against it: the line is reversed).
DIRECTION_VALUES = {
    **dict.fromkeys(
        ("", "both", "b", "n", "no", "0", "two-way", "twoway", "two way", "bothdirections", "bidirectional"),
        "both",
    ),
    **dict.fromkeys(
        ("forward", "f", "ft", "yes", "y", "1", "true", "one-way", "oneway", "indirection", "with"), "forward"
    ),
    **dict.fromkeys(("backward", "t", "tf", "-1", "reverse", "inoppositedirection", "against"), "backward"),
}


@dataclass(frozen=True, slots=True)
class Network:
    """Road centrelines in a metric CRS, with their ids and widths.

    ``geometry`` runs in the direction chainage runs (see the module docstring).
    """

    source: str
    road_id: np.ndarray  # object array of str
    geometry: np.ndarray  # LineString, metric CRS, oriented for chainage
    width_m: np.ndarray
    crs: object  # pyproj CRS of ``geometry``
    direction: np.ndarray  # object array: "both", "forward" or "backward" (as digitized: reversed)


def _fail(path, problem: str) -> NetworkError:
    return NetworkError(f"{path}: {problem}; nothing was written")


def read_network(
    path: str | Path,
    metric_crs,
    id_field: str = "road_id",
    lane_width_m: float = 3.5,
    default_width_m: float = 7.0,
    direction_field: str = "direction",
) -> Network:
    """Read and check a road network, in ``metric_crs``.

    Raises:
        NetworkError: naming the file and the problem (see the module docstring).
    """
    import pyogrio  # only where networks are read
    from pyogrio.errors import DataSourceError

    try:
        info = pyogrio.read_info(path)
    except (DataSourceError, OSError, ValueError) as exc:
        raise _fail(path, f"cannot be read as a vector file ({' '.join(str(exc).split())})") from None
    fields = list(info["fields"])
    if id_field not in fields:
        raise _fail(
            path,
            f"has no road id field {id_field!r} (fields: {', '.join(fields) or 'none'}); "
            "pass --id-field NAME",
        )
    if not info["crs"]:
        raise _fail(path, "has no CRS; set one (e.g. ogr2ogr -a_srs EPSG:...)")
    if direction_field != "direction" and direction_field not in fields:
        raise _fail(path, f"has no direction field {direction_field!r} (fields: {', '.join(fields)})")
    wanted = [f for f in (id_field, "width_m", "lanes", direction_field) if f in fields]
    _, _, wkb, values = pyogrio.raw.read(path, columns=wanted)
    data = dict(zip(wanted, values))
    ids = np.array([None if v is None else str(v) for v in data[id_field]], dtype=object)
    if len(ids) == 0:
        raise _fail(path, "has no roads")
    if any(i in (None, "") for i in ids):
        raise _fail(path, f"has roads without a {id_field}")
    if len(set(ids)) < len(ids):
        dupes = sorted({i for i in ids if (ids == i).sum() > 1})
        raise _fail(path, f"has several roads with {id_field} {', '.join(dupes[:5])}")
    if wkb is None:
        raise _fail(path, "has no geometry column")
    lines = _single_lines(path, shapely.from_wkb(wkb), ids)
    try:
        metric = projection.transform(lines, info["crs"], metric_crs)
    except (CRSError, ProjError) as exc:
        raise _fail(path, f"its CRS {info['crs']} cannot be transformed to {metric_crs} ({exc})") from None
    if not np.isfinite(shapely.get_coordinates(metric)).all():
        raise _fail(path, f"its CRS {info['crs']} cannot be transformed to {metric_crs}")
    if (bad := ids[shapely.length(metric) <= 0]).size:
        raise _fail(path, f"has zero-length lines: {', '.join(bad[:5])}")
    direction = directions(path, data.get(direction_field, [None] * len(ids)), direction_field)
    metric = np.where(direction == "backward", shapely.reverse(metric), metric)
    width = np.full(len(ids), default_width_m)
    if "lanes" in data:
        lanes = np.array([np.nan if v is None else float(v) for v in data["lanes"]])
        width = np.where(lanes > 0, lanes * lane_width_m, width)
    if "width_m" in data:
        given = np.array([np.nan if v is None else float(v) for v in data["width_m"]])
        width = np.where(given > 0, given, width)
    return Network(str(path), ids, metric, width, metric_crs, direction)


def directions(path, values, field: str = "direction") -> np.ndarray:
    """A direction field's values as ``both``, ``forward`` or ``backward`` (``DIRECTION_VALUES``).

    >>> directions("roads.gpkg", ["FT", None, -1, "inOppositeDirection", 1.0]).tolist()
    ['forward', 'both', 'backward', 'backward', 'forward']
    >>> directions("roads.gpkg", ["north"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pipeline.errors.NetworkError: roads.gpkg: its direction field holds 'north', which is not a direction ...
    """

    def key(v) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        if isinstance(v, (int, float, np.integer, np.floating)) and float(v).is_integer():
            return str(int(v))
        return str(v).strip().lower()

    keys = [key(v) for v in values]
    if bad := sorted({str(v) for v, k in zip(values, keys) if k not in DIRECTION_VALUES}):
        raise _fail(
            path,
            f"its {field} field holds {', '.join(map(repr, bad[:5]))}, which is not a direction "
            "(two-way: both, B, N, no, 0; one-way as digitized: forward, F, FT, yes, 1; "
            "one-way against it: backward, T, TF, -1, reverse)",
        )
    return np.array([DIRECTION_VALUES[k] for k in keys], dtype=object)


def _single_lines(path, geometries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Lines as given, multi-part lines merged; refuses anything else."""
    if (missing := ids[shapely.is_missing(geometries) | shapely.is_empty(geometries)]).size:
        raise _fail(path, f"has roads without geometry: {', '.join(missing[:5])}")
    kinds = shapely.get_type_id(geometries)
    multi = kinds == shapely.GeometryType.MULTILINESTRING
    geometries = geometries.copy()
    geometries[multi] = shapely.line_merge(geometries[multi])
    kinds = shapely.get_type_id(geometries)
    if (parts := ids[multi & (kinds != shapely.GeometryType.LINESTRING)]).size:
        raise _fail(
            path,
            f"has multi-part lines that do not join into one: {', '.join(parts[:5])}; "
            "split them into roads of their own",
        )
    if (other := ids[kinds != shapely.GeometryType.LINESTRING]).size:
        raise _fail(path, f"has features that are not lines: {', '.join(other[:5])}")
    return shapely.force_2d(geometries)
