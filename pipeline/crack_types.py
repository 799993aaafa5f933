"""Crack types from a line's shape and its angle to the road: longitudinal, transverse, diagonal, joint.

All functions take arrays of lines in a metric CRS (x east, y north, metres)
and work on all lines at once (no Python loop per crack).  Angles are in
degrees: a line's ``axis_deg`` is its principal axis, counter-clockwise from
the x axis, in [0, 180); ``theta_deg`` is the angle between that axis and the
road axis, in [0, 90].

The road direction is the road network's tangent where a network is given
(``pipeline.sections``), else the scene's long axis (``scene_frame``): survey
scenes are strips imaged along the road.  A survey frame's is the vehicle's
direction when the frame was taken (``pipeline.frames``).  ``pattern`` (members of an
alligator/block area) is decided by ``pipeline.pattern_areas``.

A concrete joint is not a crack: it must not add to crack length.  The joint
rule (``joint_mask``) is conservative; a line is a joint only if all hold:

1. very straight: tortuosity (length / chord) at most ``joint_tortuosity_max`` (1.02);
2. aligned within ``joint_axis_deg`` (3°) with the road axis or its perpendicular;
3. uniform in width: ``width_max_mm <= joint_width_ratio_max * width_mean_mm`` (1.6);
4. at least ``joint_min_chord_m`` (0.5 m) long, and
5. part of a joint line (collinear candidates, within ``joint_line_tolerance_m``)
   that spans at least ``joint_span_min`` (80 %) of the imaged extent in its
   direction, or of a family of at least ``joint_grid_min_lines`` (3) parallel
   joint lines on a regular grid (spacing coefficient of variation at most
   ``joint_grid_spacing_cv_max``, 0.15; spacing at least ``joint_grid_min_spacing_m``, 1 m).

Vectorized joint grids come out as paths that turn at the crossings, so the rule
is applied to straight runs (``straight_runs``: cut where a line turns by more
than 30°); a line is a joint when at least 90 % of its length is in accepted
runs (``joint_lines``).  Joints are decided when a scene is mapped, in the frame
of the scene's long axis (a survey frame's: the vehicle's direction), and kept when a
network types the other cracks again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import numpy as np
import shapely

LINEAR_TYPES = ("longitudinal", "transverse", "diagonal")
CRACK_TYPES = (*LINEAR_TYPES, "joint", "pattern")


@dataclass(frozen=True, slots=True)
class TypeProfile:
    """Angle thresholds and the joint rule; see the module docstring."""

    name: str = "aashto-r85"
    longitudinal_deg: float = 20.0  # within this of the road axis
    transverse_deg: float = 20.0  # within this of the perpendicular
    joint_axis_deg: float = 3.0
    joint_tortuosity_max: float = 1.02
    joint_width_ratio_max: float = 1.6
    joint_min_chord_m: float = 0.5
    joint_span_min: float = 0.8
    joint_line_tolerance_m: float = 0.05
    joint_grid_min_lines: int = 3
    joint_grid_spacing_cv_max: float = 0.15
    joint_grid_min_spacing_m: float = 1.0

    def __post_init__(self) -> None:
        if not (
            self.longitudinal_deg > 0
            and self.transverse_deg > 0
            and self.longitudinal_deg + self.transverse_deg <= 90
        ):
            raise ValueError(
                f"type profile {self.name!r}: longitudinal_deg and transverse_deg must be "
                f"positive and add up to at most 90, got {self.longitudinal_deg} and "
                f"{self.transverse_deg}"
            )


# Named profiles.  aashto-r85: the AASHTO R 85 orientation classes as crackmap reads them
# (within 20 degrees of the road axis / of its perpendicular, else "other": diagonal here).
PROFILES = {
    "aashto-r85": TypeProfile(),
    "strict-10": TypeProfile(name="strict-10", longitudinal_deg=10.0, transverse_deg=10.0),
    "loose-30": TypeProfile(name="loose-30", longitudinal_deg=30.0, transverse_deg=30.0),
}


def type_profile(name: str) -> TypeProfile:
    """A named profile.

    >>> type_profile("strict-10").longitudinal_deg
    10.0
    >>> type_profile("pci")
    Traceback (most recent call last):
    ...
    ValueError: unknown crack type profile 'pci'; choose one of aashto-r85, loose-30, strict-10
    """
    if name not in PROFILES:
        raise ValueError(f"unknown crack type profile {name!r}; choose one of {', '.join(sorted(PROFILES))}")
    return PROFILES[name]


@dataclass(frozen=True, slots=True)
class LineShapes:
    """Per line: principal axis, chord, planar length and tortuosity (arrays of equal length)."""

    axis_deg: np.ndarray
    chord_m: np.ndarray
    length_m: np.ndarray
    tortuosity: np.ndarray


def line_shapes(lines: np.ndarray) -> LineShapes:
    """Principal axis (length-weighted segment directions), chord and tortuosity of every line.

    >>> s = line_shapes(np.array([shapely.LineString([(0, 0), (3, 4)]),
    ...                           shapely.LineString([(0, 0), (1, 1), (2, 0)])]))
    >>> s.axis_deg.round(3).tolist(), s.chord_m.tolist(), s.tortuosity.round(4).tolist()
    ([53.13, 0.0], [5.0, 2.0], [1.0, 1.4142])
    """
    lines = np.asarray(lines, dtype=object)
    n = len(lines)
    coords, index = shapely.get_coordinates(lines, return_index=True)
    same = index[1:] == index[:-1]
    d = np.diff(coords, axis=0)[same]
    owner = index[:-1][same]
    seg = np.hypot(d[:, 0], d[:, 1])
    w = np.where(seg > 0, 1.0 / np.where(seg > 0, seg, 1.0), 0.0)  # sum of l * u u^T = d d^T / l
    a = np.bincount(owner, d[:, 0] * d[:, 0] * w, n)
    b = np.bincount(owner, d[:, 0] * d[:, 1] * w, n)
    c = np.bincount(owner, d[:, 1] * d[:, 1] * w, n)
    axis = np.round(np.degrees(0.5 * np.arctan2(2 * b, a - c)) % 180.0, 9) % 180.0
    length = np.bincount(owner, seg, n)
    first = np.searchsorted(index, np.arange(n))
    last = np.r_[first[1:], len(index)] - 1
    ends = coords[last] - coords[first] if len(coords) else np.zeros((n, 2))
    chord = np.hypot(ends[:, 0], ends[:, 1])
    tortuosity = np.where(chord > 0, length / np.where(chord > 0, chord, 1.0), np.inf)
    return LineShapes(axis, chord, length, tortuosity)


def angle_to_axis_deg(axis_deg: np.ndarray, road_deg: np.ndarray | float) -> np.ndarray:
    """The angle between undirected lines, in [0, 90].

    >>> angle_to_axis_deg(np.array([10.0, 170.0, 100.0]), 0.0).tolist()
    [10.0, 10.0, 80.0]
    """
    d = np.abs(np.asarray(axis_deg) - road_deg) % 180.0
    return np.minimum(d, 180.0 - d)


def linear_types(theta_deg: np.ndarray, profile: TypeProfile = TypeProfile()) -> np.ndarray:
    """``longitudinal`` / ``transverse`` / ``diagonal`` by the angle to the road axis.

    >>> linear_types(np.array([5.0, 20.0, 45.0, 75.0])).tolist()
    ['longitudinal', 'longitudinal', 'diagonal', 'transverse']
    """
    theta = np.asarray(theta_deg)
    return np.where(
        theta <= profile.longitudinal_deg,
        "longitudinal",
        np.where(theta >= 90.0 - profile.transverse_deg, "transverse", "diagonal"),
    ).astype(object)


@dataclass(frozen=True, slots=True)
class RoadFrame:
    """Per line, where it lies in road coordinates: along the road and across it (metres).

    ``along_mid_m`` / ``across_mid_m`` locate its midpoint; ``along_extent_m`` /
    ``across_extent_m`` are its extents; ``imaged_length_m`` / ``imaged_width_m``
    are its scene's extents along and across the road; ``group`` keys the lines
    that share one frame (a scene, or a scene on one road).
    """

    along_mid_m: np.ndarray
    across_mid_m: np.ndarray
    along_extent_m: np.ndarray
    across_extent_m: np.ndarray
    imaged_length_m: np.ndarray
    imaged_width_m: np.ndarray
    group: np.ndarray = field(default_factory=lambda: np.zeros(0, int))


def scene_frame(
    lines: np.ndarray, footprint: shapely.Polygon, road_deg: float | None = None
) -> tuple[float, RoadFrame]:
    """The scene's road direction (degrees, as ``axis_deg``) and every line's place in that frame.

    ``road_deg`` when known (a survey frame: the vehicle's direction), else the
    footprint's long axis (survey scenes are strips imaged along the road).

    >>> road, f = scene_frame(np.array([shapely.LineString([(1, 1), (1, 3)])]), shapely.box(0, 0, 10, 4))
    >>> road, f.across_extent_m.tolist(), f.imaged_width_m.tolist()
    (0.0, [2.0], [4.0])
    """
    if road_deg is None:
        ring = shapely.get_coordinates(shapely.oriented_envelope(footprint))[:3]
        sides = np.diff(ring, axis=0)
        long_side = sides[np.argmax(np.hypot(sides[:, 0], sides[:, 1]))]
        road = float(np.round(np.degrees(np.arctan2(long_side[1], long_side[0])) % 180.0, 9) % 180.0)
    else:
        road = float(road_deg) % 180.0
    along, across = _project(shapely.get_coordinates(footprint), road)
    frame = _frame_from_points(lines, road, np.ptp(along), np.ptp(across))
    return road, frame


def _project(xy: np.ndarray, road_deg: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    t = np.radians(road_deg)
    ux, uy = np.cos(t), np.sin(t)
    return xy[:, 0] * ux + xy[:, 1] * uy, -xy[:, 0] * uy + xy[:, 1] * ux


def _frame_from_points(
    lines: np.ndarray, road_deg: float, imaged_length_m: float, imaged_width_m: float
) -> RoadFrame:
    n = len(lines)
    coords, index = shapely.get_coordinates(lines, return_index=True)
    along, across = _project(coords, road_deg)
    starts = np.searchsorted(index, np.arange(n))
    lo_a, hi_a = np.minimum.reduceat(along, starts), np.maximum.reduceat(along, starts)
    lo_c, hi_c = np.minimum.reduceat(across, starts), np.maximum.reduceat(across, starts)
    return RoadFrame(
        (lo_a + hi_a) / 2,
        (lo_c + hi_c) / 2,
        hi_a - lo_a,
        hi_c - lo_c,
        np.full(n, imaged_length_m),
        np.full(n, imaged_width_m),
        np.zeros(n, int),
    )


def span_ratio(types: np.ndarray, frame: RoadFrame) -> np.ndarray:
    """A transverse crack's lateral extent over the imaged width; NaN for other types."""
    ratio = frame.across_extent_m / np.where(frame.imaged_width_m > 0, frame.imaged_width_m, np.nan)
    return np.where(np.asarray(types) == "transverse", np.minimum(ratio, 1.0), np.nan)


def joint_mask(
    shapes: LineShapes,
    theta_deg: np.ndarray,
    width_mean_mm: np.ndarray,
    width_max_mm: np.ndarray,
    frame: RoadFrame,
    profile: TypeProfile = TypeProfile(),
) -> np.ndarray:
    """Which lines are concrete joints, by the conservative rule of the module docstring."""
    p = profile
    theta = np.asarray(theta_deg)
    across = theta >= 90.0 - p.joint_axis_deg  # a transverse joint: its position is along the road
    candidate = (
        (shapes.tortuosity <= p.joint_tortuosity_max)
        & (shapes.chord_m >= p.joint_min_chord_m)
        & (np.asarray(width_max_mm) <= p.joint_width_ratio_max * np.asarray(width_mean_mm))
        & ((theta <= p.joint_axis_deg) | across)
    )
    found = np.zeros(len(theta), bool)
    if not candidate.any():
        return found
    position = np.where(across, frame.along_mid_m, frame.across_mid_m)
    cover = np.where(across, frame.across_extent_m, frame.along_extent_m)
    imaged = np.where(across, frame.imaged_width_m, frame.imaged_length_m)
    idx = np.flatnonzero(candidate)
    # sort the candidates by (group, direction, position); a joint line is a run of close positions
    order = idx[np.lexsort((position[idx], across[idx], frame.group[idx]))]
    key = np.column_stack([frame.group[order], across[order]])
    new_family = np.r_[True, (key[1:] != key[:-1]).any(axis=1)]
    new_line = new_family | np.r_[False, np.diff(position[order]) > p.joint_line_tolerance_m]
    line_id = np.cumsum(new_line) - 1
    line_cover = np.bincount(line_id, cover[order])
    line_pos = np.bincount(line_id, position[order]) / np.bincount(line_id)
    line_family = np.cumsum(new_family)[new_line] - 1
    spanning = line_cover >= p.joint_span_min * np.bincount(line_id, imaged[order]) / np.bincount(line_id)
    regular = _regular_families(line_pos, line_family, line_cover, p)
    found[order] = (spanning | regular)[line_id]
    return found


def _regular_families(
    position: np.ndarray, family: np.ndarray, cover: np.ndarray, p: TypeProfile
) -> np.ndarray:
    """Per joint line: does its family hold enough lines on a regular grid?"""
    regular = np.zeros(len(position), bool)
    for f in np.unique(family):  # a handful of families per scene, never one per crack
        members = np.flatnonzero((family == f) & (cover >= p.joint_min_chord_m))
        if len(members) < p.joint_grid_min_lines:
            continue
        spacing = np.diff(np.sort(position[members]))
        if (
            spacing.min() >= p.joint_grid_min_spacing_m
            and spacing.std() <= p.joint_grid_spacing_cv_max * spacing.mean()
        ):
            regular[members] = True
    return regular


@dataclass(frozen=True, slots=True)
class CrackTypes:
    """The typing of a set of lines: arrays of equal length."""

    crack_type: np.ndarray  # object array of CRACK_TYPES
    theta_deg: np.ndarray
    chord_m: np.ndarray
    tortuosity: np.ndarray
    span_ratio: np.ndarray  # NaN unless transverse


def straight_runs(lines: np.ndarray, turn_deg: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """The lines cut where they turn by more than ``turn_deg``: (runs, index of each run's line).

    A vectorized joint grid comes out as paths that turn at the joints' crossings;
    the joint rule looks at their straight runs.

    >>> runs, owner = straight_runs(np.array([shapely.LineString([(0, 0), (2, 0), (2, 3)])]))
    >>> [r.length for r in runs], owner.tolist()
    ([2.0, 3.0], [0, 0])
    """
    coords, index = shapely.get_coordinates(lines, return_index=True)
    start = np.flatnonzero(index[1:] == index[:-1])
    d = coords[start + 1] - coords[start]
    angle = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    owner = index[start]
    turn = np.abs((np.diff(angle) + 180.0) % 360.0 - 180.0)
    new_run = np.r_[True, (owner[1:] != owner[:-1]) | (turn > turn_deg)]
    run = np.cumsum(new_run) - 1
    last = np.r_[run[1:] != run[:-1], True]  # the last segment of each run adds its end vertex
    xy = np.concatenate([coords[start], coords[start[last] + 1]])
    key = np.concatenate([2 * np.arange(len(start)), 2 * np.flatnonzero(last) + 1])
    order = np.argsort(key, kind="stable")
    runs = shapely.linestrings(xy[order], indices=np.concatenate([run, run[last]])[order])
    return cast(np.ndarray, runs), owner[new_run]  # with indices: always an array of lines


def joint_lines(
    lines: np.ndarray,
    road_deg: float,
    footprint: shapely.Polygon,
    width_mean_mm: np.ndarray,
    width_max_mm: np.ndarray,
    profile: TypeProfile = TypeProfile(),
    share: float = 0.9,
) -> np.ndarray:
    """Which lines of a scene are joints: at least ``share`` of their length in straight runs the rule accepts."""
    if len(lines) == 0:
        return np.zeros(0, bool)
    runs, owner = straight_runs(lines)
    _, frame = scene_frame(runs, footprint, road_deg)
    shapes = line_shapes(runs)
    joint = joint_mask(
        shapes,
        angle_to_axis_deg(shapes.axis_deg, road_deg),
        np.asarray(width_mean_mm)[owner],
        np.asarray(width_max_mm)[owner],
        frame,
        profile,
    )
    length = np.bincount(owner, shapes.length_m, len(lines))
    return np.bincount(owner, shapes.length_m * joint, len(lines)) >= share * np.where(
        length > 0, length, np.inf
    )


def classify(
    lines: np.ndarray,
    road_deg: np.ndarray | float,
    frame: RoadFrame,
    width_mean_mm: np.ndarray,
    width_max_mm: np.ndarray,
    pattern: np.ndarray | None = None,
    profile: TypeProfile = TypeProfile(),
    joint: np.ndarray | None = None,
) -> CrackTypes:
    """Type every line (metric CRS): pattern members stay ``pattern``, joints are ``joint``, the rest by angle.

    ``joint`` (from ``joint_lines``, or kept from mapping time) marks the joints; None applies
    ``joint_mask`` to the whole lines.
    """
    shapes = line_shapes(lines)
    theta = angle_to_axis_deg(shapes.axis_deg, road_deg)
    types = linear_types(theta, profile)
    if joint is None:
        joint = joint_mask(shapes, theta, width_mean_mm, width_max_mm, frame, profile)
    types[np.asarray(joint, bool)] = "joint"
    if pattern is not None:
        types[np.asarray(pattern, bool)] = "pattern"
    return CrackTypes(
        types, theta, shapes.chord_m, np.minimum(shapes.tortuosity, 1e6), span_ratio(types, frame)
    )
