"""Frame surveys in the flows: their frames mapped in this process or as ``process-scene`` runs.

A frame survey's frames are merged with each other (``pipeline.frames``), so a
frame is not published by the run that maps it.  Each frame needing it is
segmented and put on the ground, in this process or as a ``process-scene`` run
on a work pool (the frame's camera, pose and survey origin travel as the run's
``frame`` parameter; ``pipeline.frames.FrameJob``).  That run keeps the frame's
ground lines beside its probability raster; then the survey (``process-survey``
or ``reprocess``) reads them, merges the views of each crack across frames and
publishes every frame.  The steps are ``pipeline.survey`` functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prefect import task

from flows.policy import RETRIES, RETRY_DELAYS_S, RETRY_JITTER, retry_transient
from flows.scene import SCENE_TIMEOUT_S, run_scenes
from pipeline.errors import FrameError, PipelineError
from pipeline.frames import FrameJob, FrameSurvey
from pipeline.stores import SceneSelection, open_store
from pipeline.survey import (
    RunSettings,
    SceneRow,
    SceneSource,
    load_frame_observation,
    map_frame_survey,
    observe_frame_job,
)

STORE_TASK = dict(
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=retry_transient,
)


@task(name="observe-frame", task_run_name="observe-frame-{job.frame_id}", **STORE_TASK)
def observe_frame_task(job: FrameJob, settings: RunSettings) -> SceneRow:
    """One frame segmented and put on the ground (``pipeline.survey.observe_frame_job``); its row."""
    obs = observe_frame_job(job, settings)
    return SceneRow(
        job.frame_id,
        "done",
        chips=obs.chip_count,
        seconds=round(obs.seconds, 2),
        probability=obs.probability_path,
    )


def map_frames(
    frames: list[SceneSource],
    survey: FrameSurvey,
    settings: RunSettings,
    scene_deployment: str | None = None,
    max_concurrent: int = 4,
    on_finished: Callable[[SceneRow], None] = lambda row: None,
    scene_timeout_s: float = SCENE_TIMEOUT_S,
) -> list[SceneRow]:
    """Map a frame survey into ``settings.store`` (``pipeline.survey.map_frame_survey``); one row per frame.

    Called inside a parent flow.  With ``scene_deployment`` every frame that needs
    mapping is a ``process-scene`` run on that deployment's work pool (at most
    ``max_concurrent`` at once), which must see the frames, the camera file and the
    output folder (shared, or a storage prefix): the survey reads each frame's ground
    lines from there.
    """
    if scene_deployment is None:
        return task(map_frame_survey, name="map-frames")(frames, survey, settings)

    def observe(jobs: list[FrameJob]) -> Iterator[tuple[FrameJob, object]]:
        rows = run_scenes(
            [SceneSource(j.uri, j.frame_id, j.identity) for j in jobs],
            settings,
            scene_deployment,
            max_concurrent,
            on_finished=on_finished,
            scene_timeout_s=scene_timeout_s,
            frames={j.frame_id: j.parameters() for j in jobs},
        )
        for job, row in zip(jobs, rows):
            if row.status == "failed":
                yield job, PipelineError(row.error)  # it names the frame already
                continue
            try:
                yield job, load_frame_observation(job, settings)
            except FrameError as exc:
                yield job, exc

    return map_frame_survey(frames, survey, settings, observe=observe)


@task(name="frame-survey", **STORE_TASK)
def stored_frame_survey(store: str, survey_id: str) -> tuple[FrameSurvey | None, list[dict]]:
    """A survey's frame settings from the store, and its frames' current rows (mapped ones); (None, []) if
    it is not a frame survey."""
    with open_store(store) as target:
        record = target.frame_survey(survey_id)
        if record is None:
            return None, []
        rows = target.scenes(SceneSelection(survey_id=survey_id))
    return FrameSurvey.from_record(record), [r for r in rows if r["status"] == "done"]
