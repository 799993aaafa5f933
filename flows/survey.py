"""Prefect flow ``process-survey``: discover a survey's scenes and map each one.

Thin on purpose: every step is a ``pipeline`` function.  One task per scene
(never per chip); tasks pass paths and small summaries, never arrays.  A scene
that fails is recorded as failed in the store and the others go on; the flow
run then ends Failed, naming the failed scenes.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact
from prefect.artifacts import update_progress_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, Failed

from models.registry import resolve
from pipeline import progress, storage
from pipeline.survey import SceneSource, default_output_dir, default_survey_id, discover, map_scene
from pipeline.store import RunInfo


def retry_transient(task, task_run, state) -> bool:
    """Retry a scene only when storage failed transiently (``storage.ERROR_POLICY``)."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by Prefect
        return bool(getattr(exc, "transient", False)) or storage.is_transient(exc)
    return False


@task(name="map-scene", task_run_name="map-scene-{source.scene_id}", retries=2,
      retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient)
def map_scene_task(source: SceneSource, store: str, run: RunInfo, backend: str,
                   output_dir: str | None, force: bool = False) -> dict:
    return map_scene(source, store, run, backend, output_dir, force=force)


class ArtifactProgress:
    """A progress artifact for the flow run, updated at most every few seconds."""

    def __init__(self, scenes: int, every_s: float = 2.0) -> None:
        self.scenes, self.finished, self.every_s, self._last = scenes, 0, every_s, 0.0
        self.artifact_id = create_progress_artifact(0.0, key="survey-progress",
                                                    description="Scenes mapped (%)")

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


@flow(name="process-survey", log_prints=True)
def process_survey(sources: list[str], store: str, survey_id: str | None = None,
                   model: str | None = None, backend: str = "auto",
                   output_dir: str | None = None, force: bool = False, glob: str | None = None):
    """Map every scene of a survey into ``store``.

    Args:
        sources: Raster files, folders, globs, or storage URL prefixes (``s3://bucket/survey/``).
        store: Where crack lines go (a ``.gpkg`` path).
        survey_id: Survey the results belong to; default: the first source's folder name.
        model: ``name[:version]`` in the model registry; default: the registry's default.
        backend: ``auto``, ``onnxruntime`` or ``torch``.
        output_dir: Where probability rasters go (a folder or a storage URL prefix);
            default: beside the store.
        force: Map scenes again even if unchanged since mapped with this model version.
        glob: Only scenes whose path relative to their folder or prefix matches this glob.
    """
    entry = resolve(model)
    run = RunInfo(survey_id=survey_id or default_survey_id(sources),
                  run_id=str(flow_run.id or uuid.uuid4()), model_name=entry.name,
                  model_version=entry.version, model_sha256=entry.sha256)
    output_dir = output_dir or str(default_output_dir(store))  # before any scene: a bad store fails once
    scenes = discover(sources, glob)
    bar = ArtifactProgress(len(scenes))
    rows = []
    with progress.listening(bar):
        for source in scenes:
            started = time.perf_counter()
            state = map_scene_task(source, store, run, backend, output_dir, force,
                                   return_state=True)
            if state.is_completed():
                rows.append({**state.result(), "error": ""})
            else:
                error = str(state.result(raise_on_failure=False))
                rows.append({"scene_id": source.scene_id, "chips": 0, "cracks": 0, "length_m": 0.0,
                             "seconds": round(time.perf_counter() - started, 2),
                             "probability": "", "status": "failed", "error": error})
            bar.scene_finished()
    create_table_artifact(rows, key="survey-scenes", description=f"Scenes of survey {run.survey_id}")
    create_markdown_artifact(summary_markdown(run, rows), key="survey-summary")
    failed = [r["scene_id"] for r in rows if r["status"] == "failed"]
    if failed:
        return Failed(message=f"{len(failed)} of {len(rows)} scenes failed: {', '.join(failed)}",
                      data=rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    return Completed(message=f"{len(rows) - skipped} scenes mapped, {skipped} unchanged and skipped",
                     data=rows)
