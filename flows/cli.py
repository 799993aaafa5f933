"""``crackmap``: the pipeline's commands plus those that run Prefect flows."""

from __future__ import annotations

import os
import sys
import time

import click
from tqdm import tqdm

from pipeline import progress
from pipeline.cli import backend_option, cli, fail, model_option
from pipeline.errors import PipelineError


def summary_table(rows: list[dict]) -> str:
    header = f"{'scene':<28} {'status':<7} {'chips':>6} {'cracks':>6} {'length m':>9} {'s':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['scene_id'][:28]:<28} {r['status']:<7} {r['chips']:>6} {r['cracks']:>6} "
                     f"{r['length_m']:>9.2f} {r['seconds']:>7.1f}")
    return "\n".join(lines)


@cli.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--store", required=True, help="GIS store for the crack map: a .gpkg path or a postgresql:// URL.")
@click.option("--survey", "survey_id", default=None, help="Survey id (default: the source folder name).")
@click.option("--output", "output_dir", default=None,
              help="Folder or storage URL prefix (s3://...) for probability rasters "
                   "(default: beside a .gpkg store; required with PostGIS).")
@click.option("--glob", "pattern", default=None,
              help="Only scenes whose path under a folder or prefix matches, e.g. '**/*_rgb.tif'.")
@click.option("--force", is_flag=True, help="Map scenes again even if unchanged since mapped "
                                            "with this model version.")
@model_option
@backend_option
def run(sources: tuple[str, ...], store: str, survey_id: str | None, output_dir: str | None,
        pattern: str | None, force: bool, model_spec: str | None, backend: str) -> None:
    """Map the cracks of SOURCES into STORE.

    SOURCES are raster files, folders, globs or storage URL prefixes such as
    s3://bucket/survey/ (credentials and endpoint from the AWS environment
    variables or profile, AWS_ENDPOINT_URL for S3-compatible stores).  Scenes
    unchanged since they were mapped with the same model version are skipped.
    Runs the Prefect flow process-survey (ephemeral: no server needed) and
    exits non-zero if any scene failed.
    """
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here
    from flows.survey import process_survey

    started = time.perf_counter()
    bars: dict[str, tqdm] = {}

    def show(scene_id: str, done: int, total: int) -> None:
        bar = bars.get(scene_id)
        if bar is None:
            for old in bars.values():
                old.close()
            bar = bars[scene_id] = tqdm(total=total, desc=scene_id[-24:], unit="chip")
        bar.update(done - bar.n)

    try:
        with progress.listening(show):
            state = process_survey(list(sources), store, survey_id, model_spec, backend,
                                   output_dir, force, pattern, return_state=True)
    except PipelineError as exc:
        fail(str(exc))
    finally:
        for bar in bars.values():
            bar.close()
    rows = state.result(raise_on_failure=False)
    if not isinstance(rows, list):
        fail(str(rows))
    done = [r for r in rows if r["status"] == "done"]
    skipped = sum(r["status"] == "skipped" for r in rows)
    click.echo(summary_table(rows))
    for r in rows:
        if r["status"] == "failed":
            click.secho(f"failed: {r['error']}", fg="red", err=True)
    click.echo(f"\n{len(done)}/{len(rows)} scenes, {sum(r['cracks'] for r in done)} cracks, "
               f"{sum(r['length_m'] for r in done):.2f} m of cracks"
               + (f", {skipped} unchanged and skipped" if skipped else "")
               + f" in {time.perf_counter() - started:.1f} s -> {store}")
    sys.exit(0 if len(done) + skipped == len(rows) else 1)


def main() -> None:
    cli()
