"""Orchestration settings, read once from the environment (``CRACKMAP_*``) at the edge.

Deployments are registered with these values (``crackmap deploy``); flows take
explicit parameters.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    """Where deployments run and what the scheduled survey run looks at.

    Attributes:
        survey_sources: Folders or storage prefixes (``s3://surveys/incoming/``) the
            scheduled run discovers scenes under (JSON list in the environment).
        store: The GIS store (a ``.gpkg`` path or a ``postgresql://`` URL, password from PGPASSWORD).
        output: Folder or storage prefix for probability rasters (required with PostGIS).
        survey_id: Survey the scheduled run publishes into (default: the first source's folder name).
        model: ``NAME[:VERSION]`` the scheduled run maps with (default: the registry's default).
        network: Road centrelines (any vector file pyogrio reads, with a ``road_id`` field): when set,
            every survey run rates its sections along them (``crackmap sections``) after mapping.
        mapping_options: Mapping options of the scheduled run (JSON object in the environment,
            e.g. ``{"threshold": 0.4, "min_length_m": 0.05}``; ``pipeline.scene.MAPPING_OPTIONS``).
        type_profile: The crack-type angle profile scenes are typed with when mapped
            (``pipeline.crack_types.PROFILES``: aashto-r85, strict-10, loose-30).
        schedule_cron: When the scheduled run starts (cron, in ``schedule_timezone``).
        cpu_pool / gpu_pool: Work pools of the parent flows and of ``process-scene``.
        scene_concurrency: At most this many ``process-scene`` runs at once per parent run.
        scene_timeout_s: A ``process-scene`` run not finished after this long (no worker serving
            the GPU pool, say) is cancelled and its scene fails with a message saying so.
        code_root: Where the workers find this repository (the images install it at /opt/crackmap).
        gpu_image: Image of ``process-scene`` jobs on container work pools (Kubernetes, Docker).
        engine_cache: Where ``process-scene`` runs keep TensorRT engines (a folder or an fsspec
            URL such as ``s3://models/engines/``), passed to every scene job as
            ``CRACKMAP_ENGINE_CACHE``; shared, so a pod loads the engine its GPU model needs
            instead of building it (minutes) in each new pod.
    """

    model_config = SettingsConfigDict(env_prefix="CRACKMAP_", extra="forbid")

    survey_sources: list[str] = []
    store: str | None = None
    output: str | None = None
    survey_id: str | None = None
    model: str | None = None
    network: str | None = None
    mapping_options: dict[str, float] = {}
    type_profile: str = "aashto-r85"
    schedule_cron: str = "0 2 * * *"
    schedule_timezone: str = "UTC"
    cpu_pool: str = "crackmap-cpu"
    gpu_pool: str = "crackmap-gpu"
    scene_concurrency: int = 4
    scene_timeout_s: float = 6 * 3600.0
    code_root: str = str(ROOT)
    gpu_image: str | None = None
    engine_cache: str | None = None


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings()
