import importlib.util
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from conftest import CRACKMAP, paint_crack, write_scene

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
        pixels = rng.integers(150, 220, (3, 500, 700), dtype=np.uint8)
        paint_crack(pixels, (40, 30), (460, 650), 6)  # the shipped model finds it (TRAINED)
        write_scene(folder / f"{name}.tif", pixels)
    return folder


TRAINED = "hrsegnet-b16:1.0.0"  # the shipped model: orchestration tests must see real cracks


def scenes_table(store):
    with sqlite3.connect(store) as con:
        return con.execute("SELECT scene_id, status, error FROM scenes ORDER BY scene_id").fetchall()


def test_flow_maps_a_survey_and_a_rerun_leaves_the_same_rows(survey, tmp_path, test_models):
    from flows.survey import process_survey
    from pipeline.probability import overview_factors

    store = str(tmp_path / "map.gpkg")
    runs = []
    for _ in range(2):
        state = process_survey([str(survey)], store, model=TRAINED, return_state=True)
        assert state.is_completed()
        runs.append(state.result())
    rows, rerun = runs
    assert [r.scene_id for r in rows] == ["a", "b"] and all(r.chips == 4 for r in rows)
    assert all(r.cracks >= 1 for r in rows)  # so that "the same rows" compares real rows
    assert [r.status for r in rerun] == ["skipped", "skipped"]  # unchanged sources
    published = [(r.chips, r.cracks, r.length_m) for r in rows]
    assert [(r.chips, r.cracks, r.length_m) for r in rerun] == published  # what they hold
    assert [s[:2] for s in scenes_table(store)] == [("a", "done"), ("b", "done")]
    with sqlite3.connect(store) as con:
        survey_ids = con.execute("SELECT DISTINCT survey_id, model_name FROM scenes").fetchall()
        total, distinct = con.execute("SELECT count(*), count(DISTINCT crack_id) FROM cracks").fetchone()
    assert total == distinct == sum(r.cracks for r in rows)  # the rerun added no crack twice
    assert survey_ids == [("road-7", "hrsegnet-b16")]
    with rasterio.open(rows[0].probability) as cog:
        assert cog.dtypes[0] == "uint8" and cog.crs.to_epsg() == 32633
        assert cog.profile["tiled"] and cog.profile["blockxsize"] == cog.profile["blockysize"] == 512
        assert cog.overviews(1) == overview_factors(700, 500) != []  # a COG: overviews included


def test_scenes_in_flight_map_what_one_at_a_time_maps(survey, tmp_path, test_models):
    """``in_flight=3``: three scenes of different sizes at once, their batches merged in one shared
    network, give the rows, cracks and probability rasters of a one-at-a-time run."""
    from flows.survey import process_survey
    from pipeline.survey import shared_backend

    pixels = np.random.default_rng(3).integers(150, 220, (3, 900, 420), dtype=np.uint8)
    paint_crack(pixels, (30, 40), (870, 380), 5)
    write_scene(survey / "c.tif", pixels)
    maps = {}
    for in_flight in (1, 3):
        store = tmp_path / f"map{in_flight}.gpkg"
        state = process_survey(
            [str(survey)], str(store), model=TRAINED, in_flight=in_flight, return_state=True
        )
        assert state.is_completed(), state
        rows = state.result()
        with sqlite3.connect(store) as con:
            cracks = con.execute(
                "SELECT scene_id, geom, length_m, width_mean_mm, width_max_mm, confidence, severity "
                "FROM cracks ORDER BY scene_id, geom"
            ).fetchall()
        rasters = [rasterio.open(r.probability).read(1) for r in rows]
        maps[in_flight] = (
            [(r.scene_id, r.status, r.chips, r.cracks, r.length_m) for r in rows],
            cracks,
            rasters,
        )
    (rows1, cracks1, rasters1), (rows3, cracks3, rasters3) = maps[1], maps[3]
    assert [r[0] for r in rows3] == ["a", "b", "c"] and all(r[1] == "done" for r in rows3)
    assert rows3 == rows1 and cracks3 == cracks1 and len(cracks1) >= 3
    for one, merged in zip(rasters1, rasters3, strict=True):
        np.testing.assert_array_equal(merged, one)
    assert shared_backend(TRAINED, "auto").calls > 0  # the in-flight run went through the shared network


@pytest.mark.parametrize("in_flight", ["1", "3"])
def test_bad_scenes_fail_alone_with_clear_errors(survey, tmp_path, test_models, in_flight):
    (survey / "c-notes.tif").write_text("not an image")
    with rasterio.open(
        survey / "d-nocrs.tif", "w", driver="GTiff", width=50, height=50, count=3, dtype="uint8"
    ) as ds:
        ds.write(np.zeros((3, 50, 50), np.uint8))
    write_scene(survey / "e-empty.tif", np.zeros((3, 100, 100), np.uint8), nodata=0)
    store = str(tmp_path / "map.gpkg")
    result = CliRunner().invoke(
        __import__("flows.cli").cli.cli, ["run", str(survey), "--store", store, "--in-flight", in_flight]
    )
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
    result = CliRunner().invoke(
        cli,
        ["run", str(survey / "a.tif"), "--store", str(store), "--survey", "s1", "--model", "test-b16:1.0.0"],
    )
    assert result.exit_code == 0, result.output
    assert "1/1 scenes" in result.output and store.exists()
    assert (tmp_path / "out" / "map-probability" / "s1" / "a.test-b16-1.0.0.tif").exists()


def prefect_records(flow_run_name_like: str | None = None) -> tuple[list, list, list]:
    """Flow runs, logs and artifacts the (test harness's) Prefect API holds."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(), client.read_logs(), client.read_artifacts()


def test_a_store_password_is_masked_in_output_logs_and_never_reaches_prefect(
    survey, tmp_path, test_models, postgis, pg_database, monkeypatch
):
    import os

    from flows.cli import cli

    password = os.environ.get("PGPASSWORD") or pytest.skip("the test server has no password")
    monkeypatch.delenv("PGPASSWORD")  # the URL is where the password comes from
    user, rest = pg_database.split("://", 1)[1].split("@", 1)
    url = f"postgresql://{user}:{password}@{rest}"
    result = CliRunner().invoke(
        cli,
        ["run", str(survey / "a.tif"), "--store", url, "--survey", "pw-1", "--output", str(tmp_path / "p")],
    )
    assert result.exit_code == 0, result.output
    assert f"-> postgresql://{user}@{rest}" in result.output and password not in result.output
    # a database that does not answer (nothing listens on port 9) is refused before any work, in
    # one line that names it without the password
    refused = f"postgresql://{user}:{password}@127.0.0.1:9/nowhere"
    early = CliRunner().invoke(cli, ["run", str(survey / "a.tif"), "--store", refused, "--survey", "pw-0"])
    assert early.exit_code == 2, early.output
    assert early.output.startswith(f"error: postgresql://{user}@127.0.0.1:9/nowhere: cannot connect (")
    assert password not in early.output and len(early.output.strip().splitlines()) == 1
    # one that goes away after that check fails the run's scenes, masked too, in the summary and
    # the error lines; a refused connection is transient, so the task retries it: no backoff here
    import flows.scene
    import pipeline.stores

    monkeypatch.setattr(pipeline.stores, "check_store", lambda url: None)
    monkeypatch.setattr(
        flows.scene,
        "map_scene_task",
        flows.scene.map_scene_task.with_options(retry_delay_seconds=0, retry_jitter_factor=None),
    )
    failed = CliRunner().invoke(
        cli,
        [
            "run",
            str(survey / "a.tif"),
            "--store",
            refused,
            "--survey",
            "pw-2",
            "--output",
            str(tmp_path / "p"),
        ],
    )
    assert failed.exit_code == 1 and "127.0.0.1:9" in failed.output and password not in failed.output
    runs, logs, artifacts = prefect_records()
    mine = [r for r in runs if r.parameters.get("survey_id") in ("pw-0", "pw-1", "pw-2")]
    assert len(mine) == 2 and all("***" not in str(r.parameters) for r in mine)
    assert password not in repr([r.parameters for r in runs] + [r.state for r in runs])
    assert password not in repr([log.message for log in logs])
    assert password not in repr([(a.data, a.description) for a in artifacts])


def test_a_survey_id_that_escapes_the_output_is_refused_before_any_work(survey, tmp_path, test_models):
    from flows.cli import cli
    from flows.survey import process_survey
    from pipeline.errors import IdError

    store = tmp_path / "out" / "map.gpkg"
    for survey_id, problem in (
        ("../elsewhere", "has the character '/'"),
        ("..", "'..' as a name"),
        ("x" * 10_000, "a name of 10000 bytes"),
    ):
        result = CliRunner().invoke(cli, ["run", str(survey), "--store", str(store), "--survey", survey_id])
        assert result.exit_code == 2, result.output
        assert problem in result.output and "ids are 1-100 bytes of letters" in result.output
        assert len(result.output) < 600  # one line naming the rule, not the whole id
    state = process_survey([str(survey)], str(store), survey_id="../elsewhere", return_state=True)
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), IdError)
    assert not (tmp_path / "out").exists() and not (tmp_path / "elsewhere").exists()  # nothing written


def test_a_transient_read_error_is_retried_by_the_flow(survey, tmp_path, test_models, monkeypatch):
    import flows.scene
    from flows.survey import process_survey
    from pipeline.errors import SceneReadError

    real, attempts = flows.scene.map_scene, []

    def throttled_once(source, *args, **kwargs):
        attempts.append(source.scene_id)
        if attempts.count(source.scene_id) == 1 and source.scene_id == "a":  # as raster.read_error makes it
            raise SceneReadError(
                source.uri, "storage temporarily unavailable (retried with backoff) (503)", transient=True
            )
        return real(source, *args, **kwargs)

    monkeypatch.setattr(flows.scene, "map_scene", throttled_once)
    monkeypatch.setattr(
        flows.scene,
        "map_scene_task",
        flows.scene.map_scene_task.with_options(retry_delay_seconds=0, retry_jitter_factor=None),
    )
    state = process_survey([str(survey)], str(tmp_path / "map.gpkg"), return_state=True)
    assert state.is_completed(), state
    assert attempts == ["a", "a", "b"]  # the policy said transient: the task ran again
    assert [r.status for r in state.result()] == ["done", "done"]


def run_cli(*args: str, timeout: int = 600, **extra_env: str):
    """``crackmap ARGS`` through the console script's entry point (``flows.launch``)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | extra_env
    return subprocess.run(
        [*CRACKMAP, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("--model", "nope:1.0.0", "error: unknown model 'nope'"),  # refused before the API starts
        ("--backend", "tensorrt", "error: the tensorrt backend needs tensorrt"),  # at the model's load
    ],
)
def test_a_model_that_cannot_load_ends_the_run_in_one_line(
    survey, tmp_path, test_models, option, value, error
):
    """An unknown model is refused with the inputs; a backend that cannot load the model fails
    when the run loads it, once the API answers and before the flow starts (``flows.cli.load_model``,
    while the warm-up compiles numba code): one line either way, and nothing is written."""
    if value == "tensorrt" and importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the backend loads")
    result = run_cli("run", str(survey), "--store", str(tmp_path / "m.gpkg"), option, value)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(error)
    assert not (tmp_path / "m.gpkg").exists()


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``CRACKMAP_TEST_MARK=marker`` (children inherit it)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"CRACKMAP_TEST_MARK={marker}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or not ours
            pass
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads processes from /proc (Linux)")
def test_the_api_server_started_before_parsing_is_gone_when_the_input_is_refused(tmp_path):
    """``flows.launch`` starts a run's API server before the command is parsed: a refused run
    (a missing source) stops it, and exits with its one line."""
    from flows.launch import command_of

    assert command_of(["-v", "run", "x"]) == "run" and command_of(["query", "s.gpkg"]) == "query"
    marker = tmp_path.name
    missing = str(tmp_path / "nothing-here")
    result = run_cli("run", missing, "--store", str(tmp_path / "m.gpkg"), CRACKMAP_TEST_MARK=marker)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {missing}: no such file or folder, and no file matches it"
    ]
    assert processes_with(marker) == []


INTERRUPT_WHILE_LOADING = """
import sys
class Interrupt:  # Ctrl-C exactly while the CLI module is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "flows.cli":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = ["crackmap", *sys.argv[1:]]
from flows.launch import main
main()
"""


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads processes from /proc (Linux)")
def test_ctrl_c_while_the_command_loads_ends_it_in_one_line(tmp_path):
    """A Ctrl-C before the command has loaded (the API server already started): one line, exit
    130, no traceback, no process left, nothing written."""
    import os
    import subprocess
    import sys

    marker = tmp_path.name
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "CRACKMAP_TEST_MARK": marker
    }
    store = tmp_path / "m.gpkg"
    result = subprocess.run(
        [sys.executable, "-c", INTERRUPT_WHILE_LOADING, "run", str(tmp_path), "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == [
        "interrupted before the command started; nothing was written"
    ]
    assert processes_with(marker) == []
    assert not store.exists()


def test_errors_are_one_line_each_without_tracebacks(survey, tmp_path, test_models):
    missing = run_cli("run", str(tmp_path / "no-such-survey"), "--store", str(tmp_path / "m.gpkg"))
    assert missing.returncode == 2, missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'no-such-survey'}: no such file or folder, and no file matches it"
    ]
    (survey / "c-notes.tif").write_text("not an image")
    bad = run_cli("run", str(survey), "--store", str(tmp_path / "m.gpkg"))
    assert bad.returncode == 1, bad.stderr
    output = bad.stdout + bad.stderr
    assert "Traceback" not in output and "ERROR" not in output
    assert output.count("c-notes.tif: not a readable raster") == 1  # once, on the failed: line
    assert "failed: " in bad.stderr and "2/3 scenes" in bad.stdout


def test_a_configured_network_rates_the_survey_sections_after_mapping(
    survey, tmp_path, test_models, monkeypatch
):
    import pyogrio
    import shapely

    from flows.survey import process_survey
    from pipeline.stores import open_store

    network = tmp_path / "roads.geojson"
    road = shapely.LineString([(499999.0, 5599999.5), (500002.0, 5599999.5)])
    pyogrio.raw.write(
        str(network),
        shapely.to_wkb(np.array([road], dtype=object)),
        field_data=[np.array(["R7"], dtype=object)],
        fields=["road_id"],
        crs="EPSG:32633",
        geometry_type="LineString",
        driver="GeoJSON",
    )
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


def test_mapping_options_reach_the_scenes_and_bad_ones_are_refused_before_any_work(
    survey, tmp_path, test_models
):
    from flows.cli import cli
    from flows.survey import process_survey

    default = str(tmp_path / "default.gpkg")
    assert process_survey([str(survey)], default, model=TRAINED, return_state=True).is_completed()
    strict = str(tmp_path / "strict.gpkg")
    options = {"threshold": 0.9, "severity_medium_mm": 1.0, "severity_high_mm": 2.0}
    assert process_survey(
        [str(survey)], strict, model=TRAINED, options=options, return_state=True
    ).is_completed()
    with sqlite3.connect(default) as con:
        loose = con.execute(
            "SELECT count(*), sum(length_m), group_concat(DISTINCT severity) FROM cracks"
        ).fetchone()
    with sqlite3.connect(strict) as con:
        tight = con.execute(
            "SELECT count(*), sum(length_m), group_concat(DISTINCT severity) FROM cracks"
        ).fetchone()
    assert loose[0] >= 1 and (tight[0] or 0) <= loose[0] and (tight[1] or 0) < loose[1]  # a higher threshold
    assert tight[0] == 0 or "low" not in tight[2]  # 6 px at 2 mm/px = 12 mm: high with these classes

    bad = str(tmp_path / "bad.gpkg")
    result = CliRunner().invoke(
        cli, ["run", str(survey), "--store", bad, "--model", TRAINED, "--overlap-px", "5"]
    )
    assert result.exit_code != 0 and "overlap_px" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bad.gpkg").exists()
    result = CliRunner().invoke(cli, ["run", str(survey), "--store", bad, "--min-length-m", "-1"])
    assert result.exit_code != 0 and "min_length_m must be a number of metres from 0 to 10" in result.output


def test_a_threshold_whose_lines_would_take_in_the_road_is_refused_before_any_work(tmp_path):
    """hrsegnet-b16 1.1.x gives plain road a crack probability of ~0.28 (its card's measured
    background); a line threshold at or below it would make the whole scene one crack."""
    from flows.cli import cli
    from models import registry
    from pipeline.errors import OptionsError
    from pipeline.scene import SceneOptions

    entry = registry.resolve("hrsegnet-b16:1.1.1")
    floor = entry.background_probability
    assert floor is not None and 0.25 < floor < 0.32
    bad = tmp_path / "bad.gpkg"
    for args in (
        ["run", str(tmp_path), "--store", str(bad), "--model", entry.spec, "--threshold", "0.25"],
        ["reprocess", str(bad), "--model", entry.spec, "--threshold", "0.25"],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert f"at or below the {floor:.3f} it gives plain road" in result.output
        assert f"use a threshold above {floor:.3f}" in result.output and "Traceback" not in result.output
    assert not bad.exists()
    SceneOptions(threshold=floor + 0.01).check_threshold(entry)  # lines then stop above the road
    SceneOptions().check_threshold(entry)  # the version's own settings
    # 1.0.0 has no chosen line settings: its lines grow down to half the threshold
    old = registry.resolve("hrsegnet-b16:1.0.0")
    assert old.background_probability is not None and old.background_probability < 0.2
    with pytest.raises(OptionsError, match=f"above {2 * old.background_probability:.3f}"):
        SceneOptions(threshold=2 * old.background_probability - 0.01).check_threshold(old)
    SceneOptions(threshold=2 * old.background_probability + 0.01).check_threshold(old)


def test_the_crack_type_profile_reaches_scenes_and_sections_and_an_unknown_one_is_refused(
    tmp_path, test_models, monkeypatch
):
    """Two cracks 15 degrees off a road along x: longitudinal under aashto-r85 (within 20), diagonal under
    strict-10 (within 10).  One is inside the road's corridor (typed by the sections step), one outside
    (keeps the type the scene gave it)."""
    import pyogrio
    import shapely

    from flows.cli import cli
    from flows.deployments import deployments
    from flows.settings import Settings
    from flows.survey import process_survey
    from pipeline.errors import OptionsError
    from pipeline.stores import CrackQuery, open_store

    folder = tmp_path / "road-9"
    folder.mkdir()
    pixels = np.random.default_rng(1).integers(150, 220, (3, 500, 700), dtype=np.uint8)
    rise = 600 * np.tan(np.radians(15.0))
    paint_crack(pixels, (20, 50), (20 + rise, 650), 6)  # mid 4.6 m from the road: inside its corridor
    paint_crack(pixels, (320, 50), (320 + rise, 650), 6)  # mid 5.2 m away: outside
    write_scene(folder / "a.tif", pixels)  # 1.4 m x 1.0 m, top edge at y = 5600000
    network = tmp_path / "roads.geojson"
    road = shapely.LineString([(499990.0, 5600004.4), (500010.0, 5600004.4)])
    pyogrio.raw.write(
        str(network),
        shapely.to_wkb(np.array([road], dtype=object)),
        field_data=[np.array(["R9"], dtype=object)],
        fields=["road_id"],
        crs="EPSG:32633",
        geometry_type="LineString",
        driver="GeoJSON",
    )

    def types(options):
        store = str(tmp_path / f"{(options or {}).get('type_profile', 'default')}.gpkg")
        state = process_survey(
            [str(folder)], store, model=TRAINED, network=str(network), options=options, return_state=True
        )
        assert state.is_completed(), state.message
        target = open_store(store)
        cracks = [c for batch in target.query(CrackQuery()) for c in batch if c["length_m"] > 0.5]
        target.close()
        return sorted((c["road_id"] or "-", c["crack_type"], round(c["theta_deg"])) for c in cracks)

    assert types(None) == [("-", "longitudinal", 15), ("R9", "longitudinal", 15)]
    assert types({"type_profile": "strict-10"}) == [("-", "diagonal", 15), ("R9", "diagonal", 15)]

    known = "unknown crack type profile 'pci'; choose one of aashto-r85, loose-30, strict-10"
    bad = tmp_path / "bad.gpkg"
    result = CliRunner().invoke(cli, ["run", str(folder), "--store", str(bad), "--profile", "pci"])
    assert result.exit_code != 0 and known in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not bad.exists()
    monkeypatch.setenv("CRACKMAP_TYPE_PROFILE", "pci")
    result = CliRunner().invoke(cli, ["run", str(folder), "--store", str(bad)])
    assert result.exit_code != 0 and known in result.output and not bad.exists()
    monkeypatch.delenv("CRACKMAP_TYPE_PROFILE")

    scheduled = {
        d.name: d
        for d in deployments(Settings(survey_sources=[str(folder)], store=str(bad), type_profile="strict-10"))
    }["scheduled-survey-run"]
    assert scheduled.parameters["options"] == {"type_profile": "strict-10"}
    with pytest.raises(OptionsError, match=known):
        deployments(Settings(survey_sources=[str(folder)], store=str(bad), type_profile="pci"))
