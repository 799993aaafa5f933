"""Road sections by chainage, cracks linearly referenced to them, and per-section condition.

Everything here is planar, in a metric CRS, and vectorized over cracks (shapely 2
``line_locate_point`` / ``line_interpolate_point`` on whole arrays; a Python
loop runs per road or per section at most, never per crack).

* A road's sections are cut by chainage with ``shapely.ops.substring``: [0, s),
  [s, 2s), ... and a shorter last one.  A section's polygon is its centreline
  buffered by half the road width with flat ends, so neighbouring sections meet
  at the normal through their common chainage.
* A crack belongs to the road nearest its midpoint, if within the corridor
  (``corridor_m`` each side).  Its vertices are located on that road: chainage
  and signed offset (positive left of the road's digitized direction), by
  projecting on the road's nearest segment (``project``: ``line_locate_point``
  restricted to the candidate segments a spatial index finds, so the cost does
  not grow with the road's vertex count).  A crack outside every corridor keeps nulls.
* Cracks are split at section boundaries by chainage, not clipped by buffers:
  each segment's length is shared among the sections its chainage interval
  covers, in proportion, so the sections' lengths add up exactly to the crack's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import shapely
from shapely.ops import substring

SEVERITIES = ("low", "medium", "high")
LENGTH_TYPES = ("longitudinal", "transverse", "diagonal", "pattern")


@dataclass(frozen=True, slots=True)
class Sections:
    """Sections of all roads, in road order then chainage (arrays of equal length)."""

    road: np.ndarray  # index into the network
    from_m: np.ndarray
    to_m: np.ndarray
    centreline: np.ndarray  # LineString
    polygon: np.ndarray  # Polygon: the centreline buffered by half the road width, flat ends
    first: np.ndarray  # per road: index of its first section
    count: np.ndarray  # per road: how many sections it has


def cut_sections(roads: np.ndarray, width_m: np.ndarray, section_m: float) -> Sections:
    """Cut every road into sections of ``section_m`` by chainage (the last one shorter).

    >>> s = cut_sections(np.array([shapely.LineString([(0, 0), (25, 0)])]), np.array([6.0]), 10.0)
    >>> s.from_m.tolist(), s.to_m.tolist(), round(s.polygon[2].area, 6)
    ([0.0, 10.0, 20.0], [10.0, 20.0, 25.0], 30.0)
    """
    lengths = shapely.length(roads)
    count = np.maximum(np.ceil(lengths / section_m - 1e-9).astype(int), 1)
    road = np.repeat(np.arange(len(roads)), count)
    first = np.cumsum(count) - count
    j = np.arange(len(road)) - first[road]
    from_m = j * section_m
    to_m = np.minimum(from_m + section_m, lengths[road])
    centreline = np.array([substring(roads[r], a, b) for r, a, b in zip(road, from_m, to_m)], dtype=object)
    polygon = shapely.buffer(centreline, width_m[road] / 2, cap_style="flat")
    return Sections(road, from_m.astype(float), to_m.astype(float), centreline, polygon, first, count)


@dataclass(frozen=True, slots=True)
class Located:
    """Cracks referenced to roads: per crack, then per segment of the located cracks."""

    road: np.ndarray  # per crack: road index, -1 outside every corridor
    chainage_from_m: np.ndarray  # NaN outside
    chainage_to_m: np.ndarray
    offset_m: np.ndarray  # signed lateral offset of the crack's midpoint (positive: left)
    road_deg: np.ndarray  # road tangent at the midpoint's chainage (axis_deg convention); NaN outside
    segment_crack: np.ndarray  # per segment of located cracks: its crack
    segment_chainage: np.ndarray  # (n, 2) chainages of its two ends
    segment_offset: np.ndarray  # (n, 2) signed offsets of its two ends
    segment_length_m: np.ndarray  # planar


@dataclass(frozen=True, slots=True)
class RoadSegments:
    """The straight segments of all roads, with a spatial index: projection is done per segment."""

    start: np.ndarray  # (n, 2)
    vector: np.ndarray  # (n, 2) end - start
    length: np.ndarray
    chainage: np.ndarray  # chainage of the start along its road
    road: np.ndarray
    tree: shapely.STRtree

    @classmethod
    def of(cls, roads: np.ndarray) -> RoadSegments:
        coords, index = shapely.get_coordinates(roads, return_index=True)
        same = np.flatnonzero(index[1:] == index[:-1])
        start, vector = coords[same], coords[same + 1] - coords[same]
        length = np.hypot(vector[:, 0], vector[:, 1])
        road = index[same]
        cumulative = np.cumsum(length) - length
        first = np.searchsorted(road, road)  # the first segment of each segment's road
        chainage = cumulative - cumulative[first]
        # (n, 2, 2) coordinates: an array of lines (shapely's stubs say "one line or an array")
        lines = shapely.linestrings(np.stack([start, start + vector], axis=1))
        return cls(start, vector, length, chainage, road, shapely.STRtree(cast(np.ndarray, lines)))


def project(xy: np.ndarray, road: np.ndarray, segments: RoadSegments, roads: np.ndarray,
            search_m: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chainage, signed offset (positive left) and road tangent angle of points on given roads.

    The candidate segments of the point's road within ``search_m`` come from the
    spatial index; the nearest one is projected on analytically (what
    ``line_locate_point`` does, on one segment instead of the whole road).  Points
    farther than ``search_m`` from their road fall back to ``shapely.line_locate_point``.

    >>> road = np.array([shapely.LineString([(0, 0), (10, 0), (10, 10)])])
    >>> c, o, a = project(np.array([[4.0, 1.0], [11.0, 6.0]]), np.array([0, 0]), RoadSegments.of(road), road, 5)
    >>> c.tolist(), o.tolist(), a.tolist()
    ([4.0, 16.0], [1.0, -1.0], [0.0, 90.0])
    """
    n = len(xy)
    point, seg = segments.tree.query(shapely.points(xy), predicate="dwithin", distance=search_m)
    keep = segments.road[seg] == road[point]
    point, seg = point[keep], seg[keep]
    rel = xy[point] - segments.start[seg]
    v, length = segments.vector[seg], segments.length[seg]
    t = np.clip(np.einsum("ij,ij->i", rel, v) / np.where(length > 0, length ** 2, 1.0), 0.0, 1.0)
    away = rel - t[:, None] * v
    distance = np.hypot(away[:, 0], away[:, 1])
    order = np.lexsort((distance, point))
    best = order[np.r_[True, point[order][1:] != point[order][:-1]]] if len(order) else order
    chain, offset, angle = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    p, b = point[best], best
    chain[p] = segments.chainage[seg[b]] + t[b] * length[b]
    side = np.sign(v[b, 0] * rel[b, 1] - v[b, 1] * rel[b, 0])
    offset[p] = np.where(side == 0, 1.0, side) * distance[b]
    angle[p] = np.degrees(np.arctan2(v[b, 1], v[b, 0])) % 180.0
    if (missing := np.flatnonzero(np.isnan(chain))).size:  # farther than search_m: the whole road
        chain[missing], offset[missing], angle[missing] = _project_on_roads(xy[missing], roads[road[missing]])
    return chain, offset, angle


def _project_on_roads(xy: np.ndarray, roads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = shapely.points(xy)
    chain = shapely.line_locate_point(roads, points)
    a = shapely.get_coordinates(shapely.line_interpolate_point(roads, chain - 0.05))
    b = shapely.get_coordinates(shapely.line_interpolate_point(roads, chain + 0.05))
    d = b - a
    foot = shapely.get_coordinates(shapely.line_interpolate_point(roads, chain))
    side = np.sign(d[:, 0] * (xy[:, 1] - foot[:, 1]) - d[:, 1] * (xy[:, 0] - foot[:, 0]))
    offset = np.where(side == 0, 1.0, side) * shapely.distance(roads, points)
    return chain, offset, np.degrees(np.arctan2(d[:, 1], d[:, 0])) % 180.0


def locate_cracks(lines: np.ndarray, roads: np.ndarray, corridor_m: float) -> Located:
    """Reference every crack to its nearest road within ``corridor_m`` (see the module docstring)."""
    n = len(lines)
    segments = RoadSegments.of(roads)
    mids = shapely.line_interpolate_point(lines, 0.5, normalized=True)
    hit_crack, hit_segment = segments.tree.query_nearest(mids, max_distance=corridor_m, all_matches=False)
    road = np.full(n, -1)
    road[hit_crack] = segments.road[hit_segment]
    located = np.flatnonzero(road >= 0)
    coords, index = shapely.get_coordinates(lines[located], return_index=True)
    crack_of_vertex = located[index]
    chain, offset, _ = project(coords, road[crack_of_vertex], segments, roads, 2 * corridor_m)
    seg_from = np.flatnonzero(index[1:] == index[:-1])
    chain_from, chain_to = np.full(n, np.nan), np.full(n, np.nan)
    starts = np.searchsorted(index, np.arange(len(located)))
    if len(chain):
        chain_from[located] = np.minimum.reduceat(chain, starts)
        chain_to[located] = np.maximum.reduceat(chain, starts)
    offset_mid, road_deg = np.full(n, np.nan), np.full(n, np.nan)
    _, offset_mid[located], road_deg[located] = project(shapely.get_coordinates(mids[located]), road[located],
                                                         segments, roads, corridor_m)
    d = coords[seg_from + 1] - coords[seg_from]
    return Located(road, chain_from, chain_to, offset_mid, road_deg, crack_of_vertex[seg_from],
                   np.column_stack([chain[seg_from], chain[seg_from + 1]]),
                   np.column_stack([offset[seg_from], offset[seg_from + 1]]), np.hypot(d[:, 0], d[:, 1]))


@dataclass(frozen=True, slots=True)
class Pieces:
    """Parts of crack segments, one per section they fall in."""

    crack: np.ndarray
    section: np.ndarray  # global section index
    share: np.ndarray  # fraction of the segment
    segment: np.ndarray


def split_by_sections(located: Located, sections: Sections, section_m: float) -> Pieces:
    """Share every segment among the sections its chainage interval covers.

    The shares of a segment add up to 1, so lengths distributed by them add up
    exactly to the crack's length.
    """
    road = located.road[located.segment_crack]
    lo = located.segment_chainage.min(axis=1)
    hi = located.segment_chainage.max(axis=1)
    last = sections.count[road] - 1
    k0 = np.minimum(np.floor(lo / section_m).astype(int), last)
    k1 = np.minimum(np.floor(hi / section_m).astype(int), last)
    reps = k1 - k0 + 1
    seg = np.repeat(np.arange(len(lo)), reps)
    j = k0[seg] + np.arange(len(seg)) - np.repeat(np.cumsum(reps) - reps, reps)
    start = np.where(j == k0[seg], lo[seg], j * section_m)
    stop = np.where(j == k1[seg], hi[seg], (j + 1) * section_m)
    span = (hi - lo)[seg]
    share = np.where(span > 0, (stop - start) / np.where(span > 0, span, 1.0), 1.0)
    return Pieces(located.segment_crack[seg], sections.first[road[seg]] + j, share, seg)


@dataclass(frozen=True, slots=True)
class ConditionFormula:
    """How cracked area becomes ``crack_index`` and ``condition_class`` (see README).

    ``crack_index = clip(100 - scale * sum_s(weight_s * cracked_area_pct_s), 0, 100)``
    over severities s; ``condition_class`` from ``cracked_area_pct`` and ``class_limits_pct``:
    below the first limit the first class, ..., above the last the last class
    (HPMS-style Good < 5 %, Fair 5-20 %, Poor > 20 % by default).  Not a PCI.
    """

    influence_width_m: float = 0.3
    cell_m: float = 0.3
    severity_weights: tuple[float, float, float] = (1.0, 2.0, 3.0)
    scale: float = 2.0
    class_names: tuple[str, ...] = ("Good", "Fair", "Poor")
    class_limits_pct: tuple[float, ...] = (5.0, 20.0)

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.class_limits_pct) + 1:
            raise ValueError(f"{len(self.class_names)} condition classes need {len(self.class_names) - 1} "
                             f"limits, got {len(self.class_limits_pct)}")
        if list(self.class_limits_pct) != sorted(self.class_limits_pct):
            raise ValueError(f"condition class limits must increase, got {self.class_limits_pct}")

    def classify(self, cracked_area_pct: np.ndarray) -> np.ndarray:
        """Class names; None where the figure is unknown (nothing imaged).

        >>> ConditionFormula().classify(np.array([0.0, 5.0, 25.0, np.nan])).tolist()
        ['Good', 'Fair', 'Poor', None]
        """
        pct = np.asarray(cracked_area_pct, float)
        names = np.array(self.class_names, dtype=object)[np.searchsorted(self.class_limits_pct,
                                                                        np.nan_to_num(pct), side="right")]
        names[np.isnan(pct)] = None  # names is a new array (fancy indexing)
        return names


# the sums a section row carries; rollups add them, then derive the figures again
SUM_FIELDS = (*(f"{t}_m" for t in LENGTH_TYPES), *(f"linear_{s}_m" for s in SEVERITIES), "transverse_count",
              "alligator_m2", "block_m2", *(f"pattern_{s}_m2" for s in SEVERITIES), "section_area_m2",
              "imaged_area_m2", "cracked_cells")


def section_sums(pieces: Pieces, crack_length_m: np.ndarray, crack_type: np.ndarray, severity: np.ndarray,
                 located: Located, sections: Sections, coverage_area_m2: np.ndarray,
                 pattern_pairs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                 formula: ConditionFormula, section_m: float) -> dict[str, np.ndarray]:
    """Per section: crack length by type and severity, pattern area, imaged area, cracked cells.

    ``crack_length_m`` is shared among sections by planar segment length;
    ``pattern_pairs`` is (section, class, severity, intersected area m2) per area piece.
    """
    n = len(sections.road)
    planar = np.bincount(located.segment_crack, located.segment_length_m, len(crack_length_m))
    per_m = np.divide(crack_length_m, planar, out=np.zeros(len(planar)), where=planar > 0)
    length = located.segment_length_m[pieces.segment] * pieces.share * per_m[pieces.crack]
    kind, sev = crack_type[pieces.crack], severity[pieces.crack]
    sums: dict[str, np.ndarray] = {f"{t}_m": np.bincount(pieces.section, length * (kind == t), n)
                                   for t in LENGTH_TYPES}
    linear = kind != "pattern"
    sums |= {f"linear_{s}_m": np.bincount(pieces.section, length * linear * (sev == s), n) for s in SEVERITIES}
    transverse = np.flatnonzero((crack_type == "transverse") & (located.road >= 0))
    mid = (located.chainage_from_m[transverse] + located.chainage_to_m[transverse]) / 2
    road = located.road[transverse]
    k = np.minimum(np.floor(mid / section_m).astype(int), sections.count[road] - 1)
    sums["transverse_count"] = np.bincount(sections.first[road] + k, minlength=n).astype(float)
    p_section, p_class, p_severity, p_area = pattern_pairs
    for c in ("alligator", "block"):
        sums[f"{c}_m2"] = np.bincount(p_section, p_area * (p_class == c), n)
    for s in SEVERITIES:
        sums[f"pattern_{s}_m2"] = np.bincount(p_section, p_area * (p_severity == s), n)
    sums["section_area_m2"] = shapely.area(sections.polygon)
    sums["imaged_area_m2"] = coverage_area_m2
    sums["cracked_cells"] = cracked_cells(located, pieces, sections, formula.cell_m, section_m)
    return sums


def cracked_cells(located: Located, pieces: Pieces, sections: Sections, cell_m: float,
                  section_m: float) -> np.ndarray:
    """Per section: how many ``cell_m`` cells (chainage x offset) a crack passes through.

    Sample points every ``cell_m / 3`` along each segment, interpolated in (chainage, offset).
    """
    n = len(sections.road)
    steps = np.maximum(np.ceil(located.segment_length_m / (cell_m / 3)).astype(int), 1) + 1
    seg = np.repeat(np.arange(len(steps)), steps)
    t = (np.arange(len(seg)) - np.repeat(np.cumsum(steps) - steps, steps)) / (steps[seg] - 1)
    chain = located.segment_chainage[seg, 0] + t * np.diff(located.segment_chainage, axis=1)[seg, 0]
    offset = located.segment_offset[seg, 0] + t * np.diff(located.segment_offset, axis=1)[seg, 0]
    road = located.road[located.segment_crack[seg]]
    k = np.minimum(np.floor(chain / section_m).astype(int), sections.count[road] - 1)
    section = sections.first[road] + k
    along = np.maximum(np.floor((chain - sections.from_m[section]) / cell_m), 0).astype(np.int64)
    side = np.floor(offset / cell_m).astype(np.int64)
    across = side - side.min(initial=0)
    key = (section.astype(np.int64) * (along.max(initial=0) + 1) + along) * (across.max(initial=0) + 1) + across
    key = np.sort(key)
    first = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else key
    return np.bincount(first // ((along.max(initial=0) + 1) * (across.max(initial=0) + 1)), minlength=n).astype(float)


def condition(sums: dict[str, np.ndarray], formula: ConditionFormula) -> dict[str, np.ndarray]:
    """The derived figures of section rows (or of rollups) from their sums.

    >>> f = condition({"longitudinal_m": np.array([10.0]), "transverse_m": np.array([0.0]),
    ...     "diagonal_m": np.array([0.0]), "pattern_m": np.array([0.0]), "linear_low_m": np.array([10.0]),
    ...     "linear_medium_m": np.array([0.0]), "linear_high_m": np.array([0.0]),
    ...     **{f"pattern_{s}_m2": np.array([0.0]) for s in SEVERITIES},
    ...     "imaged_area_m2": np.array([30.0]), "section_area_m2": np.array([30.0]),
    ...     "cracked_cells": np.array([34.0])}, ConditionFormula())
    >>> f["cracked_area_pct"].tolist(), f["crack_index"].tolist(), f["condition_class"].tolist()
    ([10.0], [80.0], ['Fair'])
    """
    imaged = sums["imaged_area_m2"]
    safe = np.where(imaged > 0, imaged, np.nan)
    w = formula.influence_width_m
    by_severity = [(sums[f"linear_{s}_m"] * w + sums[f"pattern_{s}_m2"]) / safe * 100 for s in SEVERITIES]
    cracked = np.minimum(sum(by_severity), 100.0)
    weighted = sum(wt * pct for wt, pct in zip(formula.severity_weights, by_severity))
    length = sum(sums[f"{t}_m"] for t in LENGTH_TYPES)
    cells = imaged / formula.cell_m ** 2
    return {"coverage": np.minimum(imaged / np.where(sums["section_area_m2"] > 0, sums["section_area_m2"], np.nan),
                                   1.0),
            "crack_density_m_per_m2": length / safe,
            "cracked_area_pct": cracked,
            "cracked_cells_pct": np.minimum(sums["cracked_cells"] / np.where(cells > 0, cells, np.nan) * 100, 100.0),
            "crack_index": np.clip(100.0 - formula.scale * weighted, 0.0, 100.0),
            "condition_class": formula.classify(cracked)}


def rollup_keys(road: np.ndarray, from_m: np.ndarray, rollup_m: float | None) -> np.ndarray:
    """Group keys of sections for a rollup: per road and ``rollup_m`` block (None: whole roads).

    >>> rollup_keys(np.array([0, 0, 0, 1]), np.array([0.0, 90.0, 100.0, 0.0]), 100.0).tolist()
    [0, 0, 1, 2]
    """
    block = np.zeros(len(road), int) if rollup_m is None else np.floor(from_m / rollup_m + 1e-9).astype(int)
    _, key = np.unique(np.column_stack([road, block]), axis=0, return_inverse=True)
    return key.ravel()


def add_up(sums: dict[str, np.ndarray], key: np.ndarray) -> dict[str, np.ndarray]:
    """The sums of the sections of each group."""
    n = int(key.max()) + 1 if len(key) else 0
    return {name: np.bincount(key, values, n) for name, values in sums.items()}
