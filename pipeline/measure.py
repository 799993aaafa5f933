"""Crack measurements: georeferencing, length, width, orientation, severity.

Lengths are geodesic (on the WGS 84 ellipsoid), so they are in metres whatever
the scene's CRS, projected or geographic.  Widths come from the distance
transform of the crack mask along the centreline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj import Geod, Transformer
from pyproj.exceptions import ProjError
from rasterio.crs import CRS
from shapely.geometry import LineString

from pipeline.errors import SceneContentError
from pipeline.records import CrackLine, Scene
from pipeline.vectorize import Piece, VectorizeParams

GEOD = Geod(ellps="WGS84")
LONLAT = ProjCRS.from_epsg(4326)


@dataclass(frozen=True, slots=True)
class Severity:
    """Severity classes by mean crack width, in millimetres (defaults as in common distress manuals)."""

    medium_mm: float = 6.0
    high_mm: float = 19.0

    def classify(self, width_mm: float) -> str:
        """Class of a crack of this mean width.

        >>> [Severity().classify(w) for w in (2.0, 6.0, 25.0)]
        ['low', 'medium', 'high']
        """
        if width_mm >= self.high_mm:
            return "high"
        return "medium" if width_mm >= self.medium_mm else "low"


def pixel_to_map(transform: Affine, rc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates of (row, col) pixel positions; integer positions are pixel centres.

    >>> pixel_to_map(Affine(0.5, 0, 100, 0, -0.5, 200), np.array([[0.0, 0.0], [2.0, 4.0]]))
    (array([100.25, 102.25]), array([199.75, 198.75]))
    """
    # affine applies itself to arrays of x and y; its annotations only admit float tuples
    return transform @ (rc[:, 1] + 0.5, rc[:, 0] + 0.5)  # type: ignore[operator, return-value]


def azimuth_deg(lon: np.ndarray, lat: np.ndarray) -> float:
    """Direction of a line's main axis, degrees clockwise from north in [0, 180).

    The principal axis of the length-weighted segment directions, in a local
    east/north frame, so a curved crack gets its overall direction.

    >>> azimuth_deg(np.array([0.0, 0.001]), np.array([0.0, 0.001]))
    45.0
    """
    east = np.diff(lon) * np.cos(np.radians(lat.mean()))
    north = np.diff(lat)
    length = np.hypot(east, north)
    keep = length > 0
    if not keep.any():
        return 0.0
    ue, un, w = east[keep] / length[keep], north[keep] / length[keep], length[keep]
    tensor = np.array(
        [[np.sum(w * ue * ue), np.sum(w * ue * un)], [np.sum(w * ue * un), np.sum(w * un * un)]]
    )
    _, vectors = np.linalg.eigh(tensor)
    e, n = vectors[:, -1]
    return round(float(np.degrees(np.arctan2(e, n)) % 180.0), 6) % 180.0


class Georeferencer:
    """Turns pieces in scene pixels into measured crack lines in the store CRS."""

    def __init__(
        self,
        crs: CRS,
        transform: Affine,
        width: int,
        height: int,
        store_crs: CRS,
        params: VectorizeParams,
        severity: Severity,
    ) -> None:
        self.transform = transform
        self.params, self.severity = params, severity
        self.to_store = Transformer.from_crs(crs, store_crs, always_xy=True)
        self.to_lonlat = Transformer.from_crs(crs, LONLAT, always_xy=True)
        self.spacing_m = self._spacing_m(width, height)  # (row step, column step) on the ground
        self.pixel_size_m = float(np.sqrt(self.spacing_m[0] * self.spacing_m[1]))

    @classmethod
    def for_scene(
        cls, scene: Scene, store_crs: CRS, params: VectorizeParams, severity: Severity
    ) -> Georeferencer:
        """The georeferencer of a scene; a CRS that cannot reach ``store_crs`` is a scene error."""
        crs = scene.crs
        if crs is None:  # SceneReader refuses such a scene first; a survey frame is placed otherwise
            raise SceneContentError(scene.uri, "has no CRS; crackmap needs a georeferenced scene")
        try:
            geo = cls(crs, scene.transform, scene.width, scene.height, store_crs, params, severity)
        except ProjError as exc:
            raise SceneContentError(
                scene.uri,
                f"its CRS {crs.to_string()} cannot be transformed "
                f"to the store's {store_crs.to_string()} ({exc})",
            ) from exc
        if not np.isfinite(geo.pixel_size_m) or geo.pixel_size_m <= 0:
            raise SceneContentError(
                scene.uri,
                f"its CRS {crs.to_string()} cannot be transformed to the store's {store_crs.to_string()}",
            )
        return geo

    def _spacing_m(self, width: int, height: int) -> tuple[float, float]:
        """Ground length of one row step and one column step at the scene centre, in metres."""
        rc = np.array([[height / 2, width / 2], [height / 2, width / 2 + 1], [height / 2 + 1, width / 2]])
        lon, lat = self.to_lonlat.transform(*pixel_to_map(self.transform, rc))
        _, _, dx = GEOD.inv(lon[0], lat[0], lon[1], lat[1])
        _, _, dy = GEOD.inv(lon[0], lat[0], lon[2], lat[2])
        return float(dy), float(dx)

    @property
    def column_spacing(self) -> float:
        """A column step in row steps: what the vectorizer's distance transform needs
        (``VectorizeParams.column_spacing``) for widths in true ground units."""
        return self.spacing_m[1] / self.spacing_m[0]

    def step_across_m(self, rc: np.ndarray) -> float:
        """Ground length of one pixel step across a line of (row, col) vertices (perpendicular to
        its main axis): the row step across a line along the columns, the column step across one
        along the rows, and between the two for other directions.

        >>> from affine import Affine
        >>> from rasterio.crs import CRS
        >>> geo = Georeferencer(CRS.from_epsg(4326), Affine(1e-5, 0, 10, 0, -1e-5, 60), 100, 100,
        ...                     CRS.from_epsg(4326), VectorizeParams(), Severity())
        >>> along_columns = np.array([[50.0, 0.0], [50.0, 99.0]])
        >>> round(geo.step_across_m(along_columns) / geo.spacing_m[0], 6)
        1.0
        >>> round(geo.step_across_m(along_columns[:, ::-1]) / geo.spacing_m[1], 6)
        1.0
        """
        dy, dx = self.spacing_m
        metric = (rc - rc.mean(axis=0)) * (dy, dx)
        if len(rc) < 2 or not metric.any():
            return self.pixel_size_m
        _, vectors = np.linalg.eigh(metric.T @ metric)
        along_r, along_c = vectors[:, -1]  # main axis (metric frame); across it: (-along_c, along_r)
        across_r, across_c = -along_c / dy, along_r / dx  # that direction in pixel steps
        norm = np.hypot(across_r, across_c)
        return float(np.hypot(across_r / norm * dy, across_c / norm * dx))

    def crack_line(self, piece: Piece) -> CrackLine | None:
        """The measured crack line of a piece, or None if it is shorter than ``min_length_px``."""
        if piece.length_px() < self.params.min_length_px or piece.n_px == 0:
            return None
        simple = shapely.simplify(LineString(piece.rc), self.params.simplify_px)
        rc = shapely.get_coordinates(simple)
        x, y = pixel_to_map(self.transform, rc)
        lon, lat = self.to_lonlat.transform(x, y)
        sx, sy = self.to_store.transform(x, y)
        # The distance transform (in row steps: VectorizeParams.column_spacing) at a centre pixel
        # reaches the nearest background pixel centre, half a pixel beyond the crack's edge:
        # width = 2 d - one pixel step across the crack, measured with the true per-axis spacing.
        row_mm, across_mm = self.spacing_m[0] * 1000.0, self.step_across_m(piece.rc) * 1000.0
        width_mean = max(2.0 * piece.half_width_sum / piece.n_px * row_mm - across_mm, across_mm)
        length_m = float(GEOD.line_length(lon, lat))
        return CrackLine(
            geometry=LineString(np.column_stack([sx, sy])),
            length_m=length_m,
            width_mean_mm=width_mean,
            width_max_mm=max(2.0 * piece.half_width_max * row_mm - across_mm, across_mm),
            orientation_deg=azimuth_deg(np.asarray(lon), np.asarray(lat)),
            confidence=piece.probability_sum / piece.n_px / 255.0,
            severity=self.severity.classify(width_mean),
            gsd_mm=self.pixel_size_m * 1000.0,
        )

    def crack_lines(self, pieces: list[Piece]) -> tuple[CrackLine, ...]:
        """Measured crack lines of a scene's pieces, without isolated fragments.

        A line shorter than ``params.min_length_m`` is dropped when no other
        line comes within ``params.isolation_px`` of it: an isolated fragment
        is surface texture, a short piece beside a crack is part of the cracking.
        """
        measured = [(piece, line) for piece in pieces if (line := self.crack_line(piece)) is not None]
        short = [i for i, (_, line) in enumerate(measured) if line.length_m < self.params.min_length_m]
        if not short:
            return tuple(line for _, line in measured)
        shapes = [
            LineString(piece.rc) if len(piece.rc) > 1 else shapely.Point(piece.rc[0]) for piece, _ in measured
        ]
        short_index = np.asarray(short)
        which, other = shapely.STRtree(shapes).query(
            [shapes[i] for i in short], predicate="dwithin", distance=self.params.isolation_px
        )
        accompanied = set(short_index[which[other != short_index[which]]].tolist())
        dropped = set(short) - accompanied
        return tuple(line for i, (_, line) in enumerate(measured) if i not in dropped)

    def footprint(self, width: int, height: int) -> shapely.Polygon:
        """The scene's outline in the store CRS, densified so it bends with the projection."""
        outline = shapely.segmentize(shapely.box(0, 0, width, height), max(width, height) / 16)
        col, row = shapely.get_coordinates(outline).T
        x, y = self.transform @ (col, row)
        return shapely.Polygon(np.column_stack(self.to_store.transform(x, y)))
