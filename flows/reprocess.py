"""Prefect flow ``reprocess``: map scenes already in the store again with another model version.

Scenes are selected by survey, processing date, bounding box or the model
version they currently show.  Each is mapped with the new version and
published without becoming current (``promote=False``), so the map keeps
showing the old results while the run is under way and the old rows are kept.
Then the new version is promoted for every scene that succeeded, and
``current_cracks`` switches.  A per-scene report says what changed.

A rerun after a crash skips the scenes already published with the new version
(``map_scene``) and promotes them with the rest.

A frame survey (its settings kept in the store when it was mapped) is
reprocessed whole, with the camera file, trajectory and frame times it was
mapped with: its frames' views of each crack are merged with each other
(``flows.frames``), so selecting one of its frames selects them all.
"""

from __future__ import annotations

import uuid
from collections import defaultdict

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from flows.artifacts import ArtifactProgress
from flows.frames import map_frames, stored_frame_survey
from flows.policy import RETRIES, RETRY_DELAYS_S, RETRY_JITTER, retry_transient
from flows.scene import SCENE_TIMEOUT_S, run_scenes, run_settings
from models.registry import resolve
from pipeline import progress
from pipeline.ids import check_survey_id
from pipeline.scene import SceneOptions
from pipeline.sharing import scenes_in_flight
from pipeline.stores import SEVERITIES, SceneSelection, open_store
from pipeline.survey import SceneSource

STORE_TASK = dict(
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_jitter_factor=RETRY_JITTER,
    retry_condition_fn=retry_transient,
)


def split_model(spec: str) -> tuple[str, str]:
    """``NAME:VERSION`` as a pair.

    >>> split_model("hrsegnet_b16:1.2.0")
    ('hrsegnet_b16', '1.2.0')
    """
    name, _, version = spec.partition(":")
    if not name or not version:
        raise ValueError(f"{spec!r} is not NAME:VERSION")
    return name, version


@task(name="select-scenes", **STORE_TASK)
def select_scenes(store: str, selection: SceneSelection) -> list[dict]:
    target = open_store(store)
    try:
        return target.scenes(selection)
    finally:
        target.close()


@task(name="promote", **STORE_TASK)
def promote(store: str, survey_id: str, scene_ids: list[str], model_name: str, model_version: str) -> int:
    target = open_store(store)
    try:
        return target.promote(survey_id, scene_ids, model_name, model_version)
    finally:
        target.close()


@task(name="scene-summaries", **STORE_TASK)
def summaries(
    store: str, survey_id: str, model_name: str, model_version: str, scene_ids: list[str]
) -> dict[str, dict]:
    target = open_store(store)
    try:
        return target.scene_summaries(survey_id, model_name, model_version, scene_ids)
    finally:
        target.close()


def change(old: dict | None, new: dict | None) -> dict:
    """Old and new crack count, total length and length by severity of a scene, and the differences.

    >>> old = {"crack_count": 2, "total_length_m": 3.0, "length_m_by_severity": {"low": 3.0}}
    >>> new = {"crack_count": 3, "total_length_m": 2.5, "length_m_by_severity": {"low": 1.0, "high": 1.5}}
    >>> c = change(old, new); c["cracks_delta"], c["length_m_delta"], c["high_m_new"]
    (1, -0.5, 1.5)
    """
    row = {}
    for label, key in (("cracks", "crack_count"), ("length_m", "total_length_m")):
        a, b = (old or {}).get(key, 0), (new or {}).get(key, 0)
        row |= {f"{label}_old": round(a, 3), f"{label}_new": round(b, 3), f"{label}_delta": round(b - a, 3)}
    for severity in SEVERITIES:
        a = (old or {}).get("length_m_by_severity", {}).get(severity, 0.0)
        b = (new or {}).get("length_m_by_severity", {}).get(severity, 0.0)
        row |= {f"{severity}_m_old": round(a, 3), f"{severity}_m_new": round(b, 3)}
    return row


def changes_markdown(model: str, rows: list[dict]) -> str:
    done = [r for r in rows if r["status"] != "failed"]
    lines = [
        f"# Reprocessed with {model}",
        "",
        f"- scenes: {len(done)} of {len(rows)} now show {model}",
        f"- cracks: {sum(r['cracks_old'] for r in done)} -> {sum(r['cracks_new'] for r in done)}",
        f"- total crack length: {sum(r['length_m_old'] for r in done):.2f} m -> "
        f"{sum(r['length_m_new'] for r in done):.2f} m",
        "",
        "| survey | scene | from | cracks | length m | low m | medium m | high m |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in done:
        lines.append(
            f"| {r['survey_id']} | {r['scene_id']} | {r['old_model']} | "
            f"{r['cracks_old']} -> {r['cracks_new']} | {r['length_m_old']:.2f} -> "
            f"{r['length_m_new']:.2f} | "
            + " | ".join(f"{r[f'{s}_m_old']:.2f} -> {r[f'{s}_m_new']:.2f}" for s in SEVERITIES)
            + " |"
        )
    lines += [
        f"- FAILED {r['survey_id']}/{r['scene_id']}: {r['error']}" for r in rows if r["status"] == "failed"
    ]
    return "\n".join(lines)


@flow(name="reprocess", log_prints=True)
def reprocess(
    store: str,
    model: str,
    survey_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
    bbox: list[float] | None = None,
    from_model: str | None = None,
    backend: str = "auto",
    output_dir: str | None = None,
    scene_deployment: str | None = None,
    max_concurrent: int = 4,
    force: bool = False,
    scene_timeout_s: float = SCENE_TIMEOUT_S,
    options: dict | None = None,
    in_flight: int | None = None,
):
    """Map the selected scenes of ``store`` with ``model``, promote it, and report what changed.

    Args:
        store: A ``.gpkg`` path or a ``postgresql://`` URL.
        model: ``name[:version]`` to map with (the registry's latest of that name without a version).
        survey_id: Only this survey's scenes.
        since, until: Only scenes whose current version was processed in this time range
            (ISO 8601, UTC unless the text says otherwise).
        bbox: ``[minx, miny, maxx, maxy]`` in the store CRS: only scenes whose footprint intersects it.
        from_model: ``NAME:VERSION``: only scenes that currently show this version.
        output_dir: Folder or storage prefix for probability rasters (default: beside a .gpkg store).
        scene_deployment: Run each scene as a run of this deployment on its work pool.
        max_concurrent: With a deployment, at most this many scene runs at once.
        force: Map scenes again even if already published with ``model``.
        scene_timeout_s: With a deployment, a scene run not finished after this long is cancelled
            and the scene fails, saying so.
        options: Mapping options (``pipeline.scene.MAPPING_OPTIONS``), checked before any work.
        in_flight: Without a deployment, map this many scenes at once in this process, sharing
            the network (``flows.survey.process_survey``; default: 4 on a GPU, 1 on CPUs).

    Returns the report rows (one per scene); the run fails, naming them, if any scene failed.
    """
    entry = resolve(model)
    SceneOptions.from_mapping(options).check_threshold(entry)  # before any work
    in_flight = scenes_in_flight(in_flight, backend)  # checked before any work
    old_name, old_version = split_model(from_model) if from_model else (None, None)
    if survey_id is not None:
        check_survey_id(survey_id)
    selection = SceneSelection(
        survey_id=survey_id,
        since=since,
        until=until,
        bbox=tuple(bbox) if bbox else None,
        model_name=old_name,
        model_version=old_version,
    )
    selected = [
        s
        for s in select_scenes(store, selection)
        if s["status"] == "done" and (s["model_name"], s["model_version"]) != (entry.name, entry.version)
    ]
    by_survey: dict[str, list[dict]] = defaultdict(list)
    for scene in selected:
        by_survey[scene["survey_id"]].append(scene)
    run_id = str(flow_run.id or uuid.uuid4())
    bar = ArtifactProgress(len(selected), key="reprocess-progress")
    report: list[dict] = []
    with progress.listening(bar):
        for survey, scenes in by_survey.items():
            settings = run_settings(
                store, survey, run_id, entry.spec, backend, output_dir, options, force, promote=False
            )
            frame_survey, frames = stored_frame_survey(store, survey)
            if frame_survey is not None:  # mapped whole: its frames' views of a crack are merged
                scenes = frames
            sources = [SceneSource(s["source_uri"], s["scene_id"]) for s in scenes]
            if frame_survey is not None:
                rows = map_frames(
                    sources,
                    frame_survey,
                    settings,
                    scene_deployment,
                    max_concurrent,
                    on_finished=lambda row: bar.scene_finished(),
                    scene_timeout_s=scene_timeout_s,
                )
            else:
                rows = run_scenes(
                    sources,
                    settings,
                    scene_deployment,
                    max_concurrent,
                    on_finished=lambda row: bar.scene_finished(),
                    scene_timeout_s=scene_timeout_s,
                    in_flight=in_flight,
                )
            ok = [r.scene_id for r in rows if r.status != "failed"]
            if ok:
                promote(store, survey, ok, entry.name, entry.version)
            new = summaries(store, survey, entry.name, entry.version, ok)
            old_models = {(s["model_name"], s["model_version"]) for s in scenes}
            old = {
                scene_id: summary
                for name, version in sorted(old_models)
                for scene_id, summary in summaries(
                    store,
                    survey,
                    name,
                    version,
                    [
                        s["scene_id"]
                        for s in scenes
                        if (s["model_name"], s["model_version"]) == (name, version)
                    ],
                ).items()
            }
            for scene, row in zip(scenes, rows):
                scene_id = scene["scene_id"]
                report.append(
                    {
                        "survey_id": survey,
                        "scene_id": scene_id,
                        "status": row.status,
                        "old_model": f"{scene['model_name']}:{scene['model_version']}",
                        "new_model": entry.spec,
                        **change(old.get(scene_id), new.get(scene_id)),
                        "error": row.error,
                    }
                )
    create_table_artifact(
        report, key="reprocess-changes", description=f"Scenes reprocessed with {entry.spec}"
    )
    create_markdown_artifact(changes_markdown(entry.spec, report), key="reprocess-summary")
    failed = [f"{r['survey_id']}/{r['scene_id']}" for r in report if r["status"] == "failed"]
    if failed:
        return Failed(
            message=f"{len(failed)} of {len(report)} scenes failed: {', '.join(failed)}", data=report
        )
    return Completed(message=f"{len(report)} scenes now show {entry.spec}", data=report)
