"""Throughput and memory of the CPU pipeline (a benchmark, not a test).

Measures in one run:
  1. model-only chips/s per backend (onnxruntime, torch), batch 8;
  2. end-to-end chips/s of `pipeline.scene.detect_cracks` (read, network,
     stitch, probability COG, vectorize) on a synthetic scene of a few
     thousand chips, with the CPU default backend;
  3. peak memory (max RSS of a fresh process) for a scene and one 4x longer.

Each scene runs in a fresh process after a warm-up (the network's first batch,
skan's numba compilation), as model-only runs after a warm-up; all of it is
repeated ``--rounds`` times, interleaved, and medians are reported.

Usage: python benchmarks/pipeline_throughput.py [--model NAME[:VERSION]] [--width 4096]
       [--rows 12000] [--rounds 3] [--compress jpeg|deflate|none] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.registry import resolve  # noqa: E402
from pipeline.backends import load_backend  # noqa: E402
from pipeline.tiling import chip_windows  # noqa: E402


def synthetic_scene(path: Path, width: int, height: int, seed: int = 0, compress: str = "jpeg") -> Path:
    """A pavement-like scene with dark cracks, written strip by strip (a tiled GeoTIFF).

    JPEG (YCbCr) by default, as survey imagery usually is; ``compress`` "deflate" or "none"
    shows how much of the end-to-end time is decoding.
    """
    rng = np.random.default_rng(seed)
    codec = {
        "jpeg": dict(compress="jpeg", photometric="ycbcr"),
        "deflate": dict(compress="deflate"),
        "none": {},
    }[compress]
    profile = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(431250, 5652300, 0.0015, 0.0015),
        tiled=True,
        blockxsize=512,
        blockysize=512,
        **codec,
    )
    with rasterio.open(path, "w", **profile) as ds:
        for row in range(0, height, 1024):
            rows = min(1024, height - row)
            grey = rng.normal(120, 18, (rows, width)).clip(0, 255)
            for _ in range(3):  # a few meandering cracks per strip
                col = rng.integers(100, width - 100)
                offsets = np.cumsum(rng.integers(-1, 2, rows)) + col
                for r, c in enumerate(np.clip(offsets, 2, width - 3)):
                    grey[r, c - 2 : c + 2] = 35
            ds.write(np.repeat(grey.astype(np.uint8)[None], 3, axis=0), window=Window(0, row, width, rows))
    return path


def model_only(spec: str, backend_name: str, batch: int = 8, batches: int = 100) -> float:
    """Chips/s of `Backend.predict` on random chips, after one warm-up batch (~10 s per backend:
    long enough that a slow spell of a shared machine does not decide the figure alone)."""
    backend = load_backend(resolve(spec), backend_name, batch_size=batch)
    chips = np.random.default_rng(1).integers(0, 256, (batch, 3, 400, 400), dtype=np.uint8)
    backend.predict(chips)  # warm-up
    started = time.perf_counter()
    for _ in range(batches):
        backend.predict(chips)
    return batch * batches / (time.perf_counter() - started)


def end_to_end_child(scene: str, spec: str, out: str) -> None:
    """Run in a fresh process: map one scene, print JSON with chips/s and peak RSS."""
    from pipeline.scene import SceneOptions, detect_cracks
    from pipeline.stores import DEFAULT_CRS
    from pipeline.vectorize import warm_up

    entry = resolve(spec)
    backend = load_backend(entry, "auto")
    backend.predict(np.zeros((backend.batch_size, 3, 400, 400), np.uint8))  # warm-ups, as for model-only
    warm_up()
    started = time.perf_counter()
    result = detect_cracks(scene, backend, entry, Path(out), DEFAULT_CRS, SceneOptions())
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "chips": result.chip_count,
                "seconds": seconds,
                "chips_per_s": result.chip_count / seconds,
                "cracks": len(result.cracks),
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def end_to_end(scene: Path, spec: str, workdir: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(scene),
        "--model",
        spec,
        "--out",
        str(workdir / f"{scene.stem}-probability.tif"),
    ]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def machine() -> str:
    with open("/proc/cpuinfo") as info:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
            platform.processor(),
        )
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=12000, help="rows of the smaller scene")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all measurements (medians)")
    parser.add_argument(
        "--compress",
        choices=("jpeg", "deflate", "none"),
        default="jpeg",
        help="compression of the synthetic scenes",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = resolve(args.model).spec
    if args.child:
        end_to_end_child(args.child, spec, args.out)
        return
    from pipeline.precision import cpu_graph

    report = {
        "machine": machine(),
        "model": spec,
        "rounds": args.rounds,
        "scene_compression": args.compress,
        "onnxruntime_graph": cpu_graph(resolve(spec))[1],
    }  # fp32 or int8, as the backend picks
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        scenes = {
            label: synthetic_scene(workdir / f"{label}.tif", args.width, rows, compress=args.compress)
            for label, rows in (("small", args.rows), ("large", 4 * args.rows))
        }
        # Rounds alternate model-only and end-to-end runs, so that a slow spell of a shared
        # machine lands on both; figures are medians over the rounds.
        for number in range(1, args.rounds + 1):
            result = {"model_only": {name: model_only(spec, name) for name in ("onnxruntime", "torch")}}
            for label, scene in scenes.items():
                result[label] = end_to_end(scene, spec, workdir)
            result["ratio"] = result["large"]["chips_per_s"] / result["model_only"]["onnxruntime"]
            print(
                f"round {number}: model only {result['model_only']}, small "
                f"{result['small']['chips_per_s']:.1f}, large {result['large']['chips_per_s']:.1f} "
                f"chips/s, ratio {result['ratio']:.3f}",
                flush=True,
            )
            rounds.append(result)
    report["model_only_chips_per_s"] = {
        name: round(statistics.median(r["model_only"][name] for r in rounds), 1)
        for name in ("onnxruntime", "torch")
    }
    for label, rows in (("small", args.rows), ("large", 4 * args.rows)):
        runs = [r[label] for r in rounds]
        report[label] = {
            "width": args.width,
            "height": rows,
            "chip_windows": len(chip_windows(args.width, rows)),
            "chips": runs[0]["chips"],
            "chips_per_s": round(statistics.median(r["chips_per_s"] for r in runs), 1),
            "cracks": runs[0]["cracks"],
            "max_rss_mb": round(max(r["max_rss_mb"] for r in runs), 1),
        }
    default = max(report["model_only_chips_per_s"], key=report["model_only_chips_per_s"].get)
    report["end_to_end_over_model_only"] = round(
        report["large"]["chips_per_s"] / report["model_only_chips_per_s"]["onnxruntime"], 3
    )
    report["ratio_per_round"] = [round(r["ratio"], 3) for r in rounds]
    report["memory_large_over_small"] = round(
        report["large"]["max_rss_mb"] / report["small"]["max_rss_mb"], 3
    )
    report["fastest_cpu_backend"] = default
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
