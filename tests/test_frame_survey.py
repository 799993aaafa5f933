"""Frame mode through `crackmap run` (Prefect, ephemeral) into a GeoPackage and PostGIS."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

import numpy as np
import pymap3d
import pytest
import shapely
import yaml
from click.testing import CliRunner
from PIL import ExifTags, Image
from test_frames import DOWN, ORIGIN, _Darkness, drive_north, enu_to_vehicle, render

pytest.importorskip("prefect")
from prefect.testing.utilities import prefect_test_harness

T0 = 1_780_000_000.0  # UNIX seconds of the first trajectory epoch
SPEED_M_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def prefect_ephemeral():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def camera_yaml(camera) -> dict:
    return {
        "image": {"width": camera.width_px, "height": camera.height_px},
        "intrinsics": {"fx": camera.fx, "fy": camera.fy, "cx": camera.cx, "cy": camera.cy},
        "distortion": list(camera.distortion),
        "mounting": {
            "lever_arm_m": list(camera.lever_arm_m),
            "roll_deg": camera.roll_deg,
            "pitch_deg": camera.pitch_deg,
            "yaw_deg": camera.yaw_deg,
            "height_m": camera.height_m,
        },
    }


def exif_time(seconds: float) -> Image.Exif:
    exif = Image.Exif()
    ifd = exif.get_ifd(ExifTags.IFD.Exif)
    whole = int(seconds)
    when = datetime.fromtimestamp(whole, UTC)
    ifd[ExifTags.Base.DateTimeOriginal] = when.strftime("%Y:%m:%d %H:%M:%S")
    ifd[ExifTags.Base.SubsecTimeOriginal] = f"{round((seconds - whole) * 1000):03d}"
    return exif


@pytest.fixture
def frame_survey(tmp_path):
    """Four JPEG frames 0.5 m apart (EXIF times), camera.yaml, trajectory.csv; a crack along the road."""
    folder = tmp_path / "road-9"
    folder.mkdir()
    (folder / "camera.yaml").write_text(yaml.safe_dump(camera_yaml(DOWN)))
    rows = ["time,lat,lon,height,roll,pitch,heading,pos_accuracy_m"]
    for k in range(31):  # 10 Hz, 3 s, driving north at 10 m/s
        lat, lon, h = pymap3d.enu2geodetic(0.0, SPEED_M_S * k / 10, 0.0, *ORIGIN)
        rows.append(f"{T0 + k / 10:.3f},{lat:.9f},{lon:.9f},{h:.3f},0,0,0,0.02")
    (folder / "trajectory.csv").write_text("\n".join(rows) + "\n")
    crack = np.array([[0.1, 0.05, 0.0], [0.25, 1.0, 0.0], [0.2, 1.95, 0.0]])
    for k in range(4):
        pose = drive_north(k, 0.5)
        image = render(DOWN, [enu_to_vehicle(pose, crack)])
        Image.fromarray(np.repeat(image[:, :, None], 3, axis=2)).save(
            folder / f"f{k:03d}.jpg", quality=95, exif=exif_time(T0 + k * 0.5 / SPEED_M_S)
        )
    return folder


def run(*args):
    from flows.cli import cli

    return CliRunner().invoke(cli, ["run", *args])


def test_frame_mode_maps_frames_into_a_geopackage_and_a_rerun_skips_them(frame_survey, tmp_path, test_models):
    late = frame_survey / "late.jpg"
    Image.open(frame_survey / "f000.jpg").save(late, exif=exif_time(T0 + 100.0))
    Image.open(frame_survey / "f000.jpg").save(frame_survey / "notime.jpg")
    Image.new("RGB", (64, 48)).save(frame_survey / "small.jpg", exif=exif_time(T0 + 1.0))
    store = str(tmp_path / "map.gpkg")
    result = run(str(frame_survey), "--store", store)
    assert result.exit_code == 1, result.output
    assert "4/7 scenes" in result.output
    assert "small.jpg: is 64x48 px, but the camera file is for 960x600" in result.output
    assert "late.jpg: its time 1780000100.000 s is outside the trajectory" in result.output
    assert "notime.jpg: has no EXIF DateTimeOriginal" in result.output
    assert "Traceback" not in result.output
    with sqlite3.connect(store) as con:
        scenes = {
            r[0]: r[1:]
            for r in con.execute("SELECT scene_id, status, chip_count, geom, inference FROM scenes")
        }
        columns = {r[1] for r in con.execute("PRAGMA table_info(cracks)")}
    assert {"gsd_mm", "range_m", "pos_accuracy_m", "source_frames"} <= columns
    assert [s for s, row in scenes.items() if row[0] == "done"] == ["f000", "f001", "f002", "f003"]
    # which network mapped each frame (the CPU's choice of graph: fp32 or int8)
    assert {scenes[f][3] for f in ("f000", "f001", "f002", "f003")} <= {
        "onnxruntime fp32",
        "onnxruntime int8",
    }
    assert all(scenes[f][1] > 0 for f in ("f000", "f001"))
    from pipeline import gpkg

    footprint = gpkg.decode(scenes["f001"][2])  # the ground trapezoid, lon/lat, around the camera
    lat, lon, _ = pymap3d.enu2geodetic(0.0, 1.0, 0.0, *ORIGIN)
    assert footprint.contains(shapely.Point(lon, lat)) and 1.5 < footprint.area * 111e3 * 75e3 < 4.0
    again = run(str(frame_survey), "--store", store)
    assert again.output.count("skipped") >= 4, again.output  # not segmented again
    assert "4 unchanged and skipped" in again.output
    bad = camera_yaml(DOWN)
    bad["intrinsics"]["fx"] = -900.0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    refused = run(str(frame_survey), "--store", store, "--camera", str(tmp_path / "bad.yaml"))
    assert refused.exit_code != 0
    assert "bad.yaml: focal lengths fx=-900.0, fy=900.0 must be positive" in refused.output
    assert "Traceback" not in refused.output


def test_frame_mode_publishes_merged_cracks_to_postgis(
    frame_survey, tmp_path, pg_database, test_models, monkeypatch
):
    """The real flow into PostGIS; the darkness stand-in backend gives known cracks."""
    from models.registry import resolve
    from pipeline import survey
    from pipeline.stores import open_store

    monkeypatch.setattr(survey, "cached_backend", lambda spec, backend: (resolve(spec), _Darkness()))
    result = run(str(frame_survey), "--store", pg_database, "--output", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    store = open_store(pg_database)
    try:
        cracks = [c for batch in store.query() for c in batch]
    finally:
        store.close()
    assert len(cracks) == 1  # one crack in four frames: one line
    crack = cracks[0]
    lon, lat = np.asarray(crack["geometry"].coords).T
    from pipeline.measure import GEOD

    assert GEOD.line_length(lon, lat) == pytest.approx(crack["length_m"])
    assert crack["length_m"] == pytest.approx(0.9618 + 0.9513, rel=0.01)
    assert len(json.loads(crack["source_frames"])) >= 3
    assert crack["pos_accuracy_m"] == pytest.approx(0.02) and 1.5 < crack["gsd_mm"] < 3.0
    assert 1.9 < crack["range_m"] < 2.3
    assert crack["crack_type"] == "longitudinal"  # typed when mapped, along the direction of travel
    store = open_store(pg_database)
    try:  # what reprocessing needs, kept with the survey (migration 0005)
        settings = store.frame_survey("road-9")
        assert store.frame_survey("no-such-survey") is None
    finally:
        store.close()
    assert settings["camera"] == str((frame_survey / "camera.yaml").resolve())
    assert settings["trajectory"] == str((frame_survey / "trajectory.csv").resolve())
    assert settings["frame_time"] == "exif" and settings["max_gap_s"] == 1.0
