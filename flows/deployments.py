"""The project's Prefect deployments, and registering them with a server (``crackmap deploy``).

- ``process-scene/process-scene``: one scene, the unit of work; on the GPU pool
  (``CRACKMAP_GPU_POOL``) in production, but any pool whose workers have
  crackmap installed runs it.
- ``process-survey/scheduled-survey-run``: on a cron schedule, discover new or changed
  scenes under ``CRACKMAP_SURVEY_SOURCES`` and hand them to ``process-scene`` runs;
  unchanged scenes are skipped, so each run maps only what is new.  A survey folder holding
  ``camera.yaml`` is a frame survey: its frames become ``process-scene`` runs too, and the
  survey run merges and publishes them (``flows.frames``).
- ``reprocess/reprocess``: map selected scenes with another model version and promote it
  (parameters: ``store``, ``model`` and the selection; see ``flows.reprocess``).

Flows are referenced by module path (``flows.scene.process_scene``): workers import
them from the installed package (the worker images install crackmap), so no code
is pulled from anywhere at run time.
"""

from __future__ import annotations

from uuid import UUID

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from flows.settings import Settings
from models.registry import resolve
from pipeline.ids import check_survey_id
from pipeline.redact import mask_url, password_of
from pipeline.scene import SceneOptions

SCENE_DEPLOYMENT = "process-scene/process-scene"


def scene_job_variables(config: Settings) -> dict:
    """Job variables of ``process-scene`` runs: the image, and the engine cache in their environment.

    >>> scene_job_variables(Settings(gpu_image="reg/worker-gpu:1.1", engine_cache="s3://m/engines/"))
    {'image': 'reg/worker-gpu:1.1', 'env': {'CRACKMAP_ENGINE_CACHE': 's3://m/engines/'}}
    """
    job: dict = {"image": config.gpu_image} if config.gpu_image else {}
    if config.engine_cache:
        job["env"] = {"CRACKMAP_ENGINE_CACHE": config.engine_cache}
    return job


def deployments(config: Settings, with_schedule: bool | None = None) -> list[RunnerDeployment]:
    """The deployments for these settings.

    ``scheduled-survey-run`` needs ``survey_sources`` and ``store``; it is left out
    without them unless ``with_schedule`` is True, which makes their absence an error.
    """
    from flows.reprocess import reprocess
    from flows.scene import process_scene
    from flows.survey import process_survey

    module = EntrypointType.MODULE_PATH
    scene_job = scene_job_variables(config)
    found = [
        process_scene.to_deployment(
            "process-scene",
            work_pool_name=config.gpu_pool,
            entrypoint_type=module,
            job_variables=scene_job,
            tags=["crackmap", "gpu"],
            description="Map one scene (the unit of work); GPU pool in production.",
        ),
        reprocess.to_deployment(
            "reprocess",
            work_pool_name=config.cpu_pool,
            entrypoint_type=module,
            tags=["crackmap"],
            parameters={
                "scene_deployment": SCENE_DEPLOYMENT,
                "max_concurrent": config.scene_concurrency,
                "scene_timeout_s": config.scene_timeout_s,
                **({"output_dir": config.output} if config.output else {}),
            },
            description="Map selected scenes with another model version, promote it, report the changes.",
        ),
    ]
    if with_schedule is None:
        with_schedule = bool(config.survey_sources and config.store)
    if with_schedule:
        if not (config.survey_sources and config.store):
            raise ValueError(
                "scheduled-survey-run needs CRACKMAP_SURVEY_SOURCES (a JSON list of folders "
                "or s3:// prefixes) and CRACKMAP_STORE"
            )
        if password_of(config.store):
            raise ValueError(
                f"CRACKMAP_STORE {mask_url(config.store)} holds a password: deployment "
                "parameters are stored in Prefect's database. Remove it from the URL and give "
                "the workers PGPASSWORD or a ~/.pgpass file"
            )
        if config.survey_id:
            check_survey_id(config.survey_id)
        options = dict(config.mapping_options)
        if "type_profile" in config.model_fields_set:  # CRACKMAP_TYPE_PROFILE: the runs' crack-type profile
            options["type_profile"] = config.type_profile
        # refused now, not at 2 a.m.
        SceneOptions.from_mapping(options).check_threshold(resolve(config.model))
        parameters = {
            "sources": config.survey_sources,
            "store": config.store,
            "scene_deployment": SCENE_DEPLOYMENT,
            "max_concurrent": config.scene_concurrency,
            "scene_timeout_s": config.scene_timeout_s,
        }
        parameters |= {
            k: v
            for k, v in (
                ("output_dir", config.output),
                ("survey_id", config.survey_id),
                ("model", config.model),
                ("network", config.network),
                ("options", options),
            )
            if v
        }
        found.append(
            process_survey.to_deployment(
                "scheduled-survey-run",
                work_pool_name=config.cpu_pool,
                entrypoint_type=module,
                schedules=[Cron(config.schedule_cron, timezone=config.schedule_timezone)],
                parameters=parameters,
                tags=["crackmap"],
                description="Discover new or changed scenes and map them (unchanged ones are skipped).",
            )
        )
    return found


def register(config: Settings, with_schedule: bool | None = None) -> dict[str, UUID]:
    """Create or update the deployments on the server ``PREFECT_API_URL`` names; their ids by name."""
    return {f"{d.flow_name}/{d.name}": d.apply() for d in deployments(config, with_schedule)}
