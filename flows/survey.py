"""Prefect flow ``process-survey``: discover a survey's scenes and map each one.

Thin on purpose: every step is a ``pipeline`` function.  One task per scene
(never per chip); tasks pass paths and small summaries, never arrays.  A scene
that fails is recorded as failed in the store and the others go on; the flow
run then ends Failed, naming the failed scenes.  Scenes run in-process, or as
``process-scene`` runs on a work pool when a deployment is named (``flows.scene``).
The deployment ``scheduled-survey-run`` runs this flow on a cron schedule.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from flows.artifacts import ArtifactProgress, report
from flows.frames import map_frames
from flows.scene import SCENE_TIMEOUT_S, map_scene_task, run_scenes, run_settings  # noqa: F401  (map_scene_task: re-exported)
from pipeline import progress, redact
from pipeline.condition import SectionOptions, run_sections
from pipeline.crack_types import TypeProfile
from pipeline.frames import FRAME_SUFFIXES, FrameSurvey, find_frame_survey, survey_frames
from pipeline.sharing import scenes_in_flight
from pipeline.stores import open_store
from pipeline.survey import default_survey_id, discover

redact.mask_log_handlers()  # Prefect's console and API handlers: passwords masked in every record


@task(name="rate-sections", task_run_name="rate-sections-{survey_id}")
def rate_sections(store: str, network: str, survey_id: str, types: TypeProfile = TypeProfile()) -> dict:
    """The survey's sections along the network (``pipeline.condition.run_sections``); a summary."""
    with open_store(store) as target:
        found = run_sections(target, network, survey_id, SectionOptions(types=types))
    sections = [r for r in found.rows if r["level"] == "section"]
    create_table_artifact(
        [
            {
                k: r[k]
                for k in (
                    "road_id",
                    "from_m",
                    "to_m",
                    "longitudinal_m",
                    "transverse_m",
                    "diagonal_m",
                    "pattern_m",
                    "cracked_area_pct",
                    "crack_index",
                    "condition_class",
                )
            }
            for r in sections
        ],
        key="survey-sections",
        description=f"Sections of survey {survey_id}",
    )
    return {
        "sections": len(sections),
        "cracks": found.cracks,
        "located": found.located,
        "outside": found.outside,
        "joints": found.joints,
    }


@flow(name="process-survey", log_prints=True)
def process_survey(
    sources: list[str],
    store: str,
    survey_id: str | None = None,
    model: str | None = None,
    backend: str = "auto",
    output_dir: str | None = None,
    force: bool = False,
    glob: str | None = None,
    scene_deployment: str | None = None,
    max_concurrent: int = 4,
    network: str | None = None,
    camera: str | None = None,
    trajectory: str | None = None,
    frame_time: str = "exif",
    max_gap_s: float = 1.0,
    scene_timeout_s: float = SCENE_TIMEOUT_S,
    options: dict | None = None,
    in_flight: int | None = None,
):
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
        in_flight: Without a deployment, map this many scenes at once in this process, sharing
            the network (their batches run together: what keeps a GPU busy); each scene in
            flight holds its own few rows of chips in memory.  Default: 4 where the network runs
            on a GPU, 1 on CPUs (``pipeline.sharing.default_in_flight``).  Frame surveys map one
            frame at a time.
    """
    from flows.settings import Settings

    in_flight = scenes_in_flight(in_flight, backend)  # checked before any work
    settings = run_settings(
        store, survey_id or default_survey_id(sources), None, model, backend, output_dir, options, force
    )  # checked before any work: a bad store or option fails once
    network = network or Settings().network
    frame_inputs = find_frame_survey(sources, camera, trajectory)
    if frame_inputs is not None:
        frames = survey_frames(discover(sources, glob, FRAME_SUFFIXES), frame_inputs[0])
        survey = FrameSurvey(*frame_inputs, frame_time=frame_time, max_gap_s=max_gap_s)
        bar = ArtifactProgress(len(frames))
        with progress.listening(bar):
            rows = map_frames(
                frames,
                survey,
                settings,
                scene_deployment,
                max_concurrent,
                on_finished=lambda row: bar.scene_finished(),
                scene_timeout_s=scene_timeout_s,
            )
    else:
        scenes = discover(sources, glob)
        bar = ArtifactProgress(len(scenes))
        with progress.listening(bar):
            rows = run_scenes(
                scenes,
                settings,
                scene_deployment,
                max_concurrent,
                on_finished=lambda row: bar.scene_finished(),
                scene_timeout_s=scene_timeout_s,
                in_flight=in_flight,
            )
    if network and any(r.status != "failed" for r in rows):  # typed with the scenes' profile
        rate_sections(settings.store, network, settings.run.survey_id, settings.options.types)
    return report(settings.run, rows)
