"""Surveys: finding their scenes, and mapping one scene into a store.

``map_scene`` is the unit of work every runner shares (the CLI, the Prefect
flows, a worker on another machine): it takes and returns plain values.
"""

from __future__ import annotations

import glob
import json
import logging
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, cast

from models.registry import ModelEntry, resolve
from pipeline import buckets, progress
from pipeline.backends import Backend, load_backend
from pipeline.errors import PipelineError, SceneContentError, StoreError
from pipeline.ids import check_scene_id, check_survey_id
from pipeline.raster import scene_id_for
from pipeline.redact import mask_url, redact, without_password
from pipeline.scene import SceneOptions, detect_cracks
from pipeline.sharing import SharedBackend
from pipeline.stores import RunInfo, open_store

if TYPE_CHECKING:
    from pipeline.frames import GpsFix
    from pipeline.trajectory import Pose

log = logging.getLogger(__name__)
RASTER_SUFFIXES = buckets.RASTER_SUFFIXES


@dataclass(frozen=True, slots=True)
class SceneSource:
    """A scene to process: where it is, what it is called in the store, and its content identity.

    ``identity`` is the object's ETag when a listing gave it; None means "compute
    it when needed" (a local file's sha256).
    """

    uri: str
    scene_id: str
    identity: str | None = None


SCENE_STATUSES = ("done", "skipped", "failed")


@dataclass(frozen=True, slots=True)
class SceneRow:
    """What one scene came to in a run: a row of the run's table (CLI, Prefect artifact).

    ``done``: mapped and published now; ``skipped``: unchanged since published with
    this model version (its published counts, no new probability raster);
    ``failed``: ``error`` says why, in one line.
    """

    scene_id: str
    status: str
    chips: int = 0
    cracks: int = 0
    length_m: float = 0.0
    seconds: float = 0.0
    probability: str = ""
    error: str = ""

    def __post_init__(self) -> None:
        if self.status not in SCENE_STATUSES:
            raise ValueError(f"scene status {self.status!r} is not one of {SCENE_STATUSES}")

    @classmethod
    def failed(cls, scene_id: str, error: str, seconds: float = 0.0) -> SceneRow:
        """A failed scene's row; passwords in the error are masked."""
        return cls(scene_id, "failed", seconds=round(seconds, 2), error=redact(error))

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunSettings:
    """One survey run's settings, resolved once and passed whole to every step.

    ``store`` is without its password (it travels in flow parameters; the password
    is in PGPASSWORD or ~/.pgpass), ``output_dir`` is resolved (beside a GeoPackage
    store unless given), ``options_given`` are the mapping options as the user gave
    them (the JSON that a ``process-scene`` deployment run receives) and ``options``
    the same, checked and typed.
    """

    store: str
    run: RunInfo
    output_dir: str
    backend: str = "auto"
    options_given: dict | None = None
    options: SceneOptions = field(default_factory=SceneOptions)
    force: bool = False
    promote: bool = True

    @classmethod
    def resolve(
        cls,
        store: str,
        survey_id: str,
        run_id: str,
        model: str | None = None,
        backend: str = "auto",
        output_dir: str | None = None,
        options: dict | None = None,
        type_profile: str | None = None,
        force: bool = False,
        promote: bool = True,
    ) -> RunSettings:
        """Check and resolve a run's settings before any work: the survey id, the mapping options,
        the model (the registry's default if None) and the output folder.

        Raises:
            IdError, OptionsError, ModelError, StoreError: naming what is wrong; nothing was done.
        """
        check_survey_id(survey_id)
        typed = SceneOptions.from_mapping(options, type_profile)
        entry = resolve(model)
        typed.check_threshold(entry)
        run = RunInfo(survey_id, run_id, entry.name, entry.version, entry.sha256)
        return cls(
            without_password(store),
            run,
            output_dir or str(default_output_dir(store)),
            backend,
            dict(options) if options else None,
            typed,
            force,
            promote,
        )

    @property
    def model_spec(self) -> str:
        return f"{self.run.model_name}:{self.run.model_version}"


def discover(
    sources: list[str], pattern: str | None = None, suffixes: tuple[str, ...] = RASTER_SUFFIXES
) -> list[SceneSource]:
    """The scenes named by ``sources``: raster files, folders (searched recursively), globs or URLs.

    A file is taken as given; in a folder or under a URL prefix (``s3://bucket/survey/``
    or any fsspec URL), files with a raster extension are scenes, and their ids are
    their paths relative to the folder or prefix, without extension.  ``pattern``
    (a glob on that relative path, e.g. ``*.tif`` or ``**/*_rgb.tif``) narrows folders
    and prefixes.  ``suffixes``: the extensions that make a file a scene (frame surveys:
    ``pipeline.frames.FRAME_SUFFIXES``).

    Raises:
        SceneContentError: a source matches nothing, or two scenes get the same id.
        IdError: a scene's id (its path) cannot be a file name (``pipeline.ids``).
        StorageError: a bucket is missing or refuses the credentials.
    """
    found: list[SceneSource] = []
    for source in sources:
        path = Path(source)
        if buckets.is_url(source):
            found += [
                SceneSource(o.uri, str(PurePosixPath(o.relative).with_suffix("")), o.etag)
                for o in buckets.list_scenes(source, pattern, suffixes)
            ]
        elif path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in suffixes
                and (pattern is None or buckets.matches_glob(p.relative_to(path).as_posix(), pattern))
            )
            found += [
                SceneSource(str(p), str(PurePosixPath(p.relative_to(path).with_suffix("")))) for p in files
            ]
        elif path.exists():
            found.append(SceneSource(str(path), scene_id_for(str(path))))
        else:
            found += [SceneSource(m, scene_id_for(m)) for m in local_matches(source)]
    for scene in found:
        check_scene_id(scene.scene_id, scene.uri)
    ids = [s.scene_id for s in found]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise SceneContentError(
            ", ".join(sources),
            f"several scenes would share the ids {dupes}; give their folder instead of single files",
        )
    return found


def local_matches(source: str) -> list[str]:
    """The files a local glob names, sorted.

    Raises:
        SceneContentError: it names none (nor is it a file or folder).
    """
    if matches := sorted(m for m in glob.glob(source, recursive=True) if Path(m).is_file()):
        return matches
    raise SceneContentError(source, "no such file or folder, and no file matches it")


def check_sources_exist(sources: list[str]) -> None:
    """Refuse a local source that names nothing, before any orchestration starts (a cheap check:
    storage URLs and folders are listed by ``discover_scenes`` later)."""
    for source in sources:
        if not buckets.is_url(source) and not Path(source).exists():
            local_matches(source)


def default_survey_id(sources: list[str]) -> str:
    """The survey id used when none is given: the name of the first source's folder.

    >>> default_survey_id(["data/road-12/"]), default_survey_id(["data/road-12/a.tif"])
    ('road-12', 'road-12')
    """
    first = Path(sources[0])
    return (first if first.is_dir() or not first.suffix else first.parent).name or "survey"


def probability_path(output_dir: str | Path, run: RunInfo, scene_id: str) -> str:
    """Where a scene's probability COG goes: under a local folder or a storage URL prefix.

    >>> run = RunInfo("road-12", "r1", "hrsegnet_b16", "1.0.0", "0" * 64)
    >>> probability_path("s3://maps/probability/", run, "0007")
    's3://maps/probability/road-12/0007.hrsegnet_b16-1.0.0.tif'
    """
    check_survey_id(run.survey_id), check_scene_id(scene_id)  # never a separator or '..' of their own
    return buckets.join(output_dir, f"{run.survey_id}/{scene_id}.{run.model_name}-{run.model_version}.tif")


def default_output_dir(store: str) -> Path:
    """Probability rasters go beside a GeoPackage store: ``<stem>-probability/``.

    A database store has no "beside": its runs must name an output folder or prefix.

    >>> default_output_dir("out/map.gpkg").as_posix()
    'out/map-probability'
    """
    if "://" in str(store):
        raise StoreError(
            f"{mask_url(store)}: probability rasters need a place: pass --output "
            "(a folder or an s3:// prefix) with a database store"
        )
    path = Path(store)
    return path.with_name(path.stem + "-probability")


_loading = threading.RLock()  # threads that ask at once (scenes in flight, a CLI's warm-up) wait for one load


def cached_backend(spec: str, backend: str) -> tuple[ModelEntry, Backend]:
    """Model and backend, loaded once per process (a worker keeps them across scenes)."""
    with _loading:
        return _loaded_backend(spec, backend)


@lru_cache(maxsize=4)
def _loaded_backend(spec: str, backend: str) -> tuple[ModelEntry, Backend]:
    entry = resolve(spec)
    return entry, load_backend(entry, backend)


def shared_backend(spec: str, backend: str) -> SharedBackend:
    """The cached backend behind one ``SharedBackend`` per process: scenes mapped at once
    (``map_scene(..., shared=True)`` from several threads) merge their batches into its calls."""
    with _loading:
        return _shared_backend(spec, backend)


@lru_cache(maxsize=4)
def _shared_backend(spec: str, backend: str) -> SharedBackend:
    return SharedBackend(cached_backend(spec, backend)[1])


def map_scene(source: SceneSource, settings: RunSettings, shared: bool = False) -> SceneRow:
    """Process one scene and publish it; on a bad scene, record it as failed and raise.

    A scene already published from the same content (ETag or sha256) with the
    same model version is skipped unless ``settings.force``.  The published version
    becomes the scene's current one unless ``settings.promote`` is False
    (reprocessing promotes later).  A skipped scene's row has its published counts.
    ``shared``: other scenes are mapped at once in this process; the network runs
    their batches together (``shared_backend``).
    """
    run = settings.run
    check_survey_id(run.survey_id), check_scene_id(source.scene_id)  # before anything is written
    with open_store(settings.store) as target:
        try:
            identity = source.identity or buckets.identity(source.uri)
        except OSError as exc:  # StorageError, or a local file that vanished
            log.info("%s", exc)  # raised: the caller reports it, once
            target.mark_failed(source.uri, source.scene_id, run, redact(str(exc)))
            raise
        published = target.published_sha256(run.survey_id, source.scene_id, run.model_name, run.model_version)
        if published == identity and not settings.force:
            log.info(
                "%s: unchanged since it was mapped with %s; skipped (use --force to redo)",
                source.uri,
                settings.model_spec,
            )
            done = target.scene_summaries(
                run.survey_id, run.model_name, run.model_version, [source.scene_id]
            )[source.scene_id]
            return SceneRow(
                source.scene_id,
                "skipped",
                done["chip_count"],
                done["crack_count"],
                round(done["total_length_m"], 3),
            )
        entry, net = cached_backend(settings.model_spec, settings.backend)
        if shared:
            net = shared_backend(settings.model_spec, settings.backend)
        out = probability_path(settings.output_dir, run, source.scene_id)
        try:
            result = detect_cracks(
                source.uri,
                net,
                entry,
                out,
                target.crs,
                settings.options,
                source.scene_id,
                progress.report,
                identity,
            )
        except (PipelineError, OSError) as exc:
            log.info("%s", exc)  # raised: the caller reports it, once
            target.mark_failed(source.uri, source.scene_id, run, redact(str(exc)))
            raise
        target.publish(result, run, promote=settings.promote)
    return SceneRow(
        source.scene_id,
        "done",
        result.chip_count,
        len(result.cracks),
        round(result.total_length_m, 3),
        round(result.seconds, 2),
        str(out),
    )


def observation_path(output_dir: str | Path, run: RunInfo, frame_id: str) -> str:
    """Where a frame's ground lines are kept between runs: beside its probability raster.

    >>> run = RunInfo("road-12", "r1", "hrsegnet_b16", "1.0.0", "0" * 64)
    >>> observation_path("out/p", run, "f0007")
    'out/p/road-12/f0007.hrsegnet_b16-1.0.0.frame.json'
    """
    return probability_path(output_dir, run, frame_id)[: -len(".tif")] + ".frame.json"


def _load_observation(uri: str, origin: tuple[float, float, float], identity: str):
    from pipeline.frames import observation_from_json

    try:
        with buckets.filesystem(uri).open(uri, "r") as f:
            data = f.read()
        obs = observation_from_json(data)
        kept = json.loads(data).get("origin")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return obs if kept == list(origin) and obs.sha256 == identity else None


def _save_observation(uri: str, obs, origin: tuple[float, float, float]) -> None:
    from pipeline.frames import observation_to_json

    text = json.dumps(dict(json.loads(observation_to_json(obs)), origin=list(origin)))
    if buckets.is_url(uri):
        with tempfile.TemporaryDirectory(prefix="crackmap-") as tmp:
            local = Path(tmp) / "frame.json"
            local.write_text(text)
            buckets.upload(local, uri)
    else:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        Path(uri).write_text(text)


def observe_frame_job(job, settings: RunSettings):
    """Segment one frame of a survey and put its crack lines on the ground (``pipeline.frames.FrameJob``).

    The unit of work of a frame survey, in this process or in a ``process-scene`` run
    on another machine: the observation is kept beside the frame's probability raster
    (``observation_path``), where the survey's merge reads it (``load_frame_observation``).
    Nothing is published: the frames of a survey are merged with each other first.

    Raises:
        FrameError, CameraError, SceneReadError: the frame or the camera file cannot be used.
    """
    from pipeline.camera import cached_camera
    from pipeline.frames import observe_frame

    run = settings.run
    check_survey_id(run.survey_id), check_scene_id(job.frame_id)
    camera = cached_camera(job.camera_path)
    entry, net = cached_backend(settings.model_spec, settings.backend)
    obs = observe_frame(
        job.uri,
        job.frame_id,
        camera,
        job.pose,
        job.origin,
        net,
        entry,
        probability_path(settings.output_dir, run, job.frame_id),
        settings.options,
        job.identity,
        progress.report,
    )
    _save_observation(observation_path(settings.output_dir, run, job.frame_id), obs, job.origin)
    return obs


def load_frame_observation(job, settings: RunSettings):
    """The observation ``observe_frame_job`` kept for ``job`` (same frame, camera, trajectory and origin).

    Raises:
        FrameError: there is none (the run that mapped the frame wrote it elsewhere: give the
            survey and its scene runs one shared ``--output``).
    """
    from pipeline.errors import FrameError

    path = observation_path(settings.output_dir, settings.run, job.frame_id)
    found = _load_observation(path, job.origin, job.identity)
    if found is None:
        raise FrameError(
            job.uri,
            f"its ground lines are not at {mask_url(path)} after its scene run; "
            "the survey and its process-scene runs need one shared --output",
        )
    return found


FrameObserver = Callable[[list], Iterable[tuple]]


def observe_here(settings: RunSettings) -> FrameObserver:
    """Map frame jobs one after the other in this process: (job, observation or error) for each."""

    def observe(jobs: list) -> Iterator[tuple]:
        for job in jobs:
            try:
                yield job, observe_frame_job(job, settings)
            except (PipelineError, OSError) as exc:
                yield job, exc

    return observe


def map_frame_survey(
    frames: list[SceneSource], survey, settings: RunSettings, observe: FrameObserver | None = None
) -> list[SceneRow]:
    """Map a frame survey (``pipeline.frames``) into ``store``: one scene row per frame.

    Poses for every frame first (from the trajectory, or EXIF GPS along the track);
    then each frame is segmented and put on the ground, unless it is unchanged since
    published with this model version (frame, camera file and trajectory alike) and
    its ground lines are still beside its probability raster; then the views of each
    crack are merged across frames and every frame is published with the cracks it
    holds (current unless ``settings.promote`` is False).  If no frame needed mapping,
    nothing is published again.  A bad frame is marked failed with a one-line error and
    the others go on.  The survey's settings are kept in the store (``frame_survey``) for
    reprocessing.

    ``observe`` maps the frames that need it (``FrameJob``s; default: ``observe_here``,
    one after the other in this process); the flows hand them to ``process-scene`` runs.

    Raises:
        CameraError, TrajectoryError: the camera file or trajectory cannot be used at all.

    Returns:
        One row per frame, in order (status done, skipped (not segmented again) or failed,
        with ``error``).
    """
    from pipeline.camera import cached_camera
    from pipeline.frames import FrameClock, FrameJob, frame_identity, frame_pose, frame_results, survey_origin
    from pipeline.trajectory import TrajectoryLimits, read_trajectory, track_poses, trajectory_origin

    cached_camera(survey.camera_path)  # a bad camera file stops the survey before any frame
    limits = TrajectoryLimits(survey.max_gap_s, survey.max_speed_m_s)
    trajectory = read_trajectory(survey.trajectory_path, limits) if survey.trajectory_path else None
    clock = FrameClock.parse(survey.frame_time)
    run, output_dir, options = settings.run, settings.output_dir, settings.options
    observe = observe or observe_here(settings)
    target = open_store(settings.store)
    rows: dict[str, SceneRow] = {}
    by_id = {s.scene_id: s for s in frames}

    def failed(source: SceneSource, exc: BaseException) -> None:
        log.error("%s", exc)
        target.mark_failed(source.uri, source.scene_id, run, str(exc))
        rows[source.scene_id] = SceneRow.failed(source.scene_id, str(exc))

    try:
        target.set_frame_survey(run.survey_id, survey.to_record())
        poses: dict[str, Pose] = {}
        fixes: list[tuple[SceneSource, GpsFix, float | None]] = []
        for source in frames:
            try:
                pose, fix, t = frame_pose(source.uri, clock, trajectory)
            except (PipelineError, OSError) as exc:
                failed(source, exc)
                continue
            if pose is not None:
                poses[source.scene_id] = pose
            elif fix is not None:  # frame_pose sets one of the two
                fixes.append((source, fix, t))
        if fixes:  # EXIF GPS: in time order where every frame has a time, else in name order
            if all(t is not None for _, _, t in fixes):
                fixes.sort(key=lambda item: cast(float, item[2]))  # every time is set (checked above)
            found = track_poses(
                [s.uri for s, _, _ in fixes], [f for _, f, _ in fixes], [t for _, _, t in fixes]
            )
            for (source, _, _), pose_or_error in zip(fixes, found):
                if isinstance(pose_or_error, PipelineError):
                    failed(source, pose_or_error)
                else:
                    poses[source.scene_id] = pose_or_error
            if len(fixes) > 1:
                log.warning(
                    "%s frames placed by EXIF GPS: heading from the track, roll and pitch taken "
                    "as zero (lower accuracy than a GNSS/IMU trajectory)",
                    len(fixes),
                )
        placed = [s for s in frames if s.scene_id in poses]
        if not placed:
            return [rows[s.scene_id] for s in frames]
        origin = (
            trajectory_origin(trajectory)
            if trajectory is not None  # stable across reruns
            else survey_origin([poses[placed[0].scene_id]])
        )
        camera_path = str(Path(survey.camera_path).resolve())
        observations, jobs = {}, []
        for source in placed:
            try:
                identity = frame_identity(
                    source.identity or buckets.identity(source.uri),
                    survey.camera_path,
                    survey.trajectory_path,
                )
                cached = observation_path(output_dir, run, source.scene_id)
                published = target.published_sha256(
                    run.survey_id, source.scene_id, run.model_name, run.model_version
                )
                if (
                    not settings.force
                    and published == identity
                    and (obs := _load_observation(cached, origin, identity)) is not None
                ):
                    observations[source.scene_id] = obs
                    rows[source.scene_id] = SceneRow(source.scene_id, "skipped")
                    continue
            except (PipelineError, OSError) as exc:
                failed(source, exc)
                continue
            jobs.append(
                FrameJob(source.uri, source.scene_id, identity, camera_path, poses[source.scene_id], origin)
            )
        for job, found in observe(jobs):
            if isinstance(found, BaseException):
                failed(by_id[job.frame_id], found)
                continue
            observations[job.frame_id] = found
            rows[job.frame_id] = SceneRow(
                job.frame_id,
                "done",
                chips=found.chip_count,
                seconds=round(found.seconds, 2),
                probability=found.probability_path,
            )
        if any(r.status == "done" for r in rows.values()):
            ordered = [observations[s.scene_id] for s in placed if s.scene_id in observations]
            for result in frame_results(ordered, origin, target.crs, options, survey.join_tolerance_m):
                target.publish(result, run, promote=settings.promote)
                frame_id = result.scene.scene_id
                rows[frame_id] = replace(
                    rows[frame_id], cracks=len(result.cracks), length_m=round(result.total_length_m, 3)
                )
        else:
            done = target.scene_summaries(
                run.survey_id, run.model_name, run.model_version, list(observations)
            )
            for frame_id in observations:
                summary = done.get(frame_id, {})
                rows[frame_id] = replace(
                    rows[frame_id],
                    cracks=summary.get("crack_count", 0),
                    length_m=round(summary.get("total_length_m", 0.0), 3),
                    chips=summary.get("chip_count", 0),
                )
    finally:
        target.close()
    return [rows[s.scene_id] for s in frames]
