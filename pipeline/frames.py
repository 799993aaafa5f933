"""Frame surveys: camera frames (JPEG/PNG) with a camera file and poses, mapped to the ground.

A frame is segmented with the same chips, stitching and vectorizing as a scene,
in its own pixels.  Then the crack lines' vertices (never the image) go to the
ground: pixel -> undistorted ray -> road plane (``pipeline.camera``, flat-road
model) -> vehicle frame -> local east/north/up of the survey (pymap3d,
``pipeline.trajectory``) -> the store CRS (pyproj).

Consecutive frames overlap, so one crack is seen several times.  Every point of
the road is *owned* by the frame that sees it at the shortest range (the
best-resolved view; with one camera height that is the nearest camera, so the
owned areas are cells of the cameras' nadirs cut to each footprint).  Each
frame keeps only the parts of its lines in its own area, and parts that meet
across the boundary between two frames' areas are joined into one line
(``merge_observations``).  A crack seen in five frames counts once, and each
crack records the frames it came from.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path, PurePosixPath

import numpy as np
import shapely
import yaml
from affine import Affine
from PIL import ExifTags, Image, UnidentifiedImageError
from pyproj import Transformer
from rasterio.crs import CRS
from scipy.spatial import cKDTree
from shapely.geometry import LineString, Polygon

from pipeline import buckets
from pipeline.camera import Camera, footprint, ground_points, road_pixels
from pipeline.errors import FrameError, SceneContentError
from pipeline.measure import GEOD, LONLAT, Severity, azimuth_deg
from pipeline.records import CrackLine, Scene, SceneResult
from pipeline.trajectory import Pose, Trajectory, enu_to_geodetic, pose_at, vehicle_to_enu
from pipeline.vectorize import Links, Piece, VectorizeParams, chains

log = logging.getLogger(__name__)
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
CAMERA_NAMES = ("camera.yaml", "camera.yml", "camera.json")
TRAJECTORY_NAME = "trajectory.csv"
HALF_PLANE_M = 10_000.0  # "infinite" for a road frame
SMOOTH_PX = 7  # skeleton vertices averaged before a frame's lines are simplified (smooth_path)


# ---------------------------------------------------------------- frame times and EXIF


def exif_time_s(exif: Image.Exif) -> float | None:
    """UNIX seconds of EXIF ``DateTimeOriginal`` + ``SubSecTimeOriginal`` (+ ``OffsetTimeOriginal``).

    Without an offset the time is taken as UTC (survey cameras are set to UTC or GPS time).
    """
    ifd = exif.get_ifd(ExifTags.IFD.Exif)
    text = ifd.get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime)
    if not text:
        return None
    try:
        when = datetime.strptime(str(text).strip("\x00 "), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    offset = str(ifd.get(ExifTags.Base.OffsetTimeOriginal) or "").strip("\x00 ")
    zone = UTC
    if m := re.fullmatch(r"([+-])(\d\d):(\d\d)", offset):
        sign = 1 if m[1] == "+" else -1
        zone = timezone(sign * timedelta(hours=int(m[2]), minutes=int(m[3])))
    sub = str(ifd.get(ExifTags.Base.SubsecTimeOriginal) or "").strip("\x00 ")
    fraction = float(f"0.{sub}") if sub.isdigit() else 0.0
    return when.replace(tzinfo=zone).timestamp() + fraction


def _degrees(value) -> float:
    d, m, s = (float(v) for v in value)
    return d + m / 60.0 + s / 3600.0


GpsFix = tuple[float, float, float, float | None]  # lat, lon, height, horizontal accuracy (m) or None


def exif_gps(exif: Image.Exif) -> GpsFix | None:
    """(lat, lon, height, horizontal accuracy or None) of an EXIF GPS block, or None without one."""
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    tags = ExifTags.GPS
    if tags.GPSLatitude not in gps or tags.GPSLongitude not in gps:
        return None
    lat = _degrees(gps[tags.GPSLatitude]) * (-1 if gps.get(tags.GPSLatitudeRef, "N") == "S" else 1)
    lon = _degrees(gps[tags.GPSLongitude]) * (-1 if gps.get(tags.GPSLongitudeRef, "E") == "W" else 1)
    height = float(gps.get(tags.GPSAltitude, 0.0))
    if gps.get(tags.GPSAltitudeRef) in (1, b"\x01"):
        height = -height
    accuracy = gps.get(tags.GPSHPositioningError)
    return lat, lon, height, None if accuracy is None else float(accuracy)


def read_exif(uri: str) -> Image.Exif:
    """The EXIF block of a frame (empty if it has none).

    Raises:
        FrameError: the file is missing or not an image.
    """
    try:
        with (
            buckets.filesystem(uri).open(uri if buckets.is_url(uri) else str(uri), "rb") as f,
            Image.open(f) as image,
        ):
            return image.getexif()
    except (OSError, UnidentifiedImageError) as exc:
        raise FrameError(uri, f"cannot read it as an image ({exc})") from exc


@dataclass(frozen=True, slots=True)
class FrameClock:
    """Where a frame's time comes from: ``exif`` (default), ``name:REGEX`` or ``index:CSV``.

    ``name:REGEX``: a regular expression on the file name whose group ``t`` (or first
    group) is the time (UNIX seconds or ISO 8601), e.g. ``name:_(?P<t>\\d+\\.\\d+)\\.jpg$``.
    ``index:CSV``: a CSV with columns ``frame`` (file name) and ``time``.
    """

    spec: str = "exif"
    index: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | None) -> FrameClock:
        from pipeline.trajectory import parse_time

        spec = spec or "exif"
        if spec == "exif":
            return cls(spec)
        if spec.startswith("name:"):
            try:
                re.compile(spec[5:])
            except re.error as exc:
                raise FrameError(spec, f"--frame-time: not a regular expression ({exc})") from exc
            return cls(spec)
        if spec.startswith("index:"):
            path = spec[6:]
            try:
                with open(path, newline="") as f:
                    index = {Path(r["frame"]).name: parse_time(r["time"]) for r in csv.DictReader(f)}
            except (OSError, KeyError, ValueError) as exc:
                raise FrameError(path, f"cannot read the frame index (columns frame,time) ({exc})") from exc
            return cls(spec, index)
        raise FrameError(spec, "--frame-time is exif, name:REGEX or index:CSV")

    def time_s(self, uri: str, exif: Image.Exif | None) -> float:
        """The frame's time in UNIX seconds.

        Raises:
            FrameError: naming the frame: it has no time where this clock looks.
        """
        from pipeline.trajectory import parse_time

        name = PurePosixPath(uri).name
        if self.spec == "exif":
            found = exif_time_s(exif) if exif is not None else None
            if found is None:
                raise FrameError(
                    uri, "has no EXIF DateTimeOriginal; give --frame-time name:REGEX or index:CSV"
                )
            return found
        if self.spec.startswith("name:"):
            m = re.search(self.spec[5:], name)
            if not m:
                raise FrameError(uri, f"its name does not match the time pattern {self.spec[5:]!r}")
            return parse_time(m.groupdict().get("t") or m.group(1))
        if name not in self.index:
            raise FrameError(uri, f"is not in the frame index {self.spec[6:]}")
        return self.index[name]


# ---------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class GroundLine:
    """A crack line seen in one frame, on the ground (survey ENU), with per-vertex range and GSD."""

    frame_id: str
    enu_m: np.ndarray  # (n, 3) east, north, up around the survey origin
    range_m: np.ndarray  # (n,) distance from the camera centre
    gsd_m: np.ndarray  # (n,) ground size of a pixel at each vertex
    width_mean_px: float
    width_max_px: float
    confidence: float

    def reversed(self) -> GroundLine:
        return GroundLine(
            self.frame_id,
            self.enu_m[::-1],
            self.range_m[::-1],
            self.gsd_m[::-1],
            self.width_mean_px,
            self.width_max_px,
            self.confidence,
        )


@dataclass(frozen=True, slots=True)
class FrameObservation:
    """What one frame showed: its footprint and crack lines in survey ENU, and where its camera was."""

    frame_id: str
    uri: str
    sha256: str
    camera_enu_m: tuple[float, float, float]
    footprint_enu: Polygon
    pos_accuracy_m: float | None
    lines: tuple[GroundLine, ...]
    chip_count: int
    width_px: int
    height_px: int
    probability_path: str
    seconds: float
    forward_enu: tuple[float, float] | None = None  # the vehicle's forward direction (unit, east/north)
    inference: str = ""  # which network ran (pipeline.backends.inference_of)


def observation_to_json(obs: FrameObservation) -> str:
    lines = [
        dict(
            frame_id=g.frame_id,
            enu_m=g.enu_m.tolist(),
            range_m=g.range_m.tolist(),
            gsd_m=g.gsd_m.tolist(),
            width_mean_px=g.width_mean_px,
            width_max_px=g.width_max_px,
            confidence=g.confidence,
        )
        for g in obs.lines
    ]
    return json.dumps(
        dict(
            frame_id=obs.frame_id,
            uri=obs.uri,
            sha256=obs.sha256,
            camera_enu_m=list(obs.camera_enu_m),
            footprint_wkt=obs.footprint_enu.wkt,
            pos_accuracy_m=obs.pos_accuracy_m,
            lines=lines,
            chip_count=obs.chip_count,
            width_px=obs.width_px,
            height_px=obs.height_px,
            probability_path=obs.probability_path,
            seconds=obs.seconds,
            forward_enu=list(obs.forward_enu) if obs.forward_enu else None,
            inference=obs.inference,
        )
    )


def observation_from_json(text: str) -> FrameObservation:
    d = json.loads(text)
    lines = tuple(
        GroundLine(
            g["frame_id"],
            np.array(g["enu_m"]).reshape(-1, 3),
            np.array(g["range_m"]),
            np.array(g["gsd_m"]),
            g["width_mean_px"],
            g["width_max_px"],
            g["confidence"],
        )
        for g in d["lines"]
    )
    return FrameObservation(
        d["frame_id"],
        d["uri"],
        d["sha256"],
        tuple(d["camera_enu_m"]),
        shapely.from_wkt(d["footprint_wkt"]),
        d["pos_accuracy_m"],
        lines,
        d["chip_count"],
        d["width_px"],
        d["height_px"],
        d["probability_path"],
        d["seconds"],
        tuple(d["forward_enu"]) if d["forward_enu"] else None,
        d.get("inference", ""),
    )


# ---------------------------------------------------------------- one frame: pixels -> ground


def smooth_path(rc: np.ndarray, window: int = SMOOTH_PX) -> np.ndarray:
    """A skeleton path with its pixel stair steps smoothed out.

    A moving average inside; each end is moved across the path (never along it) onto
    the straight line fitted through the smoothed vertices next to it.  In a
    forward-looking frame one row step can be several times longer on the road than
    one column step, so a skeleton's stair steps would add to a crack's ground length.

    >>> steps = np.array([[0, 0], [0, 1], [1, 2], [1, 3], [1, 4], [2, 5], [2, 6]], float)
    >>> smooth_path(steps, 3).round(2).tolist()
    [[0.0, 0.0], [0.33, 1.0], [0.67, 2.0], [1.0, 3.0], [1.33, 4.0], [1.67, 5.0], [2.0, 6.0]]
    """
    if len(rc) <= window:
        return rc
    half = window // 2
    padded = np.concatenate([np.repeat(rc[:1], half, axis=0), rc, np.repeat(rc[-1:], half, axis=0)])
    kernel = np.ones(window) / window
    smooth = np.column_stack([np.convolve(padded[:, k], kernel, mode="valid") for k in range(2)])
    for end, near in ((0, smooth[half:window]), (-1, smooth[-window:-half])):
        centre = near.mean(axis=0)
        direction = np.linalg.svd(near - centre)[2][0]
        smooth[end] = centre + direction * np.dot(rc[end] - centre, direction)
    return smooth


def ground_line(
    camera: Camera,
    pose: Pose,
    origin: tuple[float, float, float],
    frame_id: str,
    piece: Piece,
    params: VectorizeParams,
) -> GroundLine | None:
    """A vectorized piece (frame pixels) as a ground line, or None if too short or off the road."""
    return ground_lines(camera, pose, origin, frame_id, [piece], params)[0]


def ground_lines(
    camera: Camera,
    pose: Pose,
    origin: tuple[float, float, float],
    frame_id: str,
    pieces: list[Piece],
    params: VectorizeParams,
) -> list[GroundLine | None]:
    """Vectorized pieces (frame pixels) as ground lines (None where too short or off the road).

    The vertices of all pieces go to the ground together: one undistortion of every
    vertex and its two half-pixel neighbours (for the GSD), one rotation and one
    pymap3d transform for the frame, whatever the number of lines.
    """
    rcs = [
        shapely.get_coordinates(shapely.simplify(LineString(smooth_path(piece.rc)), params.simplify_px))
        if piece.length_px() >= params.min_length_px and piece.n_px > 0
        else np.zeros((0, 2))
        for piece in pieces
    ]
    uv = np.concatenate([rc[:, ::-1] for rc in rcs] + [np.zeros((0, 2))])
    n = len(uv)
    points, distance = ground_points(camera, np.concatenate([uv, uv + [0.5, 0.0], uv + [0.0, 0.5]]))
    p0, p1, p2 = points[:n], points[n : 2 * n], points[2 * n :]
    distance = distance[:n]
    gsd = np.sqrt(np.linalg.norm(np.cross(p1 - p0, p2 - p0), axis=1) * 4.0)  # as ground_sampling_m
    keep = np.isfinite(distance)
    enu = np.full((n, 3), np.nan)
    if keep.any():
        enu[keep] = vehicle_to_enu(pose, p0[keep], origin)
    found: list[GroundLine | None] = []
    start = 0
    for piece, rc in zip(pieces, rcs):
        part = slice(start, start + len(rc))
        start += len(rc)
        k = keep[part]
        if k.sum() < 2:
            found.append(None)
            continue
        found.append(
            GroundLine(
                frame_id,
                enu[part][k],
                distance[part][k],
                gsd[part][k],
                max(2.0 * piece.half_width_sum / piece.n_px - 1.0, 1.0),
                max(2.0 * piece.half_width_max - 1.0, 1.0),
                piece.probability_sum / piece.n_px / 255.0,
            )
        )
    return found


def frame_footprint_enu(
    camera: Camera, pose: Pose, origin: tuple[float, float, float], road: np.ndarray, frame: str
) -> Polygon:
    """A frame's ground trapezoid in survey ENU (x, y)."""
    outline = np.asarray(footprint(camera, road, frame).exterior.coords)
    points = np.column_stack([outline, np.full(len(outline), camera.road_z_m)])
    return Polygon(vehicle_to_enu(pose, points, origin)[:, :2])


def camera_enu(camera: Camera, pose: Pose, origin: tuple[float, float, float]) -> tuple[float, float, float]:
    e, n, u = vehicle_to_enu(pose, np.array([camera.lever_arm_m], float), origin)[0]
    return float(e), float(n), float(u)


def forward_enu(camera: Camera, pose: Pose, origin: tuple[float, float, float]) -> tuple[float, float]:
    """The vehicle's forward axis on the road, as a unit (east, north) direction: the road's direction.

    >>> from pipeline.trajectory import Pose
    >>> cam = Camera(100, 80, 50.0, 50.0, 50.0, 40.0, (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, -2.0), 0, -90, 0, 2.0)
    >>> [round(v, 6) for v in forward_enu(cam, Pose(0.0, 51.0, 14.0, 150.0, 0.0, 0.0, 90.0), (51.0, 14.0, 150.0))]
    [1.0, 0.0]
    """
    ends = vehicle_to_enu(pose, np.array([[0.0, 0.0, camera.road_z_m], [1.0, 0.0, camera.road_z_m]]), origin)
    d = ends[1, :2] - ends[0, :2]
    d = d / np.hypot(*d)
    return float(d[0]), float(d[1])


# ---------------------------------------------------------------- many frames: one line per crack


def ownership(observations: list[FrameObservation]) -> list[Polygon]:
    """Per frame, the part of its footprint it sees at a shorter range than every other frame.

    With one camera height, range order is horizontal distance order from the camera,
    so the boundary between two frames is the bisector of their cameras.  Ties go
    to the earlier frame.
    """
    outlines = [o.footprint_enu for o in observations]
    tree = shapely.STRtree(outlines)
    regions = []
    for i, a in enumerate(observations):
        region = a.footprint_enu
        ca = np.array(a.camera_enu_m[:2])
        for j in sorted(tree.query(region, predicate="intersects").tolist()):
            b = observations[j]
            if i == j:
                continue
            cb = np.array(b.camera_enu_m[:2])
            d = cb - ca
            if np.hypot(*d) < 1e-9:
                if j < i:
                    region = region.difference(b.footprint_enu)
                continue
            u = d / np.hypot(*d)
            n = np.array([-u[1], u[0]])
            mid = (ca + cb) / 2
            closer_to_b = Polygon(
                [
                    mid + n * HALF_PLANE_M,
                    mid + n * HALF_PLANE_M + u * HALF_PLANE_M,
                    mid - n * HALF_PLANE_M + u * HALF_PLANE_M,
                    mid - n * HALF_PLANE_M,
                ]
            )
            region = region.difference(closer_to_b.intersection(b.footprint_enu))
        regions.append(region)
    return regions


@dataclass(frozen=True, slots=True)
class _Part:
    line: GroundLine  # clipped to its frame's region, vertices with interpolated attributes
    cut: tuple[bool, bool]  # start / end lies on the region boundary (a clip, not a crack end)


def clip_line(line: GroundLine, region: Polygon) -> list[_Part]:
    """The parts of ``line`` inside ``region``, range and GSD interpolated at the new vertices."""
    xy = LineString(line.enu_m[:, :2])
    inside = xy.intersection(region)
    boundary = region.boundary
    original = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(line.enu_m[:, :2], axis=0).T))])
    parts = []
    for geom in getattr(inside, "geoms", [inside]):
        if not isinstance(geom, LineString) or geom.is_empty or geom.length < 1e-6:
            continue
        coords = np.asarray(geom.coords)
        at = shapely.line_locate_point(xy, shapely.points(coords))
        enu = np.column_stack([coords, np.interp(at, original, line.enu_m[:, 2])])
        clipped = GroundLine(
            line.frame_id,
            enu,
            np.interp(at, original, line.range_m),
            np.interp(at, original, line.gsd_m),
            line.width_mean_px,
            line.width_max_px,
            line.confidence,
        )
        ends = (shapely.points(coords[0]), shapely.points(coords[-1]))
        start_cut, end_cut = (
            bool(boundary.distance(p) < 1e-6 and xy.boundary.distance(p) > 1e-6) for p in ends
        )
        parts.append(_Part(clipped, (start_cut, end_cut)))
    return parts


def _links(parts: list[_Part], tolerance_m: float) -> Links:
    """Cut ends of parts that meet: mutual nearest, of different frames, within ``tolerance_m``."""
    ends = [
        (k, side, parts[k].line.enu_m[0 if side == 0 else -1, :2])
        for k, p in enumerate(parts)
        for side in (0, 1)
        if p.cut[side]
    ]
    if not ends:
        return {}
    tree = cKDTree(np.array([e[2] for e in ends]))

    def nearest(e):
        best, best_d = None, tolerance_m
        for i in tree.query_ball_point(e[2], tolerance_m):
            f = ends[i]
            if parts[f[0]].line.frame_id != parts[e[0]].line.frame_id:
                d = float(np.hypot(*(f[2] - e[2])))
                if d <= best_d:
                    best, best_d = f, d
        return best

    return {(e[0], e[1]): (f[0], f[1]) for e in ends if (f := nearest(e)) is not None and nearest(f) is e}


@dataclass(frozen=True, slots=True)
class MergedCrack:
    """One crack after merging its views: pieces in order, the frames they came from."""

    pieces: tuple[GroundLine, ...]
    frames: tuple[str, ...]  # in survey order
    owner: str  # the frame that holds it in the store: the one with the longest part

    @property
    def enu_m(self) -> np.ndarray:
        return np.concatenate([p.enu_m for p in self.pieces])


def _gsd_mm(line: CrackLine) -> float:
    """A merged frame crack's mean GSD (``crack_from_merged`` always measures it)."""
    if line.gsd_mm is None:
        raise ValueError("a merged frame crack without a GSD (crack_from_merged sets it)")
    return line.gsd_mm


def merge_observations(observations: list[FrameObservation], tolerance_m: float = 0.1) -> list[MergedCrack]:
    """One line per crack across overlapping frames: best-resolved parts, joined across frame boundaries."""
    order = {o.frame_id: i for i, o in enumerate(observations)}
    parts = [
        part
        for obs, region in zip(observations, ownership(observations))
        for line in obs.lines
        for part in clip_line(line, region)
    ]
    merged = []
    for chain in chains([p.line for p in parts], _links(parts, tolerance_m)):
        pieces = tuple(chain)
        lengths: dict[str, float] = {}
        for p in pieces:
            lengths[p.frame_id] = lengths.get(p.frame_id, 0.0) + LineString(p.enu_m[:, :2]).length
        frames = tuple(sorted(lengths, key=order.__getitem__))
        merged.append(MergedCrack(pieces, frames, max(frames, key=lambda f: (lengths[f], -order[f]))))
    return merged


def _weights(line: GroundLine) -> np.ndarray:
    """Length each vertex stands for (half of each neighbouring segment)."""
    seg = np.hypot(*np.diff(line.enu_m[:, :2], axis=0).T)
    w = np.zeros(len(line.enu_m))
    w[:-1] += seg / 2
    w[1:] += seg / 2
    return w if w.sum() > 0 else np.ones(len(w))


def crack_from_merged(
    crack: MergedCrack,
    origin: tuple[float, float, float],
    to_store: Transformer,
    accuracy: dict[str, float | None],
    severity: Severity,
) -> CrackLine:
    """The measured crack line of a merged crack: widths from each vertex's GSD, in the store CRS."""
    lon, lat = enu_to_geodetic(crack.enu_m, origin)
    keep = np.concatenate([[True], (np.diff(lon) != 0) | (np.diff(lat) != 0)])
    lon, lat = lon[keep], lat[keep]
    w = np.concatenate([_weights(p) for p in crack.pieces])
    gsd = np.concatenate([p.gsd_m for p in crack.pieces])
    rng = np.concatenate([p.range_m for p in crack.pieces])
    px_mean = np.concatenate([np.full(len(p.gsd_m), p.width_mean_px) for p in crack.pieces])
    width_mean = float(np.sum(w * px_mean * gsd) / w.sum()) * 1000.0
    width_max = max(p.width_max_px * float(np.average(p.gsd_m, weights=_weights(p))) for p in crack.pieces)
    confidence = float(
        np.sum(w * np.concatenate([np.full(len(p.gsd_m), p.confidence) for p in crack.pieces])) / w.sum()
    )
    known = [a for f in crack.frames if (a := accuracy.get(f)) is not None]
    sx, sy = to_store.transform(lon, lat)
    return CrackLine(
        geometry=LineString(np.column_stack([sx, sy])),
        length_m=float(GEOD.line_length(lon, lat)),
        width_mean_mm=width_mean,
        width_max_mm=width_max * 1000.0,
        orientation_deg=azimuth_deg(lon, lat),
        confidence=confidence,
        severity=severity.classify(width_mean),
        gsd_mm=float(np.sum(w * gsd) / w.sum()) * 1000.0,
        range_m=float(np.sum(w * rng) / w.sum()),
        pos_accuracy_m=max(known) if known else None,
        source_frames=crack.frames,
    )


def frame_results(
    observations: list[FrameObservation],
    origin: tuple[float, float, float],
    store_crs: CRS,
    options=None,
    tolerance_m: float = 0.1,
) -> list[SceneResult]:
    """One SceneResult per frame (its ground trapezoid and the merged cracks it owns, typed), in order.

    Short lines go as a scene's do: a merged crack shorter than ``min_length_px``
    pixels at its GSD (the sliver of a crack another frame sees closer), and one shorter
    than ``min_length_m`` with no other crack within ``isolation_px`` pixels at its GSD
    (an isolated fleck of texture).  Each frame's cracks are then typed as a scene's
    (``pipeline.scene.type_cracks``: joints, pattern areas, longitudinal / transverse /
    diagonal), against the vehicle's direction at that frame and within its footprint.
    ``options``: a ``pipeline.scene.SceneOptions`` (default: the defaults).
    """
    from pipeline.scene import SceneOptions, type_cracks

    options = options or SceneOptions()
    params = options.vectorize
    to_store = Transformer.from_crs(LONLAT, store_crs, always_xy=True)
    accuracy = {o.frame_id: o.pos_accuracy_m for o in observations}
    owned: dict[str, list[CrackLine]] = {o.frame_id: [] for o in observations}
    found = [
        (crack, line)
        for crack in merge_observations(observations, tolerance_m)
        if (line := crack_from_merged(crack, origin, to_store, accuracy, options.severity)).length_m
        >= params.min_length_px * _gsd_mm(line) / 1000.0
    ]
    shapes = [LineString(crack.enu_m[:, :2]) for crack, _ in found]
    tree = shapely.STRtree(shapes)
    for i, (crack, line) in enumerate(found):
        if line.length_m < params.min_length_m:
            reach_m = params.isolation_px * _gsd_mm(line) / 1000.0
            near = tree.query(shapes[i], predicate="dwithin", distance=reach_m)
            if not (near != i).any():
                continue
        owned[crack.owner].append(line)
    results = []
    for o in observations:
        ring = np.asarray(o.footprint_enu.exterior.coords)
        lon, lat = enu_to_geodetic(np.column_stack([ring, np.zeros(len(ring))]), origin)
        outline = Polygon(np.column_stack(to_store.transform(lon, lat)))
        cracks, areas = type_cracks(
            tuple(owned[o.frame_id]), outline, store_crs, options, road_axis=_road_axis(o, origin, to_store)
        )
        scene = Scene(o.uri, o.frame_id, o.width_px, o.height_px, 3, "uint8", store_crs, Affine.identity())
        results.append(
            SceneResult(
                scene=scene,
                cracks=cracks,
                footprint=outline,
                chip_count=o.chip_count,
                probability_path=o.probability_path,
                seconds=o.seconds,
                sha256=o.sha256,
                pattern_areas=areas,
                inference=o.inference,
            )
        )
    return results


def _road_axis(
    obs: FrameObservation, origin: tuple[float, float, float], to_store: Transformer
) -> LineString | None:
    """The vehicle's forward axis through the frame's camera, 1 m long, in the store CRS (None if unknown)."""
    if obs.forward_enu is None:
        return None
    start = np.array(obs.camera_enu_m[:2])
    ends = np.column_stack([np.stack([start, start + obs.forward_enu]), np.zeros(2)])
    lon, lat = enu_to_geodetic(ends, origin)
    return LineString(np.column_stack(to_store.transform(lon, lat)))


# ---------------------------------------------------------------- survey level


@dataclass(frozen=True, slots=True)
class FrameSurvey:
    """A frame survey's inputs: the camera, where poses come from, how frames get their time."""

    camera_path: str
    trajectory_path: str | None = None
    frame_time: str = "exif"
    max_gap_s: float = 1.0
    max_speed_m_s: float = 70.0
    join_tolerance_m: float = 0.1

    def to_record(self) -> dict:
        """The settings as a JSON-able mapping, with absolute paths: what the store keeps for reprocessing.

        >>> r = FrameSurvey("/s/camera.yaml", None, "index:/s/frames.csv").to_record()
        >>> r["camera"], r["trajectory"], r["frame_time"]
        ('/s/camera.yaml', None, 'index:/s/frames.csv')
        """
        frame_time = self.frame_time
        if frame_time.startswith("index:"):
            frame_time = "index:" + str(Path(frame_time[6:]).resolve())
        return {
            "camera": str(Path(self.camera_path).resolve()),
            "trajectory": str(Path(self.trajectory_path).resolve()) if self.trajectory_path else None,
            "frame_time": frame_time,
            "max_gap_s": self.max_gap_s,
            "max_speed_m_s": self.max_speed_m_s,
            "join_tolerance_m": self.join_tolerance_m,
        }

    @classmethod
    def from_record(cls, record: dict) -> FrameSurvey:
        """The settings ``to_record`` wrote.

        >>> s = FrameSurvey("/s/camera.yaml", "/s/trajectory.csv", max_gap_s=2.0)
        >>> FrameSurvey.from_record(s.to_record()) == s
        True
        """
        return cls(
            record["camera"],
            record.get("trajectory"),
            record.get("frame_time", "exif"),
            float(record.get("max_gap_s", 1.0)),
            float(record.get("max_speed_m_s", 70.0)),
            float(record.get("join_tolerance_m", 0.1)),
        )


@dataclass(frozen=True, slots=True)
class FrameJob:
    """One frame to segment and put on the ground: all a worker needs, as plain values.

    ``identity``: the frame's content with the camera file's and trajectory's
    (``frame_identity``); ``pose`` comes from the survey (EXIF GPS headings need the
    neighbouring frames), so a worker maps a frame without seeing the others.
    """

    uri: str
    frame_id: str
    identity: str
    camera_path: str
    pose: Pose
    origin: tuple[float, float, float]

    def parameters(self) -> dict:
        """What travels to a ``process-scene`` run besides the uri, id and identity (JSON-able).

        >>> job = FrameJob("f.jpg", "f", "ab", "/s/camera.yaml", Pose(0.0, 51.0, 14.0, 150.0, 0, 0, 90.0),
        ...                (51.0, 14.0, 150.0))
        >>> FrameJob.from_parameters("f.jpg", "f", "ab", job.parameters()) == job
        True
        """
        return {"camera": self.camera_path, "pose": asdict(self.pose), "origin": list(self.origin)}

    @classmethod
    def from_parameters(cls, uri: str, frame_id: str, identity: str, frame: dict) -> FrameJob:
        """The job a ``process-scene`` run was given (``parameters``).

        Raises:
            FrameError: the parameters lack the camera, pose or origin.
        """
        try:
            x, y, z = (float(v) for v in frame["origin"])
            return cls(uri, frame_id, identity, str(frame["camera"]), Pose(**frame["pose"]), (x, y, z))
        except (KeyError, TypeError, ValueError) as exc:
            raise FrameError(uri, f"the frame parameters need camera, pose and origin ({exc})") from exc


def find_frame_survey(
    sources: list[str], camera: str | None, trajectory: str | None
) -> tuple[str, str | None] | None:
    """(camera file, trajectory file or None) if ``sources`` are a frame survey, else None.

    ``--camera`` chooses frame mode; so does a single source folder holding ``camera.yaml``
    (or ``.yml``/``.json``), with ``trajectory.csv`` beside it used unless ``--trajectory`` is given.
    """
    folder = Path(sources[0]) if len(sources) == 1 and Path(sources[0]).is_dir() else None
    if camera is None and folder is not None:
        camera = next((str(folder / n) for n in CAMERA_NAMES if (folder / n).is_file()), None)
    if camera is None:
        if trajectory is not None:
            raise SceneContentError(trajectory, "a trajectory needs a camera file (--camera)")
        return None
    if trajectory is None and folder is not None and (folder / TRAJECTORY_NAME).is_file():
        trajectory = str(folder / TRAJECTORY_NAME)
    return camera, trajectory


def survey_frames(found: list, camera_path: str) -> list:
    """The frames among discovered images: all but the camera's road mask.

    >>> from pipeline.survey import SceneSource
    >>> import tempfile; d = Path(tempfile.mkdtemp()); _ = (d / "cam.yaml").write_text("mask: m.png")
    >>> [s.scene_id for s in survey_frames([SceneSource(str(d / "m.png"), "m"), SceneSource("f.jpg", "f")],
    ...                                    str(d / "cam.yaml"))]
    ['f']
    """
    try:
        mask = (yaml.safe_load(Path(camera_path).read_text()) or {}).get("mask")
    except (OSError, yaml.YAMLError, AttributeError):
        mask = None  # read_camera reports it
    if not mask:
        return found
    mask_path = (Path(camera_path).parent / str(mask)).resolve()
    return [s for s in found if buckets.is_url(s.uri) or Path(s.uri).resolve() != mask_path]


def frame_identity(frame_sha256: str, *inputs: str | None) -> str:
    """A frame's identity in the store: its content with the camera and trajectory files' contents.

    A new camera calibration or trajectory maps the frame again.
    """
    digest = hashlib.sha256(frame_sha256.encode())
    for path in inputs:
        content = hashlib.sha256(Path(path).read_bytes()).hexdigest().encode() if path else b"-"
        digest.update(b"\0" + content)
    return digest.hexdigest()


def survey_origin(poses: list[Pose]) -> tuple[float, float, float]:
    """The local ENU origin of a survey: its first pose."""
    return poses[0].lat_deg, poses[0].lon_deg, poses[0].height_m


_ROAD: dict[int, tuple[Camera, np.ndarray]] = {}  # the last camera's road pixels (one camera per survey)


def frame_road(camera: Camera) -> np.ndarray:
    """``road_pixels(camera)``, computed once per camera and process (every frame of a survey shares it)."""
    if id(camera) not in _ROAD:
        _ROAD.clear()
        _ROAD[id(camera)] = (camera, road_pixels(camera))  # the camera is kept: its id stays its own
    return _ROAD[id(camera)][1]


Progress = Callable[[str, int, int], None]


def frame_pose(
    uri: str, clock: FrameClock, trajectory: Trajectory | None
) -> tuple[Pose | None, GpsFix | None, float | None]:
    """(pose from the trajectory, EXIF GPS fix, time) of a frame; one of the first two is set.

    Raises:
        FrameError: no time where needed, a time outside the trajectory, or no EXIF GPS
            when there is no trajectory.
    """
    if trajectory is not None:
        t = clock.time_s(uri, read_exif(uri) if clock.spec == "exif" else None)
        return pose_at(trajectory, t, uri), None, t
    exif = read_exif(uri)
    fix = exif_gps(exif)
    if fix is None:
        raise FrameError(uri, "has no EXIF GPS position, and there is no trajectory (--trajectory)")
    time_s: float | None
    try:
        time_s = clock.time_s(uri, exif)
    except FrameError:
        time_s = None
    return None, fix, time_s


def observe_frame(
    uri: str,
    frame_id: str,
    camera: Camera,
    pose: Pose,
    origin: tuple[float, float, float],
    backend,
    model,
    probability_path: str,
    options,
    sha256: str,
    progress: Progress | None = None,
) -> FrameObservation:
    """Segment one frame with the scene chips and stitching, and put its crack lines on the ground.

    Pixels outside the camera's road (above the horizon, beyond ``max_range_m``, under
    the mask) are nodata: no crack is drawn there, and chips with no road pixel are not
    run through the network.

    Raises:
        SceneReadError: the frame is missing or not an image.
        FrameError: its size is not the camera's, or its footprint is degenerate.
    """
    from pipeline.backends import inference_of
    from pipeline.probability import ProbabilityWriter
    from pipeline.raster import SceneReader
    from pipeline.scene import run_network
    from pipeline.stitching import StripStitcher
    from pipeline.vectorize import BandVectorizer

    started = time.perf_counter()
    with SceneReader(uri, frame_id, georeferenced=False) as reader:
        scene = reader.scene
    if (scene.width, scene.height) != (camera.width_px, camera.height_px):
        raise FrameError(
            uri,
            f"is {scene.width}x{scene.height} px, but the camera file is for "
            f"{camera.width_px}x{camera.height_px}",
        )
    road = frame_road(camera)
    outline = frame_footprint_enu(camera, pose, origin, road, uri)
    params = options.vectorize_params(model)
    vectorizer = BandVectorizer(scene.width, scene.height, params)
    probability = ProbabilityWriter(probability_path, scene, overviews=False)  # frame pixels: no map to zoom

    def sink(row_off, p, valid):
        valid = valid & road[row_off : row_off + len(p)]
        probability(row_off, p, valid)
        vectorizer(row_off, p, valid)

    stitcher = StripStitcher(
        scene.width, scene.height, sink, options.size_px, options.border_px, options.overlap_px
    )
    try:
        chips = run_network(
            uri, frame_id, backend, stitcher, options, progress, georeferenced=False, road=road
        )
        pieces = vectorizer.finish()
        probability.finish()
    except BaseException:
        probability.abort()
        raise
    lines = tuple(g for g in ground_lines(camera, pose, origin, frame_id, pieces, params) if g is not None)
    return FrameObservation(
        frame_id,
        uri,
        sha256,
        camera_enu(camera, pose, origin),
        outline,
        pose.pos_accuracy_m,
        lines,
        chips,
        scene.width,
        scene.height,
        str(probability_path),
        time.perf_counter() - started,
        forward_enu(camera, pose, origin),
        inference_of(backend),
    )
