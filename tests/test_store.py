"""The store tests: the shared ones (``store_url``) run on a GeoPackage and on PostGIS."""

import dataclasses
import json
import sqlite3

import numpy as np
import psycopg
import pyogrio
import pytest
import shapely
from click.testing import CliRunner
from conftest import paint_crack, write_scene
from rasterio.crs import CRS

from pipeline.cli import cli
from pipeline.errors import StoreError
from pipeline.scene import SceneOptions, detect_cracks
from pipeline.stores import DEFAULT_CRS, CrackQuery, RunInfo, open_store

RUN = RunInfo("survey-a", "run-1", "test-b16", "1.0.0", "abc")
V2 = dataclasses.replace(RUN, model_version="2.0.0", run_id="run-2")


class Model:
    spec, threshold, line_settings = "test:1", 0.5, {}  # no line settings chosen for it


@pytest.fixture
def result(tmp_path, darkness):
    pixels = np.full((3, 700, 900), 220, np.uint8)
    paint_crack(pixels, (50, 50), (650, 850), 5)
    paint_crack(pixels, (600, 100), (600, 500), 3)
    path = write_scene(tmp_path / "scene.tif", pixels)
    return detect_cracks(str(path), darkness, Model(), tmp_path / "p.tif", DEFAULT_CRS, SceneOptions())


def rows(url, sql):
    """Rows of a query on either store (plain SQL both understand)."""
    if str(url).startswith("postgresql://"):
        with psycopg.connect(url) as con:
            return con.execute(sql).fetchall()
    with sqlite3.connect(url) as con:
        return con.execute(sql).fetchall()


def crack_rows(url):
    return rows(url, "SELECT CAST(crack_id AS TEXT), model_version, length_m FROM cracks ORDER BY 1")


def scene_with(result, scene_id, cracks):
    """``result`` as scene ``scene_id`` with cracks given as (lon/lat coordinates, severity)."""
    base = result.cracks[0]
    lines = tuple(
        dataclasses.replace(base, geometry=shapely.LineString(coords), severity=severity)
        for coords, severity in cracks
    )
    return dataclasses.replace(
        result, scene=dataclasses.replace(result.scene, scene_id=scene_id), cracks=lines
    )


def found(store, **selection):
    """(survey, scene, model version, severity) of every crack a query returns, sorted."""
    return sorted(
        (r["survey_id"], r["scene_id"], r["model_version"], r["severity"])
        for batch in store.query(CrackQuery(**selection), batch_size=2)
        for r in batch
    )


def test_gdal_reads_the_layers_with_crs_and_fields(tmp_path, result):
    store = open_store(tmp_path / "map.gpkg")
    store.publish(result, RUN)
    store.close()
    info = pyogrio.read_info(tmp_path / "map.gpkg", layer="cracks")
    assert info["crs"] == "EPSG:4326" and info["geometry_type"] == "LineString"
    assert info["features"] == 2
    for field in (
        "crack_id",
        "survey_id",
        "scene_id",
        "model_name",
        "model_version",
        "run_id",
        "length_m",
        "width_mean_mm",
        "width_max_mm",
        "orientation_deg",
        "confidence",
        "severity",
        "created_at",
    ):
        assert field in info["fields"]
    _, _, geometry, fields = pyogrio.raw.read(tmp_path / "map.gpkg", layer="cracks")
    assert len(geometry) == 2
    scenes = pyogrio.read_info(tmp_path / "map.gpkg", layer="scenes")
    assert scenes["geometry_type"] == "Polygon" and scenes["features"] == 1
    # the spatial index answers a bbox query through GDAL
    minx, miny, maxx, maxy = result.footprint.bounds
    _, _, hits, _ = pyogrio.raw.read(tmp_path / "map.gpkg", layer="cracks", bbox=(minx, miny, maxx, maxy))
    assert len(hits) == 2
    # the current_cracks view is a layer too
    _, _, current, _ = pyogrio.raw.read(tmp_path / "map.gpkg", layer="current_cracks")
    assert len(current) == 2


def test_a_geopackage_without_the_current_flag_gets_it(tmp_path, result):
    store = open_store(tmp_path / "map.gpkg")
    store.publish(result, RUN)
    store.publish(result, V2, promote=False)
    store.close()
    with sqlite3.connect(tmp_path / "map.gpkg") as con:  # as written before is_current existed
        for view in ("current_cracks", "current_pattern_areas"):  # (road-condition layers came later)
            con.executescript(
                f"DROP VIEW {view}; DELETE FROM gpkg_contents WHERE table_name = '{view}'; "
                f"DELETE FROM gpkg_geometry_columns WHERE table_name = '{view}'"
            )
        con.executescript("DROP INDEX scenes_one_current; ALTER TABLE scenes DROP COLUMN is_current")
    store = open_store(tmp_path / "map.gpkg")
    assert {v for *_, v, _ in found(store)} == {"2.0.0"}  # the latest successful version
    store.close()


def test_each_scene_row_says_which_network_mapped_it(store_url, result):
    """``scenes.inference``: one model version can run as an FP32 or an INT8 graph (their pixels
    differ slightly), so each scene row says which ran; a failed scene's row says none."""
    from pipeline.stores import SceneSelection

    assert result.inference == "darkness"  # detect_cracks records the backend it was given
    with open_store(store_url) as store:
        store.publish(dataclasses.replace(result, inference="onnxruntime int8"), RUN)
        assert [r["inference"] for r in store.scenes(SceneSelection())] == ["onnxruntime int8"]
        store.mark_failed(result.scene.uri, result.scene.scene_id, RUN, "scene.tif: truncated")
    assert rows(store_url, "SELECT status, inference FROM scenes") == [("failed", None)]


def test_a_geopackage_without_the_inference_column_gets_it(tmp_path, result):
    with open_store(tmp_path / "map.gpkg") as store:
        store.publish(result, RUN)
    with sqlite3.connect(tmp_path / "map.gpkg") as con:  # as written before the column existed
        con.execute("ALTER TABLE scenes DROP COLUMN inference")
    with open_store(tmp_path / "map.gpkg") as store:
        store.publish(result, V2)
    assert rows(tmp_path / "map.gpkg", "SELECT model_version, inference FROM scenes ORDER BY 1") == [
        ("1.0.0", None),
        ("2.0.0", "darkness"),
    ]


def test_the_same_scene_twice_leaves_the_same_rows(store_url, result):
    for _ in range(2):
        store = open_store(store_url)
        store.publish(result, dataclasses.replace(RUN, run_id=f"run-{_}"))
        store.close()
    cracks = crack_rows(store_url)
    assert len(cracks) == 2 and len({r[0] for r in cracks}) == 2
    assert rows(store_url, "SELECT count(*) FROM scenes") == [(1,)]


def test_other_model_versions_are_untouched(store_url, result):
    store = open_store(store_url)
    store.publish(result, RUN)
    store.publish(result, V2)
    store.publish(result, V2)
    store.close()
    assert sorted(r[1] for r in crack_rows(store_url)) == ["1.0.0"] * 2 + ["2.0.0"] * 2


def test_a_failed_publish_leaves_the_previous_rows(store_url, result):
    store = open_store(store_url)
    store.publish(result, RUN)
    before = crack_rows(store_url)
    bad = dataclasses.replace(
        result, cracks=(result.cracks[0], dataclasses.replace(result.cracks[1], severity="bogus"))
    )
    with pytest.raises(StoreError, match="nothing was written"):
        store.publish(bad, RUN)  # fails on the second row, after the delete
    store.close()
    assert crack_rows(store_url) == before


def test_failed_scene_is_recorded_and_keeps_its_cracks(store_url, result):
    store = open_store(store_url)
    store.publish(result, RUN)
    store.mark_failed(result.scene.uri, result.scene.scene_id, RUN, "scene.tif: truncated")
    store.close()
    assert rows(store_url, "SELECT status, error FROM scenes") == [("failed", "scene.tif: truncated")]
    assert len(crack_rows(store_url)) == 2


def test_store_urls_are_checked(tmp_path):
    with pytest.raises(StoreError, match="ending in .gpkg"):
        open_store(tmp_path / "map.shp")
    (tmp_path / "junk.gpkg").write_text("junk")
    with pytest.raises(StoreError, match="junk.gpkg: cannot open"):
        open_store(tmp_path / "junk.gpkg")


def test_published_sha256_tells_what_a_scene_was_made_from(store_url, result):
    store = open_store(store_url)
    key = ("survey-a", result.scene.scene_id, "test-b16")
    assert store.published_sha256(*key, "1.0.0") is None
    store.publish(result, RUN)
    assert store.published_sha256(*key, "1.0.0") == result.sha256
    assert store.published_sha256(*key, "2.0.0") is None
    store.mark_failed(result.scene.uri, result.scene.scene_id, RUN, "broken")
    assert store.published_sha256(*key, "1.0.0") is None
    store.close()


def test_publishing_makes_a_version_current_unless_told_not_to(store_url, result):
    store = open_store(store_url)
    store.publish(result, RUN)
    store.publish(result, V2, promote=False)  # reprocessed, not yet promoted
    assert {v for *_, v, _ in found(store)} == {"1.0.0"}
    assert store.promote("survey-a", None, "test-b16", "2.0.0") == 1
    assert {v for *_, v, _ in found(store)} == {"2.0.0"}
    store.publish(result, RUN, promote=False)  # republishing 1.0.0 does not take it back
    assert {v for *_, v, _ in found(store)} == {"2.0.0"}
    with pytest.raises(StoreError, match="elsewhere has no successful publication"):
        store.promote("survey-a", [result.scene.scene_id, "elsewhere"], "test-b16", "1.0.0")
    assert {v for *_, v, _ in found(store)} == {"2.0.0"}  # nothing was changed
    assert store.promote("survey-a", [result.scene.scene_id], "test-b16", "1.0.0") == 1
    store.close()
    assert rows(store_url, "SELECT model_version FROM scenes WHERE is_current") == [("1.0.0",)]
    assert len(rows(store_url, "SELECT * FROM current_cracks")) == 2


def test_query_by_bbox_severity_survey_and_model_version(store_url, result):
    west = [((15.00, 50.0), (15.01, 50.0)), ((15.00, 50.1), (15.01, 50.1))]
    east = [((16.00, 50.0), (16.01, 50.0))]
    store = open_store(store_url)
    store.publish(scene_with(result, "w", [(west[0], "low"), (west[1], "high")]), RUN)
    store.publish(scene_with(result, "e", [(east[0], "medium")]), RUN)
    store.publish(scene_with(result, "w", [(west[0], "high")]), V2, promote=False)
    store.publish(scene_with(result, "w", [(west[0], "low")]), dataclasses.replace(RUN, survey_id="survey-b"))
    a1 = [
        ("survey-a", "e", "1.0.0", "medium"),
        ("survey-a", "w", "1.0.0", "high"),
        ("survey-a", "w", "1.0.0", "low"),
    ]
    assert found(store) == sorted(a1 + [("survey-b", "w", "1.0.0", "low")])
    assert found(store, survey_id="survey-a") == a1
    assert found(store, survey_id="survey-a", scene_id="e") == a1[:1]
    assert found(store, survey_id="survey-a", severity="high") == [a1[1]]
    assert found(store, bbox=(15.5, 49.9, 16.5, 50.05)) == a1[:1]
    assert found(store, bbox=(14.9, 50.05, 15.005, 50.2)) == [a1[1]]  # reaches only the 50.1 line
    assert found(store, model_name="test-b16", model_version="2.0.0") == [("survey-a", "w", "2.0.0", "high")]
    assert found(store, model_name="other") == []
    batch = next(store.query(CrackQuery(scene_id="e")))
    assert batch[0]["geometry"].equals(shapely.LineString(east[0])) and batch[0]["length_m"] > 0
    store.close()


def test_the_query_command_streams_geojson_csv_and_gpkg(store_url, result, tmp_path):
    store = open_store(store_url)
    store.publish(result, RUN)
    store.publish(dataclasses.replace(result, cracks=result.cracks[:1]), V2, promote=False)
    store.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["query", store_url, "--survey", "survey-a"])
    assert out.exit_code == 0, out.output
    collection = json.loads(out.stdout)
    assert len(collection["features"]) == 2
    assert collection["features"][0]["geometry"]["type"] == "LineString"
    assert collection["features"][0]["properties"]["model_version"] == "1.0.0"
    out = runner.invoke(
        cli, ["query", store_url, "--model", "test-b16:2.0.0", "--out", str(tmp_path / "q.csv")]
    )
    assert out.exit_code == 0, out.output
    lines = (tmp_path / "q.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith("wkt") and "LINESTRING" in lines[1]
    out = runner.invoke(
        cli,
        ["query", store_url, "--severity", "medium", "--format", "gpkg", "--out", str(tmp_path / "q.gpkg")],
    )
    assert out.exit_code == 0, out.output
    info = pyogrio.read_info(tmp_path / "q.gpkg", layer="cracks")
    assert info["crs"] == "EPSG:4326"
    assert info["features"] == sum(c.severity == "medium" for c in result.cracks)
    out = runner.invoke(cli, ["query", store_url, "--model", ":1.0"])
    assert out.exit_code == 2 and "needs a model name" in out.output


def test_a_scene_in_a_crs_the_store_cannot_reach_is_refused(store_url, result):
    mars = CRS.from_string("IAU_2015:49900")
    alien = dataclasses.replace(result, scene=dataclasses.replace(result.scene, crs=mars))
    store = open_store(store_url)
    with pytest.raises(StoreError, match=r"IAU_2015:49900, which cannot be transformed to .*EPSG:4326"):
        store.publish(alien, RUN)
    store.close()
    assert crack_rows(store_url) == []
    unplaced = dataclasses.replace(result, scene=dataclasses.replace(result.scene, crs=None))  # a frame's own
    with open_store(store_url) as store, pytest.raises(StoreError, match="has no CRS; .*nothing was written"):
        store.publish(unplaced, RUN)
    assert crack_rows(store_url) == []


def test_scenes_select_by_survey_time_bbox_and_model_version(store_url, result):
    from pipeline.stores import SceneSelection

    west = [((15.00, 50.0), (15.01, 50.0))]
    store = open_store(store_url)
    store.publish(
        scene_with(
            dataclasses.replace(result, footprint=shapely.box(14.9, 49.9, 15.1, 50.1)),
            "w",
            [(west[0], "low")],
        ),
        RUN,
    )
    store.publish(
        scene_with(
            dataclasses.replace(result, footprint=shapely.box(15.9, 49.9, 16.1, 50.1)),
            "e",
            [(west[0], "low")],
        ),
        RUN,
    )
    store.publish(scene_with(result, "w", [(west[0], "high")]), V2, promote=False)
    store.publish(scene_with(result, "x", []), dataclasses.replace(RUN, survey_id="survey-b"))

    def ids(**selection):
        return [
            (r["survey_id"], r["scene_id"], r["model_version"])
            for r in store.scenes(SceneSelection(**selection))
        ]

    assert ids() == [("survey-a", "e", "1.0.0"), ("survey-a", "w", "1.0.0"), ("survey-b", "x", "1.0.0")]
    assert ids(survey_id="survey-a", bbox=(14.95, 49.95, 15.05, 50.05)) == [("survey-a", "w", "1.0.0")]
    assert ids(model_name="test-b16", model_version="2.0.0") == []  # 2.0.0 is not current anywhere
    assert ids(model_name="test-b16", model_version="2.0.0", current_only=False) == [
        ("survey-a", "w", "2.0.0")
    ]
    assert ids(since="2000-01-01", until="2000-12-31") == []
    assert len(ids(since="2000-01-01T00:00:00Z")) == 3
    row = store.scenes(SceneSelection(survey_id="survey-b"))[0]
    assert row["source_uri"] == result.scene.uri and row["status"] == "done" and row["is_current"] is True
    assert row["processed_at"].endswith("Z") and row["crack_count"] == 0
    store.close()


def test_scene_summaries_count_cracks_and_length_by_severity(store_url, result):
    lines = [
        (((15.00, 50.0), (15.01, 50.0)), "low"),
        (((15.00, 50.1), (15.01, 50.1)), "high"),
        (((15.00, 50.2), (15.02, 50.2)), "high"),
    ]
    store = open_store(store_url)
    store.publish(scene_with(result, "w", lines), RUN)
    store.publish(scene_with(result, "e", []), RUN)
    store.publish(scene_with(result, "w", lines[:1]), V2, promote=False)
    run1 = store.scene_summaries("survey-a", "test-b16", "1.0.0")
    assert sorted(run1) == ["e", "w"]
    assert run1["e"]["crack_count"] == 0 and run1["e"]["total_length_m"] == 0.0
    w = run1["w"]
    assert w["status"] == "done" and w["crack_count"] == 3 and w["chip_count"] == result.chip_count
    by = w["length_m_by_severity"]
    assert by["medium"] == 0.0 and 0 < by["low"] < by["high"]
    assert w["total_length_m"] == pytest.approx(sum(by.values()))
    run2 = store.scene_summaries("survey-a", "test-b16", "2.0.0", ["w", "e"])
    assert list(run2) == ["w"] and run2["w"]["crack_count"] == 1
    assert run2["w"]["length_m_by_severity"]["low"] == pytest.approx(by["low"])
    assert store.scene_summaries("survey-a", "test-b16", "9.9.9") == {}
    store.close()


def test_a_foreign_geopackage_is_refused_and_left_byte_identical(tmp_path):
    path = tmp_path / "roads.gpkg"  # another application's GeoPackage, written by GDAL
    geometry = np.array([shapely.to_wkb(shapely.LineString([(16.3, 48.2), (16.4, 48.3)]))], dtype=object)
    pyogrio.raw.write(
        path,
        geometry,
        [np.array(["A1"], dtype=object)],
        ["road"],
        driver="GPKG",
        layer="roads",
        geometry_type="LineString",
        crs="EPSG:4326",
    )
    before = path.read_bytes()
    with pytest.raises(
        StoreError,
        match="roads.gpkg: cannot open as a crackmap GeoPackage: it holds another "
        r"application's layers \(roads\); nothing was written",
    ):
        open_store(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roads.gpkg"]  # no journal, no temporary file


def test_a_store_is_created_whole_or_not_at_all(tmp_path, result):
    from pipeline.stores import GeoPackageStore

    folder = tmp_path / "out"
    ortho = CRS.from_wkt(CRS.from_proj4("+proj=ortho +lat_0=48 +lon_0=16").to_wkt())  # no EPSG code
    with pytest.raises(StoreError, match="must have an EPSG code"):
        GeoPackageStore(folder / "map.gpkg", ortho)
    assert list(folder.iterdir()) == []  # built beside it under a temporary name, never linked
    store = open_store(folder / "map.gpkg")
    store.close()
    with sqlite3.connect(folder / "map.gpkg") as con:  # whoever sees the file sees every table
        names = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    assert {"cracks", "scenes", "current_cracks", "scenes_one_current", "rtree_cracks_geom"} <= names
    assert sorted(p.name for p in folder.iterdir()) == ["map.gpkg"]
    (folder / "empty.gpkg").touch()  # an empty file is filled, in one transaction
    open_store(folder / "empty.gpkg").close()
    assert rows(folder / "empty.gpkg", "SELECT count(*) FROM scenes") == [(0,)]


MAP_SURVEY = """
import sys
from pipeline.survey import RunSettings, SceneSource, map_scene
settings = RunSettings.resolve(sys.argv[3], "road-4", sys.argv[1], "test-b16:1.0.0", "onnxruntime", force=True)
for scene_id in ("a", "b"):
    row = map_scene(SceneSource(f"{sys.argv[2]}/{scene_id}.tif", scene_id), settings)
    print(row.status, row.scene_id, row.cracks, flush=True)
"""


def test_two_runs_of_one_survey_at_once_into_one_geopackage_both_succeed(tmp_path, test_models):
    import os
    import subprocess
    import sys

    survey = tmp_path / "road-4"
    survey.mkdir()
    for seed, name in ((1, "a"), (2, "b")):
        pixels = np.random.default_rng(seed).integers(150, 220, (3, 500, 700), dtype=np.uint8)
        paint_crack(pixels, (40, 30), (460, 650), 6)
        write_scene(survey / f"{name}.tif", pixels)
    store = tmp_path / "out" / "map.gpkg"
    env = dict(os.environ, CRACKMAP_MODELS=str(test_models))
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", MAP_SURVEY, f"run-{i}", str(survey), str(store)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 2)
    ]
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
        assert [line.split()[:2] for line in out.splitlines()] == [["done", "a"], ["done", "b"]]
    scenes = rows(store, "SELECT scene_id, status FROM scenes ORDER BY scene_id")
    assert scenes == [("a", "done"), ("b", "done")]  # each scene once, whichever run published last
    total, distinct = rows(store, "SELECT count(*), count(DISTINCT crack_id) FROM cracks")[0]
    assert total == distinct
    probability = tmp_path / "out" / "map-probability" / "road-4"
    assert sorted(p.name for p in probability.iterdir()) == ["a.test-b16-1.0.0.tif", "b.test-b16-1.0.0.tif"]


def _open_and_publish(path, result, scene_id, barrier) -> str:
    barrier.wait()
    try:
        store = open_store(path)
        store.publish(scene_with(result, scene_id, [([(16.30, 48.20), (16.31, 48.21)], "low")]), RUN)
        store.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def test_writers_that_create_one_geopackage_at_once_all_succeed(tmp_path, result):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(4)
    with ProcessPoolExecutor(4, mp_context=context) as pool:
        outcomes = list(
            pool.map(
                _open_and_publish,
                [tmp_path / "map.gpkg"] * 4,
                [result] * 4,
                ["a", "b", "c", "d"],
                [barrier] * 4,
            )
        )
    assert outcomes == ["ok"] * 4
    assert sorted(r[0] for r in rows(tmp_path / "map.gpkg", "SELECT scene_id FROM scenes")) == [
        "a",
        "b",
        "c",
        "d",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.gpkg", "p.tif", "scene.tif"]


def test_query_refuses_a_bbox_that_is_not_four_finite_numbers(tmp_path, result):
    store = open_store(tmp_path / "map.gpkg")
    store.publish(result, RUN)
    store.close()
    for bbox in (["0", "0", "inf", "1"], ["nan", "0", "1", "1"], ["-inf", "-inf", "inf", "inf"]):
        refused = CliRunner().invoke(cli, ["query", str(tmp_path / "map.gpkg"), "--bbox", *bbox])
        assert refused.exit_code == 2, refused.output
        assert refused.output.strip().splitlines() == [
            f"error: bbox {' '.join(str(float(v)) for v in bbox)}: MINX MINY MAXX MAXY must be four finite "
            "numbers in the store CRS"
        ]
