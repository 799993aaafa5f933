"""The ``crackmap`` command line: the commands that need no orchestrator.

``flows.cli`` adds the commands that run Prefect flows (``run``) to this
group; the console script starts there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

from models import registry
from models.tensorrt_build import PRECISIONS
from pipeline.backends import BACKENDS, load_backend
from pipeline.errors import USER_ERRORS
from pipeline.images import image_files, image_probability, read_rgb
from pipeline.redact import mask_url, redact

model_option = click.option(
    "--model",
    "model_spec",
    default=None,
    metavar="NAME[:VERSION]",
    help="Model from the registry (default: the registry's default).",
)
backend_option = click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="Where the network runs.",
)
precision_option = click.option(
    "--cpu-precision",
    type=click.Choice(["auto", "fp32", "int8"]),
    default="auto",
    show_default=True,
    help="ONNX Runtime's graph: auto runs the INT8 graph where it passed "
    "its accuracy gate and measures faster on this CPU.",
)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log what happens, step by step.")
def cli(verbose: bool) -> None:
    """crackmap: road-crack maps from survey imagery."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def fail(message: str) -> NoReturn:
    """Print one line (passwords masked) and exit with status 2."""
    click.secho(f"error: {redact(message)}", fg="red", err=True)
    sys.exit(2)


def threshold_u8(threshold: float) -> float:
    return threshold * 255.0


@cli.command()
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@model_option
@backend_option
@precision_option
def segment(
    images_dir: Path, out_dir: Path, model_spec: str | None, backend: str, cpu_precision: str
) -> None:
    """Write a crack mask (PNG, 0/255, same size and stem) for every image in IMAGES_DIR."""
    try:
        entry = registry.resolve(model_spec)
        net = load_backend(entry, backend, cpu_precision=cpu_precision)
    except USER_ERRORS as exc:
        fail(str(exc))
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in tqdm(image_files(images_dir), desc="segment", unit="image"):
        try:
            probability = image_probability(read_rgb(path), net, entry.size_px)
        except USER_ERRORS as exc:
            tqdm.write(f"error: {exc}")
            failed += 1
            continue
        mask = (probability >= threshold_u8(entry.threshold)).astype(np.uint8) * 255
        Image.fromarray(mask).save(out_dir / f"{path.stem}.png")
    click.echo(f"masks written to {out_dir} with {entry.spec}")
    sys.exit(1 if failed else 0)


@cli.command("eval")
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@model_option
@backend_option
@precision_option
def evaluate(
    images_dir: Path, masks_dir: Path, model_spec: str | None, backend: str, cpu_precision: str
) -> None:
    """Score a model on images with 0/255 truth masks; prints JSON.

    Counts are accumulated over all pixels: two-class mIoU (as the HrSegNet
    paper reports), crack IoU, F1, precision and recall.
    """
    from models.metrics import PixelCounts

    try:
        entry = registry.resolve(model_spec)
        net = load_backend(entry, backend, cpu_precision=cpu_precision)
    except USER_ERRORS as exc:
        fail(str(exc))
    masks = {p.stem: p for p in image_files(masks_dir)}
    images = image_files(images_dir)
    if missing := sorted(p.name for p in images if p.stem not in masks):
        fail(
            f"{masks_dir} has no mask for {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    counts = PixelCounts()
    for path in tqdm(images, desc="eval", unit="image"):
        truth = np.asarray(Image.open(masks[path.stem]).convert("L")) > 127
        probability = image_probability(read_rgb(path), net, entry.size_px)
        if truth.shape != probability.shape:
            fail(
                f"{masks[path.stem]} is {truth.shape[::-1]}, its image {path.name} "
                f"is {probability.shape[::-1]}"
            )
        counts.add(probability >= threshold_u8(entry.threshold), truth)
    scores = {"model": entry.spec, "images": len(images), "threshold": entry.threshold, **counts.scores()}
    click.echo(json.dumps(scores, indent=2))


@cli.group()
def models() -> None:
    """The model registry."""


@models.command("list")
def models_list() -> None:
    """Every model version, the default marked with *."""
    try:
        default = registry.default_spec()
    except registry.ModelError:
        default = None
    for entry in registry.list_models():
        metrics = entry.card.get("metrics") or {}
        f1 = np.mean([m["f1"] for m in metrics.values()]) if metrics else float("nan")
        click.echo(
            f"{'*' if entry.spec == default else ' '} {entry.spec:<24} "
            f"{entry.variant:<4} threshold {entry.threshold:.3f}  mean val F1 {f1:.3f}  "
            f"{entry.folder}"
        )


@models.command("show")
@click.argument("spec", required=False)
def models_show(spec: str | None) -> None:
    """The model card of NAME[:VERSION] (default: the default model)."""
    try:
        entry = registry.resolve(spec)
    except registry.ModelError as exc:
        fail(str(exc))
    click.echo((entry.folder / "MODEL_CARD.md").read_text())


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}
)
@click.pass_context
def train(ctx: click.Context) -> None:
    """Train HrSegNet on crack datasets (options: crackmap train --help)."""
    from models.train import main as train_main

    sys.exit(train_main(ctx.args))


def new_version_options(command):
    """The options of the commands that add a version: --root, --default, --int8-data-root."""
    command = click.option(
        "--int8-data-root",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Also add the INT8 graph, calibrated and scored on the val splits "
        "under this folder (as `crackmap models quantize`).",
    )(command)
    command = click.option(
        "--default", "make_default", is_flag=True, help="Make it the root's default model."
    )(command)
    return click.option(
        "--root",
        type=click.Path(file_okay=False, path_type=Path),
        default=registry.ZOO,
        show_default=True,
        help="Registry folder to add the version to.",
    )(command)


@models.command("add")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name, e.g. hrsegnet-b16.")
@click.option("--version", "version", required=True, help="Semantic version, e.g. 1.1.0.")
@new_version_options
def models_add(
    checkpoint: Path, name: str, version: str, root: Path, make_default: bool, int8_data_root: Path | None
) -> None:
    """Add a trained CHECKPOINT (crackmap train's best.pt) as a new model version."""
    from models.package import package

    try:
        entry = package(checkpoint, name, version, root, default=make_default)
    except registry.ModelError as exc:
        fail(str(exc))
    added(entry, int8_data_root)


def added(entry: registry.ModelEntry, int8_data_root: Path | None) -> None:
    """Say what was added; then add its INT8 graph where a data root was given."""
    click.echo(
        f"added {entry.spec} in {entry.folder} "
        f"(ONNX verified, max abs diff {entry.card['onnx']['max_abs_diff_vs_torch']:.1e})"
    )
    if int8_data_root is not None:
        from pipeline.precision import add_int8

        try:
            record = add_int8(entry, int8_data_root).card["int8"]
        except (*USER_ERRORS, FileNotFoundError, ValueError) as exc:
            fail(f"{entry.spec} was added, but not its INT8 graph: {exc}")
        click.echo(
            f"INT8 graph: mean val F1 {record['mean_f1']:.4f} (float {record['fp32_mean_f1']:.4f}): "
            f"{'passes' if record['accepted'] else 'fails'} the gate"
        )


@models.command("rebuild")
@click.argument("spec")
@click.option("--version", "version", required=True, help="The new version, higher than SPEC's.")
@new_version_options
def models_rebuild(
    spec: str, version: str, root: Path, make_default: bool, int8_data_root: Path | None
) -> None:
    """Add SPEC's weights as a new version with the graph the exporter writes now (a faster graph
    for the same weights: versions are immutable)."""
    from models.package import rebuild

    try:
        entry = rebuild(registry.resolve(spec), version, root, default=make_default)
    except registry.ModelError as exc:
        fail(str(exc))
    added(entry, int8_data_root)


@models.command("export")
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@model_option
def models_export(fmt: str, out: Path, model_spec: str | None) -> None:
    """Export a registry model to ONNX (dynamic batch of uint8 400x400 chips), verified against torch."""
    from models.onnx_export import export_onnx, load_net, verify_onnx

    try:
        entry = registry.resolve(model_spec)
        net = load_net(entry.variant, entry.file("weights"))
    except registry.ModelError as exc:
        fail(str(exc))
    export_onnx(net, out, entry.size_px)
    diff = verify_onnx(net, out, size_px=entry.size_px)
    click.echo(f"{out}: {entry.spec}, max abs difference to torch {diff:.2e} (batch 1 and 5)")


@models.command("quantize")
@model_option
@click.option(
    "--data-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Datasets folder (<dataset>/val/images, masks) of the model's training data "
    "(default: $CRACKMAP_DATA, else ../shared/data/cracks, as crackmap train).",
)
@click.option(
    "--per-dataset",
    type=click.IntRange(1, 10_000),
    default=16,
    show_default=True,
    help="Calibration chips from each dataset's val split.",
)
def models_quantize(model_spec: str | None, data_root: Path | None, per_dataset: int) -> None:
    """Add an INT8 graph to a model version: calibrated and scored on val, recorded in its card.

    CPUs run it only where it passed the gate (mean val crack F1 at most 0.005
    below the float graph's) and measures faster (``--cpu-precision auto``).
    """
    import os

    from pipeline.precision import add_int8

    data_root = data_root or Path(os.environ.get("CRACKMAP_DATA", "../shared/data/cracks"))
    try:
        entry = add_int8(registry.resolve(model_spec), data_root, per_dataset)
    except (*USER_ERRORS, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    record = entry.card["int8"]
    click.echo(
        f"{entry.folder / record['path']}: mean val F1 {record['mean_f1']:.4f} "
        f"(float {record['fp32_mean_f1']:.4f}, drop {record['f1_drop']:.4f}): "
        f"{'passes' if record['accepted'] else 'fails'} the gate; masks agree on "
        f"{record['mask_agreement']:.3%} of val pixels"
    )


@models.command("build-engine")
@model_option
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp16", show_default=True)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 1024),
    default=64,
    show_default=True,
    help="Largest batch of chips the engine takes (it is tuned for 32, or less if smaller).",
)
@click.option(
    "--cache",
    default=None,
    metavar="DIR|URL",
    help="Engine cache, a folder or an fsspec URL (default: $CRACKMAP_ENGINE_CACHE, "
    "else ~/.cache/crackmap/engines).",
)
def models_build_engine(model_spec: str | None, precision: str, max_batch: int, cache: str | None) -> None:
    """Build (or find in the cache) the TensorRT engine of a model for this GPU."""
    from pipeline.backends.tensorrt import EngineCache, Profile, engine_for

    try:
        entry = registry.resolve(model_spec)
        _, key, path = engine_for(
            entry,
            precision,
            Profile.for_max_batch(max_batch, entry.size_px),
            EngineCache(cache) if cache else None,
        )
    except (*USER_ERRORS, RuntimeError) as exc:
        fail(str(exc))
    click.echo(f"{path}: {entry.spec}, {key.describe()}")


@cli.command()
@click.argument("store")
@click.option(
    "--bbox",
    type=float,
    nargs=4,
    default=None,
    metavar="MINX MINY MAXX MAXY",
    help="Cracks intersecting this box, in the store CRS (EPSG:4326: lon/lat).",
)
@click.option("--survey", "survey_id", default=None, help="Only this survey.")
@click.option("--scene", "scene_id", default=None, help="Only this scene.")
@click.option("--severity", type=click.Choice(["low", "medium", "high"]), default=None)
@click.option(
    "--model",
    "model_spec",
    default=None,
    metavar="NAME[:VERSION]",
    help="NAME:VERSION: that version, current or not; NAME: the current results of that "
    "model.  Default: every scene's current version.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["geojson", "gpkg", "csv", "geoparquet", "flatgeobuf"]),
    default=None,
    help="Output format (default: from --out's suffix, else geojson).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Output file (default: standard output; gpkg, geoparquet and flatgeobuf need a file).",
)
def query(
    store: str,
    bbox: tuple[float, float, float, float] | None,
    survey_id: str | None,
    scene_id: str | None,
    severity: str | None,
    model_spec: str | None,
    fmt: str | None,
    out: Path | None,
) -> None:
    """Write the cracks of STORE (a .gpkg path or a postgresql:// URL) that match, streaming."""
    from pipeline import export
    from pipeline.stores import CrackQuery, open_store

    fmt = fmt or (export.SUFFIXES.get(out.suffix.lower(), "geojson") if out else "geojson")
    if fmt in export.FILE_FORMATS and out is None:
        fail(f"--format {fmt} needs --out FILE")
    name, _, version = (model_spec or "").partition(":")
    try:
        selection = CrackQuery(
            bbox=bbox,
            survey_id=survey_id,
            scene_id=scene_id,
            severity=severity,
            model_name=name or None,
            model_version=version or None,
        )
    except ValueError as exc:
        fail(str(exc))
    if not str(store).startswith(("postgresql://", "postgres://")) and not Path(store).is_file():
        fail(f"{mask_url(store)}: no such GeoPackage")
    try:
        target = open_store(store)
    except USER_ERRORS as exc:
        fail(str(exc))
    try:
        batches = target.query(selection)
        if fmt in export.FILE_FORMATS:
            assert out is not None  # refused above
            writer = {
                "gpkg": export.write_gpkg,
                "geoparquet": export.write_geoparquet,
                "flatgeobuf": export.write_flatgeobuf,
            }[fmt]
            count = writer(batches, out, target.crs)
        else:
            with (
                open(out, "w", newline="", encoding="utf-8") if out else contextlib.nullcontext(sys.stdout)
            ) as stream:
                count = (
                    export.write_csv(batches, stream)
                    if fmt == "csv"
                    else export.write_geojson(batches, stream, target.crs)
                )
    except USER_ERRORS as exc:
        fail(str(exc))
    finally:
        target.close()
    click.echo(f"{count} cracks -> {out or 'stdout'}", err=True)


@cli.command()
@click.argument("store")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback exposes the store: put a reverse proxy "
    "with TLS and authentication in front (infra/README.md).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--allow-write-role",
    is_flag=True,
    help="Serve PostGIS as a role that could write (connections stay read-only). "
    "Default: refuse it; connect as a role in crackmap_reader.",
)
@click.option(
    "--root-path",
    default="",
    metavar="PREFIX",
    help="The path prefix a reverse proxy serves the app under, e.g. /crackmap.",
)
def serve(store: str, host: str, port: int, allow_write_role: bool, root_path: str) -> None:
    """Serve STORE over HTTP: a web map at /, OGC API Features and vector tiles at /ogc.

    STORE is a .gpkg path or a postgresql:// URL (as a read-only role; the password
    from PGPASSWORD or ~/.pgpass).  Stops with Ctrl-C.
    """
    from pipeline.serve.app import create_app, run_app

    try:
        app = create_app(store, allow_write_role=allow_write_role)
    except USER_ERRORS as exc:
        fail(str(exc))
    run_app(app, store, host, port, root_path)


def sections_table(rows: list[dict], level: str = "section") -> str:
    """The per-section table: road, from-to m, crack m by type, cracked %, index and class.

    Sections the survey did not image (coverage 0) are counted in a last line, not listed.
    """
    header = (
        f"{'road':<12} {'from-to m':>13} {'long m':>7} {'trans m':>7} {'diag m':>7} {'pattern m':>9} "
        f"{'allig m2':>8} {'cover':>5} {'cracked %':>9} {'index':>5} class"
    )
    lines = [header, "-" * len(header)]
    unimaged = 0
    for r in rows:
        if r["level"] != level:
            continue
        if not r["coverage"]:
            unimaged += 1
            continue

        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        lines.append(
            f"{str(r['road_id'])[:12]:<12} {r['from_m']:>6.0f}-{r['to_m']:<6.0f} "
            f"{r['longitudinal_m']:>7.2f} {r['transverse_m']:>7.2f} {r['diagonal_m']:>7.2f} "
            f"{r['pattern_m']:>9.2f} {r['alligator_m2']:>8.2f} {num(r['coverage'], '5.2f'):>5} "
            f"{num(r['cracked_area_pct'], '9.2f'):>9} {num(r['crack_index'], '5.1f'):>5} "
            f"{r['condition_class'] or '-'}"
        )
    if unimaged:
        lines.append(f"({unimaged} {level}s not imaged by this survey: no condition)")
    return "\n".join(lines)


def open_existing(store: str):
    """A store that must exist already (a .gpkg file or a PostGIS URL)."""
    from pipeline.stores import open_store

    if not str(store).startswith(("postgresql://", "postgres://")) and not Path(store).is_file():
        fail(f"{mask_url(store)}: no such GeoPackage")
    try:
        return open_store(store)
    except USER_ERRORS as exc:
        fail(str(exc))


def section_options(
    section_m: float,
    rollup_m: float,
    corridor_m: float,
    id_field: str,
    profile: str,
    direction_field: str = "direction",
):
    from pipeline.condition import SectionOptions
    from pipeline.crack_types import type_profile

    try:
        return SectionOptions(
            section_m=section_m,
            rollup_m=rollup_m,
            corridor_m=corridor_m,
            id_field=id_field,
            direction_field=direction_field,
            types=type_profile(profile),
        )
    except ValueError as exc:
        fail(str(exc))


network_options = [
    click.option("--section-m", default=10.0, show_default=True, help="Section length along the road (m)."),
    click.option(
        "--rollup-m", default=100.0, show_default=True, help="Reporting length (m), a multiple of it."
    ),
    click.option(
        "--corridor-m",
        default=5.0,
        show_default=True,
        help="A crack belongs to a road within this distance of its centreline (m).",
    ),
    click.option("--id-field", default="road_id", show_default=True, help="The network's road id field."),
    click.option(
        "--direction-field",
        default="direction",
        show_default=True,
        help="The network's optional one-way field: chainage runs with the traffic (README).",
    ),
    click.option(
        "--profile",
        default="aashto-r85",
        show_default=True,
        help="Crack type angles: aashto-r85, strict-10 or loose-30.",
    ),
]


def with_network_options(command):
    for option in reversed(network_options):
        command = option(command)
    return command


@cli.command()
@click.argument("store")
@click.option(
    "--network",
    "network",
    required=True,
    metavar="ROADS",
    help="Road centrelines: any vector file pyogrio reads (GeoPackage, Shapefile, GeoJSON, FlatGeobuf).",
)
@click.option("--survey", "survey_id", default=None, help="Survey (default: the store's only survey).")
@with_network_options
def sections(
    store: str,
    network: str,
    survey_id: str | None,
    section_m: float,
    rollup_m: float,
    corridor_m: float,
    id_field: str,
    direction_field: str,
    profile: str,
) -> None:
    """Rate the sections of a road network from the cracks of a survey in STORE.

    Writes the layer ``sections`` (sections, rollups and whole roads) and each crack's
    road_id, chainages and offset; prints the per-section table.
    """
    from pipeline.condition import run_sections

    options = section_options(section_m, rollup_m, corridor_m, id_field, profile, direction_field)
    target = open_existing(store)
    try:
        if survey_id is None:
            known = target.survey_ids()
            if len(known) != 1:
                fail(
                    f"{mask_url(store)} holds surveys {', '.join(known) or '(none)'}; pick one with --survey"
                )
            survey_id = known[0]
        report = run_sections(target, network, survey_id, options)
    except USER_ERRORS as exc:
        fail(str(exc))
    finally:
        target.close()
    click.echo(sections_table(report.rows))
    roads = sum(r["level"] == "road" for r in report.rows)
    click.echo(
        f"\nsurvey {report.survey_id}: {sum(r['level'] == 'section' for r in report.rows)} sections of "
        f"{section_m:g} m on {roads} roads; {report.located} of {report.cracks} cracks on the network, "
        f"{report.outside} outside every corridor (kept, without road), {report.joints} joints left out"
        f" -> {mask_url(store)} (layer sections)"
    )


@cli.command()
@click.argument("store")
@click.option("--from", "from_survey", required=True, help="The earlier survey.")
@click.option("--to", "to_survey", required=True, help="The later survey.")
@click.option("--network", default=None, metavar="ROADS", help="Compute both surveys' sections on it first.")
@click.option("--buffer-m", default=0.15, show_default=True, help="Cracks match within this distance (m).")
@click.option("--angle-deg", default=20.0, show_default=True, help="... and this difference in direction.")
@with_network_options
def change(
    store: str,
    from_survey: str,
    to_survey: str,
    network: str | None,
    buffer_m: float,
    angle_deg: float,
    section_m: float,
    rollup_m: float,
    corridor_m: float,
    id_field: str,
    direction_field: str,
    profile: str,
) -> None:
    """Change between two surveys in STORE: new, grown, unchanged and gone cracks, and per-section deltas.

    Writes the layers ``crack_changes`` and ``section_changes``.
    """
    from pipeline.change import MatchParams
    from pipeline.condition import run_change

    options = section_options(section_m, rollup_m, corridor_m, id_field, profile, direction_field)
    try:
        match = MatchParams(buffer_m=buffer_m, angle_deg=angle_deg)
    except ValueError as exc:
        fail(str(exc))
    target = open_existing(store)
    try:
        report = run_change(target, from_survey, to_survey, network, options, match)
    except USER_ERRORS as exc:
        fail(str(exc))
    finally:
        target.close()
    if report.warning:
        click.secho(f"warning: {report.warning}", fg="yellow", err=True)
    header = (
        f"{'road':<12} {'from-to m':>13} {'long m':>7} {'trans m':>7} {'diag m':>7} {'pattern m':>9} "
        f"{'cracked %':>9} {'index':>6} class"
    )
    click.echo(header + "\n" + "-" * len(header))
    for r in report.sections:
        if r["level"] != "section":
            continue

        def d(key, row=r):
            v = row[f"{key}_delta"]
            return "-" if v is None else f"{v:+.2f}"

        click.echo(
            f"{str(r['road_id'])[:12]:<12} {r['from_m']:>6.0f}-{r['to_m']:<6.0f} {d('longitudinal_m'):>7} "
            f"{d('transverse_m'):>7} {d('diagonal_m'):>7} {d('pattern_m'):>9} {d('cracked_area_pct'):>9} "
            f"{d('crack_index'):>6} {r['class_from'] or '-'} -> {r['class_to'] or '-'}"
        )
    c = report.counts
    click.echo(
        f"\n{from_survey} -> {to_survey}: {c['new']} new, {c['grown']} grown, {c['unchanged']} unchanged, "
        f"{c['gone']} gone -> {mask_url(store)} (layers crack_changes, section_changes)"
    )


def main() -> None:
    cli()
