"""The deployments on a real Prefect server with a real process worker (both started once per session).

The server (``prefect server start``, sqlite, temp PREFECT_HOME) and the worker
(``prefect worker start --type process``) listen on loopback only; the worker
gets the test model registry through CRACKMAP_MODELS.  Both are stopped at the
end of the session, whatever happens.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import CRACKMAP, paint_crack, write_scene
from test_frame_survey import frame_survey  # noqa: F401  (a fixture: four frames, camera, trajectory)

pytest.importorskip("prefect")
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,  # noqa: E402
)
from prefect.deployments import run_deployment  # noqa: E402
from prefect.deployments.runner import EntrypointType  # noqa: E402
from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings  # noqa: E402

POOL = "crackmap-test"
PREFECT = Path(sys.executable).with_name("prefect")
RUN_TIMEOUT_S = 420
TRAINED = "hrsegnet-b16:1.0.0"  # the shipped model: the checks below compare real cracks
UNSERVED_POOL = "crackmap-unserved"  # a pool no worker serves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=8)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def scene(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(150, 220, (3, 500, 700), dtype=np.uint8)
    paint_crack(pixels, (40, 30), (460, 650), 6)
    return write_scene(path, pixels)


class Stack:
    """The session's server, worker and the survey the scheduled deployment looks at."""

    def __init__(self, url: str, env: dict, survey: Path, store: Path) -> None:
        self.url, self.env, self.survey, self.store = url, env, survey, store


@pytest.fixture(scope="session")
def stack(tmp_path_factory, model_root):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="5",
        CRACKMAP_MODELS=str(model_root),
    )
    survey = tmp_path_factory.mktemp("incoming") / "road-9"
    survey.mkdir()
    store = survey.parent / "map.gpkg"
    processes = []
    try:
        with open(home / "server.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if processes[0].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        subprocess.run(
            [str(PREFECT), "work-pool", "create", POOL, "--type", "process"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        with open(home / "worker.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    [str(PREFECT), "worker", "start", "--pool", POOL, "--type", "process", "--limit", "4"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        from flows.deployments import register
        from flows.settings import Settings

        subprocess.run(
            [str(PREFECT), "work-pool", "create", UNSERVED_POOL, "--type", "process"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        config = Settings(
            cpu_pool=POOL,
            gpu_pool=POOL,
            survey_sources=[str(survey)],
            store=str(store),
            schedule_cron="30 3 * * 1-5",
            schedule_timezone="Europe/Vienna",
            scene_concurrency=2,
            model=TRAINED,
        )
        with temporary_settings({PREFECT_API_URL: url, PREFECT_LOGGING_TO_API_ENABLED: False}):
            register(config)
            from flows.scene import process_scene

            process_scene.to_deployment(
                "unserved", work_pool_name=UNSERVED_POOL, entrypoint_type=EntrypointType.MODULE_PATH
            ).apply()
            yield Stack(url, env, survey, store)
    finally:
        for process in reversed(processes):
            stop(process)


@pytest.fixture
def api(stack):
    with temporary_settings({PREFECT_API_URL: stack.url, PREFECT_LOGGING_TO_API_ENABLED: False}):
        yield stack


def scenes_table(store) -> dict:
    with sqlite3.connect(store, timeout=60) as con:
        return {
            r[0]: r[1:]
            for r in con.execute("SELECT scene_id, status, crack_count, error FROM scenes ORDER BY scene_id")
        }


def table_artifact(flow_run_id, key: str) -> list[dict]:
    import json

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])
            )
        )
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def crack_counts(store) -> dict:
    with sqlite3.connect(store) as con:
        total, distinct = con.execute("SELECT count(*), count(DISTINCT crack_id) FROM cracks").fetchone()
        assert total == distinct
        return dict(con.execute("SELECT scene_id, count(*) FROM cracks GROUP BY scene_id"))


def children(parent_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )


def test_scheduled_deployment_has_its_cron_schedule(api):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("process-survey/scheduled-survey-run")
        names = {
            d.name
            for d in client.read_deployments(
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["process-scene", "reprocess", "scheduled-survey-run"])
                )
            )
        }
    assert names == {"process-scene", "reprocess", "scheduled-survey-run"}
    schedule = deployment.schedules[0].schedule
    assert schedule.cron == "30 3 * * 1-5" and schedule.timezone == "Europe/Vienna"
    assert deployment.schedules[0].active and deployment.work_pool_name == POOL
    assert deployment.parameters["sources"] == [str(api.survey)]
    assert deployment.parameters["scene_deployment"] == "process-scene/process-scene"


def test_a_worker_picks_up_process_scene_runs(api, tmp_path):
    path = scene(tmp_path / "solo.tif", 1)
    store = tmp_path / "solo.gpkg"
    run = run_deployment(
        "process-scene/process-scene",
        timeout=RUN_TIMEOUT_S,
        poll_interval=1,
        parameters={"uri": str(path), "scene_id": "solo", "store": str(store), "survey_id": "solo-survey"},
    )
    assert run.state.is_completed(), run.state
    assert run.work_pool_name == POOL and run.state.message.startswith("done: solo")
    assert scenes_table(store)["solo"][0] == "done"
    with sqlite3.connect(store) as con:
        assert con.execute("SELECT DISTINCT survey_id, model_name FROM scenes").fetchall() == [
            ("solo-survey", "test-b16")
        ]


def test_scheduled_run_fans_out_maps_new_scenes_only_and_isolates_failures(api):
    scene(api.survey / "a.tif", 2)
    scene(api.survey / "b.tif", 3)
    (api.survey / "c-notes.tif").write_text("not an image")
    first = run_deployment("process-survey/scheduled-survey-run", timeout=RUN_TIMEOUT_S, poll_interval=1)
    assert first.state.is_failed(), first.state
    assert first.state.message == "1 of 3 scenes failed: c-notes"
    table = scenes_table(api.store)
    assert table["a"][0] == table["b"][0] == "done"
    assert "c-notes.tif: not a readable raster" in table["c-notes"][2]
    runs = children(first.id)  # each scene was a process-scene run through the worker
    assert sorted(r.name for r in runs) == ["road-9/a", "road-9/b", "road-9/c-notes"]
    assert all(r.work_pool_name == POOL for r in runs)
    counts = crack_counts(api.store)
    assert counts["a"] >= 1 and counts["b"] >= 1  # so that "no duplicates" compares real cracks

    scene(api.survey / "d.tif", 4)  # new imagery arrives; the next scheduled run maps only it
    (api.survey / "c-notes.tif").unlink()
    second = run_deployment("process-survey/scheduled-survey-run", timeout=RUN_TIMEOUT_S, poll_interval=1)
    assert second.state.is_completed(), second.state
    assert second.state.message == "1 scenes mapped, 2 unchanged and skipped"
    assert sorted((r.name, r.state.message.split(":")[0]) for r in children(second.id)) == [
        ("road-9/a", "skipped"),
        ("road-9/b", "skipped"),
        ("road-9/d", "done"),
    ]
    again = crack_counts(api.store)
    assert {k: again.get(k) for k in counts} == counts and scenes_table(api.store)["d"][0] == "done"
    rows = {r["scene_id"]: r for r in table_artifact(second.id, "survey-scenes")}
    for scene_id in ("a", "b"):  # skipped scenes report what is published, not zeros
        assert rows[scene_id]["status"] == "skipped" and rows[scene_id]["cracks"] == counts[scene_id]
        assert rows[scene_id]["chips"] == 4 and rows[scene_id]["length_m"] > 0


def test_a_killed_run_resumes_without_duplicates(api, tmp_path, test_models):
    from flows.survey import process_survey

    survey = tmp_path / "road-10"
    survey.mkdir()
    scene(survey / "a.tif", 5)
    scene(survey / "b.tif", 6)
    os.mkfifo(survey / "c.tif")  # reading it blocks: the run hangs on c until it is killed
    store = tmp_path / "map.gpkg"
    env = dict(api.env, PREFECT_LOGGING_LEVEL="ERROR")
    run = subprocess.Popen(
        [
            *CRACKMAP,
            "run",
            str(survey),
            "--store",
            str(store),
            "--model",
            TRAINED,
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # the store appears whole (built aside, then linked): once it exists, its tables do too
        while not (store.exists() and [s for s, *_ in scenes_table(store).values()][:2] == ["done", "done"]):
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.5)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    before = crack_counts(store)
    (survey / "c.tif").unlink()
    scene(survey / "c.tif", 7)
    assert before["a"] >= 1 and before["b"] >= 1
    state = process_survey([str(survey)], str(store), model=TRAINED, return_state=True)
    assert state.is_completed(), state
    assert [(r.scene_id, r.status) for r in state.result()] == [
        ("a", "skipped"),
        ("b", "skipped"),
        ("c", "done"),
    ]
    after = crack_counts(store)  # asserts no crack id twice
    assert {k: after.get(k) for k in before} == before
    assert sorted(scenes_table(store)) == ["a", "b", "c"]


def test_a_scene_run_no_worker_picks_up_times_out_with_a_clear_state(api, tmp_path, test_models):
    from flows.survey import process_survey

    path = scene(tmp_path / "lonely.tif", 8)
    store = tmp_path / "unserved.gpkg"
    started = time.monotonic()
    state = process_survey(
        [str(path)],
        str(store),
        survey_id="unserved",
        scene_deployment="process-scene/unserved",
        scene_timeout_s=5,
        return_state=True,
    )
    assert time.monotonic() - started < 120
    assert state.is_failed() and state.message == "1 of 1 scenes failed: lonely"
    (row,) = state.result(raise_on_failure=False)
    assert row.status == "failed"
    assert (
        "was still Scheduled after 5 s and was cancelled; is a worker serving crackmap-unserved?" in row.error
    )
    with get_client(sync_client=True) as client:
        (child,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    assert child.state.is_cancelled()  # it will not run later, when a worker turns up


def test_a_frame_survey_fans_out_to_process_scene_runs_and_merges_like_one_process(
    api,
    tmp_path,
    test_models,
    frame_survey,  # noqa: F811  (the fixture imported above)
):
    """Each frame is a process-scene run on the worker; the survey merges and publishes them."""
    from flows.survey import process_survey

    store = tmp_path / "frames.gpkg"
    state = process_survey(
        [str(frame_survey)],
        str(store),
        model=TRAINED,
        scene_deployment="process-scene/process-scene",
        return_state=True,
    )
    assert state.is_completed(), state
    assert [(r.scene_id, r.status) for r in state.result()] == [(f"f00{k}", "done") for k in range(4)]
    runs = children(state.state_details.flow_run_id)
    assert sorted((r.name, r.state.message.split(":")[0]) for r in runs) == [
        (f"road-9/f00{k}", "observed") for k in range(4)
    ]
    assert all(r.work_pool_name == POOL for r in runs)
    here = tmp_path / "here.gpkg"  # the same survey mapped in this process
    assert process_survey([str(frame_survey)], str(here), model=TRAINED, return_state=True).is_completed()
    sql = (
        "SELECT scene_id, round(length_m, 6), round(width_mean_mm, 4), source_frames, crack_type "
        "FROM cracks ORDER BY scene_id, length_m"
    )
    with sqlite3.connect(store) as a, sqlite3.connect(here) as b:
        fanned, local = a.execute(sql).fetchall(), b.execute(sql).fetchall()
    assert fanned == local and len(fanned) >= 1  # the painted crack, one line through the frames
    again = process_survey(
        [str(frame_survey)],
        str(store),
        model=TRAINED,
        scene_deployment="process-scene/process-scene",
        return_state=True,
    )
    assert again.is_completed() and again.message == "0 scenes mapped, 4 unchanged and skipped"
    assert children(again.state_details.flow_run_id) == []  # nothing mapped again
