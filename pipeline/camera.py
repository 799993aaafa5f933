"""Survey cameras: the camera file, and pixels -> rays -> points on the road.

Frames of a frame survey are perspective photos, not orthophotos.  Crack lines
are vectorized in frame pixels; their vertices (never the image) are mapped to
the ground here, with the **flat-road model**:

* the road is a plane, fixed in the vehicle frame, ``height_m`` below the camera
  centre (the vehicle rolls and pitches with the road; a crown, a gradient change
  or a pothole within the frame is not modelled);
* every road pixel's ray (undistorted with OpenCV's Brown-Conrady model) meets
  that plane once; rays at or above the horizon, beyond ``max_range_m`` or
  outside the camera's road mask are not road.

Frames (all in metres, right-handed):

* **vehicle**: x forward, y right, z down (as GNSS/IMU roll, pitch and heading are
  given); its origin is the trajectory's reference point;
* **camera** (OpenCV): x right, y down, z along the optical axis.  With
  roll = pitch = yaw = 0 the camera looks forward, image right = vehicle right;
  pitch -90 looks straight down (image top = forward).  The mounting angles are
  applied as yaw, then pitch, then roll (intrinsic Z-Y-X, like a vehicle attitude).

Downward cameras are the same model as forward-looking ones, not a special path.

OpenCV is imported where it is used: a GeoTIFF survey never needs it, and its import
costs ~0.15 s of every ``crackmap run`` (``flows.survey`` imports this module).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import yaml
from scipy.spatial.transform import Rotation

from pipeline.errors import CameraError

# camera axes (x right, y down, z forward) in vehicle axes (x forward, y right, z down)
CAMERA_BASE = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
MIN_DOWN = 1e-6  # a ray must point at least this much downwards (z) to meet the road
FOOTPRINT_SAMPLES = 33  # image samples per side when outlining the ground footprint


@dataclass(frozen=True, slots=True)
class Camera:
    """A calibrated survey camera and how it is mounted on the vehicle.

    Args:
        width_px, height_px: Image size the calibration is for.
        fx, fy, cx, cy: Intrinsics in pixels (OpenCV: pixel centres at integers).
        distortion: OpenCV Brown-Conrady coefficients (k1, k2, p1, p2[, k3[, k4, k5, k6]]).
        lever_arm_m: Camera centre in the vehicle frame (x forward, y right, z down).
        roll_deg, pitch_deg, yaw_deg: Camera mounting relative to the vehicle.
        height_m: Camera centre above the road.
        max_range_m: Road farther from the camera than this is not mapped (None: no limit).
        road_mask: (height_px, width_px) bool, True where the image may show road (None: all).
    """

    width_px: int
    height_px: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion: tuple[float, ...]
    lever_arm_m: tuple[float, float, float]
    roll_deg: float
    pitch_deg: float
    yaw_deg: float
    height_m: float
    max_range_m: float | None = None
    road_mask: np.ndarray | None = None

    @property
    def matrix(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def dist(self) -> np.ndarray:
        return np.array(self.distortion, dtype=float)

    @property
    def rotation(self) -> np.ndarray:
        """Camera axes -> vehicle axes (3x3)."""
        mount = Rotation.from_euler("ZYX", [self.yaw_deg, self.pitch_deg, self.roll_deg], degrees=True)
        return mount.as_matrix() @ CAMERA_BASE

    @property
    def road_z_m(self) -> float:
        """The road plane's z in the vehicle frame (z down)."""
        return self.lever_arm_m[2] + self.height_m


def check_camera(camera: Camera, source: str) -> None:
    """Refuse absurd values; the message names ``source`` and the value.

    Raises:
        CameraError: a non-positive focal length or size, a principal point outside the
            image, a camera at or below the road, distortion that is not 4-14 finite numbers,
            a mask of another size, a horizon inside the road mask, or no road in view.
    """
    problems = []
    if camera.width_px <= 0 or camera.height_px <= 0:
        problems.append(f"image size {camera.width_px}x{camera.height_px} must be positive")
    if not (camera.fx > 0 and camera.fy > 0):
        problems.append(f"focal lengths fx={camera.fx}, fy={camera.fy} must be positive")
    if not (0 <= camera.cx <= camera.width_px and 0 <= camera.cy <= camera.height_px):
        problems.append(f"principal point ({camera.cx}, {camera.cy}) lies outside the image")
    if not camera.height_m > 0:
        problems.append(f"height_m={camera.height_m}: the camera must be above the road (height_m > 0)")
    if len(camera.distortion) not in (4, 5, 8, 12, 14) or not np.isfinite(camera.distortion).all():
        problems.append(
            f"distortion must be 4, 5, 8, 12 or 14 finite OpenCV coefficients, got {list(camera.distortion)}"
        )
    if camera.max_range_m is not None and not camera.max_range_m > 0:
        problems.append(f"max_range_m={camera.max_range_m} must be positive")
    if not all(map(math.isfinite, (*camera.lever_arm_m, camera.roll_deg, camera.pitch_deg, camera.yaw_deg))):
        problems.append("the lever arm and mounting angles must be finite numbers")
    if camera.road_mask is not None and camera.road_mask.shape != (camera.height_px, camera.width_px):
        problems.append(
            f"the road mask is {camera.road_mask.shape[1]}x{camera.road_mask.shape[0]}, "
            f"the image {camera.width_px}x{camera.height_px}"
        )
    if problems:
        raise CameraError(source, "; ".join(problems))
    hits = road_pixels(camera, with_mask=False)
    if camera.road_mask is not None and (above := camera.road_mask & ~hits).any():
        rows = np.flatnonzero(above.any(axis=1))
        raise CameraError(
            source,
            f"the horizon (or max_range_m) lies inside the road mask: mask rows "
            f"{rows[0]}-{rows[-1]} are marked road but see no road; fix the mask "
            "or the mounting angles",
        )
    footprint(camera, hits if camera.road_mask is None else hits & camera.road_mask, source)


def undistort(camera: Camera, uv: np.ndarray) -> np.ndarray:
    """Normalized image coordinates (x/z, y/z) of distorted pixel positions ``uv`` (n, 2: col, row).

    >>> cam = Camera(100, 80, 50.0, 50.0, 50.0, 40.0, (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 0, -90, 0, 2.0)
    >>> undistort(cam, np.array([[50.0, 40.0], [100.0, 40.0]])).round(6).tolist()
    [[0.0, 0.0], [1.0, 0.0]]
    """
    if len(uv) == 0:
        return np.zeros((0, 2))
    points = np.ascontiguousarray(uv, dtype=np.float64).reshape(-1, 1, 2)
    import cv2

    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-10)
    return cv2.undistortPoints(points, camera.matrix, camera.dist, None, None, None, criteria).reshape(-1, 2)


def pixel_rays(camera: Camera, uv: np.ndarray) -> np.ndarray:
    """Unit ray directions (n, 3) in the vehicle frame of pixel positions ``uv`` (col, row)."""
    xy = undistort(camera, uv)
    rays = np.column_stack([xy, np.ones(len(xy))]) @ camera.rotation.T
    return rays / np.linalg.norm(rays, axis=1, keepdims=True)


def ground_points(camera: Camera, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the rays of pixels ``uv`` (col, row) meet the road: vehicle-frame points (n, 3) and ranges (n,).

    A ray that does not meet the road (at or above the horizon) gives NaN.

    >>> cam = Camera(100, 80, 50.0, 50.0, 50.0, 40.0, (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 0, -90, 0, 2.0)
    >>> p, r = ground_points(cam, np.array([[50.0, 40.0], [100.0, 40.0]]))
    >>> p.round(6).tolist(), r.round(6).tolist()
    ([[0.0, 0.0, 2.0], [0.0, 2.0, 2.0]], [2.0, 2.828427])
    """
    rays = pixel_rays(camera, uv)
    down = rays[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = np.where(down > MIN_DOWN, (camera.road_z_m - camera.lever_arm_m[2]) / down, np.nan)
    return np.asarray(camera.lever_arm_m) + rays * distance[:, None], distance


def ground_sampling_m(camera: Camera, uv: np.ndarray) -> np.ndarray:
    """Ground size of one pixel at ``uv`` (geometric mean of its two sides on the road), metres.

    >>> cam = Camera(100, 80, 500.0, 500.0, 50.0, 40.0, (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 0, -90, 0, 2.0)
    >>> ground_sampling_m(cam, np.array([[50.0, 40.0]])).round(6).tolist()
    [0.004]
    """
    uv = np.asarray(uv, dtype=float)
    p0, _ = ground_points(camera, uv)
    p1, _ = ground_points(camera, uv + [0.5, 0.0])
    p2, _ = ground_points(camera, uv + [0.0, 0.5])
    area = np.linalg.norm(np.cross(p1 - p0, p2 - p0), axis=1) * 4.0
    return np.sqrt(area)


_HITS: dict[tuple[int, int], tuple[Camera, np.ndarray]] = {}  # rays traced per camera (road_pixels)


def road_pixels(camera: Camera, with_mask: bool = True, stride_px: int = 4) -> np.ndarray:
    """(height_px, width_px) bool: pixels whose ray meets the road within ``max_range_m`` (and the mask).

    Rays are traced every ``stride_px`` pixels and the answer spread to the pixels
    around (the boundary is placed to within ``stride_px``).
    """
    key = (id(camera), stride_px)
    if key not in _HITS:  # checking a camera traces them too: once per camera and process
        rows, cols = np.mgrid[
            0 : camera.height_px + stride_px : stride_px, 0 : camera.width_px + stride_px : stride_px
        ]
        uv = np.column_stack([cols.ravel(), rows.ravel()]).astype(float)
        _, distance = ground_points(camera, uv)
        hits = np.isfinite(distance)
        if camera.max_range_m is not None:
            hits &= np.nan_to_num(distance, nan=np.inf) <= camera.max_range_m
        hits = hits.reshape(rows.shape)
        r = (np.arange(camera.height_px) + stride_px // 2) // stride_px
        c = (np.arange(camera.width_px) + stride_px // 2) // stride_px
        if len(_HITS) >= 4:
            _HITS.clear()
        _HITS[key] = (camera, hits[r][:, c])  # the camera is kept: its id stays its own
    hits = _HITS[key][1].copy()
    if with_mask and camera.road_mask is not None:
        hits &= camera.road_mask
    return hits


def footprint(camera: Camera, road: np.ndarray | None = None, source: str = "camera") -> shapely.Polygon:
    """The road area a frame shows, in the vehicle frame's (x, y): a trapezoid for a plain camera.

    The convex hull of the ground points of a grid of road pixels (``road`` from
    ``road_pixels``), so distortion, the mask and ``max_range_m`` shape it too.

    Raises:
        CameraError: fewer than three road samples or no area: the camera looks at the sky.
    """
    road = road_pixels(camera) if road is None else road
    cols = np.linspace(0, camera.width_px - 1, FOOTPRINT_SAMPLES).round().astype(int)
    rows = np.linspace(0, camera.height_px - 1, FOOTPRINT_SAMPLES).round().astype(int)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    keep = road[rr, cc]
    if keep.sum() >= 3:
        points, _ = ground_points(camera, np.column_stack([cc[keep], rr[keep]]).astype(float))
        hull = shapely.MultiPoint(points[:, :2]).convex_hull
        if isinstance(hull, shapely.Polygon) and hull.area > 1e-4:
            return hull
    raise CameraError(
        source,
        "the ground footprint is degenerate (the camera sees no road: "
        "it looks at the sky or the mask hides the road)",
    )


def project(camera: Camera, points: np.ndarray) -> np.ndarray:
    """Pixel positions (n, 2: col, row) of vehicle-frame points (n, 3), with distortion (OpenCV)."""
    import cv2

    to_camera = camera.rotation.T
    rvec, _ = cv2.Rodrigues(to_camera)
    tvec = -to_camera @ np.asarray(camera.lever_arm_m, dtype=float)
    uv, _ = cv2.projectPoints(
        np.asarray(points, dtype=np.float64).reshape(-1, 1, 3), rvec, tvec, camera.matrix, camera.dist
    )
    return uv.reshape(-1, 2)


CAMERA_KEYS = {"image", "intrinsics", "distortion", "mounting", "max_range_m", "mask"}


_LIST_KEYS = {"lever_arm_m"}  # the only camera value that is a list of numbers


def _section(data: dict, key: str, names: tuple[str, ...], source: str) -> list[Any]:
    """The section's values in ``names`` order: numbers, and lists of numbers for ``_LIST_KEYS``."""
    part = data.get(key)
    if not isinstance(part, dict):
        raise CameraError(source, f"missing section {key!r} with {', '.join(names)}")
    if missing := [n for n in names if n not in part]:
        raise CameraError(source, f"{key} lacks {', '.join(missing)}")
    if extra := sorted(set(part) - set(names)):
        raise CameraError(source, f"{key} has unknown keys {extra}; expected {', '.join(names)}")
    try:
        return [
            [float(v) for v in part[n]] if n in _LIST_KEYS and isinstance(part[n], list) else float(part[n])
            for n in names
        ]
    except (TypeError, ValueError) as exc:
        raise CameraError(source, f"{key} holds a value that is not a number ({exc})") from exc


def camera_from_dict(data: dict, source: str, mask: np.ndarray | None = None) -> Camera:
    """A checked Camera from the parsed camera file (see README, "Frame surveys")."""
    if not isinstance(data, dict):
        raise CameraError(source, "is not a mapping of camera settings")
    if extra := sorted(set(data) - CAMERA_KEYS):
        raise CameraError(source, f"unknown keys {extra}; expected {sorted(CAMERA_KEYS)}")
    width, height = _section(data, "image", ("width", "height"), source)
    fx, fy, cx, cy = _section(data, "intrinsics", ("fx", "fy", "cx", "cy"), source)
    lever, roll, pitch, yaw, height_m = _section(
        data, "mounting", ("lever_arm_m", "roll_deg", "pitch_deg", "yaw_deg", "height_m"), source
    )
    distortion = data.get("distortion", [0.0, 0.0, 0.0, 0.0])
    if not isinstance(distortion, list) or not isinstance(lever, list) or len(lever) != 3:
        raise CameraError(source, "distortion must be a list of numbers and lever_arm_m a list of three")
    max_range = data.get("max_range_m")
    camera = Camera(
        int(width),
        int(height),
        fx,
        fy,
        cx,
        cy,
        tuple(float(d) for d in distortion),
        tuple(lever),
        roll,
        pitch,
        yaw,
        height_m,
        float(max_range) if max_range is not None else None,
        mask,
    )
    check_camera(camera, source)
    return camera


def read_camera(path: str | Path) -> Camera:
    """Read and check a camera file (YAML or JSON); a ``mask`` image is read relative to it.

    Raises:
        CameraError: the file is missing or unreadable, or holds missing or absurd values.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise CameraError(str(path), f"cannot read the camera file ({str(exc).splitlines()[0]})") from exc
    mask = None
    if isinstance(data, dict) and data.get("mask"):
        import cv2

        mask_path = path.parent / str(data["mask"])
        image = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise CameraError(str(path), f"cannot read its road mask {mask_path}")
        mask = image > 127
    return camera_from_dict(data, str(path), mask)


_CAMERAS: dict[tuple[str, int, int], Camera] = {}


def cached_camera(path: str | Path) -> Camera:
    """``read_camera(path)``, read once per process while the file is unchanged (a worker maps many frames).

    The same Camera object comes back each time, so what is derived from it once
    (its road pixels, its undistortion) is shared by every frame.

    Raises:
        CameraError: as ``read_camera``.
    """
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise CameraError(str(path), f"cannot read the camera file ({exc.strerror or exc})") from exc
    key = (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CAMERAS:
        if len(_CAMERAS) >= 4:
            _CAMERAS.clear()
        _CAMERAS[key] = read_camera(path)
    return _CAMERAS[key]
