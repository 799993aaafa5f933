"""Vehicle poses: a GNSS/IMU trajectory (CSV), EXIF GPS, and vehicle -> local ENU.

A trajectory CSV has one row per epoch with the columns (any order, more are
ignored) ``time`` (UNIX seconds, or ISO 8601 text; UTC unless it says
otherwise), ``lat``, ``lon`` (degrees, WGS 84), ``height`` (ellipsoidal,
metres), ``roll``, ``pitch``, ``heading`` (degrees; heading clockwise from
north, pitch positive nose up, roll positive right side down) and optionally
``pos_accuracy_m``, as GNSS/IMU post-processing exports it.

Poses between epochs are interpolated: position linearly (in ECEF), attitude by
spherical linear interpolation (scipy ``Slerp``).  Geodesy is pymap3d's and
pyproj's, never our own.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pymap3d
from pyproj import Geod
from scipy.spatial.transform import Rotation, Slerp

from pipeline.errors import FrameError, TrajectoryError

GEOD = Geod(ellps="WGS84")
COLUMNS = ("time", "lat", "lon", "height", "roll", "pitch", "heading")
EXIF_POS_ACCURACY_M = 5.0  # a phone or dashcam GPS fix without GPSHPositioningError (nominal)


@dataclass(frozen=True, slots=True)
class TrajectoryLimits:
    """What a trajectory may hold: the longest gap between epochs and the highest speed."""

    max_gap_s: float = 1.0
    max_speed_m_s: float = 70.0


@dataclass(frozen=True, slots=True)
class Pose:
    """The vehicle's reference point and attitude at one time.

    ``heading_from_track``: the heading was derived from consecutive positions (EXIF GPS),
    roll and pitch were assumed zero: lower accuracy than an IMU's.
    """

    time_s: float
    lat_deg: float
    lon_deg: float
    height_m: float
    roll_deg: float
    pitch_deg: float
    heading_deg: float
    pos_accuracy_m: float | None = None
    heading_from_track: bool = False


@dataclass(frozen=True, slots=True)
class Trajectory:
    """Epochs of a GNSS/IMU trajectory, in strictly increasing time."""

    source: str
    time_s: np.ndarray  # (n,)
    ecef_m: np.ndarray  # (n, 3)
    attitude: Rotation  # n rotations, vehicle -> NED
    pos_accuracy_m: np.ndarray | None  # (n,)
    limits: TrajectoryLimits


def parse_time(text: str) -> float:
    """UNIX seconds from a number or ISO 8601 text (UTC unless it names a zone).

    >>> parse_time("1700000000.25"), parse_time("2023-11-14T22:13:20.25Z")
    (1700000000.25, 1700000000.25)
    """
    try:
        return float(text)
    except ValueError:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()


def attitude(roll_deg, pitch_deg, heading_deg) -> Rotation:
    """Vehicle axes (x forward, y right, z down) -> north, east, down."""
    return Rotation.from_euler("ZYX", np.column_stack([heading_deg, pitch_deg, roll_deg]), degrees=True)


def make_trajectory(
    source: str,
    time_s,
    lat,
    lon,
    height,
    roll,
    pitch,
    heading,
    pos_accuracy_m=None,
    limits: TrajectoryLimits = TrajectoryLimits(),
) -> Trajectory:
    """A checked Trajectory from per-epoch arrays.

    Raises:
        TrajectoryError: fewer than two epochs, non-finite values, or time not strictly
            increasing (naming the first bad row, counted from 1 after the header).
    """
    time_s = np.asarray(time_s, float)
    values = np.column_stack([time_s, lat, lon, height, roll, pitch, heading]).astype(float)
    if len(time_s) < 2:
        raise TrajectoryError(source, "needs at least two epochs")
    if bad := np.flatnonzero(~np.isfinite(values).all(axis=1)).tolist():
        raise TrajectoryError(source, f"row {bad[0] + 1} holds a value that is not a finite number")
    if bad := np.flatnonzero(np.diff(time_s) <= 0).tolist():
        raise TrajectoryError(
            source,
            f"time is not increasing at row {bad[0] + 2} ({time_s[bad[0]]} then "
            f"{time_s[bad[0] + 1]}); sort it and drop repeats",
        )
    ecef = np.column_stack(
        pymap3d.geodetic2ecef(np.asarray(lat, float), np.asarray(lon, float), np.asarray(height, float))
    )
    accuracy = None if pos_accuracy_m is None else np.asarray(pos_accuracy_m, float)
    return Trajectory(source, time_s, ecef, attitude(roll, pitch, heading), accuracy, limits)


def read_trajectory(path: str, limits: TrajectoryLimits = TrajectoryLimits()) -> Trajectory:
    """Read a trajectory CSV (see the module docstring for its columns).

    Raises:
        TrajectoryError: the file is unreadable, lacks columns, holds text where numbers
            belong, or its time does not increase.
    """
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            if missing := [c for c in COLUMNS if c not in header]:
                raise TrajectoryError(
                    path, f"lacks the columns {', '.join(missing)} (it has {', '.join(header) or 'none'})"
                )
            rows = [{k.strip(): v for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrajectoryError(path, f"cannot read the trajectory ({exc})") from exc
    try:
        time_s = [parse_time(r["time"]) for r in rows]
        numbers = {c: [float(r[c]) for r in rows] for c in COLUMNS[1:]}
        accuracy = [float(r["pos_accuracy_m"]) for r in rows] if "pos_accuracy_m" in header else None
    except (TypeError, ValueError) as exc:
        raise TrajectoryError(path, f"holds a value that is not a number or time ({exc})") from exc
    return make_trajectory(path, time_s, **numbers, pos_accuracy_m=accuracy, limits=limits)


def trajectory_origin(trajectory: Trajectory) -> tuple[float, float, float]:
    """(lat, lon, height) of a trajectory's first epoch: the local ENU origin of its survey."""
    lat, lon, height = pymap3d.ecef2geodetic(*trajectory.ecef_m[0])
    return float(lat), float(lon), float(height)


def pose_at(trajectory: Trajectory, time_s: float, frame: str) -> Pose:
    """The interpolated pose at ``time_s``: linear in ECEF for position, slerp for attitude.

    Raises:
        FrameError: naming ``frame``: the time is outside the trajectory, falls in a gap
            longer than ``max_gap_s``, or between epochs further apart than ``max_speed_m_s`` allows.
    """
    t, limits = trajectory.time_s, trajectory.limits
    if not t[0] <= time_s <= t[-1]:
        raise FrameError(
            frame,
            f"its time {time_s:.3f} s is outside the trajectory "
            f"{trajectory.source} ({t[0]:.3f} to {t[-1]:.3f} s)",
        )
    i = int(np.clip(np.searchsorted(t, time_s, side="right") - 1, 0, len(t) - 2))
    dt = t[i + 1] - t[i]
    if dt > limits.max_gap_s:
        raise FrameError(
            frame,
            f"its time {time_s:.3f} s falls in a {dt:.2f} s gap of {trajectory.source} "
            f"(limit {limits.max_gap_s} s; --max-gap-s allows more)",
        )
    speed = np.linalg.norm(trajectory.ecef_m[i + 1] - trajectory.ecef_m[i]) / dt
    if speed > limits.max_speed_m_s:
        raise FrameError(
            frame,
            f"{trajectory.source} has an impossible speed of {speed:.0f} m/s between "
            f"rows {i + 1} and {i + 2} around its time {time_s:.3f} s "
            f"(limit {limits.max_speed_m_s} m/s)",
        )
    w = (time_s - t[i]) / dt
    x, y, z = (1 - w) * trajectory.ecef_m[i] + w * trajectory.ecef_m[i + 1]
    lat, lon, height = pymap3d.ecef2geodetic(x, y, z)
    slerp = Slerp(t[i : i + 2], trajectory.attitude[i : i + 2])
    heading, pitch, roll = slerp([time_s]).as_euler("ZYX", degrees=True)[0]
    accuracy = trajectory.pos_accuracy_m
    return Pose(
        time_s,
        float(lat),
        float(lon),
        float(height),
        float(roll),
        float(pitch),
        float(heading % 360.0),
        None if accuracy is None else float((1 - w) * accuracy[i] + w * accuracy[i + 1]),
    )


def track_poses(
    frames: list[str], fixes: list[tuple[float, float, float, float | None]], times_s: list[float | None]
) -> list[Pose | FrameError]:
    """Poses of frames from their GPS fixes (lat, lon, height, accuracy), heading along the track.

    Each frame's heading is the azimuth from the nearest earlier fix at another place to
    the nearest later one (at the ends: to or from the frame's own fix); roll and pitch
    are taken as zero, and the poses are flagged ``heading_from_track``.  Frames must be
    in driving order.  A frame with no other place before or after it gets a FrameError
    instead of a pose (the others go on).
    """

    def elsewhere(k: int, step: int) -> int:
        j = k + step
        while 0 <= j < len(fixes):
            if GEOD.inv(fixes[k][1], fixes[k][0], fixes[j][1], fixes[j][0])[2] >= 0.01:
                return j
            j += step
        return k

    poses: list[Pose | FrameError] = []
    for k, (lat, lon, height, accuracy) in enumerate(fixes):
        a, b = fixes[elsewhere(k, -1)], fixes[elsewhere(k, 1)]
        if a is b:
            poses.append(
                FrameError(
                    frames[k],
                    "has no neighbouring frame at another GPS position; its heading "
                    "along the track is undefined (give a trajectory file)",
                )
            )
            continue
        azimuth = GEOD.inv(a[1], a[0], b[1], b[0])[0]
        time_s = times_s[k]
        poses.append(
            Pose(
                time_s if time_s is not None else float(k),
                lat,
                lon,
                height,
                0.0,
                0.0,
                float(azimuth % 360.0),
                accuracy if accuracy is not None else EXIF_POS_ACCURACY_M,
                True,
            )
        )
    return poses


def vehicle_to_enu(pose: Pose, points_m: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    """Vehicle-frame points (n, 3: forward, right, down) -> east, north, up (n, 3) around ``origin``.

    ``origin`` is (lat, lon, height) of the survey's local frame.  The points are rotated
    by the pose's attitude into north/east/down at the vehicle, then placed by pymap3d.

    >>> pose = Pose(0.0, 45.0, 7.0, 100.0, 0.0, 0.0, 90.0)
    >>> vehicle_to_enu(pose, np.array([[10.0, 0.0, 0.0]]), (45.0, 7.0, 100.0)).round(3).tolist()
    [[10.0, 0.0, -0.0]]
    """
    ned = attitude([pose.roll_deg], [pose.pitch_deg], [pose.heading_deg]).apply(points_m)
    lat, lon, height = pymap3d.ned2geodetic(
        ned[:, 0], ned[:, 1], ned[:, 2], pose.lat_deg, pose.lon_deg, pose.height_m
    )
    return np.column_stack(pymap3d.geodetic2enu(lat, lon, height, *origin))


def enu_to_geodetic(enu: np.ndarray, origin: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) in degrees of local east/north/up points (n, 3) around ``origin``."""
    lat, lon, _ = pymap3d.enu2geodetic(enu[:, 0], enu[:, 1], enu[:, 2], *origin)
    return np.asarray(lon, float), np.asarray(lat, float)
