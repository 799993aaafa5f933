"""Prefect flow ``process-survey``: discover a survey's scenes and map each one.

Thin on purpose: every step is a ``pipeline`` function.  One task per scene
(never per chip); tasks pass paths and small summaries, never arrays.  A scene
that fails is recorded as failed in the store and the others go on; the flow
run then ends Failed, naming the failed scenes.  Scenes run in-process, or as
``process-scene`` runs on a work pool when a deployment is named (``flows.scene``).
The deployment ``scheduled-survey-run`` runs this flow on a cron schedule.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from flows.scene import SCENE_TIMEOUT_S, map_scene_task, run_scenes, scene_options  # noqa: F401  (map_scene_task: re-exported)
from models.registry import resolve
from pipeline import progress, redact
from pipeline.condition import SectionOptions, run_sections
from pipeline.crack_types import TypeProfile
from pipeline.frames import FRAME_SUFFIXES, FrameSurvey, find_frame_survey, survey_frames
from pipeline.ids import check_survey_id
from pipeline.store import RunInfo, open_store
from pipeline.survey import default_output_dir, default_survey_id, discover, map_frame_survey

redact.mask_log_handlers()  # Prefect's console and API handlers: passwords masked in every record


class ArtifactProgress:
    """A progress artifact for the flow run, updated at most every few seconds."""

    def __init__(self, scenes: int, every_s: float = 2.0, key: str = "survey-progress") -> None:
        self.scenes, self.finished, self.every_s, self._last = scenes, 0, every_s, 0.0
        self.artifact_id = create_progress_artifact(0.0, key=key, description="Scenes mapped (%)")

    def __call__(self, scene_id: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._update(self.finished + done / max(total, 1))

    def scene_finished(self) -> None:
        self.finished += 1
        self._update(self.finished)

    def _update(self, scenes_done: float) -> None:
        update_progress_artifact(self.artifact_id, 100.0 * scenes_done / max(self.scenes, 1))


def summary_markdown(run: RunInfo, rows: list[dict]) -> str:
    done = [r for r in rows if r["status"] == "done"]
    failed = [r for r in rows if r["status"] == "failed"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    lines = [f"# Survey {run.survey_id}", "",
             f"Model {run.model_name}:{run.model_version}, run {run.run_id}.", "",
             f"- scenes mapped: {len(done)} of {len(rows)}",
             f"- scenes skipped (unchanged since mapped with this model version): {len(skipped)}",
             f"- cracks: {sum(r['cracks'] for r in done)}",
             f"- total crack length: {sum(r['length_m'] for r in done):.2f} m"]
    lines += [f"- FAILED {r['scene_id']}: {r['error']}" for r in failed]
    return "\n".join(lines)


@task(name="rate-sections", task_run_name="rate-sections-{survey_id}")
def rate_sections(store: str, network: str, survey_id: str, types: TypeProfile = TypeProfile()) -> dict:
    """The survey's sections along the network (``pipeline.condition.run_sections``); a summary."""
    target = open_store(store)
    try:
        found = run_sections(target, network, survey_id, SectionOptions(types=types))
    finally:
        target.close()
    sections = [r for r in found.rows if r["level"] == "section"]
    create_table_artifact([{k: r[k] for k in ("road_id", "from_m", "to_m", "longitudinal_m", "transverse_m",
                                              "diagonal_m", "pattern_m", "cracked_area_pct", "crack_index",
                                              "condition_class")} for r in sections],
                          key="survey-sections", description=f"Sections of survey {survey_id}")
    return {"sections": len(sections), "cracks": found.cracks, "located": found.located,
            "outside": found.outside, "joints": found.joints}


def report(run: RunInfo, rows: list[dict], what: str = "survey"):
    """The table and markdown artifacts of a parent run, and its final state (Failed names the failed scenes)."""
    create_table_artifact(rows, key=f"{what}-scenes", description=f"Scenes of survey {run.survey_id}")
    create_markdown_artifact(summary_markdown(run, rows), key=f"{what}-summary")
    failed = [r["scene_id"] for r in rows if r["status"] == "failed"]
    if failed:
        return Failed(message=f"{len(failed)} of {len(rows)} scenes failed: {', '.join(failed)}",
                      data=rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    return Completed(message=f"{len(rows) - skipped} scenes mapped, {skipped} unchanged and skipped",
                     data=rows)


@flow(name="process-survey", log_prints=True)
def process_survey(sources: list[str], store: str, survey_id: str | None = None,
                   model: str | None = None, backend: str = "auto",
                   output_dir: str | None = None, force: bool = False, glob: str | None = None,
                   scene_deployment: str | None = None, max_concurrent: int = 4, network: str | None = None,
                   camera: str | None = None, trajectory: str | None = None, frame_time: str = "exif",
                   max_gap_s: float = 1.0, scene_timeout_s: float = SCENE_TIMEOUT_S,
                   options: dict | None = None):
    """Map every scene of a survey into ``store``; with a road network, rate its sections too.

    Args:
        sources: Raster files, folders, globs, or storage URL prefixes (``s3://bucket/survey/``).
        store: Where crack lines go (a ``.gpkg`` path or a ``postgresql://`` URL without a password:
            parameters are stored by Prefect; give the password as PGPASSWORD or in ~/.pgpass).
        survey_id: Survey the results belong to; default: the first source's folder name.
        model: ``name[:version]`` in the model registry; default: the registry's default.
        backend: ``auto``, ``onnxruntime`` or ``torch``.
        output_dir: Where probability rasters go (a folder or a storage URL prefix);
            default: beside the store.
        force: Map scenes again even if unchanged since mapped with this model version.
        glob: Only scenes whose path relative to their folder or prefix matches this glob.
        scene_deployment: Run each scene as a run of this deployment
            (``process-scene/process-scene``) on its work pool; default: in this process.
        max_concurrent: With a deployment, at most this many scene runs at once.
        network: Road centrelines (``CRACKMAP_NETWORK`` when not given): after mapping, the
            survey's cracks are typed against them and rated per section (layer ``sections``).
        camera: A camera file: SOURCES are frames (JPEG/PNG) of a frame survey
            (``pipeline.frames``); a single source folder holding ``camera.yaml`` is one too.
        trajectory: The frame survey's GNSS/IMU trajectory CSV (default: ``trajectory.csv``
            in the source folder, else EXIF GPS in the frames).
        frame_time: Where frames' times come from: ``exif``, ``name:REGEX`` or ``index:CSV``.
        max_gap_s: The longest trajectory gap a frame may fall in.
        scene_timeout_s: With a deployment, a scene run not finished after this long (no worker
            serves its pool?) is cancelled and the scene fails, saying so.
        options: Mapping options (threshold, overlap_px, severity_medium_mm, severity_high_mm,
            min_length_m, bridge_gap_px; ``pipeline.scene.MAPPING_OPTIONS``) and ``type_profile`` (the
            crack-type profile of the scenes and the sections; default CRACKMAP_TYPE_PROFILE), checked
            before any work.
    """
    from flows.settings import Settings

    check_survey_id(survey_id or default_survey_id(sources))  # before any work
    scene_options(options)
    network = network or Settings().network
    entry = resolve(model)
    run = RunInfo(survey_id=survey_id or default_survey_id(sources),
                  run_id=str(flow_run.id or uuid.uuid4()), model_name=entry.name,
                  model_version=entry.version, model_sha256=entry.sha256)
    output_dir = output_dir or str(default_output_dir(store))  # before any scene: a bad store fails once
    frame_inputs = find_frame_survey(sources, camera, trajectory)
    if frame_inputs is not None:
        if scene_deployment is not None:
            raise ValueError("frame surveys are mapped in this process: their frames are merged "
                             "across each other; leave out the scene deployment")
        frames = survey_frames(discover(sources, glob, FRAME_SUFFIXES), frame_inputs[0])
        survey = FrameSurvey(*frame_inputs, frame_time=frame_time, max_gap_s=max_gap_s)
        bar = ArtifactProgress(len(frames))
        with progress.listening(bar):
            rows = task(map_frame_survey, name="map-frames")(frames, survey, store, run, backend, output_dir,
                                                             scene_options(options), force=force)
    else:
        scenes = discover(sources, glob)
        bar = ArtifactProgress(len(scenes))
        with progress.listening(bar):
            rows = run_scenes(scenes, store, run, backend, output_dir, force,
                              scene_deployment=scene_deployment, max_concurrent=max_concurrent,
                              on_finished=lambda row: bar.scene_finished(), scene_timeout_s=scene_timeout_s,
                              options=options)
    if network and any(r["status"] != "failed" for r in rows):
        rate_sections(store, network, run.survey_id, scene_options(options).types)  # typed as the scenes were
    return report(run, rows)
