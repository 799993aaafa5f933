"""Prefect flow ``process-scene`` (the unit of work, one scene) and the fan-out that runs many.

A parent flow (``process-survey``, ``reprocess``) hands its scenes to
``run_scenes``.  Without a deployment it maps them in-process, one task per
scene.  With one (``scene_deployment="process-scene/process-scene"``) every
scene becomes a ``process-scene`` run on that deployment's work pool, at most
``max_concurrent`` at a time per parent, so N workers on N machines share a
survey.  Either way a failing scene never stops the others, and a scene
already published from the same content with the same model version is
skipped (``map_scene``), which is what makes a rerun after a crash resume.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from prefect import flow, task
from prefect.deployments import run_deployment
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Completed

from flows.artifacts import ArtifactProgress
from flows.policy import RETRIES, RETRY_DELAYS_S, RETRY_JITTER, retry_transient
from pipeline import progress, redact
from pipeline.ids import check_scene_id
from pipeline.redact import mask_url
from pipeline.stores import open_store
from pipeline.survey import RunSettings, SceneRow, SceneSource, map_scene, probability_path

log = logging.getLogger(__name__)
redact.mask_log_handlers()  # Prefect's console and API handlers: passwords masked in every record
POLL_S = 2.0  # how often a parent looks at its process-scene runs
SCENE_TIMEOUT_S = 6 * 3600.0  # a process-scene run not finished by then (no worker?) fails its scene


@task(
    name="map-scene",
    task_run_name="map-scene-{source.scene_id}",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=retry_transient,
)
def map_scene_task(source: SceneSource, settings: RunSettings, shared: bool = False) -> SceneRow:
    return map_scene(source, settings, shared)


def run_settings(
    store: str,
    survey_id: str,
    run_id: str | None,
    model: str | None = None,
    backend: str = "auto",
    output_dir: str | None = None,
    options: dict | None = None,
    force: bool = False,
    promote: bool = True,
) -> RunSettings:
    """A flow run's settings, resolved once (``RunSettings.resolve``): the run id defaults to this
    flow run's, the crack-type profile comes from CRACKMAP_TYPE_PROFILE (``flows.settings``)."""
    from flows.settings import Settings

    return RunSettings.resolve(
        store,
        survey_id,
        run_id or str(flow_run.id or uuid.uuid4()),
        model,
        backend,
        output_dir,
        options,
        Settings().type_profile,
        force,
        promote,
    )


@flow(name="process-scene", log_prints=True)
def process_scene(
    uri: str,
    scene_id: str,
    store: str,
    survey_id: str,
    model: str | None = None,
    run_id: str | None = None,
    backend: str = "auto",
    output_dir: str | None = None,
    force: bool = False,
    promote: bool = True,
    identity: str | None = None,
    options: dict | None = None,
    frame: dict | None = None,
):
    """Map one scene into ``store``: the unit of work, on whatever work pool runs it.

    Args:
        uri: The scene (a path or a storage URL).
        scene_id: Its id in the store.
        store: A ``.gpkg`` path or a ``postgresql://`` URL.
        survey_id: The survey it belongs to.
        model: ``name[:version]`` in the registry; default: the registry's default.
        run_id: The parent run the rows are tagged with (default: this flow run).
        output_dir: Folder or storage prefix for the probability raster.
        force: Map it again even if unchanged since mapped with this model version.
        promote: Make this version the scene's current one (reprocessing promotes later).
        identity: The scene's ETag or sha256 if known (computed otherwise).
        options: Mapping options (threshold, overlap_px, severity_medium_mm, severity_high_mm,
            min_length_m, bridge_gap_px; ``pipeline.scene.MAPPING_OPTIONS``); default: the defaults.
        frame: A survey frame's camera file, pose and survey origin (``pipeline.frames.FrameJob``;
            ``identity`` is then the frame's): the frame is segmented and put on the ground, and its
            ground lines are kept beside its probability raster, where its survey run merges and
            publishes them (``flows.frames``).
    """
    check_scene_id(scene_id)
    settings = run_settings(store, survey_id, run_id, model, backend, output_dir, options, force, promote)
    source = SceneSource(uri, scene_id, identity)
    bar = ArtifactProgress(1, key="scene-progress")
    if frame is not None:
        from flows.frames import FrameJob, observe_frame_task

        with progress.listening(bar):
            row = observe_frame_task(FrameJob.from_parameters(uri, scene_id, identity, frame), settings)
        bar.scene_finished()
        return Completed(
            message=f"observed: {scene_id}, {row.chips} chips (published by its survey run)", data=row
        )
    with progress.listening(bar):
        row = map_scene_task(source, settings)
    bar.scene_finished()
    return Completed(message=f"{row.status}: {scene_id}, {row.cracks} cracks, {row.length_m:.2f} m", data=row)


@task(name="run-process-scene", task_run_name="process-scene-{source.scene_id}")
def run_scene_deployment(
    deployment: str,
    source: SceneSource,
    settings: RunSettings,
    timeout_s: float = SCENE_TIMEOUT_S,
    frame: dict | None = None,
) -> SceneRow:
    """One scene as a ``process-scene`` run on the deployment's work pool; its row when it ends.

    The row's numbers are read back from the store (the one place every worker
    writes to), so no result storage has to be shared between machines.  A run
    not finished after ``timeout_s`` (no worker serves the pool, or it hangs) is
    cancelled and its scene fails with a message saying so.  A survey frame (``frame``,
    ``flows.frames``) is not published by its run: its row says only that it was mapped.
    """
    started = time.perf_counter()
    run = settings.run
    child = run_deployment(
        deployment,
        timeout=timeout_s,
        poll_interval=min(POLL_S, max(timeout_s / 4, 0.1)),
        flow_run_name=f"{run.survey_id}/{source.scene_id}",
        parameters={
            "uri": source.uri,
            "scene_id": source.scene_id,
            "store": settings.store,
            "survey_id": run.survey_id,
            "model": settings.model_spec,
            "run_id": run.run_id,
            "backend": settings.backend,
            "output_dir": settings.output_dir,
            "force": settings.force,
            "promote": settings.promote,
            "identity": source.identity,
            "options": settings.options_given,
            **({"frame": frame} if frame is not None else {}),
        },
    )
    state = child.state
    seconds = child.total_run_time.total_seconds() if child.total_run_time else time.perf_counter() - started
    if state is not None and not state.is_final():
        return SceneRow.failed(source.scene_id, timed_out(child, source, timeout_s), seconds)
    if state is None or not state.is_completed():
        message = (state.message if state else None) or f"process-scene run {child.id} did not complete"
        return SceneRow.failed(source.scene_id, f"{source.uri}: {message}", seconds)
    if frame is not None:
        return SceneRow(source.scene_id, "done", seconds=round(seconds, 2))
    with open_store(settings.store) as target:
        summary = target.scene_summaries(
            run.survey_id, run.model_name, run.model_version, [source.scene_id]
        ).get(source.scene_id)
    if summary is None:
        return SceneRow.failed(
            source.scene_id,
            f"{source.uri}: process-scene run {child.id} completed "
            f"but {mask_url(settings.store)} has no row for it",
            seconds,
        )
    skipped = (state.message or "").startswith("skipped")
    return SceneRow(
        source.scene_id,
        "skipped" if skipped else "done",  # what is published
        summary["chip_count"],
        summary["crack_count"],
        round(summary["total_length_m"], 3),
        0.0 if skipped else round(seconds, 2),
        "" if skipped else probability_path(settings.output_dir, run, source.scene_id),
    )


def timed_out(child, source: SceneSource, timeout_s: float) -> str:
    """Cancel a ``process-scene`` run that did not finish in time; the scene's error message."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    was = child.state.name if child.state else "unknown"
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(
                child.id, Cancelled(message=f"not finished after {timeout_s:g} s"), force=True
            )
    except Exception as exc:  # the message below still says what happened
        log.warning("could not cancel process-scene run %s: %s", child.id, exc)
    pool = child.work_pool_name or "its work pool"
    return (
        f"{source.uri}: process-scene run {child.name} was still {was} after {timeout_s:g} s and was "
        f"cancelled; is a worker serving {pool}? (prefect worker start --pool {pool}); "
        "run again to map it (the limit: CRACKMAP_SCENE_TIMEOUT_S for deployments, --scene-timeout)"
    )


def run_scenes(
    scenes: list[SceneSource],
    settings: RunSettings,
    scene_deployment: str | None = None,
    max_concurrent: int = 4,
    on_finished: Callable[[SceneRow], None] = lambda row: None,
    scene_timeout_s: float = SCENE_TIMEOUT_S,
    frames: dict[str, dict] | None = None,
    in_flight: int = 1,
) -> list[SceneRow]:
    """Map ``scenes`` in-process or as ``process-scene`` runs; one row per scene, in their order.

    Called inside a parent flow.  A failed scene is a row with status ``failed``
    and its error; the others go on.  ``frames``: with a deployment, the ``frame``
    parameter of the survey frames among them, by scene id (``flows.frames``).
    ``in_flight``: in-process, this many scenes are mapped at once (task runs in
    threads), their batches merged into the network's calls (``map_scene(shared=True)``);
    with a deployment, ``max_concurrent`` scene runs are.
    """
    if scene_deployment is None and in_flight == 1:
        rows: dict[str, SceneRow] = {}
        for source in scenes:
            started = time.perf_counter()
            state = map_scene_task(source, settings, return_state=True)
            if state.is_completed():
                rows[source.scene_id] = state.result()
            else:
                rows[source.scene_id] = SceneRow.failed(
                    source.scene_id, str(state.result(raise_on_failure=False)), time.perf_counter() - started
                )
            on_finished(rows[source.scene_id])
        return [rows[s.scene_id] for s in scenes]
    if scene_deployment is None:
        return windowed(
            scenes,
            in_flight,
            lambda source: map_scene_task.submit(source, settings, shared=True),
            lambda source, exc: SceneRow.failed(source.scene_id, str(exc)),  # names its file already
            on_finished,
        )
    return windowed(
        scenes,
        max_concurrent,
        lambda source: run_scene_deployment.submit(
            scene_deployment, source, settings, scene_timeout_s, (frames or {}).get(source.scene_id)
        ),
        lambda source, exc: SceneRow.failed(source.scene_id, f"{source.uri}: {exc}"),
        on_finished,
    )


def windowed(
    scenes: list[SceneSource],
    window: int,
    submit: Callable[[SceneSource], PrefectFuture],
    failed: Callable[[SceneSource, Exception], SceneRow],
    on_finished: Callable[[SceneRow], None],
) -> list[SceneRow]:
    """Scene task runs submitted with at most ``window`` unfinished at once; rows in the scenes' order."""
    if window < 1:
        raise ValueError(f"at most {window} scenes at once: give 1 or more")
    rows: dict[str, SceneRow] = {}
    pending: dict = {}  # task run id -> (future, source)

    def collect(task_run_id) -> None:
        future, source = pending.pop(task_run_id)
        try:
            rows[source.scene_id] = future.result()
        except Exception as exc:  # the task's own error: this scene fails alone
            rows[source.scene_id] = failed(source, exc)
        on_finished(rows[source.scene_id])

    for source in scenes:
        if len(pending) >= window:
            collect(next(as_completed([f for f, _ in pending.values()])).task_run_id)
        future = submit(source)
        pending[future.task_run_id] = (future, source)
    for finished in as_completed([f for f, _ in pending.values()]):
        collect(finished.task_run_id)
    return [rows[s.scene_id] for s in scenes]
