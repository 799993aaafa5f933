"""Write the road centreline of the sample survey: examples/sample-roads.geojson.

One road, ``sample-road``, along the middle of the two sample strips (north to
south, the direction the strips were placed in), 1.92 m wide (the strips' width),
in lon/lat as GeoJSON wants.  Run from the repository root:
    python examples/make_sample_roads.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio
import shapely
from pyproj import Transformer

OUT = Path(__file__).parent / "sample-roads.geojson"
X = 431250.96  # UTM 33N easting of the strips' centre line (make_sample_survey.py)
NORTH, SOUTH = 5652300.5, 5652293.74  # half a metre beyond the strips' ends


def main() -> None:
    to_lonlat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    y = np.linspace(NORTH, SOUTH, 5)
    lon, lat = to_lonlat.transform(np.full(5, X), y)
    road = shapely.LineString(np.column_stack([lon, lat]))
    OUT.unlink(missing_ok=True)
    pyogrio.raw.write(str(OUT), shapely.to_wkb(np.array([road], dtype=object)),
                      field_data=[np.array(["sample-road"], dtype=object), np.array([1.92]), np.array([1])],
                      fields=["road_id", "width_m", "lanes"], crs="EPSG:4326", geometry_type="LineString",
                      driver="GeoJSON", layer_options={"COORDINATE_PRECISION": 9})
    print(f"{OUT}: {road.length:.6f} degrees")


if __name__ == "__main__":
    main()
