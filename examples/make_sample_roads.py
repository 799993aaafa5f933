"""Write the road centreline of the sample survey: examples/sample-roads.geojson.

One road, ``sample-road``, along the sample frame survey's nominal trajectory
(make_sample_survey.py: a straight drive north), 110 m long, one 3.5 m lane, in
lon/lat as GeoJSON wants.  Like the trajectory, the road is made up.  Run from the
repository root:
    python examples/make_sample_roads.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pymap3d
import pyogrio
import shapely

OUT = Path(__file__).parent / "sample-roads.geojson"
START = (51.0107, 14.0339, 150.0)  # the trajectory's first epoch (make_sample_survey.py)
LENGTH_M = 110.0  # the drive: 10 m/s for 10.5 s, and the road seen ahead of the last frame


def main() -> None:
    north = np.linspace(0.0, LENGTH_M, 5)
    lat, lon, _ = pymap3d.enu2geodetic(np.zeros(5), north, np.zeros(5), *START)
    road = shapely.LineString(np.column_stack([lon, lat]))
    OUT.unlink(missing_ok=True)
    pyogrio.raw.write(
        str(OUT),
        shapely.to_wkb(np.array([road], dtype=object)),
        field_data=[np.array(["sample-road"], dtype=object), np.array([3.5]), np.array([1])],
        fields=["road_id", "width_m", "lanes"],
        crs="EPSG:4326",
        geometry_type="LineString",
        driver="GeoJSON",
        layer_options={"COORDINATE_PRECISION": 9},
    )
    print(f"{OUT}: {road.length:.6f} degrees")


if __name__ == "__main__":
    main()
