"""What a flow run shows in Prefect's UI: a progress artifact, the scenes table, a summary."""

from __future__ import annotations

import time

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Completed, Failed

from pipeline.stores import RunInfo
from pipeline.survey import SceneRow


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


def summary_markdown(run: RunInfo, rows: list[SceneRow]) -> str:
    done = [r for r in rows if r.status == "done"]
    failed = [r for r in rows if r.status == "failed"]
    skipped = [r for r in rows if r.status == "skipped"]
    lines = [
        f"# Survey {run.survey_id}",
        "",
        f"Model {run.model_name}:{run.model_version}, run {run.run_id}.",
        "",
        f"- scenes mapped: {len(done)} of {len(rows)}",
        f"- scenes skipped (unchanged since mapped with this model version): {len(skipped)}",
        f"- cracks: {sum(r.cracks for r in done)}",
        f"- total crack length: {sum(r.length_m for r in done):.2f} m",
    ]
    lines += [f"- FAILED {r.scene_id}: {r.error}" for r in failed]
    return "\n".join(lines)


def report(run: RunInfo, rows: list[SceneRow], what: str = "survey"):
    """The table and markdown artifacts of a parent run, and its final state (Failed names the failed scenes)."""
    create_table_artifact(
        [r.as_dict() for r in rows], key=f"{what}-scenes", description=f"Scenes of survey {run.survey_id}"
    )
    create_markdown_artifact(summary_markdown(run, rows), key=f"{what}-summary")
    failed = [r.scene_id for r in rows if r.status == "failed"]
    if failed:
        return Failed(message=f"{len(failed)} of {len(rows)} scenes failed: {', '.join(failed)}", data=rows)
    skipped = sum(r.status == "skipped" for r in rows)
    return Completed(
        message=f"{len(rows) - skipped} scenes mapped, {skipped} unchanged and skipped", data=rows
    )
