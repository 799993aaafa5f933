"""Surveys: finding their scenes, and mapping one scene into a store.

``map_scene`` is the unit of work every runner shares (the CLI, the Prefect
flows, a worker on another machine): it takes and returns plain values.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from models.registry import ModelEntry, resolve
from pipeline import progress
from pipeline.errors import PipelineError, SceneContentError
from pipeline.inference import Backend, load_backend
from pipeline.raster import scene_id_for
from pipeline.scene import SceneOptions, process_scene
from pipeline.store import RunInfo, open_store

log = logging.getLogger(__name__)
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


@dataclass(frozen=True, slots=True)
class SceneSource:
    """A scene to process: where it is and what it is called in the store."""

    uri: str
    scene_id: str


def discover(sources: list[str]) -> list[SceneSource]:
    """The scenes named by ``sources``: raster files, folders (searched recursively) or globs.

    A file is taken as given; in a folder, files with a raster extension are
    scenes, and their ids are their paths relative to the folder.

    Raises:
        SceneContentError: a source matches nothing, or two scenes get the same id.
    """
    found: list[SceneSource] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in RASTER_SUFFIXES)
            found += [SceneSource(str(p), str(PurePosixPath(p.relative_to(path).with_suffix(""))))
                      for p in files]
        elif path.exists():
            found.append(SceneSource(str(path), scene_id_for(str(path))))
        elif matches := sorted(glob.glob(source, recursive=True)):
            found += [SceneSource(m, scene_id_for(m)) for m in matches if Path(m).is_file()]
        else:
            raise SceneContentError(source, "no such file or folder, and no file matches it")
    ids = [s.scene_id for s in found]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise SceneContentError(", ".join(sources), f"several scenes would share the ids {dupes}; "
                                                    "give their folder instead of single files")
    return found


def default_survey_id(sources: list[str]) -> str:
    """The survey id used when none is given: the name of the first source's folder.

    >>> default_survey_id(["data/road-12/"]), default_survey_id(["data/road-12/a.tif"])
    ('road-12', 'road-12')
    """
    first = Path(sources[0])
    return (first if first.is_dir() or not first.suffix else first.parent).name or "survey"


def probability_path(output_dir: str | Path, run: RunInfo, scene_id: str) -> Path:
    return Path(output_dir) / run.survey_id / f"{scene_id}.{run.model_name}-{run.model_version}.tif"


def default_output_dir(store: str) -> Path:
    """Probability rasters go beside a GeoPackage store: ``<stem>-probability/``."""
    path = Path(store)
    return path.with_name(path.stem + "-probability")


@lru_cache(maxsize=4)
def cached_backend(spec: str, backend: str) -> tuple[ModelEntry, Backend]:
    """Model and backend, loaded once per process (a worker keeps them across scenes)."""
    entry = resolve(spec)
    return entry, load_backend(entry, backend)


def map_scene(source: SceneSource, store: str, run: RunInfo, backend: str = "auto",
              output_dir: str | None = None, options: SceneOptions = SceneOptions()) -> dict:
    """Process one scene and publish it; on a bad scene, record it as failed and raise.

    Returns a summary: scene_id, chips, cracks, length_m, seconds, probability.
    """
    entry, net = cached_backend(f"{run.model_name}:{run.model_version}", backend)
    target = open_store(store)
    try:
        out = probability_path(output_dir or default_output_dir(store), run, source.scene_id)
        try:
            result = process_scene(source.uri, net, entry, out, target.crs, options,
                                   source.scene_id, progress.report)
        except (PipelineError, OSError) as exc:
            log.error("%s", exc)
            target.mark_failed(source.uri, source.scene_id, run, str(exc))
            raise
        target.publish(result, run)
    finally:
        target.close()
    return {"scene_id": source.scene_id, "chips": result.chip_count, "cracks": len(result.cracks),
            "length_m": round(result.total_length_m, 3), "seconds": round(result.seconds, 2),
            "probability": str(out)}
