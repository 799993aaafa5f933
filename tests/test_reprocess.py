"""Reprocessing with a second model version, in ephemeral mode (prefect_test_harness)."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import paint_crack, write_scene
from test_frame_survey import frame_survey  # noqa: F401  (a fixture: four frames, camera, trajectory)
from test_frames import _Darkness

pytest.importorskip("prefect")
from prefect.testing.utilities import prefect_test_harness  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def prefect_ephemeral():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory, model_root):
    """test-b16 2.0.0: the same network with other (seeded) weights, in a registry of its own."""
    torch = pytest.importorskip("torch")
    from models.hrsegnet import create
    from models.package import package

    root = tmp_path_factory.mktemp("models-v2")
    torch.manual_seed(1)
    checkpoint = root / "untrained-2.pt"
    torch.save(
        {
            "state_dict": create("b16").state_dict(),
            "variant": "b16",
            "threshold": 0.5,
            "val_metrics": {},
            "data": {"datasets": []},
            "recipe": {"untrained": True},
        },
        checkpoint,
    )
    package(checkpoint, "test-b16", "2.0.0", root, summary="untrained, other seed, for tests")
    return root


@pytest.fixture
def two_versions(test_models, v2_root, monkeypatch):
    monkeypatch.setenv("CRACKMAP_MODELS", f"{test_models}:{v2_root}")


@pytest.fixture
def mapped(tmp_path, test_models):
    """A store with survey road-5 (scenes a, b) and survey road-6 (scene c) mapped with 1.0.0."""
    from flows.survey import process_survey

    store = str(tmp_path / "map.gpkg")
    for survey, names in (("road-5", "ab"), ("road-6", "c")):
        folder = tmp_path / survey
        folder.mkdir()
        for i, name in enumerate(names):
            pixels = np.random.default_rng(i).integers(150, 220, (3, 500, 700), dtype=np.uint8)
            paint_crack(pixels, (40, 30 + 100 * i), (460, 650), 6)
            write_scene(folder / f"{name}.tif", pixels)
        assert process_survey([str(folder)], store, model="test-b16:1.0.0", return_state=True).is_completed()
    return store


def rows(store, sql):
    with sqlite3.connect(store) as con:
        return con.execute(sql).fetchall()


def test_reprocess_keeps_both_versions_switches_current_and_reports_changes(mapped, two_versions):
    from flows.reprocess import reprocess
    from pipeline.stores import open_store

    old_cracks = rows(mapped, "SELECT count(*) FROM cracks")[0][0]
    state = reprocess(
        mapped, "test-b16:2.0.0", survey_id="road-5", from_model="test-b16:1.0.0", return_state=True
    )
    assert state.is_completed(), state
    report = state.result()
    assert [(r["survey_id"], r["scene_id"], r["status"], r["old_model"], r["new_model"]) for r in report] == [
        ("road-5", "a", "done", "test-b16:1.0.0", "test-b16:2.0.0"),
        ("road-5", "b", "done", "test-b16:1.0.0", "test-b16:2.0.0"),
    ]
    assert rows(mapped, "SELECT count(*) FROM cracks WHERE model_version = '1.0.0'")[0][0] == old_cracks
    assert rows(
        mapped, "SELECT survey_id, scene_id, model_version FROM scenes WHERE is_current ORDER BY 1, 2"
    ) == [("road-5", "a", "2.0.0"), ("road-5", "b", "2.0.0"), ("road-6", "c", "1.0.0")]
    assert rows(mapped, "SELECT DISTINCT model_version FROM current_cracks WHERE survey_id = 'road-5'") in (
        [("2.0.0",)],
        [],
    )
    store = open_store(mapped)
    old = store.scene_summaries("road-5", "test-b16", "1.0.0")
    new = store.scene_summaries("road-5", "test-b16", "2.0.0")
    store.close()
    for r in report:
        before, after = old[r["scene_id"]], new[r["scene_id"]]
        assert (r["cracks_old"], r["cracks_new"]) == (before["crack_count"], after["crack_count"])
        assert r["cracks_delta"] == after["crack_count"] - before["crack_count"]
        assert r["length_m_new"] == pytest.approx(after["total_length_m"], abs=1e-3)
        assert r["high_m_old"] == pytest.approx(before["length_m_by_severity"]["high"], abs=1e-3)
    rerun = reprocess(mapped, "test-b16:2.0.0", survey_id="road-5", return_state=True)
    assert rerun.is_completed() and rerun.result() == []  # they show 2.0.0 now: nothing to do


def test_cli_reprocess_by_bbox_prints_the_changes(mapped, two_versions):
    from flows.cli import cli
    from pipeline.stores import SceneSelection, open_store

    store = open_store(mapped)
    c = store.scenes(SceneSelection(survey_id="road-6"))[0]
    store.close()
    lon, lat = rows(
        mapped,
        "SELECT (minx + maxx) / 2, (miny + maxy) / 2 FROM rtree_scenes_geom r "
        "JOIN scenes s ON s.fid = r.id WHERE s.scene_id = 'c'",
    )[0]
    result = CliRunner().invoke(
        cli,
        [
            "reprocess",
            mapped,
            "--model",
            "test-b16:2.0.0",
            "--bbox",
            str(lon - 1e-4),
            str(lat - 1e-4),
            str(lon + 1e-4),
            str(lat + 1e-4),
            "--since",
            c["processed_at"],
        ],
    )
    assert result.exit_code == 0, result.output
    assert "road-6/c" in result.output and "road-5" not in result.output
    assert "1/1 scenes now show test-b16:2.0.0" in result.output
    assert rows(mapped, "SELECT model_version FROM scenes WHERE scene_id = 'c' AND is_current") == [
        ("2.0.0",)
    ]


def test_a_scene_whose_source_is_gone_fails_alone(mapped, two_versions, tmp_path):
    from flows.reprocess import reprocess

    (tmp_path / "road-5" / "a.tif").unlink()
    state = reprocess(mapped, "test-b16:2.0.0", survey_id="road-5", return_state=True)
    assert state.is_failed() and state.message == "1 of 2 scenes failed: road-5/a"
    assert rows(
        mapped,
        "SELECT scene_id, model_version FROM scenes WHERE is_current AND survey_id = 'road-5' ORDER BY 1",
    ) == [("a", "1.0.0"), ("b", "2.0.0")]


def test_a_frame_survey_is_reprocessed_whole_with_the_settings_it_was_mapped_with(
    frame_survey,  # noqa: F811  (the fixture imported above)
    tmp_path,
    two_versions,
    monkeypatch,
):
    """Frames are not rasters: reprocess maps them with their camera and trajectory, all together.

    The darkness stand-in gives one known crack through the four frames, whatever the version.
    """
    from flows.reprocess import reprocess
    from flows.survey import process_survey
    from models.registry import resolve
    from pipeline import survey

    monkeypatch.setattr(survey, "cached_backend", lambda spec, backend: (resolve(spec), _Darkness()))
    store = str(tmp_path / "frames.gpkg")
    assert process_survey(
        [str(frame_survey)], store, model="test-b16:1.0.0", return_state=True
    ).is_completed()
    lon, lat = rows(
        store,
        "SELECT (minx + maxx) / 2, (miny + maxy) / 2 FROM rtree_scenes_geom r "
        "JOIN scenes s ON s.fid = r.id WHERE s.scene_id = 'f003'",
    )[0]
    (frame_survey / "camera.yaml").rename(tmp_path / "camera.yaml")  # the stored path is what counts...
    state = reprocess(
        store, "test-b16:2.0.0", bbox=[lon - 1e-7, lat - 1e-7, lon + 1e-7, lat + 1e-7], return_state=True
    )
    assert state.is_failed() and "camera.yaml: cannot read the camera file" in state.message
    (tmp_path / "camera.yaml").rename(frame_survey / "camera.yaml")  # ...and it is back
    state = reprocess(
        store, "test-b16:2.0.0", bbox=[lon - 1e-7, lat - 1e-7, lon + 1e-7, lat + 1e-7], return_state=True
    )
    assert state.is_completed(), state
    # one frame selected, the survey reprocessed whole: its frames' views of a crack are merged
    assert [(r["scene_id"], r["status"], r["new_model"]) for r in state.result()] == [
        (f"f00{k}", "done", "test-b16:2.0.0") for k in range(4)
    ]
    assert rows(store, "SELECT DISTINCT model_version FROM scenes WHERE is_current") == [("2.0.0",)]
    new = rows(
        store,
        "SELECT scene_id, length_m, source_frames, crack_type FROM cracks WHERE model_version = '2.0.0'",
    )
    old = rows(
        store,
        "SELECT scene_id, length_m, source_frames, crack_type FROM cracks WHERE model_version = '1.0.0'",
    )
    assert new == old and len(new) == 1  # one line through four frames, both versions kept
    assert new[0][1] == pytest.approx(0.9618 + 0.9513, rel=0.01) and new[0][3] == "longitudinal"
    assert rows(store, "SELECT count(*) FROM scenes WHERE status = 'failed'") == [(0,)]


def test_retries_only_transient_errors(tmp_path):
    import socket
    import sqlite3 as sq

    from flows.policy import is_transient
    from pipeline.errors import SceneReadError, StorageError, StoreError
    from pipeline.stores import open_store
    from pipeline.stores.postgis import connect

    assert is_transient(StorageError("s3://b/a.tif", "storage temporarily unavailable", transient=True))
    assert is_transient(TimeoutError("read timed out"))
    assert not is_transient(SceneReadError("a.tif", "not a readable raster"))
    assert not is_transient(StorageError("s3://b/a.tif", "no such object"))
    assert not is_transient(ValueError("bad bbox"))
    # A GeoPackage another writer holds: the store's own error says transient, by SQLite's code
    store = tmp_path / "m.gpkg"
    open_store(store).close()
    holder = sq.connect(store, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        waiting = sq.connect(store, timeout=0, isolation_level=None)
        with pytest.raises(sq.OperationalError) as locked:
            waiting.execute("BEGIN IMMEDIATE")
        waiting.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert is_transient(locked.value)
    assert is_transient(StoreError("m.gpkg: publishing failed", transient=True))
    assert not is_transient(StoreError("m.gpkg: cannot open as a crackmap GeoPackage"))
    # A closed port on loopback: connection refused, no SQLSTATE, transient
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StoreError) as refused:
        connect(f"postgresql://nobody@127.0.0.1:{port}/nothing?connect_timeout=5")
    assert refused.value.transient and is_transient(refused.value)
