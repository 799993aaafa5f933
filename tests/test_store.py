import dataclasses
import sqlite3

import numpy as np
import pyogrio
import pytest

from conftest import paint_crack, write_scene
from pipeline.errors import StoreError
from pipeline.scene import SceneOptions, process_scene
from pipeline.store import DEFAULT_CRS, RunInfo, open_store

RUN = RunInfo("survey-a", "run-1", "test-b16", "1.0.0", "abc")


class Model:
    spec, threshold = "test:1", 0.5


@pytest.fixture
def result(tmp_path, darkness):
    pixels = np.full((3, 700, 900), 220, np.uint8)
    paint_crack(pixels, (50, 50), (650, 850), 5)
    paint_crack(pixels, (600, 100), (600, 500), 3)
    path = write_scene(tmp_path / "scene.tif", pixels)
    return process_scene(str(path), darkness, Model(), tmp_path / "p.tif", DEFAULT_CRS, SceneOptions())


def crack_rows(path):
    with sqlite3.connect(path) as con:
        return con.execute("SELECT crack_id, model_version, length_m FROM cracks ORDER BY crack_id").fetchall()


def test_gdal_reads_the_layers_with_crs_and_fields(tmp_path, result):
    store = open_store(tmp_path / "map.gpkg")
    store.publish(result, RUN)
    store.close()
    info = pyogrio.read_info(tmp_path / "map.gpkg", layer="cracks")
    assert info["crs"] == "EPSG:4326" and info["geometry_type"] == "LineString"
    assert info["features"] == 2
    for field in ("crack_id", "survey_id", "scene_id", "model_name", "model_version", "run_id",
                  "length_m", "width_mean_mm", "width_max_mm", "orientation_deg", "confidence",
                  "severity", "created_at"):
        assert field in info["fields"]
    _, _, geometry, fields = pyogrio.raw.read(tmp_path / "map.gpkg", layer="cracks")
    assert len(geometry) == 2
    scenes = pyogrio.read_info(tmp_path / "map.gpkg", layer="scenes")
    assert scenes["geometry_type"] == "Polygon" and scenes["features"] == 1
    # the spatial index answers a bbox query through GDAL
    minx, miny, maxx, maxy = result.footprint.bounds
    _, _, hits, _ = pyogrio.raw.read(tmp_path / "map.gpkg", layer="cracks", bbox=(minx, miny, maxx, maxy))
    assert len(hits) == 2


def test_the_same_scene_twice_leaves_the_same_rows(tmp_path, result):
    for _ in range(2):
        store = open_store(tmp_path / "map.gpkg")
        store.publish(result, dataclasses.replace(RUN, run_id=f"run-{_}"))
        store.close()
    rows = crack_rows(tmp_path / "map.gpkg")
    assert len(rows) == 2 and len({r[0] for r in rows}) == 2


def test_other_model_versions_are_untouched(tmp_path, result):
    store = open_store(tmp_path / "map.gpkg")
    store.publish(result, RUN)
    store.publish(result, dataclasses.replace(RUN, model_version="2.0.0"))
    store.publish(result, dataclasses.replace(RUN, model_version="2.0.0"))
    store.close()
    assert sorted(r[1] for r in crack_rows(tmp_path / "map.gpkg")) == ["1.0.0"] * 2 + ["2.0.0"] * 2


def test_a_failed_publish_leaves_the_previous_rows(tmp_path, result):
    store = open_store(tmp_path / "map.gpkg")
    store.publish(result, RUN)
    before = crack_rows(tmp_path / "map.gpkg")
    bad = dataclasses.replace(result, cracks=(result.cracks[0], dataclasses.replace(result.cracks[1], severity="bogus")))
    with pytest.raises(StoreError, match="nothing was written"):
        store.publish(bad, RUN)  # fails on the second row, after the delete
    store.close()
    assert crack_rows(tmp_path / "map.gpkg") == before


def test_failed_scene_is_recorded_and_keeps_its_cracks(tmp_path, result):
    store = open_store(tmp_path / "map.gpkg")
    store.publish(result, RUN)
    store.mark_failed(result.scene.uri, result.scene.scene_id, RUN, "scene.tif: truncated")
    store.close()
    with sqlite3.connect(tmp_path / "map.gpkg") as con:
        assert con.execute("SELECT status, error FROM scenes").fetchall() == [("failed", "scene.tif: truncated")]
    assert len(crack_rows(tmp_path / "map.gpkg")) == 2


def test_store_urls_are_checked(tmp_path):
    with pytest.raises(StoreError, match="ending in .gpkg"):
        open_store(tmp_path / "map.shp")
    (tmp_path / "junk.gpkg").write_text("junk")
    with pytest.raises(StoreError, match="junk.gpkg: cannot open"):
        open_store(tmp_path / "junk.gpkg")


def test_published_sha256_tells_what_a_scene_was_made_from(tmp_path, result):
    store = open_store(tmp_path / "map.gpkg")
    key = ("survey-a", result.scene.scene_id, "test-b16")
    assert store.published_sha256(*key, "1.0.0") is None
    store.publish(result, RUN)
    assert store.published_sha256(*key, "1.0.0") == result.sha256
    assert store.published_sha256(*key, "2.0.0") is None
    store.mark_failed(result.scene.uri, result.scene.scene_id, RUN, "broken")
    assert store.published_sha256(*key, "1.0.0") is None
    store.close()
