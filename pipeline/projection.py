"""A metric CRS to measure in, and moving arrays of geometries between CRSs.

Road-condition figures (chainages, offsets, areas, densities) are planar
measurements in metres.  A store in a projected metric CRS is measured in its
own CRS; one in degrees (EPSG:4326, the default) in the UTM zone of the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from pyproj import CRS as ProjCRS
from pyproj import Transformer


def is_metric(crs) -> bool:
    """Is ``crs`` projected, in metres?

    >>> is_metric("EPSG:32633"), is_metric("EPSG:4326")
    (True, False)
    """
    crs = ProjCRS.from_user_input(crs if isinstance(crs, str) else crs.to_wkt())
    return crs.is_projected and crs.axis_info[0].unit_name in ("metre", "meter")


def utm_crs(lon: float, lat: float) -> ProjCRS:
    """The WGS 84 UTM zone of a point.

    >>> utm_crs(15.5, 50.0).to_epsg(), utm_crs(-70.0, -33.0).to_epsg()
    (32633, 32719)
    """
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    return ProjCRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def metric_crs(crs, bounds: Sequence[float] | np.ndarray) -> ProjCRS:
    """``crs`` itself if it is metric, else the UTM zone of the centre of ``bounds`` (in ``crs``)."""
    if is_metric(crs):
        return ProjCRS.from_user_input(crs if isinstance(crs, str) else crs.to_wkt())
    x, y = (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
    return utm_crs(lon, lat)


def transform(geometries, source, target) -> np.ndarray:
    """Geometries (an array) from ``source`` to ``target``, all at once.

    >>> g = transform([shapely.Point(15, 50)], "EPSG:4326", "EPSG:32633")[0]
    >>> round(g.x), round(g.y)
    (500000, 5538631)
    """
    geometries = np.asarray(geometries, dtype=object)
    t = Transformer.from_crs(source, target, always_xy=True)
    return shapely.transform(geometries, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))
