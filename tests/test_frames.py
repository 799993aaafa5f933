"""Frame surveys: synthetic frames rendered with OpenCV from a known ground pattern through a
known distorted camera, and mapped back to the ground."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pymap3d
import pytest
import shapely
from PIL import ExifTags, Image
from rasterio.crs import CRS

from pipeline.camera import Camera, check_camera, footprint, project, read_camera
from pipeline.errors import CameraError, FrameError, TrajectoryError
from pipeline.frames import (
    FrameObservation,
    GroundLine,
    exif_gps,
    exif_time_s,
    frame_results,
    ground_line,
    merge_observations,
    observe_frame,
    read_exif,
)
from pipeline.scene import SceneOptions
from pipeline.trajectory import (
    Pose,
    TrajectoryLimits,
    attitude,
    make_trajectory,
    pose_at,
    read_trajectory,
    track_poses,
    vehicle_to_enu,
)
from pipeline.vectorize import BandVectorizer, VectorizeParams

ORIGIN = (47.3769, 8.5417, 410.0)  # survey origin (lat, lon, ellipsoidal height)
DISTORTION = (-0.18, 0.04, 0.0008, -0.0006, 0.0)
# A downward camera (pitch -90: constant GSD) and a forward-looking one (pitch -28).
DOWN = Camera(960, 600, 900.0, 900.0, 478.5, 301.0, DISTORTION, (0.5, 0.0, -2.0), 0.0, -90.0, 0.0, 2.0)
FORWARD = Camera(
    1280,
    720,
    1100.0,
    1100.0,
    641.0,
    358.0,
    DISTORTION,
    (1.2, 0.1, -1.6),
    0.4,
    -28.0,
    1.5,
    1.8,
    max_range_m=8.0,
)
PARAMS = VectorizeParams(threshold=0.5)


def enu_to_vehicle(pose: Pose, enu: np.ndarray) -> np.ndarray:
    """The test's inverse of vehicle_to_enu (pymap3d both ways), to render world lines into frames."""
    lat, lon, h = pymap3d.enu2geodetic(enu[:, 0], enu[:, 1], enu[:, 2], *ORIGIN)
    n, e, d = pymap3d.geodetic2ned(lat, lon, h, pose.lat_deg, pose.lon_deg, pose.height_m)
    to_vehicle = attitude([pose.roll_deg], [pose.pitch_deg], [pose.heading_deg]).inv()
    return to_vehicle.apply(np.column_stack([n, e, d]))


def render(camera: Camera, lines_vehicle: list[np.ndarray], thickness_px: int = 5) -> np.ndarray:
    """A grey road with dark lines: ground polylines (vehicle frame, on the road) projected by OpenCV."""
    image = np.full((camera.height_px, camera.width_px), 235, np.uint8)
    for line in lines_vehicle:
        dense = np.concatenate([np.linspace(a, b, 400) for a, b in zip(line[:-1], line[1:])])
        to_camera = (dense - camera.lever_arm_m) @ camera.rotation
        uv = project(camera, dense[to_camera[:, 2] > 0.1])
        cv2.polylines(
            image,
            [np.round(uv * 16).astype(np.int32)],
            False,
            20,
            thickness=thickness_px,
            lineType=cv2.LINE_AA,
            shift=4,
        )
    return image


def vectorize(image: np.ndarray):
    probability = (255 - image).astype(np.uint8)
    vectorizer = BandVectorizer(image.shape[1], image.shape[0], PARAMS)
    vectorizer(0, probability, np.ones(image.shape, bool))
    return vectorizer.finish()


def on_road(camera: Camera, xy: list[tuple[float, float]]) -> np.ndarray:
    return np.array([[x, y, camera.road_z_m] for x, y in xy])


@pytest.mark.parametrize(
    "camera, pattern",
    [
        (DOWN, [[(0.3, -0.8), (0.9, 0.7)], [(-0.05, 0.2), (0.25, 0.5), (0.35, 0.9)]]),
        (
            FORWARD,
            [[(3.0, -0.9), (5.2, 0.5)], [(3.1, 0.5), (3.6, 1.1), (3.9, 1.25)], [(4.4, -1.9), (4.9, -0.9)]],
        ),
    ],
    ids=["downward", "forward"],
)
def test_ground_polylines_come_back_within_1_cm_and_1_percent(camera, pattern):
    pose = Pose(0.0, 47.37695, 8.54175, 411.0, 1.5, -2.0, 33.0)
    lines = [on_road(camera, p) for p in pattern]
    truths = [shapely.LineString(vehicle_to_enu(pose, line, ORIGIN)[:, :2]) for line in lines]
    found = [
        g
        for piece in vectorize(render(camera, lines, thickness_px=3))
        if (g := ground_line(camera, pose, ORIGIN, "f", piece, PARAMS)) is not None
    ]
    assert len(found) == len(truths)
    for truth in truths:
        line = min(found, key=lambda g: shapely.LineString(g.enu_m[:, :2]).distance(truth.centroid))
        recovered = shapely.LineString(line.enu_m[:, :2])
        assert max(truth.distance(shapely.Point(p)) for p in line.enu_m[:, :2]) < 0.01
        assert recovered.length == pytest.approx(truth.length, rel=0.01)
        assert np.all(line.range_m > camera.height_m)
    if camera is DOWN:  # constant GSD for a downward camera (up to distortion)
        gsd = np.concatenate([g.gsd_m for g in found])
        assert gsd.max() / gsd.min() < 1.1
    else:  # the GSD grows with range down a forward-looking frame
        g = np.concatenate([g.gsd_m for g in found])
        r = np.concatenate([g.range_m for g in found])
        assert np.corrcoef(g, r)[0, 1] > 0.9


def test_footprint_is_a_trapezoid_in_front_of_a_forward_camera():
    outline = footprint(FORWARD)
    x, y = np.asarray(outline.exterior.coords).T
    assert x.min() > 1.2 and x.max() <= 1.2 + 8.0 + 1e-6
    near = np.abs(y[x < x.min() + 0.3]).max()
    far = np.abs(y[x > x.max() - 1.0]).max()
    assert far > 2 * near  # wider far away than near: a trapezoid, cut by the range


def test_absurd_camera_values_are_one_line_naming_the_file(tmp_path):
    good = {
        "image": {"width": 960, "height": 600},
        "intrinsics": {"fx": 900, "fy": 900, "cx": 480, "cy": 300},
        "distortion": list(DISTORTION),
        "mounting": {
            "lever_arm_m": [0.5, 0, -2],
            "roll_deg": 0,
            "pitch_deg": -90,
            "yaw_deg": 0,
            "height_m": 2.0,
        },
    }
    path = tmp_path / "camera.json"
    path.write_text(json.dumps(good))
    assert read_camera(path).fx == 900
    cases = {
        "fx": ("intrinsics", "fx", -900, "focal lengths"),
        "below": ("mounting", "height_m", -0.5, "above the road"),
        "sky": ("mounting", "pitch_deg", 30, "degenerate"),
        # a list where a number belongs (only the lever arm is a list) was a traceback
        "list width": ("image", "width", [960, 961], "image holds a value that is not a number"),
        "list fx": ("intrinsics", "fx", [900], "intrinsics holds a value that is not a number"),
    }
    for section, key, value, words in cases.values():
        bad = json.loads(json.dumps(good))
        bad[section][key] = value
        path.write_text(json.dumps(bad))
        with pytest.raises(CameraError, match=words) as err:
            read_camera(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    del good["intrinsics"]["cy"]
    path.write_text(json.dumps(good))
    with pytest.raises(CameraError, match="lacks cy"):
        read_camera(path)


def test_a_road_mask_reaching_above_the_horizon_is_refused():
    mask = np.ones((FORWARD.height_px, FORWARD.width_px), bool)  # the whole image "road", sky included
    camera = Camera(**{f: getattr(FORWARD, f) for f in FORWARD.__slots__ if f != "road_mask"}, road_mask=mask)
    with pytest.raises(CameraError, match="horizon"):
        check_camera(camera, "cam.yaml")


# ---------------------------------------------------------------- trajectories


def circle(t: np.ndarray, radius_m: float = 200.0, speed_m_s: float = 20.0):
    """An analytic path: a circle around ORIGIN, driven anticlockwise, rolling and pitching slowly."""
    angle = speed_m_s * t / radius_m
    east, north = radius_m * np.cos(angle), radius_m * np.sin(angle)
    lat, lon, h = pymap3d.enu2geodetic(east, north, 0.0 * t, *ORIGIN)
    heading = (-np.degrees(angle)) % 360.0  # the tangent (math angle + 90), clockwise from north
    return lat, lon, h, 2.0 * np.sin(0.3 * t), 1.0 * np.cos(0.2 * t), heading


def test_trajectory_interpolation_follows_an_analytic_path():
    epochs = np.arange(0.0, 20.0, 0.1)
    trajectory = make_trajectory(
        "traj.csv", epochs + 1.7e9, *circle(epochs), pos_accuracy_m=np.full(len(epochs), 0.02)
    )
    for t in np.random.default_rng(1).uniform(0.0, 19.9, 50):
        pose = pose_at(trajectory, 1.7e9 + t, "f.jpg")
        lat, lon, h, roll, pitch, heading = (float(v) for v in circle(np.array(t)))
        e, n, u = pymap3d.geodetic2enu(pose.lat_deg, pose.lon_deg, pose.height_m, lat, lon, h)
        assert np.hypot(e, n) < 0.005 and abs(u) < 0.005  # a chord's sagitta at 2 m spacing: 2.5 mm
        assert abs((pose.heading_deg - heading + 180) % 360 - 180) < 0.01
        assert pose.roll_deg == pytest.approx(roll, abs=0.01)
        assert pose.pitch_deg == pytest.approx(pitch, abs=0.01)
        assert pose.pos_accuracy_m == pytest.approx(0.02)


def test_trajectory_problems_name_the_file_or_frame(tmp_path):
    path = tmp_path / "traj.csv"
    rows = [
        "time,lat,lon,height,roll,pitch,heading",
        "100.0,47.0,8.0,400,0,0,10",
        "100.1,47.0000001,8.0,400,0,0,10",
        "103.0,47.0000002,8.0,400,0,0,10",
        "103.1,47.01,8.0,400,0,0,10",
        "103.2,47.0100001,8.0,400,0,0,10",
    ]
    path.write_text("\n".join(rows))
    trajectory = read_trajectory(str(path), TrajectoryLimits(max_gap_s=1.0, max_speed_m_s=70.0))
    assert pose_at(trajectory, 100.05, "a.jpg").lat_deg == pytest.approx(47.00000005)
    with pytest.raises(FrameError, match=r"a\.jpg: its time 99\.000 s is outside the trajectory"):
        pose_at(trajectory, 99.0, "a.jpg")
    with pytest.raises(FrameError, match=r"b\.jpg: .*2\.90 s gap"):
        pose_at(trajectory, 101.0, "b.jpg")
    with pytest.raises(FrameError, match="c.jpg: .*impossible speed"):
        pose_at(trajectory, 103.05, "c.jpg")
    path.write_text("\n".join([rows[0], rows[2], rows[1]]))
    with pytest.raises(TrajectoryError, match="time is not increasing at row 2"):
        read_trajectory(str(path))
    path.write_text("time,lat,lon\n1,2,3\n")
    with pytest.raises(TrajectoryError, match="lacks the columns height, roll, pitch, heading"):
        read_trajectory(str(path))


# ---------------------------------------------------------------- EXIF


def write_exif_frame(
    path,
    when: str,
    subsec: str,
    lat: float,
    lon: float,
    height: float,
    accuracy: float | None = None,
    size=(64, 48),
) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "crackmap-test"
    ifd = exif.get_ifd(ExifTags.IFD.Exif)
    ifd[ExifTags.Base.DateTimeOriginal] = when
    ifd[ExifTags.Base.SubsecTimeOriginal] = subsec
    ifd[ExifTags.Base.OffsetTimeOriginal] = "+02:00"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)

    def dms(value: float):
        d = int(value)
        m = int((value - d) * 60)
        return (d, m, round(((value - d) * 60 - m) * 60, 4))

    gps[ExifTags.GPS.GPSLatitudeRef] = "N" if lat >= 0 else "S"
    gps[ExifTags.GPS.GPSLatitude] = dms(abs(lat))
    gps[ExifTags.GPS.GPSLongitudeRef] = "E" if lon >= 0 else "W"
    gps[ExifTags.GPS.GPSLongitude] = dms(abs(lon))
    gps[ExifTags.GPS.GPSAltitudeRef] = 0
    gps[ExifTags.GPS.GPSAltitude] = height
    if accuracy is not None:
        gps[ExifTags.GPS.GPSHPositioningError] = accuracy
    Image.new("RGB", size, (120, 120, 120)).save(path, exif=exif)


def test_exif_time_and_gps_are_read_from_frames_written_with_known_tags(tmp_path):
    path = tmp_path / "f0001.jpg"
    write_exif_frame(path, "2026:05:04 10:20:30", "250", 47.3769, -8.5417, 412.5, accuracy=3.0)
    exif = read_exif(str(path))
    assert exif_time_s(exif) == pytest.approx(1777882830.25)  # 08:20:30.25 UTC
    lat, lon, height, accuracy = exif_gps(exif)
    assert (lat, lon) == (pytest.approx(47.3769, abs=1e-7), pytest.approx(-8.5417, abs=1e-7))
    assert (height, accuracy) == (pytest.approx(412.5), 3.0)
    plain = tmp_path / "plain.jpg"
    Image.new("RGB", (8, 8)).save(plain)
    assert exif_time_s(read_exif(str(plain))) is None and exif_gps(read_exif(str(plain))) is None


def test_exif_gps_track_gives_headings_flagged_as_lower_accuracy():
    fixes = [(47.0 + k * 1e-5, 8.0, 400.0, None) for k in range(3)]  # driving north
    poses = track_poses(["a", "b", "c"], fixes, [0.0, 1.0, 2.0])
    assert all(p.heading_from_track and p.pos_accuracy_m == 5.0 for p in poses)
    assert [round(p.heading_deg) % 360 for p in poses] == [0, 0, 0]
    stopped = track_poses(["a", "b", "c", "d"], [fixes[0], fixes[0], fixes[1], fixes[2]], [0, 1, 2, 3])
    assert [round(p.heading_deg) for p in stopped] == [0, 0, 0, 0]  # waiting at a light: heading still known
    alone = track_poses(["a", "b"], [fixes[0]] * 2, [0.0, 1.0])
    assert all(isinstance(p, FrameError) for p in alone)
    assert str(alone[1]).startswith("b: has no neighbouring")


# ---------------------------------------------------------------- overlap: one crack, one line


def drive_north(k: int, spacing_m: float) -> Pose:
    lat, lon, h = pymap3d.enu2geodetic(0.0, k * spacing_m, 0.0, *ORIGIN)  # reference point on the road
    return Pose(float(k), float(lat), float(lon), float(h), 0.0, 0.0, 0.0, pos_accuracy_m=0.03)


def test_a_crack_spanning_three_overlapping_frames_is_one_line_of_the_right_length(tmp_path):
    """A downward camera every 0.5 m; a 1.9 m crack along the road shows in three frames."""
    crack_enu = np.array([[0.1, 0.05, 0.0], [0.25, 1.0, 0.0], [0.2, 1.95, 0.0]])  # on the road (up = 0)
    truth = shapely.LineString(crack_enu[:, :2])
    other_enu = np.array([[-0.7, 1.2, 0.0], [-0.3, 1.25, 0.0]])  # a short crack across, one frame
    observations = []
    for k in range(5):
        pose = drive_north(k, 0.5)
        lines = [enu_to_vehicle(pose, c) for c in (crack_enu, other_enu)]
        path = tmp_path / f"f{k}.png"
        cv2.imwrite(str(path), np.repeat(render(DOWN, lines)[:, :, None], 3, axis=2))
        observations.append(
            observe_frame(
                str(path),
                f"f{k}",
                DOWN,
                pose,
                ORIGIN,
                _Darkness(),
                None,
                str(tmp_path / f"p{k}.tif"),
                SceneOptions(threshold=0.5),
                "sha",
            )
        )
    seen = sum(
        1 for o in observations for g in o.lines if shapely.LineString(g.enu_m[:, :2]).distance(truth) < 0.02
    )
    assert seen >= 3  # the crack really is in several frames
    results = frame_results(observations, ORIGIN, CRS.from_epsg(32632))
    cracks = [c for r in results for c in r.cracks]
    assert len(cracks) == 2
    long = max(cracks, key=lambda c: c.length_m)
    assert long.length_m == pytest.approx(truth.length, rel=0.01)
    assert len(long.source_frames) >= 3 and long.pos_accuracy_m == 0.03
    assert long.range_m == pytest.approx(2.0, abs=0.3) and long.gsd_mm == pytest.approx(2.2, abs=0.3)
    # drawn 5 px wide, anti-aliased: the mask (down to half the threshold) holds 5-8 px
    assert 5 * long.gsd_mm <= long.width_mean_mm <= 8 * long.gsd_mm
    short = min(cracks, key=lambda c: c.length_m)
    assert short.length_m == pytest.approx(np.hypot(0.4, 0.05), rel=0.03)
    # typed when mapped, against the direction of travel (north): each frame's footprint is wider
    # across the road (2.1 m) than along it (1.3 m), so its long axis would have swapped the two
    assert (long.crack_type, short.crack_type) == ("longitudinal", "transverse")
    assert long.theta_deg < 10 and short.theta_deg > 80 and long.tortuosity >= 1.0
    footprints = [r.footprint for r in results]
    assert all(f.is_valid and f.area > 0 for f in footprints)
    assert footprints[0].intersects(footprints[1])  # consecutive frames overlap


class _Darkness:
    """Probability = darkness (as conftest.DarknessBackend), with a batch size."""

    name, batch_size = "darkness", 4

    def predict(self, chips):
        return (255.0 - chips.mean(axis=1, dtype=np.float32)) / 255.0


def test_merging_keeps_each_part_from_the_frame_that_sees_it_closest():
    def line(frame, ys, rng):
        enu = np.column_stack([np.zeros(len(ys)), ys, np.zeros(len(ys))])
        return GroundLine(frame, enu, np.full(len(ys), rng), np.full(len(ys), 0.002), 3.0, 4.0, 0.9)

    box = shapely.box(-1, -1, 1, 1)
    a = FrameObservation(
        "a", "a", "s", (0.0, -0.5, 2.0), box, None, (line("a", [-0.9, 0.9], 2.0),), 1, 10, 10, "", 0.0
    )
    b = FrameObservation(
        "b", "b", "s", (0.0, 0.5, 2.0), box, None, (line("b", [-0.9, 0.9], 2.0),), 1, 10, 10, "", 0.0
    )
    merged = merge_observations([a, b])
    assert len(merged) == 1 and merged[0].frames == ("a", "b")
    ys = merged[0].enu_m[:, 1]
    assert ys.min() == pytest.approx(-0.9) and ys.max() == pytest.approx(0.9)


def test_a_geopackage_from_before_the_frame_columns_gets_them(tmp_path):
    import sqlite3

    from affine import Affine

    from pipeline.records import CrackLine, Scene, SceneResult
    from pipeline.stores import RunInfo, open_store

    path = tmp_path / "old.gpkg"
    open_store(path).close()
    with sqlite3.connect(path) as con:  # as a file written before these columns existed
        for column in ("gsd_mm", "range_m", "pos_accuracy_m", "source_frames"):
            con.execute(f"ALTER TABLE cracks DROP COLUMN {column}")
    store = open_store(path)
    try:
        scene = Scene("f.jpg", "f", 10, 10, 3, "uint8", CRS.from_epsg(4326), Affine.identity())
        crack = CrackLine(
            shapely.LineString([(8.0, 47.0), (8.00001, 47.0)]),
            0.76,
            3.0,
            4.0,
            90.0,
            0.9,
            "low",
            gsd_mm=2.5,
            range_m=4.2,
            pos_accuracy_m=0.05,
            source_frames=("e", "f"),
        )
        store.publish(
            SceneResult(scene, (crack,), shapely.box(7.9, 46.9, 8.1, 47.1), 1, "", 0.0, "sha"),
            RunInfo("s", "r", "m", "1", "x"),
        )
        (row,) = [c for batch in store.query() for c in batch]
    finally:
        store.close()
    assert (row["gsd_mm"], row["range_m"], row["pos_accuracy_m"]) == (2.5, 4.2, 0.05)
    assert json.loads(row["source_frames"]) == ["e", "f"]


def test_a_survey_without_trajectory_is_placed_by_exif_gps(tmp_path, test_models):
    """Frames with EXIF GPS only: placed at their fixes, heading along the track (here east)."""
    import sqlite3

    import yaml

    from pipeline import gpkg
    from pipeline.frames import FrameSurvey
    from pipeline.stores import RunInfo
    from pipeline.survey import RunSettings, SceneSource, map_frame_survey

    camera = tmp_path / "camera.yaml"
    camera.write_text(
        yaml.safe_dump(
            {
                "image": {"width": DOWN.width_px, "height": DOWN.height_px},
                "intrinsics": {"fx": DOWN.fx, "fy": DOWN.fy, "cx": DOWN.cx, "cy": DOWN.cy},
                "distortion": list(DOWN.distortion),
                "mounting": {
                    "lever_arm_m": [0.0, 0.0, -2.0],
                    "roll_deg": 0,
                    "pitch_deg": -90,
                    "yaw_deg": 0,
                    "height_m": 2.0,
                },
            }
        )
    )
    sources = []
    for k in range(3):
        lat, lon, h = pymap3d.enu2geodetic(3.0 * k, 0.0, 0.0, *ORIGIN)  # driving east, 3 m apart
        path = tmp_path / f"g{k}.jpg"
        write_exif_frame(
            path,
            f"2026:05:04 10:20:3{k}",
            "0",
            float(lat),
            float(lon),
            float(h),
            size=(DOWN.width_px, DOWN.height_px),
        )
        sources.append(SceneSource(str(path), f"g{k}"))
    lone = tmp_path / "nogps.jpg"
    Image.new("RGB", (DOWN.width_px, DOWN.height_px)).save(lone)
    sources.append(SceneSource(str(lone), "nogps"))
    store = str(tmp_path / "map.gpkg")
    from models.registry import resolve

    entry = resolve(None)
    run = RunInfo("exif", "r1", entry.name, entry.version, entry.sha256)
    settings = RunSettings(store, run, str(tmp_path / "p"), "onnxruntime")
    rows = map_frame_survey(sources, FrameSurvey(str(camera)), settings)
    assert [r.status for r in rows] == ["done", "done", "done", "failed"]
    assert "nogps.jpg: has no EXIF GPS position, and there is no trajectory" in rows[3].error
    with sqlite3.connect(store) as con:
        footprints = {
            s: gpkg.decode(g)
            for s, g in con.execute("SELECT scene_id, geom FROM scenes WHERE status = 'done'")
        }
    x0, y0, x1, y1 = footprint(read_camera(camera)).bounds  # vehicle frame: x forward, y right
    for k in range(3):
        lat, lon, _ = pymap3d.enu2geodetic(3.0 * k, 0.0, 0.0, *ORIGIN)
        outline = footprints[f"g{k}"]
        assert outline.contains(shapely.Point(lon, lat))
        minx, miny, maxx, maxy = outline.bounds  # forward is east: along the track = east-west
        assert (maxx - minx) * 111_320 * np.cos(np.radians(lat)) == pytest.approx(x1 - x0, abs=0.02)
        assert (maxy - miny) * 111_200 == pytest.approx(y1 - y0, abs=0.02)


def test_isolated_flecks_go_and_short_pieces_beside_a_crack_stay():
    def line(x0, y0, x1, y1):
        enu = np.array([[x0, y0, 0.0], [x1, y1, 0.0]])
        return GroundLine("a", enu, np.full(2, 2.0), np.full(2, 0.001), 2.0, 3.0, 0.9)

    lines = (
        line(0, 0, 0, 0.5),  # a crack
        line(0.01, 0.2, 0.03, 0.2),  # 2 cm beside it: part of the cracking (24 px = 2.4 cm reach)
        line(0.5, 0.5, 0.52, 0.5),
    )  # 2 cm on its own: texture
    obs = FrameObservation(
        "a", "a", "s", (0.0, 0.0, 2.0), shapely.box(-1, -1, 1, 1), None, lines, 1, 10, 10, "", 0.0
    )
    (result,) = frame_results([obs], ORIGIN, CRS.from_epsg(32632))
    assert sorted(round(c.length_m, 2) for c in result.cracks) == [0.02, 0.5]


def test_frame_times_from_the_file_name_or_an_index(tmp_path):
    from pipeline.frames import FrameClock

    by_name = FrameClock.parse(r"name:cam0_(?P<t>\d+\.\d+)\.jpg$")
    assert by_name.time_s("s3://survey/cam0_1780000000.250.jpg", None) == 1780000000.25
    with pytest.raises(FrameError, match="cam1.jpg: its name does not match"):
        by_name.time_s("cam1.jpg", None)
    index = tmp_path / "frames.csv"
    index.write_text("frame,time\nf1.jpg,2026-05-04T10:00:00.5+02:00\n")
    by_index = FrameClock.parse(f"index:{index}")
    assert by_index.time_s("/data/f1.jpg", None) == pytest.approx(1777881600.5)
    with pytest.raises(FrameError, match="f2.jpg: is not in the frame index"):
        by_index.time_s("f2.jpg", None)
    with pytest.raises(FrameError, match="exif, name:REGEX or index:CSV"):
        FrameClock.parse("gps")


def test_chips_that_show_no_road_are_not_run_through_the_network(tmp_path):
    from pipeline.camera import road_pixels
    from pipeline.tiling import chip_windows

    camera = Camera(
        1280,
        1200,
        1100.0,
        1100.0,
        639.5,
        599.5,
        DISTORTION,
        (1.2, 0.0, -1.8),
        0.0,
        -3.0,
        0.0,
        1.8,
        max_range_m=30.0,
    )  # nearly level: the top third of the image is sky or too far
    path = tmp_path / "f.png"
    cv2.imwrite(str(path), np.full((1200, 1280, 3), 200, np.uint8))
    obs = observe_frame(
        str(path),
        "f",
        camera,
        drive_north(0, 1.0),
        ORIGIN,
        _Darkness(),
        None,
        str(tmp_path / "p.tif"),
        SceneOptions(threshold=0.5),
        "sha",
    )
    road = road_pixels(camera)
    windows = chip_windows(1280, 1200, 400, 64)
    seeing_road = sum(road[w.row_off : w.row_off + 400, w.col_off : w.col_off + 400].any() for w in windows)
    assert obs.chip_count == seeing_road < len(windows)


def test_a_jpeg_frame_is_decoded_by_libjpeg_turbo_to_the_same_pixels(tmp_path, monkeypatch):
    from pipeline import raster

    path = tmp_path / "f.jpg"
    rows, cols = np.mgrid[0:300, 0:500]  # a smooth colour image: decoders may differ on chroma detail
    pixels = np.stack([rows * 255 // 300, cols * 255 // 500, (rows + cols) * 255 // 800], axis=2)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    with raster.SceneReader(str(path), georeferenced=False) as reader:
        turbo, _ = reader.read_strip(0, 300)
        whole = reader._frame is not None
    monkeypatch.setattr(raster, "TURBO_JPEG", False)
    with raster.SceneReader(str(path), georeferenced=False) as reader:
        gdal, _ = reader.read_strip(0, 300)
        assert reader._frame is None
    assert whole == raster.features.check_feature("libjpeg_turbo")
    assert np.abs(turbo.astype(int) - gdal).max() <= 2
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(path.read_bytes()[:5000])
    with (
        pytest.raises(OSError, match="cut.jpg: truncated or corrupt"),
        raster.SceneReader(str(truncated), georeferenced=False) as reader,
    ):
        reader.read_strip(0, 300)
