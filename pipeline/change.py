"""Change between two surveys of the same road: crack matching and per-section deltas.

Positions differ between surveys (GNSS, georeferencing), so a crack of survey B
matches a crack of survey A when it lies within ``buffer_m`` (0.15 m) of it
and their axes differ by at most ``angle_deg`` (20°).  A crack of B is

* ``new`` if it matches nothing in A;
* ``grown`` if its length exceeds that of its matches by more than
  ``max(grown_length_m, grown_ratio * matched length)`` (0.10 m, 10 %), or its
  mean width exceeds their widest by more than ``grown_width_mm`` (1 mm);
* ``unchanged`` otherwise.

Cracks of A that no crack of B matches are ``gone``.  All on arrays of lines
in a metric CRS; matching uses one spatial-index query for all cracks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

from pipeline.crack_types import angle_to_axis_deg

CHANGE_STATUSES = ("new", "grown", "unchanged", "gone")


@dataclass(frozen=True, slots=True)
class MatchParams:
    """Tolerances of crack matching; see the module docstring."""

    buffer_m: float = 0.15
    angle_deg: float = 20.0
    grown_length_m: float = 0.10
    grown_ratio: float = 0.10
    grown_width_mm: float = 1.0

    def __post_init__(self) -> None:
        if self.buffer_m <= 0 or not 0 < self.angle_deg <= 90:
            raise ValueError(
                f"matching needs buffer_m > 0 and 0 < angle_deg <= 90, got {self.buffer_m} "
                f"and {self.angle_deg}"
            )


def match_cracks(
    a_lines: np.ndarray,
    a_axis_deg: np.ndarray,
    b_lines: np.ndarray,
    b_axis_deg: np.ndarray,
    params: MatchParams = MatchParams(),
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (index in A, index in B) of cracks within ``buffer_m`` and ``angle_deg`` of each other.

    >>> a = np.array([shapely.LineString([(0, 0), (1, 0)])])
    >>> b = np.array([shapely.LineString([(0, 0.1), (1, 0.1)]), shapely.LineString([(0, 0.1), (0, 1)])])
    >>> [p.tolist() for p in match_cracks(a, np.array([0.0]), b, np.array([0.0, 90.0]))]
    [[0], [0]]
    """
    b_idx, a_idx = shapely.STRtree(a_lines).query(b_lines, predicate="dwithin", distance=params.buffer_m)
    keep = angle_to_axis_deg(a_axis_deg[a_idx], b_axis_deg[b_idx]) <= params.angle_deg
    return a_idx[keep], b_idx[keep]


def crack_status(
    pairs: tuple[np.ndarray, np.ndarray],
    a_length_m: np.ndarray,
    a_width_mm: np.ndarray,
    b_length_m: np.ndarray,
    b_width_mm: np.ndarray,
    params: MatchParams = MatchParams(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Status of every crack of B, whether each crack of A is gone, and B's length growth (m).

    >>> pairs = (np.array([0, 1]), np.array([0, 1]))
    >>> s, gone, grew = crack_status(pairs, np.array([1.0, 1.0, 2.0]), np.array([2.0, 2.0, 2.0]),
    ...                              np.array([1.02, 1.5, 0.7]), np.array([2.0, 2.0, 2.0]))
    >>> s.tolist(), gone.tolist(), grew.round(2).tolist()
    (['unchanged', 'grown', 'new'], [False, False, True], [0.02, 0.5, 0.7])
    """
    a_idx, b_idx = pairs
    nb = len(b_length_m)
    matched_length = np.bincount(b_idx, a_length_m[a_idx], nb)
    widest = np.full(nb, -np.inf)
    np.maximum.at(widest, b_idx, a_width_mm[a_idx])
    matched = np.bincount(b_idx, minlength=nb) > 0
    grew = b_length_m - matched_length
    grown = matched & (
        (grew > np.maximum(params.grown_length_m, params.grown_ratio * matched_length))
        | (b_width_mm > widest + params.grown_width_mm)
    )
    status = np.where(~matched, "new", np.where(grown, "grown", "unchanged")).astype(object)
    gone = np.bincount(a_idx, minlength=len(a_length_m)) == 0
    return status, gone, grew


DELTA_FIELDS = (
    "longitudinal_m",
    "transverse_m",
    "diagonal_m",
    "pattern_m",
    "alligator_m2",
    "block_m2",
    "transverse_count",
    "cracked_area_pct",
    "cracked_cells_pct",
    "crack_index",
)


def section_deltas(a_rows: list[dict], b_rows: list[dict]) -> list[dict]:
    """Per section present in both (same road, level and chainages): B minus A, and the class change.

    >>> a = [{"road_id": "r", "level": "section", "from_m": 0.0, "to_m": 10.0, "condition_class": "Good",
    ...       **dict.fromkeys(DELTA_FIELDS, 1.0)}]
    >>> b = [dict(a[0], crack_index=0.5, condition_class="Fair")]
    >>> d = section_deltas(a, b)[0]
    >>> d["crack_index_delta"], d["class_from"], d["class_to"], d["class_changed"]
    (-0.5, 'Good', 'Fair', 1)
    """

    def key(r: dict) -> tuple:
        return r["road_id"], r["level"], round(r["from_m"], 3), round(r["to_m"], 3)

    before = {key(r): r for r in a_rows}
    out = []
    for row in b_rows:  # one per section, never per crack
        old = before.get(key(row))
        if old is None:
            continue
        delta = {f"{f}_delta": _minus(row[f], old[f]) for f in DELTA_FIELDS}
        out.append(
            {
                "road_id": row["road_id"],
                "level": row["level"],
                "from_m": row["from_m"],
                "to_m": row["to_m"],
                "geometry": row.get("geometry"),
                **delta,
                "class_from": old["condition_class"],
                "class_to": row["condition_class"],
                "class_changed": int(old["condition_class"] != row["condition_class"]),
            }
        )
    return out


def _minus(new, old) -> float | None:
    if (
        new is None
        or old is None
        or (isinstance(new, float) and np.isnan(new))
        or (isinstance(old, float) and np.isnan(old))
    ):
        return None
    return float(new) - float(old)
