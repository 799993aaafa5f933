"""``crackmap``: the pipeline's commands plus those that run Prefect flows."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import time
import traceback
from datetime import UTC, datetime

import click
from tqdm import tqdm

from models.registry import resolve
from pipeline import progress
from pipeline.cli import backend_option, cli, fail, model_option
from pipeline.errors import USER_ERRORS
from pipeline.ids import check_survey_id
from pipeline.redact import mask_url, password_of, redact, remember, without_password
from pipeline.scene import SceneOptions
from pipeline.survey import SceneRow, cached_backend, check_sources_exist, default_survey_id
from pipeline.vectorize import warm_up as compile_skeleton_code


def verbose() -> bool:
    """Whether ``crackmap -v`` was given (it sets the root logger to INFO)."""
    return logging.getLogger().getEffectiveLevel() <= logging.INFO


def quiet_prefect() -> None:
    """Before Prefect is imported: its own log lines only with ``-v``.

    A failed scene is reported once, by the summary's ``failed:`` line; without this,
    Prefect logs it twice more, with a traceback.
    """
    from flows.embedded import quiet_prefect_environment

    quiet_prefect_environment(verbose())
    if not verbose():  # Prefect's background services log under their class names, outside "prefect"
        for name in ("EventsWorker", "APILogWorker"):
            logging.getLogger(name).setLevel(logging.ERROR)


in_flight_option = click.option(
    "--in-flight",
    type=click.IntRange(min=1),
    default=None,
    help="Scenes mapped at once in this process, their batches run together through one network; "
    "each holds a few rows of chips in memory (default: 4 where the network runs on a GPU, 1 on CPUs).",
)


def hand_over_password(store: str) -> str:
    """The store URL without its password, which goes to ``PGPASSWORD`` in this process instead.

    Flow-run parameters are kept in Prefect's database (the embedded one under
    ~/.prefect too), so the password must not be one; libpq reads ``PGPASSWORD``.
    """
    password = password_of(store)
    if password is None:
        return store
    remember(password)
    os.environ["PGPASSWORD"] = password
    return without_password(store)


@contextlib.contextmanager
def orchestration_errors(*also: type[BaseException]):
    """Our errors as one line; an orchestration failure (Prefect's API unreachable) as one line too.

    With ``crackmap -v`` the latter also shows its traceback.
    """
    try:
        yield
    except (*USER_ERRORS, *also) as exc:
        fail(str(exc))
    except (KeyboardInterrupt, SystemExit):  # Interrupted too
        raise
    except Exception as exc:
        if verbose():
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        fail(
            f"the run could not be orchestrated ({type(exc).__name__}: {first}); "
            "nothing was lost: run the same command again (crackmap -v shows the details)"
        )


@contextlib.contextmanager
def interruptible():
    """SIGTERM ends the run as Ctrl-C does (KeyboardInterrupt), so it can clean up and report."""

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C, even where the shell started us with SIGINT ignored (a background job of a script)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def interrupted(store: str, survey_id: str, model_spec: str | None, since: datetime) -> None:
    """One line on what an interrupted run finished (read back from the store), then exit 130."""
    from models.registry import resolve
    from pipeline.stores import SceneSelection, open_store

    try:
        entry = resolve(model_spec)
        target = open_store(store)
        try:
            rows = target.scenes(
                SceneSelection(
                    survey_id=survey_id,
                    since=since,
                    model_name=entry.name,
                    model_version=entry.version,
                    current_only=False,
                )
            )
        finally:
            target.close()
        finished = [r["scene_id"] for r in rows if r["status"] == "done"]
        what = (
            f"{len(finished)} scenes finished in this run ({', '.join(finished[:10])}"
            f"{', ...' if len(finished) > 10 else ''})"
            if finished
            else "no scene finished in this run"
        )
    except Exception:  # the store itself is what failed: say what we can
        what = "the scenes finished so far are in the store"
    click.secho(
        f"interrupted: {what}; nothing half-written was kept. Run the same command again to "
        "resume (finished scenes are skipped).",
        fg="yellow",
        err=True,
    )
    raise Interrupted()


class Interrupted(KeyboardInterrupt):
    """Raised once an interrupted run has been reported; ``run`` exits 130 after its API has stopped.
    A KeyboardInterrupt still: nothing on its way out waits for background work (``prefect_api``)."""


def exit_now(status: int) -> None:
    """Exit at once: what a run wrote is closed or rolled back, and its API has stopped, so the
    interpreter's seconds of tearing down (Prefect's queues to a stopped API, the network's
    sessions) are skipped, as a terminal user expects of Ctrl-C."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def load_model(model_spec: str | None, backend: str) -> None:
    """The model on its backend, before the flow starts (kept for the run's scenes,
    ``pipeline.survey.cached_backend``): a model or backend that cannot load ends the run in one
    line, before any scene.  A run's warm-up compiles skan's numba code meanwhile (``prefect_api``)."""
    cached_backend(resolve(model_spec).spec, backend)


def summary_table(rows: list[SceneRow]) -> str:
    header = f"{'scene':<28} {'status':<7} {'chips':>6} {'cracks':>6} {'length m':>9} {'s':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.scene_id[:28]:<28} {r.status:<7} {r.chips:>6} {r.cracks:>6} "
            f"{r.length_m:>9.2f} {r.seconds:>7.1f}"
        )
    return "\n".join(lines)


def checked_inputs(
    store: str, survey_id: str | None, options: dict | None, sources: list[str] = (), model: str | None = None
) -> str:
    """Refuse a bad survey id, mapping option (a threshold too low for ``model`` included),
    unknown model, missing local source or unreachable store before any work (and before
    Prefect starts); the store URL without its password.

    The password goes to PGPASSWORD of this process (``hand_over_password``), never to Prefect.
    """
    from pipeline.stores import check_store

    try:
        if survey_id is not None:
            check_survey_id(survey_id)
        typed = SceneOptions.from_mapping(options, os.environ.get("CRACKMAP_TYPE_PROFILE"))
        typed.check_threshold(resolve(model))
        check_sources_exist(list(sources))
        store = hand_over_password(store)
        check_store(store)  # a database that does not answer: one line now, not minutes of retries
        return store
    except USER_ERRORS as exc:
        fail(str(exc))
        raise  # fail() exits; for type checkers


def mapping_options(command):
    """--threshold, --overlap-px, --severity-mm, --min-length-m, --bridge-gap-px, --profile: one ``options`` dict.

    Only the options given go into the dict (the flow parameters stay short); the
    others keep their defaults (``pipeline.scene.MAPPING_OPTIONS``).
    """

    @functools.wraps(command)
    def wrapper(
        *args,
        threshold=None,
        overlap_px=None,
        severity_mm=None,
        min_length_m=None,
        bridge_gap_px=None,
        type_profile=None,
        **kwargs,
    ):
        given = {
            "threshold": threshold,
            "overlap_px": overlap_px,
            "min_length_m": min_length_m,
            "bridge_gap_px": bridge_gap_px,
            "type_profile": type_profile,
        }
        if severity_mm:
            given |= {"severity_medium_mm": severity_mm[0], "severity_high_mm": severity_mm[1]}
        options = {k: v for k, v in given.items() if v is not None}
        return command(*args, options=options or None, **kwargs)

    for option in reversed(
        [
            click.option(
                "--threshold",
                type=float,
                default=None,
                help="Crack probability that seeds a crack (default: the line threshold chosen for the "
                "model version, else its calibrated pixel threshold).",
            ),
            click.option(
                "--overlap-px", type=int, default=None, help="Overlap of neighbouring chips (default 64)."
            ),
            click.option(
                "--severity-mm",
                type=float,
                nargs=2,
                default=None,
                metavar="MEDIUM HIGH",
                help="Mean widths where severity becomes medium and high (default 6 19).",
            ),
            click.option(
                "--min-length-m",
                type=float,
                default=None,
                help="Drop isolated lines shorter than this (default 0.025; 0 keeps all).",
            ),
            click.option(
                "--bridge-gap-px",
                type=float,
                default=None,
                help="Join lines facing each other across a gap up to this (default 12; 0: off).",
            ),
            click.option(
                "--profile",
                "type_profile",
                default=None,
                metavar="NAME",
                help="Crack-type angle profile: aashto-r85, strict-10 or loose-30 (default: "
                "$CRACKMAP_TYPE_PROFILE, else aashto-r85); the sections step uses it too.",
            ),
        ]
    ):
        wrapper = option(wrapper)
    return wrapper


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--store", required=True, help="GIS store for the crack map: a .gpkg path or a postgresql:// URL."
)
@click.option("--survey", "survey_id", default=None, help="Survey id (default: the source folder name).")
@click.option(
    "--output",
    "output_dir",
    default=None,
    help="Folder or storage URL prefix (s3://...) for probability rasters "
    "(default: beside a .gpkg store; required with PostGIS).",
)
@click.option(
    "--glob",
    "pattern",
    default=None,
    help="Only scenes whose path under a folder or prefix matches, e.g. '**/*_rgb.tif'.",
)
@click.option(
    "--force", is_flag=True, help="Map scenes again even if unchanged since mapped with this model version."
)
@click.option(
    "--camera",
    default=None,
    help="Camera file (YAML/JSON): SOURCES are survey frames (JPEG/PNG), not orthophotos. "
    "A source folder holding camera.yaml is a frame survey too.",
)
@click.option(
    "--trajectory",
    default=None,
    help="Frame surveys: GNSS/IMU trajectory CSV (default: trajectory.csv in the source "
    "folder, else EXIF GPS in the frames).",
)
@click.option(
    "--frame-time",
    default="exif",
    show_default=True,
    help="Frame surveys: where frame times come from: exif, name:REGEX (group t) or index:CSV.",
)
@click.option(
    "--max-gap-s",
    default=1.0,
    show_default=True,
    help="Frame surveys: the longest trajectory gap a frame may fall in, seconds.",
)
@click.option(
    "--network",
    default=None,
    metavar="ROADS",
    help="Road centrelines (any vector file pyogrio reads, field road_id): rate the survey's "
    "sections after mapping (default: $CRACKMAP_NETWORK).",
)
@model_option
@backend_option
@in_flight_option
@mapping_options
def run(
    sources: tuple[str, ...],
    store: str,
    survey_id: str | None,
    output_dir: str | None,
    pattern: str | None,
    force: bool,
    camera: str | None,
    trajectory: str | None,
    frame_time: str,
    max_gap_s: float,
    network: str | None,
    model_spec: str | None,
    backend: str,
    in_flight: int | None,
    options: dict | None = None,
) -> None:
    """Map the cracks of SOURCES into STORE.

    SOURCES are raster files, folders, globs or storage URL prefixes such as
    s3://bucket/survey/ (credentials and endpoint from the AWS environment
    variables or profile, AWS_ENDPOINT_URL for S3-compatible stores).  Scenes
    unchanged since they were mapped with the same model version are skipped.
    Runs the Prefect flow process-survey (ephemeral: no server needed) and
    exits non-zero if any scene failed.
    """
    store = checked_inputs(store, survey_id, options, sources, model_spec)
    quiet_prefect()
    from flows.embedded import prefect_api, start_api_server

    server = start_api_server()  # (already started by the entry point, flows.launch)

    started = time.perf_counter()
    bars: dict[str, tqdm] = {}

    def show(scene_id: str, done: int, total: int) -> None:
        bar = bars.get(scene_id)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[scene_id] = tqdm(total=total, desc=scene_id[-24:], unit="chip")
        bar.update(done - bar.n)

    run_started = datetime.now(UTC)
    try:
        with (
            interruptible(),
            orchestration_errors(),
            prefect_api(compile_skeleton_code, server, imports=["flows.survey"]),
        ):
            try:
                load_model(model_spec, backend)  # while the warm-up compiles skan's numba code
                from flows.survey import process_survey

                with progress.listening(show):
                    state = process_survey(
                        list(sources),
                        store,
                        survey_id,
                        model_spec,
                        backend,
                        output_dir,
                        force,
                        pattern,
                        network=network,
                        camera=camera,
                        trajectory=trajectory,
                        frame_time=frame_time,
                        max_gap_s=max_gap_s,
                        options=options,
                        in_flight=in_flight,
                        return_state=True,
                    )
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: report while the API still answers
                for bar in bars.values():
                    bar.close()
                interrupted(store, survey_id or default_survey_id(list(sources)), model_spec, run_started)
    except Interrupted:
        exit_now(130)
    finally:
        for bar in bars.values():
            bar.close()
    rows = state.result(raise_on_failure=False)
    if not isinstance(rows, list):
        fail(str(rows))
    done = [r for r in rows if r.status == "done"]
    skipped = sum(r.status == "skipped" for r in rows)
    click.echo(summary_table(rows))
    for r in rows:
        if r.status == "failed":
            click.secho(f"failed: {redact(r.error)}", fg="red", err=True)
    click.echo(
        f"\n{len(done)}/{len(rows)} scenes, {sum(r.cracks for r in done)} cracks, "
        f"{sum(r.length_m for r in done):.2f} m of cracks"
        + (f", {skipped} unchanged and skipped" if skipped else "")
        + f" in {time.perf_counter() - started:.1f} s -> {mask_url(store)}"
    )
    if network := network or os.environ.get("CRACKMAP_NETWORK"):
        print_sections(store, survey_id or default_survey_id(list(sources)), network)
    sys.exit(0 if len(done) + skipped == len(rows) else 1)


def print_sections(store: str, survey_id: str, network: str) -> None:
    """The per-section table the survey run wrote (layer current_sections)."""
    from pipeline.cli import sections_table
    from pipeline.stores import open_store

    target = open_store(store)
    try:
        rows = target.read_layer("current_sections", {"survey_id": survey_id})
    finally:
        target.close()
    click.echo(f"\nSections of {survey_id} along {network}:\n" + sections_table(rows))


def changes_table(rows: list[dict]) -> str:
    header = (
        f"{'scene':<28} {'status':<7} {'cracks old':>10} {'new':>6} {'length m old':>12} {'new':>9} "
        f"{'low m':>13} {'medium m':>13} {'high m':>13}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        by = "".join(f" {r[f'{s}_m_old']:>6.2f}>{r[f'{s}_m_new']:<6.2f}" for s in ("low", "medium", "high"))
        lines.append(
            f"{(r['survey_id'] + '/' + r['scene_id'])[:28]:<28} {r['status']:<7} "
            f"{r['cracks_old']:>10} {r['cracks_new']:>6} {r['length_m_old']:>12.2f} "
            f"{r['length_m_new']:>9.2f}{by}"
        )
    return "\n".join(lines)


@cli.command()
@click.argument("store")
@click.option("--model", "model_spec", required=True, help="NAME[:VERSION] to map the scenes with.")
@click.option("--survey", "survey_id", default=None, help="Only this survey's scenes.")
@click.option("--since", default=None, help="Only scenes processed at or after this time (ISO 8601, UTC).")
@click.option("--until", default=None, help="Only scenes processed at or before this time (ISO 8601, UTC).")
@click.option(
    "--bbox",
    nargs=4,
    type=float,
    default=None,
    metavar="MINX MINY MAXX MAXY",
    help="Only scenes whose footprint intersects this box (store CRS).",
)
@click.option(
    "--from-model",
    default=None,
    metavar="NAME:VERSION",
    help="Only scenes that currently show this model version.",
)
@click.option(
    "--output",
    "output_dir",
    default=None,
    help="Folder or storage URL prefix for probability rasters (required with PostGIS).",
)
@click.option(
    "--deployment",
    "scene_deployment",
    default=None,
    help="Run each scene as a run of this deployment (process-scene/process-scene) on its "
    "work pool (needs PREFECT_API_URL); default: in this process.",
)
@click.option("--max-concurrent", default=4, show_default=True, help="Scene runs at once with --deployment.")
@click.option(
    "--scene-timeout",
    "scene_timeout_s",
    default=6 * 3600.0,
    show_default=True,
    metavar="SECONDS",
    help="With --deployment, a scene run not finished after this long (no worker serving the "
    "pool?) is cancelled and the scene fails.",
)
@click.option("--force", is_flag=True, help="Map scenes again even if already published with --model.")
@backend_option
@in_flight_option
@mapping_options
def reprocess(
    store: str,
    model_spec: str,
    survey_id: str | None,
    since: str | None,
    until: str | None,
    bbox: tuple[float, ...] | None,
    from_model: str | None,
    output_dir: str | None,
    scene_deployment: str | None,
    max_concurrent: int,
    scene_timeout_s: float,
    force: bool,
    backend: str,
    in_flight: int | None,
    options: dict | None = None,
) -> None:
    """Map scenes already in STORE again with another model version and make it current.

    The old results stay in the store (crackmap query --model NAME:VERSION reads them);
    a table shows per scene what changed.  Runs the Prefect flow reprocess; exits
    non-zero if any scene failed (those keep showing their old version).
    """
    store = checked_inputs(store, survey_id, options, model=model_spec)
    quiet_prefect()
    from flows.embedded import prefect_api, start_api_server

    server = start_api_server()
    from flows.reprocess import reprocess as reprocess_flow  # while the server starts

    bar = tqdm(unit="chip", desc="reprocess")

    def show(scene_id: str, done: int, total: int) -> None:
        if bar.desc != scene_id[-24:]:
            bar.reset(total)
            bar.set_description(scene_id[-24:])
        bar.update(done - bar.n)

    try:
        with (
            interruptible(),
            orchestration_errors(ValueError),
            prefect_api(server=server),
            progress.listening(show),
        ):
            state = reprocess_flow(
                store,
                model_spec,
                survey_id,
                since,
                until,
                list(bbox) if bbox else None,
                from_model,
                backend,
                output_dir,
                scene_deployment,
                max_concurrent,
                force,
                scene_timeout_s,
                options,
                in_flight,
                return_state=True,
            )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: scenes published so far stay unpromoted
        bar.close()
        click.secho(
            "interrupted: nothing half-written was kept; run the same command again to resume "
            "(scenes already mapped with the new version are skipped).",
            fg="yellow",
            err=True,
        )
        sys.exit(130)
    finally:
        bar.close()
    rows = state.result(raise_on_failure=False)
    if not isinstance(rows, list):
        fail(str(rows))
    click.echo(changes_table(rows))
    for r in rows:
        if r["status"] == "failed":
            click.secho(f"failed: {redact(r['error'])}", fg="red", err=True)
    ok = [r for r in rows if r["status"] != "failed"]
    click.echo(
        f"\n{len(ok)}/{len(rows)} scenes now show {rows[0]['new_model'] if rows else model_spec}; "
        f"cracks {sum(r['cracks_old'] for r in ok)} -> {sum(r['cracks_new'] for r in ok)}, "
        f"{sum(r['length_m_old'] for r in ok):.2f} m -> {sum(r['length_m_new'] for r in ok):.2f} m"
    )
    sys.exit(0 if len(ok) == len(rows) else 1)


@cli.command()
@click.option(
    "--schedule/--no-schedule",
    default=None,
    help="Register scheduled-survey-run (default: when CRACKMAP_SURVEY_SOURCES and CRACKMAP_STORE are set).",
)
def deploy(schedule: bool | None) -> None:
    """Register the deployments with the Prefect server PREFECT_API_URL names.

    process-scene (pool CRACKMAP_GPU_POOL), reprocess and scheduled-survey-run (pool
    CRACKMAP_CPU_POOL; cron CRACKMAP_SCHEDULE_CRON over CRACKMAP_SURVEY_SOURCES into
    CRACKMAP_STORE).  Start workers with: prefect worker start --pool POOL.
    """
    from flows.deployments import register
    from flows.settings import Settings

    try:
        ids = register(Settings(), schedule)
    except (ValueError, *USER_ERRORS) as exc:  # an unknown model, a threshold too low for it
        fail(str(exc))
    for name, deployment_id in ids.items():
        click.echo(f"{name}  {deployment_id}")


def main() -> None:
    cli()
