"""Pattern (alligator / block) cracking: areas where cracks form a connected network.

The method, on lines in a metric CRS:

1. Crack length is binned into square cells (``cell_m``, 0.5 m) with its
   orientation (doubled-angle vectors, so a line and its reverse agree).
2. Over a moving window of ``window_cells`` cells, a cell is *networked* if the
   crack length density reaches ``min_density_m_per_m2`` and the orientations
   are mixed (coherence ``|sum l e^(2i phi)| / sum l`` at most ``max_coherence``:
   1 is one direction, 0 is an even mix).  Connected networked cells are candidates.
3. A crack is a member of a candidate if at least ``min_member_share`` of its
   length lies in it.
4. Pieces: the members are buffered by half ``gap_m`` (closing gaps of 10-20 mm)
   and unioned; the enclosed holes are the pieces of pavement.  With at least
   ``min_pieces`` pieces, the median piece's longest side (oriented envelope)
   gives the class as ASTM D6433 does: ``alligator`` below ``alligator_piece_m``
   (0.5 m), ``block`` up to ``block_piece_max_m`` (3 m); larger pieces are no pattern.
5. The area is the members' closing (buffer out and back in by ``cell_m``)
   with holes filled.

Members of an area are typed ``pattern`` and left out of linear totals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely
from scipy import ndimage

PATTERN_CLASSES = ("alligator", "block")


@dataclass(frozen=True, slots=True)
class PatternParams:
    """How pattern areas are found; see the module docstring."""

    cell_m: float = 0.5
    window_cells: int = 3
    min_density_m_per_m2: float = 1.5
    max_coherence: float = 0.6
    min_member_share: float = 0.5
    gap_m: float = 0.015
    min_pieces: int = 3
    alligator_piece_m: float = 0.5
    block_piece_max_m: float = 3.0

    def __post_init__(self) -> None:
        if self.cell_m <= 0 or self.window_cells < 1:
            raise ValueError(
                f"pattern cells must be positive, got cell_m={self.cell_m}, window_cells={self.window_cells}"
            )


@dataclass(frozen=True, slots=True)
class PatternArea:
    """One alligator or block area (metric CRS) and its member cracks (indexes into the input)."""

    geometry: shapely.MultiPolygon
    pattern_class: str
    area_m2: float
    crack_length_m: float
    crack_density_m_per_m2: float
    piece_m: float  # median longest side of the pieces
    pieces: int
    members: np.ndarray


def cell_grid(
    lines: np.ndarray, cell_m: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Segments of all lines (at most half a cell long) binned to cells.

    Returns per segment: its line, its cell (flat index), its length and its doubled
    orientation angle; and the grid shape (rows, cols).
    """
    dense = shapely.segmentize(lines, cell_m / 2)
    coords, index = shapely.get_coordinates(dense, return_index=True)
    same = index[1:] == index[:-1]
    d = np.diff(coords, axis=0)[same]
    mid = ((coords[1:] + coords[:-1]) / 2)[same]
    origin = coords.min(axis=0)
    col = ((mid[:, 0] - origin[0]) // cell_m).astype(np.int64)
    row = ((mid[:, 1] - origin[1]) // cell_m).astype(np.int64)
    shape = (int(row.max(initial=0)) + 1, int(col.max(initial=0)) + 1)
    return (
        index[:-1][same],
        row * shape[1] + col,
        np.hypot(d[:, 0], d[:, 1]),
        2 * np.arctan2(d[:, 1], d[:, 0]),
        shape,
    )


def networked_cells(
    cell: np.ndarray, length: np.ndarray, angle2: np.ndarray, shape: tuple[int, int], params: PatternParams
) -> np.ndarray:
    """Labels (0: none) of connected cells whose window is dense and mixed in orientation."""
    size = shape[0] * shape[1]

    def window_sum(weights: np.ndarray) -> np.ndarray:
        grid = np.bincount(cell, weights, size).reshape(shape)
        return ndimage.uniform_filter(grid, params.window_cells, mode="constant") * params.window_cells**2

    total = window_sum(length)
    cos, sin = window_sum(length * np.cos(angle2)), window_sum(length * np.sin(angle2))
    with np.errstate(invalid="ignore", divide="ignore"):
        coherence = np.hypot(cos, sin) / total
    area = (params.window_cells * params.cell_m) ** 2
    mask = (total / area >= params.min_density_m_per_m2) & (coherence <= params.max_coherence)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    return labels


def pieces(members: np.ndarray, gap_m: float) -> np.ndarray:
    """Longest sides of the pavement pieces the member cracks enclose (gaps up to ``gap_m`` closed)."""
    net = shapely.union_all(shapely.buffer(members, gap_m / 2, quad_segs=2))
    holes = [
        shapely.Polygon(ring)
        for part in getattr(net, "geoms", [net])
        for ring in getattr(part, "interiors", [])
    ]
    if not holes:
        return np.zeros(0)
    ring = shapely.get_coordinates(
        shapely.oriented_envelope(np.array(holes, dtype=object)), return_index=True
    )
    xy, index = ring
    d = np.hypot(*np.diff(xy, axis=0).T)[index[1:] == index[:-1]]
    return np.maximum.reduceat(d, np.arange(0, len(d), 4)) if len(d) else np.zeros(0)


def find_pattern_areas(lines: np.ndarray, params: PatternParams = PatternParams()) -> list[PatternArea]:
    """The pattern areas among ``lines`` (metric CRS), each with its member indexes."""
    lines = np.asarray(lines, dtype=object)
    if len(lines) < params.min_pieces:
        return []
    owner, cell, length, angle2, shape = cell_grid(lines, params.cell_m)
    labels = networked_cells(cell, length, angle2, shape, params).ravel()[cell]
    inside = labels > 0
    if not inside.any():
        return []
    # per (line, label): length inside; each line goes to its label with the most length
    key, where = np.unique(
        owner[inside].astype(np.int64) * (labels.max() + 1) + labels[inside], return_inverse=True
    )
    got = np.bincount(where, length[inside])
    line, label = key // (labels.max() + 1), key % (labels.max() + 1)
    best = np.lexsort((-got, line))
    first = best[np.r_[True, line[best][1:] != line[best][:-1]]]
    total = np.bincount(owner, length, len(lines))
    share = got[first] / np.where(total[line[first]] > 0, total[line[first]], 1.0)
    keep = share >= params.min_member_share
    member_line, member_label = line[first][keep], label[first][keep]
    areas = []
    for lab in np.unique(member_label):  # one per candidate area, never per crack
        members = np.sort(member_line[member_label == lab])
        area = _area(lines[members], members, params)
        if area is not None:
            areas.append(area)
    return areas


def _area(member_lines: np.ndarray, members: np.ndarray, params: PatternParams) -> PatternArea | None:
    sizes = pieces(member_lines, params.gap_m)
    if len(sizes) < params.min_pieces:
        return None
    piece_m = float(np.median(sizes))
    if piece_m < params.alligator_piece_m:
        kind = "alligator"
    elif piece_m <= params.block_piece_max_m:
        kind = "block"
    else:
        return None
    closed = shapely.buffer(
        shapely.union_all(shapely.buffer(member_lines, params.cell_m, quad_segs=4)),
        -params.cell_m,
        quad_segs=4,
    )
    parts = [shapely.Polygon(p.exterior) for p in getattr(closed, "geoms", [closed]) if not p.is_empty]
    if not parts:
        return None
    geometry = shapely.MultiPolygon(parts)
    length = float(shapely.length(member_lines).sum())
    return PatternArea(
        geometry, kind, float(geometry.area), length, length / geometry.area, piece_m, len(sizes), members
    )
