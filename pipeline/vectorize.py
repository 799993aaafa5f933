"""From crack probability to crack centrelines, band by band, merged across seams.

The probability raster arrives in row runs (from the stitcher, or read back
from a probability COG).  Rows are processed in bands of ``band_rows`` with a
``halo_rows`` margin above and below, so memory is a few bands of the scene's
width whatever its length.  Each band: hysteresis threshold, speck removal,
skeleton, skeleton graph (skan), spur pruning.  Every skeleton path is cut to
the band's own rows; where it leaves them, it ends exactly halfway between the
last row inside and the first row outside.  The neighbouring band computes the
same point from its side, so the pieces of one crack meet end to end and are
joined again (``SeamJoiner``): a crack crossing chip or band seams is one line.

Once the whole scene is vectorized, crack lines that stop and start again
across a short gap, pointing at each other (a crack broken by a faint stretch),
are bridged into one line (``bridge_gaps``).  Isolated fragments shorter than
``min_length_m`` (surface texture) are dropped when the lines are measured
(``pipeline.measure``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Self, TypeVar

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skan import Skeleton
from skimage.morphology import skeletonize


@dataclass(frozen=True, slots=True)
class VectorizeParams:
    """How probabilities become lines.

    Args:
        threshold: Crack probability (0..1) that seeds a crack (the model's calibrated threshold).
        low_ratio: Hysteresis: pixels down to ``threshold * low_ratio`` join a seeded crack.
        min_area_px: Connected crack regions smaller than this are specks, dropped.
        spur_px: Side branches shorter than this, hanging off a junction, are pruned.
        min_length_px: Lines shorter than this (after joining across seams) are dropped.
        min_length_m: Lines shorter than this on the ground, after bridging, are dropped
            when no other line comes within ``isolation_px`` (isolated fragments of
            surface texture).
        isolation_px: How far from every other line a short line must be to count as isolated.
        bridge_gap_px: Line ends at most this far apart, each pointing at the other within
            ``bridge_angle_deg``, are bridged into one line (0 turns bridging off).
        bridge_angle_deg: Largest angle between a line's direction at its end and the gap.
        simplify_px: Douglas-Peucker tolerance applied to lines, in pixels.
        band_rows: Rows per vectorized band.
        halo_rows: Context rows above and below a band (must exceed the widest crack).
        column_spacing: Ground size of a pixel's column step over its row step (1 for square
            pixels); the distance transform, and so crack widths, are measured in row steps.
    """

    threshold: float = 0.5
    low_ratio: float = 0.5
    min_area_px: int = 30
    spur_px: float = 10.0
    min_length_px: float = 12.0
    min_length_m: float = 0.025  # R 85 practice; chosen on the val scenes (docs/benchmarks.md)
    isolation_px: float = 24.0
    bridge_gap_px: float = 12.0
    bridge_angle_deg: float = 30.0
    simplify_px: float = 0.75
    band_rows: int = 1024
    halo_rows: int = 64
    column_spacing: float = 1.0


@dataclass(slots=True)
class Piece:
    """Part of a crack centreline in scene pixel coordinates, with sums for its measurements.

    ``rc`` holds (row, col) vertices; pixel centres are at integer values.
    ``seams`` gives, for the start and the end, the seam row ``s`` the piece
    was cut at (the end lies on ``row = s - 0.5``), or None for a true end.
    """

    rc: np.ndarray
    seams: tuple[int | None, int | None]
    n_px: int
    half_width_sum: float  # sum of the distance transform at centreline pixels
    half_width_max: float
    probability_sum: float  # sum of uint8 probability at centreline pixels

    def reversed(self) -> Piece:
        return Piece(
            self.rc[::-1],
            self.seams[::-1],
            self.n_px,
            self.half_width_sum,
            self.half_width_max,
            self.probability_sum,
        )

    def length_px(self) -> float:
        return float(np.hypot(*np.diff(self.rc, axis=0).T).sum())


EIGHT_NEIGHBOURS = np.ones((3, 3), dtype=bool)
SPARSE_GAP_PX = 32  # crack_columns: empty gaps narrower than this do not split column runs
SPARSE_MAX_RUNS = 64  # ... and with more runs than this, the whole width is one run


def crack_columns(mask: np.ndarray) -> list[slice]:
    """Column runs that hold a mask's pixels, each with the empty column on either side.

    Runs are split at gaps of ``SPARSE_GAP_PX`` empty columns or more; if there
    are more than ``SPARSE_MAX_RUNS`` runs or they cover over half the width,
    the whole width is one run.  8-connected regions never span two runs, so a
    band can be processed as its runs laid side by side (``pack_columns``).

    >>> m = np.zeros((4, 200), bool); m[1, 2:5] = m[2, 5] = m[0, 150:152] = True
    >>> crack_columns(m), crack_columns(m[:, :0])
    ([slice(1, 7, None), slice(149, 153, None)], [])
    """
    columns = np.concatenate([[0], mask.any(axis=0).view(np.int8), [0]])
    edges = np.flatnonzero(np.diff(columns))
    if not len(edges):
        return []
    starts, stops = edges[::2], edges[1::2]
    apart = starts[1:] - stops[:-1] >= SPARSE_GAP_PX
    starts, stops = starts[np.concatenate([[True], apart])], stops[np.concatenate([apart, [True]])]
    width = mask.shape[1]
    if len(starts) > SPARSE_MAX_RUNS or (stops - starts).sum() > width // 2:
        return [slice(0, width)]
    return [slice(max(a - 1, 0), min(b + 1, width)) for a, b in zip(starts.tolist(), stops.tolist())]


def pack_columns(runs: list[slice], *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """``arrays`` cut to the column ``runs`` and laid side by side, then the scene column of each
    packed column.

    >>> a = np.arange(10)[None]
    >>> pack_columns([slice(1, 3), slice(7, 9)], a)
    (array([[1, 2, 7, 8]]), array([1, 2, 7, 8]))
    """
    if len(runs) == 1:
        return (*(a[:, runs[0]] for a in arrays), np.arange(runs[0].start, runs[0].stop))
    packed = tuple(np.concatenate([a[:, run] for run in runs], axis=1) for a in arrays)
    return (*packed, np.concatenate([np.arange(run.start, run.stop) for run in runs]))


def seed_level(params: VectorizeParams) -> np.uint8:
    """The uint8 probability at which a crack is seeded (hysteresis high threshold)."""
    return np.uint8(min(np.ceil(params.threshold * 255.0), 255))


def above_low(probability: np.ndarray, valid: np.ndarray, params: VectorizeParams) -> np.ndarray:
    """Valid pixels at or above the hysteresis low threshold."""
    low = probability >= params.threshold * params.low_ratio * 255.0
    if not valid.all():
        low &= valid
    return low


def crack_regions(
    probability: np.ndarray, valid: np.ndarray, params: VectorizeParams
) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Crack regions of a uint8 probability array: hysteresis threshold, then speck removal.

    Regions above the low threshold (8-connected, so thin diagonal cracks
    hold together) are kept if they reach the high threshold somewhere and
    have at least ``min_area_px`` pixels.  Returns ``(labels, boxes)``: the
    kept regions numbered 1..n, 0 elsewhere, and their bounding boxes.  Cracks
    cover a tiny part of a band, so after labelling only the pixels above the
    low threshold are touched; most bands have no crack at all and cost one pass.

    >>> p = np.zeros((5, 40), np.uint8); p[2, 5:35] = 200; p[2, 35:38] = 80; p[4, :3] = 200
    >>> labels, boxes = crack_regions(p, p >= 0, VectorizeParams(min_area_px=5))
    >>> len(boxes), int((labels > 0).sum()), boxes[0][1]
    (1, 33, slice(5, 38, None))
    """
    high = seed_level(params)
    if probability.max(initial=0) < high:
        return np.zeros(probability.shape, dtype=np.int32), []
    low = above_low(probability, valid, params)
    labels, count = ndimage.label(low, structure=EIGHT_NEIGHBOURS)
    boxes = ndimage.find_objects(labels, count)
    where = np.flatnonzero(low)
    region = labels.ravel()[where]
    seeded = np.zeros(len(boxes) + 1, dtype=bool)
    seeded[region[probability.ravel()[where] >= high]] = True
    keep = seeded & (np.bincount(region, minlength=len(boxes) + 1) >= params.min_area_px)
    keep[0] = False
    renumber = np.cumsum(keep, dtype=np.int32) * keep
    labels.ravel()[where] = renumber[region]
    return labels, [box for box, kept in zip(boxes, keep[1:]) if kept]


def crack_mask(probability: np.ndarray, valid: np.ndarray, params: VectorizeParams) -> np.ndarray:
    """``crack_regions`` as a boolean mask.

    >>> p = np.zeros((5, 40), np.uint8); p[2, 5:35] = 200; p[2, 35:38] = 80
    >>> int(crack_mask(p, p >= 0, VectorizeParams(min_area_px=5)).sum())
    33
    """
    return crack_regions(probability, valid, params)[0] > 0


def centrelines(
    mask: np.ndarray,
    labels: np.ndarray | None = None,
    boxes: list[tuple[slice, ...]] | None = None,
    column_spacing: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Skeleton of a mask and its distance transform, computed region by region.

    Returns ``(skeleton, half_width)``: ``skeletonize(mask)`` and
    ``distance_transform_edt(mask)`` (float32; zero outside the mask).  Both
    are computed only inside each crack region's bounding box, grown by one
    pixel so that its border is background: cracks cover a small part of a
    band, and whole-band transforms cost time for every background pixel.
    ``labels`` and ``boxes`` (the mask's 8-connected regions and their boxes,
    from ``crack_regions``) save labelling the mask again.  Distances are in row
    steps; a column step is ``column_spacing`` of them (non-square pixels).

    >>> m = np.zeros((9, 30), bool); m[3:6, 2:28] = True
    >>> skeleton, half_width = centrelines(m)
    >>> bool((skeleton == skeletonize(m)).all()), float(half_width[4, 10])
    (True, 2.0)
    """
    if labels is None or boxes is None:
        labels, _ = ndimage.label(mask, structure=EIGHT_NEIGHBOURS)
        boxes = ndimage.find_objects(labels)
    skeleton = np.zeros_like(mask)
    half_width = np.zeros(mask.shape, dtype=np.float32)
    for index, box in enumerate(boxes, start=1):
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        region = labels[grown] == index
        skeleton[grown] |= skeletonize(region)
        half_width[grown] += ndimage.distance_transform_edt(
            region, sampling=None if column_spacing == 1.0 else (1.0, column_spacing)
        ).astype(np.float32)
    return skeleton, half_width


def warm_up() -> None:
    """Compile skan's numba code now (~2.5 s, once per process) rather than on the first crack.

    Long-running workers pay it once either way; benchmarks call this before timing,
    as they warm the network up.
    """
    y = np.zeros((9, 9), bool)
    y[4, :5] = y[:4, 5] = y[5:, 5] = True  # a junction and a spur: every code path
    y[4, 4:6] = True
    skeleton_paths(y, spur_px=3.0)


def skeleton_paths(skeleton: np.ndarray, spur_px: float) -> list[np.ndarray]:
    """Paths of a skeleton as (row, col) int arrays, with short spurs pruned."""
    if np.count_nonzero(skeleton) < 2:
        return []
    graph = Skeleton(skeleton)
    for _ in range(2):  # pruning can expose a new spur once
        degrees, lengths = graph.degrees, graph.path_lengths()
        ends = [(degrees[graph.path(i)[0]], degrees[graph.path(i)[-1]]) for i in range(graph.n_paths)]
        spurs = [
            i for i, (a, b) in enumerate(ends) if lengths[i] < spur_px and min(a, b) == 1 and max(a, b) >= 3
        ]
        if not spurs:
            break
        graph = graph.prune_paths(spurs)
        if graph.n_paths == 0:
            return []
    return [graph.path_coordinates(i) for i in range(graph.n_paths)]


def cut_to_rows(rc: np.ndarray, first: int, stop: int) -> list[tuple[np.ndarray, slice, tuple]]:
    """Split a path into its runs inside rows ``[first, stop)``.

    Returns (vertices, slice of ``rc`` inside, seams) per run.  A run that
    leaves the rows gets an extra end vertex halfway to the first vertex
    outside, and the seam row it crossed.

    >>> rc = np.array([[8, 0], [9, 1], [10, 2], [11, 2]])
    >>> [(v.tolist(), s) for v, _, s in cut_to_rows(rc, 0, 10)]
    [([[8.0, 0.0], [9.0, 1.0], [9.5, 1.5]], (None, 10))]
    """
    inside = (rc[:, 0] >= first) & (rc[:, 0] < stop)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], inside.view(np.int8), [0]])))
    runs = []
    for a, b in zip(edges[::2], edges[1::2]):
        vertices = [rc[a:b].astype(np.float64)]
        seams: list[int | None] = [None, None]
        if a > 0:
            vertices.insert(0, (rc[a - 1 : a] + rc[a : a + 1]) / 2.0)
            seams[0] = first if rc[a - 1, 0] < first else stop
        if b < len(rc):
            vertices.append((rc[b - 1 : b] + rc[b : b + 1]) / 2.0)
            seams[1] = first if rc[b, 0] < first else stop
        runs.append((np.concatenate(vertices), slice(a, b), tuple(seams)))
    return runs


def band_pieces(
    probability: np.ndarray, valid: np.ndarray, row_off: int, first: int, stop: int, params: VectorizeParams
) -> list[Piece]:
    """Crack pieces whose pixels lie in scene rows ``[first, stop)``.

    ``probability`` and ``valid`` hold scene rows from ``row_off`` on,
    including the halo around ``[first, stop)``.  Cracks cover a small part of
    a band, and most bands have none: the columns that can hold cracks are
    packed side by side (``crack_columns``), and every later step sees only those.
    """
    if probability.max(initial=0) < seed_level(params):
        return []
    columns = crack_columns(above_low(probability, valid, params))
    if not columns:  # the seeds were all nodata
        return []
    probability, valid, scene_column = pack_columns(columns, probability, valid)
    labels, boxes = crack_regions(probability, valid, params)
    if not boxes:
        return []
    skeleton, half_width = centrelines(labels > 0, labels, boxes, params.column_spacing)
    pieces = []
    for path in skeleton_paths(skeleton, params.spur_px):
        absolute = np.column_stack([path[:, 0] + row_off, scene_column[path[:, 1]]])
        for vertices, inside, seams in cut_to_rows(absolute, first, stop):
            rows, cols = path[inside, 0], path[inside, 1]
            hw = half_width[rows, cols]
            pieces.append(
                Piece(
                    vertices,
                    seams,
                    len(rows),
                    float(hw.sum()),
                    float(hw.max()),
                    float(probability[rows, cols].sum(dtype=np.int64)),
                )
            )
    return pieces


class SeamJoiner:
    """Join pieces that meet end to end on a band seam into whole crack lines."""

    def __init__(self, tolerance_px: float = 1.5) -> None:
        self.tolerance_px = tolerance_px
        self.pending: list[Piece] = []

    def add(self, piece: Piece) -> Piece | None:
        """Keep a piece that ends on a seam; return a piece that is already whole."""
        if piece.seams == (None, None):
            return piece
        self.pending.append(piece)
        return None

    def finish(self) -> list[Piece]:
        """Join all pending pieces and return the joined lines."""
        lines = [join(chain) for chain in chains(self.pending, self._links())]
        self.pending = []
        return lines

    def _links(self) -> dict[tuple[int, int], tuple[int, int]]:
        """Pair piece ends across each seam: one from above, one from below, closest first."""
        ends: dict[int, list[tuple[float, int, int, bool]]] = {}
        for i, piece in enumerate(self.pending):
            for end, seam in enumerate(piece.seams):
                if seam is not None:
                    above = piece.rc[-2 if end else 1, 0] < seam  # the pixel next to the cut
                    col = float(piece.rc[-1 if end else 0, 1])
                    ends.setdefault(seam, []).append((col, i, end, bool(above)))
        links = {}
        for candidates in ends.values():
            uppers = [c for c in candidates if c[3]]
            lowers = [c for c in candidates if not c[3]]
            pairs = sorted(
                (abs(u[0] - v[0]), u, v)
                for u in uppers
                for v in lowers
                if abs(u[0] - v[0]) <= self.tolerance_px
            )
            for _, u, v in pairs:
                if (u[1], u[2]) not in links and (v[1], v[2]) not in links:
                    links[(u[1], u[2])] = (v[1], v[2])
                    links[(v[1], v[2])] = (u[1], u[2])
        return links


Links = dict[tuple[int, int], tuple[int, int]]  # (piece, end) <-> (piece, end); end 0 = start, 1 = end


def _extremity(start: int, links: Links) -> tuple[int, int]:
    """Walk backwards from ``start`` to the first piece of its chain; return (piece, entry end)."""
    node, entry, seen = start, 0, {start}
    while (node, entry) in links:
        prev, prev_end = links[(node, entry)]
        if prev in seen:  # a closed loop: start anywhere
            return start, 0
        seen.add(prev)
        node, entry = prev, 1 - prev_end
    return node, entry


class Orientable(Protocol):
    """Something with a direction that ``chains`` can turn around: a Piece, a frame's GroundLine."""

    def reversed(self) -> Self: ...


PieceT = TypeVar("PieceT", bound=Orientable)


def chains(pieces: Sequence[PieceT], links: Links) -> list[list[PieceT]]:
    """Group linked pieces into chains, each piece oriented along its chain.

    >>> a = Piece(np.array([[0., 0], [0, 4]]), (None, None), 5, 5.0, 1.0, 900.0)
    >>> b = Piece(np.array([[0., 9], [0, 6]]), (None, None), 4, 4.0, 1.0, 800.0)
    >>> [[p.rc[0].tolist() for p in c] for c in chains([a, b], {(0, 1): (1, 1), (1, 1): (0, 1)})]
    [[[0.0, 0.0], [0.0, 6.0]]]
    """
    done: set[int] = set()
    groups: list[list[PieceT]] = []
    for start in range(len(pieces)):
        if start in done:
            continue
        node, entry = _extremity(start, links)
        chain: list[PieceT] = []
        while node not in done:
            done.add(node)
            chain.append(pieces[node] if entry == 0 else pieces[node].reversed())
            nxt = links.get((node, 1 - entry))
            if nxt is None:
                break
            node, entry = nxt
        groups.append(chain)
    return groups


def join(chain: list[Piece], bridged: bool = False) -> Piece:
    """Concatenate pieces that meet end to end (each oriented along the chain).

    Pieces cut at a seam share their end point (the two are averaged);
    ``bridged`` pieces are joined by a straight segment across the gap.
    """
    if len(chain) == 1:
        return chain[0]
    parts = [chain[0].rc]
    for piece in chain[1:]:
        if bridged:
            parts.append(piece.rc)
            continue
        joint = (parts[-1][-1] + piece.rc[0]) / 2.0
        parts[-1] = np.vstack([parts[-1][:-1], joint])
        parts.append(piece.rc[1:])
    return Piece(
        np.vstack(parts),
        (chain[0].seams[0], chain[-1].seams[1]),
        sum(p.n_px for p in chain),
        sum(p.half_width_sum for p in chain),
        max(p.half_width_max for p in chain),
        sum(p.probability_sum for p in chain),
    )


def end_directions(pieces: list[Piece], tangent_px: float = 8.0) -> tuple[np.ndarray, np.ndarray]:
    """Ends of every piece and the unit direction pointing out of the line there.

    Returns ``(points, directions)``, each (2 P, 2) in (row, col): rows ``2 i``
    and ``2 i + 1`` are the start and the end of piece ``i``. The direction is
    taken from the vertex about ``tangent_px`` along the line (or its other end).

    >>> p, d = end_directions([Piece(np.array([[0., 0], [0, 5], [0, 10]]), (None, None), 11, 0, 0, 0)])
    >>> p.tolist(), d.round(3).tolist()
    ([[0.0, 0.0], [0.0, 10.0]], [[0.0, -1.0], [0.0, 1.0]])
    """
    points, directions = [], []
    for piece in pieces:
        rc = piece.rc
        along = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(rc, axis=0).T))])
        inner_start = rc[min(int(np.searchsorted(along, tangent_px)), len(rc) - 1)]
        inner_end = rc[max(int(np.searchsorted(along, along[-1] - tangent_px, side="right")) - 1, 0)]
        points += [rc[0], rc[-1]]
        directions += [rc[0] - inner_start, rc[-1] - inner_end]
    points_array, vectors = np.asarray(points, float), np.asarray(directions, float)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return points_array, np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def bridge_gaps(pieces: list[Piece], gap_px: float, max_angle_deg: float = 30.0) -> list[Piece]:
    """Join lines whose ends face each other across a gap of at most ``gap_px``.

    Two ends are bridged when each line, continued straight out of its end,
    points at the other end within ``max_angle_deg``. Closest pairs are taken
    first; every end is bridged at most once and no loop is closed. The gap
    becomes a straight segment of the joined line (its length counts, its
    pixels add nothing to the width and confidence sums).

    >>> a = Piece(np.array([[5., 0], [5, 20]]), (None, None), 21, 21.0, 1.0, 4000.0)
    >>> b = Piece(np.array([[5., 26], [5, 50]]), (None, None), 25, 25.0, 1.0, 5000.0)
    >>> [p.rc[[0, -1]].tolist() for p in bridge_gaps([a, b], gap_px=8)]
    [[[5.0, 0.0], [5.0, 50.0]]]
    >>> len(bridge_gaps([a, b], gap_px=5))
    2
    """
    if gap_px <= 0 or len(pieces) < 2:
        return list(pieces)
    points, directions = end_directions(pieces)
    pairs = np.array(sorted(cKDTree(points).query_pairs(gap_px)), dtype=np.int64).reshape(-1, 2)
    pairs = pairs[pairs[:, 0] // 2 != pairs[:, 1] // 2]
    if len(pairs) == 0:
        return list(pieces)
    gap = points[pairs[:, 1]] - points[pairs[:, 0]]
    distance = np.linalg.norm(gap, axis=1)
    unit = np.divide(gap, distance[:, None], out=np.zeros_like(gap), where=distance[:, None] > 0)
    cos_limit = np.cos(np.radians(max_angle_deg))
    facing = (np.einsum("ij,ij->i", directions[pairs[:, 0]], unit) >= cos_limit) & (
        np.einsum("ij,ij->i", directions[pairs[:, 1]], -unit) >= cos_limit
    )
    facing |= distance < 1.0  # ends that touch need no direction
    links: Links = {}
    group = list(range(len(pieces)))

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for k in np.argsort(distance, kind="stable"):
        if not facing[k]:
            continue
        (pa, ea), (pb, eb) = divmod(int(pairs[k, 0]), 2), divmod(int(pairs[k, 1]), 2)
        if (pa, ea) in links or (pb, eb) in links or root(pa) == root(pb):
            continue
        links[(pa, ea)], links[(pb, eb)] = (pb, eb), (pa, ea)
        group[root(pa)] = root(pb)
    return [join(chain, bridged=True) for chain in chains(list(pieces), links)]


class BandVectorizer:
    """Consume finished probability rows (a ``stitching.RowSink``) and collect whole crack pieces.

    Feed rows top to bottom with ``__call__``; call ``finish`` once at the end.
    Rows are held as they come and joined into one array once per band.
    """

    def __init__(self, width: int, height: int, params: VectorizeParams) -> None:
        self.width, self.height, self.params = width, height, params
        self._held: list[tuple[np.ndarray, np.ndarray]] = []  # (probability, valid) runs of rows
        self._buf_top = 0  # scene row of the first held row
        self._loaded = 0  # scene rows received
        self._next = 0  # first row of the next band to vectorize
        self.joiner = SeamJoiner()
        self.pieces: list[Piece] = []

    def __call__(self, row_off: int, probability: np.ndarray, valid: np.ndarray) -> None:
        if row_off != self._loaded:
            raise ValueError(f"rows must arrive in order: expected row {self._loaded}, got {row_off}")
        self._held.append((probability, valid))
        self._loaded += len(probability)
        self._drain(final=False)

    def finish(self) -> list[Piece]:
        """Vectorize the remaining rows and join across seams; returns all pieces."""
        self._drain(final=True)
        self.pieces.extend(self.joiner.finish())
        self.pieces = bridge_gaps(self.pieces, self.params.bridge_gap_px, self.params.bridge_angle_deg)
        return self.pieces

    def _drain(self, final: bool) -> None:
        band, halo = self.params.band_rows, self.params.halo_rows
        while self._next < self._loaded:
            stop = min(self._next + band, self.height)
            if self._loaded < min(stop + halo, self.height) and not final:
                return
            if len(self._held) > 1:
                probability, valid = (np.concatenate(parts) for parts in zip(*self._held))
                self._held = [(probability, valid)]
            probability, valid = self._held[0]
            lo = max(self._next - halo, self._buf_top) - self._buf_top
            hi = min(stop + halo, self._loaded) - self._buf_top
            for piece in band_pieces(
                probability[lo:hi], valid[lo:hi], self._buf_top + lo, self._next, stop, self.params
            ):
                whole = self.joiner.add(piece)
                if whole is not None:
                    self.pieces.append(whole)
            self._next = stop
            keep = max(self._next - halo, self._buf_top) - self._buf_top
            self._held = [(probability[keep:], valid[keep:])]
            self._buf_top += keep
