"""Road sections by chainage, cracks linearly referenced to them, and per-section condition.

Everything here is planar, in a metric CRS, and vectorized over cracks and sections
(numpy on coordinate arrays; no Python loop per crack or per section).

* A road's sections are cut by chainage (``substrings``, a vectorized
  ``shapely.ops.substring``): [0, s), [s, 2s), ... and a shorter last one.  Chainage
  runs in the direction the road line runs (``pipeline.network`` turns one-way
  roads digitized against the traffic around).  A section's polygon is its
  centreline buffered by half the road width with flat ends, so neighbouring
  sections meet at the normal through their common chainage.
* A crack belongs to the road nearest its midpoint, if within the corridor
  (``corridor_m`` each side).  Its vertices are located on that road: chainage
  and signed offset (positive left of the direction chainage runs in), by
  projecting on the road's nearest segment (``project``: ``line_locate_point``
  restricted to the candidate segments a grid index finds, so the cost does
  not grow with the road's vertex count).  A crack outside every corridor keeps nulls.
* Cracks are split at section boundaries by chainage, not clipped by buffers:
  each segment's length is shared among the sections its chainage interval
  covers, in proportion, so the sections' lengths add up exactly to the crack's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

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
    centreline = substrings(roads, road, from_m, to_m)
    polygon = shapely.buffer(centreline, width_m[road] / 2, cap_style="flat")
    return Sections(road, from_m.astype(float), to_m.astype(float), centreline, polygon, first, count)


def substrings(roads: np.ndarray, road: np.ndarray, from_m: np.ndarray, to_m: np.ndarray) -> np.ndarray:
    """The part of ``roads[road]`` from chainage ``from_m`` to ``to_m``, for many parts at once.

    What ``shapely.ops.substring`` gives for ``from_m < to_m`` within the road, without a
    Python call per part (that was most of the time of cutting 10,000 sections).

    >>> line = shapely.LineString([(0, 0), (10, 0), (10, 10)])
    >>> [p.wkt for p in substrings(np.array([line]), np.array([0, 0]), np.array([5.0, 0.0]), np.array([15.0, 20.0]))]
    ['LINESTRING (5 0, 10 0, 10 5)', 'LINESTRING (0 0, 10 0, 10 10)']
    """
    coords, index = shapely.get_coordinates(roads, return_index=True)
    step = np.r_[0.0, np.hypot(*np.diff(coords, axis=0).T)]
    step[np.r_[True, index[1:] != index[:-1]]] = 0.0
    first = np.searchsorted(index, np.arange(len(roads)))
    chain = np.cumsum(step)
    chain -= chain[first[index]]  # chainage of each vertex along its road
    last = np.r_[first[1:], len(chain)] - 1
    gap = np.r_[0.0, np.cumsum(chain[last][:-1] + 1.0)]  # the roads one after another, 1 m apart
    along = chain + gap[index]

    def point(m: np.ndarray) -> np.ndarray:
        g = m + gap[road]
        j = np.clip(
            np.searchsorted(along, g, "right") - 1, first[road], np.maximum(last[road] - 1, first[road])
        )
        span = along[j + 1] - along[j]
        t = np.clip(np.divide(g - along[j], span, out=np.zeros(len(g)), where=span > 0), 0.0, 1.0)
        return coords[j] + t[:, None] * (coords[j + 1] - coords[j])

    lo = np.searchsorted(along, from_m + gap[road], "right")  # vertices strictly inside
    hi = np.searchsorted(along, to_m + gap[road], "left")
    inner = np.maximum(hi - lo, 0)
    count = inner + 2
    part = np.repeat(np.arange(len(road)), count)
    k = np.arange(len(part)) - np.repeat(np.cumsum(count) - count, count)
    xy = coords[np.clip(lo[part] + k - 1, 0, len(coords) - 1)]
    at_start, at_end = k == 0, k == count[part] - 1
    xy[at_start] = point(np.asarray(from_m, float))
    xy[at_end] = point(np.asarray(to_m, float))
    return shapely.linestrings(xy, indices=part)


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
    """The straight segments of all roads, with a grid index: projection is done per segment.

    The index is a uniform grid of ``cell_m`` cells in numpy (no tree: a tree query
    per point cost more than everything else on a million cracks).  Each segment is
    listed in every cell within ``reach_m`` of it (long segments in pieces of one
    cell), so a point's cell lists every segment within ``reach_m`` of the point.
    """

    start: np.ndarray  # (n, 2)
    vector: np.ndarray  # (n, 2) end - start
    length: np.ndarray
    chainage: np.ndarray  # chainage of the start along its road
    road: np.ndarray
    reach_m: float
    cell_m: float
    origin: np.ndarray  # (2,) lower left corner of cell (0, 0)
    rows: int  # cells along y
    cell_key: np.ndarray  # sorted: the cells that list a segment (ix * rows + iy) ...
    cell_segment: np.ndarray  # ... and the segment each lists

    @classmethod
    def of(cls, roads: np.ndarray, reach_m: float) -> RoadSegments:
        coords, index = shapely.get_coordinates(roads, return_index=True)
        same = np.flatnonzero(index[1:] == index[:-1])
        start, vector = coords[same], coords[same + 1] - coords[same]
        length = np.hypot(vector[:, 0], vector[:, 1])
        road = index[same]
        cumulative = np.cumsum(length) - length
        first = np.searchsorted(road, road)  # the first segment of each segment's road
        chainage = cumulative - cumulative[first]
        cell = max(float(reach_m), 0.5)
        pieces = np.maximum(np.ceil(length / cell), 1).astype(np.int64)
        seg = np.repeat(np.arange(len(length)), pieces)
        k = (np.arange(len(seg)) - np.repeat(np.cumsum(pieces) - pieces, pieces))[:, None]
        a = start[seg] + vector[seg] * k / pieces[seg, None]
        b = start[seg] + vector[seg] * (k + 1) / pieces[seg, None]
        origin = coords.min(axis=0) - reach_m - cell
        lo = np.floor((np.minimum(a, b) - reach_m - origin) / cell).astype(np.int64)
        hi = np.floor((np.maximum(a, b) + reach_m - origin) / cell).astype(np.int64)
        rows = int(hi[:, 1].max(initial=0)) + 2
        span = hi - lo + 1
        count = span[:, 0] * span[:, 1]
        owner = np.repeat(np.arange(len(seg)), count)
        j = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
        key = (lo[owner, 0] + j // span[owner, 1]) * rows + lo[owner, 1] + j % span[owner, 1]
        pair = np.unique(key * len(length) + seg[owner])  # sorted by cell, then segment; no repeats
        return cls(
            start,
            vector,
            length,
            chainage,
            road,
            float(reach_m),
            cell,
            origin,
            rows,
            pair // max(len(length), 1),
            pair % max(len(length), 1),
        )

    def nearest(
        self, xy: np.ndarray, road: np.ndarray | None = None, chunk: int = 200_000
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per point: its nearest segment within ``reach_m`` (of its ``road``, if given; -1: none),
        the position ``t`` (0..1) of the foot on it, and the signed distance (positive left).

        >>> s = RoadSegments.of(np.array([shapely.LineString([(0, 0), (10, 0), (10, 10)])]), 5.0)
        >>> seg, t, d = s.nearest(np.array([[4.0, 1.0], [11.0, 6.0], [30.0, 0.0]]))
        >>> seg.tolist(), t.tolist(), d.tolist()
        ([0, 1, -1], [0.4, 0.6, nan], [1.0, -1.0, nan])
        """
        out = np.full(len(xy), -1), np.full(len(xy), np.nan), np.full(len(xy), np.nan)
        for begin in range(0, len(xy), chunk):
            part = slice(begin, begin + chunk)
            self._nearest(xy[part], None if road is None else road[part], *(o[part] for o in out))
        return out

    def _nearest(self, xy, road, seg_out, t_out, d_out) -> None:
        cell = np.floor((xy - self.origin) / self.cell_m).astype(np.int64)
        inside = (cell >= 0).all(axis=1) & (cell[:, 1] < self.rows - 1)
        key = np.where(inside, cell[:, 0] * self.rows + cell[:, 1], -1)
        lo = np.searchsorted(self.cell_key, key, "left")
        count = np.searchsorted(self.cell_key, key, "right") - lo
        point = np.repeat(np.arange(len(xy)), count)
        seg = self.cell_segment[np.repeat(lo - np.cumsum(count) + count, count) + np.arange(len(point))]
        if road is not None:
            keep = self.road[seg] == road[point]
            point, seg = point[keep], seg[keep]
        rel = xy[point] - self.start[seg]
        v, length = self.vector[seg], self.length[seg]
        t = np.clip((rel[:, 0] * v[:, 0] + rel[:, 1] * v[:, 1]) / np.where(length > 0, length**2, 1.0), 0, 1)
        distance = np.hypot(rel[:, 0] - t * v[:, 0], rel[:, 1] - t * v[:, 1])
        keep = distance <= self.reach_m
        point, seg, t, distance, rel, v = point[keep], seg[keep], t[keep], distance[keep], rel[keep], v[keep]
        if not len(point):
            return
        starts = np.flatnonzero(np.r_[True, point[1:] != point[:-1]])  # pairs come grouped by point
        least = np.minimum.reduceat(distance, starts)
        best = np.flatnonzero(distance == np.repeat(least, np.diff(np.r_[starts, len(point)])))
        best = best[np.r_[True, point[best][1:] != point[best][:-1]]]  # the first of equals
        p = point[best]
        side = np.sign(v[best, 0] * rel[best, 1] - v[best, 1] * rel[best, 0])
        seg_out[p], t_out[p] = seg[best], t[best]
        d_out[p] = np.where(side == 0, 1.0, side) * distance[best]


def project(
    xy: np.ndarray, road: np.ndarray, segments: RoadSegments, roads: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chainage, signed offset (positive left) and road tangent angle of points on given roads.

    The nearest segment of the point's road within ``segments.reach_m`` comes from the
    grid; the point is projected on it analytically (what ``line_locate_point`` does,
    on one segment instead of the whole road).  Points farther than that from their
    road fall back to ``shapely.line_locate_point`` on the whole road.

    >>> road = np.array([shapely.LineString([(0, 0), (10, 0), (10, 10)])])
    >>> c, o, a = project(np.array([[4.0, 1.0], [11.0, 6.0]]), np.array([0, 0]), RoadSegments.of(road, 5), road)
    >>> c.tolist(), o.tolist(), a.tolist()
    ([4.0, 16.0], [1.0, -1.0], [0.0, 90.0])
    >>> project(np.array([[-3.0, 4.0]]), np.array([0]), RoadSegments.of(road, 1), road)  # beyond reach, before 0
    (array([0.]), array([5.]), array([0.]))
    """
    seg, t, offset = segments.nearest(xy, road)
    found = seg >= 0
    chain, angle = np.full(len(xy), np.nan), np.full(len(xy), np.nan)
    s = seg[found]
    chain[found] = segments.chainage[s] + t[found] * segments.length[s]
    angle[found] = np.degrees(np.arctan2(segments.vector[s, 1], segments.vector[s, 0])) % 180.0
    if (missing := np.flatnonzero(~found)).size:  # farther than reach_m: the whole road
        chain[missing], offset[missing], angle[missing] = _project_on_roads(xy[missing], roads[road[missing]])
    return chain, offset, angle


def _project_on_roads(xy: np.ndarray, roads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = shapely.points(xy)
    chain = shapely.line_locate_point(roads, points)
    length = shapely.length(roads)  # a negative distance would count from the far end
    a = shapely.get_coordinates(shapely.line_interpolate_point(roads, np.clip(chain - 0.05, 0, length)))
    b = shapely.get_coordinates(shapely.line_interpolate_point(roads, np.clip(chain + 0.05, 0, length)))
    d = b - a
    foot = shapely.get_coordinates(shapely.line_interpolate_point(roads, chain))
    side = np.sign(d[:, 0] * (xy[:, 1] - foot[:, 1]) - d[:, 1] * (xy[:, 0] - foot[:, 0]))
    offset = np.where(side == 0, 1.0, side) * shapely.distance(roads, points)
    return chain, offset, np.degrees(np.arctan2(d[:, 1], d[:, 0])) % 180.0


def _midpoints(coords: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """The point halfway along each line (what ``line_interpolate_point(lines, 0.5, normalized=True)`` gives).

    >>> _midpoints(np.array([[0.0, 0], [2, 0], [2, 2], [5, 5], [5, 6]]), np.array([0, 0, 0, 1, 1]), 2).tolist()
    [[2.0, 0.0], [5.0, 5.5]]
    """
    same = np.flatnonzero(index[1:] == index[:-1])
    d = coords[same + 1] - coords[same]
    step = np.hypot(d[:, 0], d[:, 1])
    owner = index[same]
    total = np.bincount(owner, step, n)
    before = np.cumsum(step) - step
    before -= before[np.searchsorted(owner, owner)]  # length before each segment, within its line
    half = total[owner] / 2
    holds = np.flatnonzero((before <= half) & ((before + step >= half) | (step == 0)))
    holds = holds[np.r_[True, owner[holds][1:] != owner[holds][:-1]]] if len(holds) else holds
    mid = coords[np.searchsorted(index, np.arange(n))].astype(float)  # a zero-length line: its first vertex
    s = same[holds]
    f = np.divide(half[holds] - before[holds], step[holds], out=np.zeros(len(holds)), where=step[holds] > 0)
    mid[owner[holds]] = coords[s] + f[:, None] * d[holds]
    return mid


def locate_cracks(lines: np.ndarray, roads: np.ndarray, corridor_m: float) -> Located:
    """Reference every crack to its nearest road within ``corridor_m`` (see the module docstring)."""
    n = len(lines)
    segments = RoadSegments.of(roads, corridor_m)  # vertices beyond it (long cracks at the edge): whole roads
    coords, index = shapely.get_coordinates(lines, return_index=True)
    mids = _midpoints(coords, index, n)
    seg, t, offset_mid = segments.nearest(mids)  # the nearest road, within the corridor
    hit = seg >= 0
    road = np.where(hit, segments.road[np.maximum(seg, 0)], -1)
    located = np.flatnonzero(road >= 0)
    offset_mid[~hit] = np.nan
    road_deg = np.full(n, np.nan)
    s = seg[located]
    road_deg[located] = np.degrees(np.arctan2(segments.vector[s, 1], segments.vector[s, 0])) % 180.0
    keep = hit[index]
    coords, index = coords[keep], index[keep]
    crack_of_vertex = index
    chain, offset, _ = project(coords, road[crack_of_vertex], segments, roads)
    seg_from = np.flatnonzero(index[1:] == index[:-1])
    chain_from, chain_to = np.full(n, np.nan), np.full(n, np.nan)
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]]) if len(index) else np.zeros(0, int)
    if len(chain):
        chain_from[located] = np.minimum.reduceat(chain, starts)
        chain_to[located] = np.maximum.reduceat(chain, starts)
    d = coords[seg_from + 1] - coords[seg_from]
    return Located(
        road,
        chain_from,
        chain_to,
        offset_mid,
        road_deg,
        crack_of_vertex[seg_from],
        np.column_stack([chain[seg_from], chain[seg_from + 1]]),
        np.column_stack([offset[seg_from], offset[seg_from + 1]]),
        np.hypot(d[:, 0], d[:, 1]),
    )


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
            raise ValueError(
                f"{len(self.class_names)} condition classes need {len(self.class_names) - 1} "
                f"limits, got {len(self.class_limits_pct)}"
            )
        if list(self.class_limits_pct) != sorted(self.class_limits_pct):
            raise ValueError(f"condition class limits must increase, got {self.class_limits_pct}")

    def classify(self, cracked_area_pct: np.ndarray) -> np.ndarray:
        """Class names; None where the figure is unknown (nothing imaged).

        >>> ConditionFormula().classify(np.array([0.0, 5.0, 25.0, np.nan])).tolist()
        ['Good', 'Fair', 'Poor', None]
        """
        pct = np.asarray(cracked_area_pct, float)
        names = np.array(self.class_names, dtype=object)[
            np.searchsorted(self.class_limits_pct, np.nan_to_num(pct), side="right")
        ]
        names[np.isnan(pct)] = None  # names is a new array (fancy indexing)
        return names


# the sums a section row carries; rollups add them, then derive the figures again
SUM_FIELDS = (
    *(f"{t}_m" for t in LENGTH_TYPES),
    *(f"linear_{s}_m" for s in SEVERITIES),
    "transverse_count",
    "alligator_m2",
    "block_m2",
    *(f"pattern_{s}_m2" for s in SEVERITIES),
    "section_area_m2",
    "imaged_area_m2",
    "cracked_cells",
)


def section_sums(
    pieces: Pieces,
    crack_length_m: np.ndarray,
    crack_type: np.ndarray,
    severity: np.ndarray,
    located: Located,
    sections: Sections,
    coverage_area_m2: np.ndarray,
    pattern_pairs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    formula: ConditionFormula,
    section_m: float,
) -> dict[str, np.ndarray]:
    """Per section: crack length by type and severity, pattern area, imaged area, cracked cells.

    ``crack_length_m`` is shared among sections by planar segment length;
    ``pattern_pairs`` is (section, class, severity, intersected area m2) per area piece.
    """
    n = len(sections.road)
    planar = np.bincount(located.segment_crack, located.segment_length_m, len(crack_length_m))
    per_m = np.divide(crack_length_m, planar, out=np.zeros(len(planar)), where=planar > 0)
    length = located.segment_length_m[pieces.segment] * pieces.share * per_m[pieces.crack]
    kind, sev = crack_type[pieces.crack], severity[pieces.crack]
    sums: dict[str, np.ndarray] = {
        f"{t}_m": np.bincount(pieces.section, length * (kind == t), n) for t in LENGTH_TYPES
    }
    linear = kind != "pattern"
    sums |= {
        f"linear_{s}_m": np.bincount(pieces.section, length * linear * (sev == s), n) for s in SEVERITIES
    }
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


def cracked_cells(
    located: Located, pieces: Pieces, sections: Sections, cell_m: float, section_m: float
) -> np.ndarray:
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
    key = (section.astype(np.int64) * (along.max(initial=0) + 1) + along) * (
        across.max(initial=0) + 1
    ) + across
    key = np.sort(key)
    first = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else key
    return np.bincount(
        first // ((along.max(initial=0) + 1) * (across.max(initial=0) + 1)), minlength=n
    ).astype(float)


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
    cells = imaged / formula.cell_m**2
    return {
        "coverage": np.minimum(
            imaged / np.where(sums["section_area_m2"] > 0, sums["section_area_m2"], np.nan), 1.0
        ),
        "crack_density_m_per_m2": length / safe,
        "cracked_area_pct": cracked,
        "cracked_cells_pct": np.minimum(
            sums["cracked_cells"] / np.where(cells > 0, cells, np.nan) * 100, 100.0
        ),
        "crack_index": np.clip(100.0 - formula.scale * weighted, 0.0, 100.0),
        "condition_class": formula.classify(cracked),
    }


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
