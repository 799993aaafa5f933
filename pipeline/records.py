"""The records that pass between pipeline steps: frozen, typed, small."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window
from shapely.geometry import LineString, MultiPolygon, Polygon


@dataclass(frozen=True, slots=True)
class Scene:
    """One georeferenced image of a survey, as opened (no pixels)."""

    uri: str
    scene_id: str
    width: int
    height: int
    band_count: int
    dtype: str
    crs: CRS | None  # None: a survey frame, placed by its camera and pose instead
    transform: Affine


@dataclass(frozen=True, slots=True)
class ChipBatch:
    """Chips cut from a scene, ready for a network: only ``pixels`` goes into a tensor."""

    windows: tuple[Window, ...]  # scene pixel windows, each size_px x size_px
    pixels: np.ndarray  # (n, 3, size_px, size_px) uint8, zero where invalid
    valid: np.ndarray  # (n, size_px, size_px) bool: inside the scene and not nodata


@dataclass(frozen=True, slots=True)
class CrackLine:
    """One crack as a georeferenced polyline with its measurements."""

    geometry: LineString  # in the store CRS
    length_m: float
    width_mean_mm: float
    width_max_mm: float
    orientation_deg: float  # azimuth of the main axis, clockwise from north, in [0, 180)
    confidence: float  # mean crack probability along the line, 0..1
    severity: str  # low | medium | high
    gsd_mm: float | None = None  # ground size of a pixel along the line (mean), millimetres
    range_m: float | None = None  # frame surveys: mean distance from the camera
    pos_accuracy_m: float | None = None  # frame surveys: the poses' position accuracy, if given
    source_frames: tuple[str, ...] = ()  # frame surveys: the frames the crack was seen in
    # road-condition typing (pipeline.crack_types, pipeline.pattern_areas); None until typed
    crack_type: str | None = None  # longitudinal | transverse | diagonal | joint | pattern
    theta_deg: float | None = None  # angle to the road axis, 0..90
    chord_m: float | None = None  # straight distance between the ends
    tortuosity: float | None = None  # length / chord
    span_ratio: float | None = None  # transverse only: lateral extent / imaged width
    pattern_no: int | None = None  # index of its area in SceneResult.pattern_areas


@dataclass(frozen=True, slots=True)
class PatternAreaRecord:
    """An alligator / block area of a scene, in the store CRS (see pipeline.pattern_areas)."""

    geometry: MultiPolygon
    pattern_class: str  # alligator | block
    area_m2: float
    crack_density_m_per_m2: float
    width_mean_mm: float
    width_max_mm: float
    severity: str  # low | medium | high, from the members' mean width
    piece_m: float


@dataclass(frozen=True, slots=True)
class SceneResult:
    """What processing one scene produced; paths, never arrays."""

    scene: Scene
    cracks: tuple[CrackLine, ...]
    footprint: Polygon  # scene outline in the store CRS
    chip_count: int
    probability_path: str
    seconds: float
    sha256: str
    stats: dict = field(default_factory=dict)
    pattern_areas: tuple[PatternAreaRecord, ...] = ()
    inference: str = ""  # which network ran (pipeline.backends.inference_of): "onnxruntime int8"

    @property
    def counted(self) -> tuple[CrackLine, ...]:
        """The cracks that count in totals: every line but concrete joints (which are kept, typed)."""
        return tuple(c for c in self.cracks if c.crack_type != "joint")

    @property
    def total_length_m(self) -> float:
        """Length of the cracks that count (joints left out; pattern members are cracks)."""
        return float(sum(c.length_m for c in self.counted))


@dataclass(frozen=True, slots=True)
class CrackPositions:
    """Where a survey's cracks lie on the road network (``crackmap sections``): arrays of equal length.

    One entry per crack inside a road corridor; a crack outside every corridor has
    none (its road columns stay null, its typing is the one from mapping time).
    """

    survey_id: str
    crack_id: np.ndarray  # str (a UUID)
    road_id: np.ndarray  # str
    chainage_from_m: np.ndarray
    chainage_to_m: np.ndarray
    offset_m: np.ndarray  # of the midpoint: positive left of the direction chainage runs in
    crack_type: np.ndarray  # str: the typing against the road
    theta_deg: np.ndarray
    span_ratio: np.ndarray  # NaN unless transverse
