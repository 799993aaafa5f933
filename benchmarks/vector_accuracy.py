"""Vector accuracy of crack maps on georeferenced scenes built from the val splits (a benchmark).

Crack lines are what agencies sum per road section, so they are scored as lines,
not pixels. This script builds georeferenced scenes from val images (several
images of one dataset tiled edge to edge into one scene), runs the real
pipeline (``pipeline.scene.detect_cracks``: chips, network, stitching,
vectorizing, measuring) with each model asked for, and scores the crack lines
against the skeletons of the true masks (``pipeline.accuracy``):

* F1 at 5 px tolerance;
* total-length ratio (measured / true) per scene;
* length ratio by true width class (thin < 3 px <= medium < 8 px <= wide).

Scenes (nominal ground geometry: the val images carry none, so each scene is
given a plausible pixel size; lengths are compared in the same units):

=================  ===================================  ====================
scene              images                               CRS, pixel
=================  ===================================  ====================
paveseg-utm        paveseg_preview val, 2 x 2            EPSG:32633, 1.0 mm
gaps384-wgs84      gaps384 val tiles, 6 x 6              EPSG:4326, ~1.0 mm
uav_crackx-nodata  uav_crackx val, 3 x 3, nodata collar  EPSG:32632, 1.5 mm
crack500-webmerc   crack500 val tiles, 5 x 8             EPSG:3857, 0.8 mm
aiglern-lambert93  aiglern val tiles, 3 x 6              EPSG:2154, 1.0 mm
=================  ===================================  ====================

The probability raster of each scene is computed once per model; the
vectorizing settings (``--min-length-m``, ``--bridge-gap-px``, ``--low-ratio``
and ``--threshold-scale``, a factor on the model's threshold) are swept over it
with ``pipeline.probability.read_rows``, as a rerun of the vectorizer would.

Usage:
    python benchmarks/vector_accuracy.py [--data-root ../shared/data/cracks]
        [--model hrsegnet-b16:1.0.0 ...] [--min-length-m 0 0.05] [--bridge-gap-px 0 12]
        [--low-ratio 0.5 0.3] [--threshold-scale 1 0.8]
        [--out out/vector-accuracy] [--json results.json] [--card]

``--choose NAME:VERSION`` picks that version's line threshold (a factor on its
pixel threshold) and hysteresis from the sweep (``choose_line_settings``) and
records them in its card (``vectorize``), which the pipeline then uses for it.
``--card`` adds each model's scores at the settings the pipeline uses for it
(which must be among those swept) to its model card.

Needs the val splits (``$CRACKMAP_DATA`` or ``../shared/data/cracks``); reads only val.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import numpy as np
import rasterio
import shapely
from PIL import Image
from pyproj import Geod
from rasterio.crs import CRS
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.registry import ModelError, add_record, resolve  # noqa: E402
from pipeline.accuracy import choose_line_settings, score_lines, truth_skeleton  # noqa: E402
from pipeline.backends import load_backend  # noqa: E402
from pipeline.measure import Georeferencer, Severity  # noqa: E402
from pipeline.probability import read_rows  # noqa: E402
from pipeline.scene import SceneOptions, detect_cracks  # noqa: E402
from pipeline.vectorize import BandVectorizer, VectorizeParams  # noqa: E402

GEOD = Geod(ellps="WGS84")


@dataclass(frozen=True)
class SceneSpec:
    name: str
    dataset: str
    grid: tuple[int, int]  # rows, columns of images
    crs: str
    pixel_m: float
    origin: tuple[float, float]  # upper-left corner in the CRS (metres, or lon/lat for 4326)
    collar_px: int = 0  # nodata border around the tiled images


SCENES = (
    SceneSpec("paveseg-utm", "paveseg_preview", (2, 2), "EPSG:32633", 0.001, (431250.0, 5652300.0)),
    SceneSpec("gaps384-wgs84", "gaps384", (6, 6), "EPSG:4326", 0.001, (13.40, 52.52)),
    SceneSpec(
        "uav_crackx-nodata", "uav_crackx", (3, 3), "EPSG:32632", 0.0015, (690000.0, 5335000.0), collar_px=120
    ),
    SceneSpec("crack500-webmerc", "crack500", (5, 8), "EPSG:3857", 0.0008, (-8575000.0, 4705000.0)),
    SceneSpec("aiglern-lambert93", "aiglern", (3, 6), "EPSG:2154", 0.001, (652000.0, 6862000.0)),
)


def val_images(root: Path, dataset: str, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` val images of the dataset's most common size (sorted by name), with masks."""
    folder = root / dataset / "val"
    stems = sorted(p.stem for p in (folder / "images").iterdir())
    sizes = {}
    for stem in stems:
        image_path = next((folder / "images").glob(f"{stem}.*"))
        with Image.open(image_path) as image:
            sizes.setdefault(image.size, []).append(image_path)
    size, paths = max(sizes.items(), key=lambda item: len(item[1]))
    if len(paths) < count:
        raise SystemExit(f"{folder} has {len(paths)} val images of {size[0]}x{size[1]} px; {count} needed")
    pairs = []
    for path in paths[:count]:
        image = np.asarray(Image.open(path).convert("RGB"))
        mask = np.asarray(Image.open(folder / "masks" / f"{path.stem}.png")) > 0
        pairs.append((image, mask))
    return pairs


def build_scene(spec: SceneSpec, root: Path, out: Path) -> tuple[Path, np.ndarray, np.ndarray, tuple]:
    """Write the scene GeoTIFF; return its path, the true mask, the valid mask and the spacing (m)."""
    rows, cols = spec.grid
    pairs = val_images(root, spec.dataset, rows * cols)
    h, w = pairs[0][1].shape
    c = spec.collar_px
    image = np.zeros((rows * h + 2 * c, cols * w + 2 * c, 3), np.uint8)
    truth = np.zeros(image.shape[:2], bool)
    for k, (pixels, mask) in enumerate(pairs):
        r, q = divmod(k, cols)
        image[c + r * h : c + (r + 1) * h, c + q * w : c + (q + 1) * w] = pixels
        truth[c + r * h : c + (r + 1) * h, c + q * w : c + (q + 1) * w] = mask
    valid = np.zeros(truth.shape, bool)
    valid[c : truth.shape[0] - c, c : truth.shape[1] - c] = True
    if spec.crs == "EPSG:4326":
        lon, lat = spec.origin
        _, lat2, _ = GEOD.fwd(lon, lat, 180.0, spec.pixel_m)
        lon2, _, _ = GEOD.fwd(lon, lat, 90.0, spec.pixel_m)
        transform = from_origin(lon, lat, lon2 - lon, lat - lat2)
        spacing = (spec.pixel_m, spec.pixel_m)
    else:
        transform = from_origin(*spec.origin, spec.pixel_m, spec.pixel_m)
        scale = CRS.from_string(spec.crs)
        factor = 1.0
        if scale.to_epsg() == 3857:  # Web Mercator metres are not ground metres away from the equator
            lat = np.degrees(np.arctan(np.sinh(spec.origin[1] / 6378137.0)))
            factor = np.cos(np.radians(lat))
        spacing = (spec.pixel_m * factor, spec.pixel_m * factor)
    path = out / f"{spec.name}.tif"
    profile = dict(
        driver="GTiff",
        width=image.shape[1],
        height=image.shape[0],
        count=3,
        dtype="uint8",
        crs=spec.crs,
        transform=transform,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
    )
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as ds:
        ds.write(np.moveaxis(image, 2, 0))
        if c:
            ds.write_mask(valid.astype(np.uint8) * 255)
    return path, truth, valid, spacing


def lines_in_pixels(cracks, transform) -> list[np.ndarray]:
    """Crack geometries (in the scene CRS) as (row, col) vertices; pixel centres are integers."""
    inverse = ~transform
    lines = []
    for crack in cracks:
        xy = shapely.get_coordinates(crack.geometry)
        col, row = inverse * (xy[:, 0], xy[:, 1])
        lines.append(np.column_stack([np.asarray(row) - 0.5, np.asarray(col) - 0.5]))
    return lines


def revectorize(result, params: VectorizeParams) -> list:
    """Crack lines of a processed scene again from its probability COG, with other settings."""
    scene = result.scene
    vectorizer = BandVectorizer(scene.width, scene.height, params)
    for row, probability, valid in read_rows(result.probability_path):
        vectorizer(row, probability, valid)
    geo = Georeferencer(scene.crs, scene.transform, scene.width, scene.height, scene.crs, params, Severity())
    return list(geo.crack_lines(vectorizer.finish()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-root", type=Path, default=Path(os.environ.get("CRACKMAP_DATA", "../shared/data/cracks"))
    )
    parser.add_argument(
        "--model", nargs="+", default=[None], help="NAME[:VERSION] (default: the default model)"
    )
    parser.add_argument("--min-length-m", nargs="+", type=float, default=[VectorizeParams().min_length_m])
    parser.add_argument("--bridge-gap-px", nargs="+", type=float, default=[VectorizeParams().bridge_gap_px])
    parser.add_argument("--low-ratio", nargs="+", type=float, default=[VectorizeParams().low_ratio])
    parser.add_argument("--threshold-scale", nargs="+", type=float, default=[1.0])
    parser.add_argument("--tolerance-px", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("out/vector-accuracy"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--card", action="store_true", help="Add the scores at the settings the pipeline uses to each card."
    )
    parser.add_argument(
        "--choose",
        nargs="+",
        metavar="NAME:VERSION",
        help="Choose these versions' line threshold and hysteresis from the sweep (choose_line_settings) "
        "and record them in their cards, which the pipeline then uses.",
    )
    args = parser.parse_args(argv)
    try:
        problem = card_problem(args)  # before the long run, not after it
    except ModelError as exc:
        problem = str(exc)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)

    scenes = []
    for spec in SCENES:
        path, truth, valid, spacing = build_scene(spec, args.data_root, args.out)
        scenes.append((spec, path, truth_skeleton(truth, spacing), valid))
        print(f"scene {spec.name}: {truth.shape[1]}x{truth.shape[0]} px, {spec.crs}", flush=True)

    results = []
    for model_spec in args.model:
        entry = resolve(model_spec)
        backend = load_backend(entry, "onnxruntime")
        for spec, path, truth, valid in scenes:
            started = time.perf_counter()
            result = detect_cracks(
                str(path),
                backend,
                entry,
                args.out / f"{spec.name}.{entry.version}.prob.tif",
                CRS.from_string(spec.crs),
                SceneOptions(),
            )
            base = replace(SceneOptions().vectorize, threshold=entry.threshold)  # the pixel threshold
            for min_length_m, gap_px, low_ratio, scale in itertools.product(
                args.min_length_m, args.bridge_gap_px, args.low_ratio, args.threshold_scale
            ):
                params = replace(
                    base,
                    min_length_m=min_length_m,
                    bridge_gap_px=gap_px,
                    low_ratio=low_ratio,
                    threshold=base.threshold * scale,
                )
                floor = entry.background_probability
                if floor is not None and params.threshold * low_ratio <= floor:
                    # the road itself would join the lines: a flood, slow to trace and never chosen
                    print(
                        f"{entry.spec} {spec.name}: skipped low ratio {low_ratio:g}, scale {scale:g}: "
                        f"lines would grow down to {params.threshold * low_ratio:.3f}, at or below "
                        f"the background {floor:.3f}",
                        flush=True,
                    )
                    continue
                cracks = revectorize(result, params)
                score = score_lines(
                    lines_in_pixels(cracks, result.scene.transform),
                    sum(c.length_m for c in cracks),
                    truth,
                    args.tolerance_px,
                    valid,
                )
                results.append(
                    {
                        "model": entry.spec,
                        "scene": spec.name,
                        "min_length_m": min_length_m,
                        "bridge_gap_px": gap_px,
                        "low_ratio": low_ratio,
                        "threshold_scale": scale,
                        "threshold": params.threshold,
                        "cracks": len(cracks),
                        **score.as_dict(),
                    }
                )
            print(
                f"{entry.spec} {spec.name}: {result.chip_count} chips in "
                f"{time.perf_counter() - started:.1f} s",
                flush=True,
            )

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"tolerance {args.tolerance_px:g} px\n"
    )
    print(
        "| model | scene | min length m | bridge px | low ratio | threshold x | F1 | P | R | length ratio "
        "| thin | medium | wide |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def fmt(value):
        return "-" if value is None else f"{value:.2f}"

    for row in results:
        widths = row["length_ratio_by_width"]
        print(
            f"| {row['model']} | {row['scene']} | {row['min_length_m']:g} | {row['bridge_gap_px']:g} | "
            f"{row['low_ratio']:g} | {row['threshold_scale']:g} | "
            f"{row['f1']:.3f} | {row['precision']:.3f} | {row['recall']:.3f} | {row['length_ratio']:.2f} | "
            f"{fmt(widths['thin'])} | {fmt(widths['medium'])} | {fmt(widths['wide'])} |"
        )
    setting = lambda row: (  # noqa: E731
        row["model"],
        row["min_length_m"],
        row["bridge_gap_px"],
        row["low_ratio"],
        row["threshold_scale"],
    )
    for key, group in itertools.groupby(sorted(results, key=setting), key=setting):
        group = list(group)
        ratios = ", ".join(format(row["length_ratio"], ".2f") for row in group)
        print(f"{key}: mean F1 {np.mean([row['f1'] for row in group]):.3f}; length ratios {ratios}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for spec in args.choose or []:
        entry = resolve(spec)
        low_ratio, scale, why = choose_line_settings(
            defaults_of([r for r in results if r["model"] == entry.spec])
        )
        record = {
            "threshold": round(entry.threshold * scale, 6),
            "low_ratio": low_ratio,
            "pixel_threshold_scale": scale,
            "rule": why,
            "swept": {"low_ratio": args.low_ratio, "threshold_scale": args.threshold_scale},
            "command": "benchmarks/vector_accuracy.py --choose",
            "date": date.today().isoformat(),
        }
        add_record(entry, "vectorize", record)
        print(f"{entry.spec}: lines at {record['threshold']:.3f}, hysteresis {low_ratio:g} ({why})")
    if args.card:
        return add_to_cards(results, args.tolerance_px)
    return 0


def card_problem(args: argparse.Namespace) -> str | None:
    """Why ``--choose`` or ``--card`` could not be carried out after the sweep, if so."""
    if not (args.choose or args.card):
        return None
    defaults = VectorizeParams()
    if defaults.min_length_m not in args.min_length_m or defaults.bridge_gap_px not in args.bridge_gap_px:
        return (
            f"--choose and --card need the default fragment length ({defaults.min_length_m:g}) "
            f"and bridging ({defaults.bridge_gap_px:g}) among those swept"
        )
    models = {entry.spec: entry for entry in map(resolve, args.model)}
    chosen = {entry.spec: entry for entry in map(resolve, args.choose or [])}
    for spec, entry in chosen.items():
        if spec not in models:
            return f"--choose {spec}: not among the --model versions swept"
        if "vectorize" in entry.card:
            return f"--choose {spec}: its card has line settings already; they are never replaced"
    for entry in models.values():
        if not args.card or entry.spec in chosen:
            continue
        chosen = entry.card.get("vectorize") or {}
        low_ratio, scale = (
            chosen.get("low_ratio", defaults.low_ratio),
            chosen.get("pixel_threshold_scale", 1.0),
        )
        if low_ratio not in args.low_ratio or scale not in args.threshold_scale:
            return (
                f"--card: {entry.spec} maps with hysteresis {low_ratio:g} and threshold factor {scale:g}; "
                "sweep them too"
            )
    return None


def finite(value: float | None) -> float | None:
    """JSON has no infinity: a ratio over a length of zero is None ("-" in the card)."""
    return None if value is None or not np.isfinite(value) else value


def defaults_of(rows: list[dict]) -> list[dict]:
    """The rows at the default fragment length and bridging."""
    defaults = VectorizeParams()
    return [
        row
        for row in rows
        if row["min_length_m"] == defaults.min_length_m and row["bridge_gap_px"] == defaults.bridge_gap_px
    ]


def add_to_cards(results: list[dict], tolerance_px: float) -> int:
    """Each model's scores at the settings the pipeline uses for it, into its model card."""
    for spec in dict.fromkeys(row["model"] for row in results):
        used = SceneOptions().vectorize_params(resolve(spec))
        rows = [
            row
            for row in defaults_of(results)
            if row["model"] == spec
            and abs(row["low_ratio"] - used.low_ratio) < 1e-6
            and abs(row["threshold"] - used.threshold) < 1e-6
        ]
        if not rows:
            print(f"error: --card: {spec}'s own line settings were not among those swept", file=sys.stderr)
            return 2
        vectorizing = (
            f"threshold {used.threshold:.3f}, hysteresis down to {used.low_ratio:g} x it, bridging "
            f"{used.bridge_gap_px:g} px, isolated lines under {used.min_length_m * 1000:g} mm dropped"
        )
        record = {
            "command": "benchmarks/vector_accuracy.py",
            "date": date.today().isoformat(),
            "tolerance_px": tolerance_px,
            "vectorizing": vectorizing,
            "scenes": [
                {
                    **{key: row[key] for key in ("scene", "f1", "precision", "recall")},
                    "length_ratio": finite(row["length_ratio"]),
                    "length_ratio_by_width": {k: finite(v) for k, v in row["length_ratio_by_width"].items()},
                }
                for row in rows
            ],
        }
        entry = resolve(spec)
        if "vector_accuracy" in entry.card:
            print(f"{spec}: its card has vector accuracy already; it is kept", file=sys.stderr)
            continue
        add_record(entry, "vector_accuracy", record)
        print(f"{spec}: vector accuracy added to its card")
    return 0


if __name__ == "__main__":
    sys.exit(main())
