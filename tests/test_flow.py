import sqlite3

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from conftest import write_scene

pytest.importorskip("prefect")
from prefect.testing.utilities import prefect_test_harness  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def prefect_ephemeral():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def survey(tmp_path):
    folder = tmp_path / "road-7"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_scene(folder / f"{name}.tif", rng.integers(100, 200, (3, 500, 700), dtype=np.uint8))
    return folder


def scenes_table(store):
    with sqlite3.connect(store) as con:
        return con.execute("SELECT scene_id, status, error FROM scenes ORDER BY scene_id").fetchall()


def test_flow_maps_a_survey_and_a_rerun_leaves_the_same_rows(survey, tmp_path, test_models):
    from flows.survey import process_survey

    store = str(tmp_path / "map.gpkg")
    runs = []
    for _ in range(2):
        state = process_survey([str(survey)], store, return_state=True)
        assert state.is_completed()
        runs.append(state.result())
    rows, rerun = runs
    assert [r["scene_id"] for r in rows] == ["a", "b"] and all(r["chips"] == 4 for r in rows)
    assert [r["status"] for r in rerun] == ["skipped", "skipped"]  # unchanged sources
    published = [(r["chips"], r["cracks"], r["length_m"]) for r in rows]
    assert [(r["chips"], r["cracks"], r["length_m"]) for r in rerun] == published  # what they hold
    assert [s[:2] for s in scenes_table(store)] == [("a", "done"), ("b", "done")]
    with sqlite3.connect(store) as con:
        survey_ids = con.execute("SELECT DISTINCT survey_id, model_name FROM scenes").fetchall()
    assert survey_ids == [("road-7", "test-b16")]
    with rasterio.open(rows[0]["probability"]) as cog:
        assert cog.dtypes[0] == "uint8" and cog.crs.to_epsg() == 32633
        assert cog.profile.get("tiled") and cog.overviews(1) == [] or cog.profile["blockxsize"] == 512


def test_bad_scenes_fail_alone_with_clear_errors(survey, tmp_path, test_models):
    (survey / "c-notes.tif").write_text("not an image")
    with rasterio.open(survey / "d-nocrs.tif", "w", driver="GTiff", width=50, height=50, count=3,
                       dtype="uint8") as ds:
        ds.write(np.zeros((3, 50, 50), np.uint8))
    write_scene(survey / "e-empty.tif", np.zeros((3, 100, 100), np.uint8), nodata=0)
    store = str(tmp_path / "map.gpkg")
    result = CliRunner().invoke(__import__("flows.cli").cli.cli,
                                ["run", str(survey), "--store", store])
    assert result.exit_code == 1, result.output
    assert "2/5 scenes" in result.output
    table = {s[0]: s[1:] for s in scenes_table(store)}
    assert table["a"][0] == table["b"][0] == "done"
    assert "c-notes.tif: not a readable raster" in table["c-notes"][1]
    assert "d-nocrs.tif: has no CRS" in table["d-nocrs"][1]
    assert "e-empty.tif: is all nodata" in table["e-empty"][1]


def test_cli_run_succeeds_with_a_summary(survey, tmp_path, test_models):
    from flows.cli import cli

    store = tmp_path / "out" / "map.gpkg"
    result = CliRunner().invoke(cli, ["run", str(survey / "a.tif"), "--store", str(store),
                                      "--survey", "s1", "--model", "test-b16:1.0.0"])
    assert result.exit_code == 0, result.output
    assert "1/1 scenes" in result.output and store.exists()
    assert (tmp_path / "out" / "map-probability" / "s1" / "a.test-b16-1.0.0.tif").exists()


def test_a_configured_network_rates_the_survey_sections_after_mapping(survey, tmp_path, test_models,
                                                                      monkeypatch):
    import pyogrio
    import shapely

    from flows.survey import process_survey
    from pipeline.store import open_store

    network = tmp_path / "roads.geojson"
    road = shapely.LineString([(499999.0, 5599999.5), (500002.0, 5599999.5)])
    pyogrio.raw.write(str(network), shapely.to_wkb(np.array([road], dtype=object)),
                      field_data=[np.array(["R7"], dtype=object)], fields=["road_id"], crs="EPSG:32633",
                      geometry_type="LineString", driver="GeoJSON")
    monkeypatch.setenv("CRACKMAP_NETWORK", str(network))  # as a deployment configures it
    store = str(tmp_path / "map.gpkg")
    state = process_survey([str(survey)], store, return_state=True)
    assert state.is_completed(), state.message
    target = open_store(store)
    sections = target.read_layer("current_sections", {"survey_id": "road-7", "level": "section"})
    cracks = [r for batch in target.query() for r in batch]
    target.close()
    assert [(r["road_id"], r["from_m"], r["to_m"]) for r in sections] == [("R7", 0.0, 3.0)]
    assert sections[0]["coverage"] > 0 and sections[0]["models"] == "test-b16:1.0.0"
    assert all(c["crack_type"] is not None for c in cracks)
