"""The fixed cost of ``crackmap run`` over the pipeline's own work, for a one-scene survey.

Each round runs, in fresh interpreters, side by side:

- ``pipeline``: ``pipeline.survey.map_scene`` on the scene into a new GeoPackage (imports,
  model load, the scene, publishing: what any runner must do), with the garbage collector's
  threshold that ``crackmap`` sets, so that the difference is what Prefect adds;
- ``cli``: ``crackmap run`` on the same scene into another new GeoPackage (the same work
  plus Prefect: its import, the embedded API server, flow and task runs, artifacts).

Wall seconds of each, medians over the rounds, and their difference: the CLI's fixed cost.
One untimed ``crackmap run`` first creates Prefect's database, as a user's first run does once.
With ``--baseline TREE`` (a checkout of an earlier commit, e.g. ``git worktree add /tmp/base
HEAD~1``) each round also runs that tree's ``crackmap run``, for a side-by-side comparison.

    python benchmarks/cli_overhead.py [--rounds 3] [--scene SCENE.tif]

Without ``--scene`` it maps a GeoTIFF made from the sample survey's first frame
(1920 x 1080 px, EPSG:32633 at 1 mm per pixel: 24 chips).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = """
import gc, sys
from flows.embedded import GC_THRESHOLD  # stdlib only: no Prefect
gc.set_threshold(*GC_THRESHOLD)  # as crackmap runs: the difference is Prefect's
from pipeline.survey import RunSettings, SceneSource, map_scene
settings = RunSettings.resolve(sys.argv[2], "bench", "bench-run", None, "onnxruntime")
row = map_scene(SceneSource(sys.argv[1], "scene"), settings)
print(row.status, row.chips, row.cracks)
"""


def timed(command: list[str], env: dict, cwd: Path = ROOT) -> float:
    """Wall seconds of ``command`` run in ``cwd`` (``python -c`` imports from there first)."""
    started = time.perf_counter()
    subprocess.run(
        command, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - started


def sample_scene(folder: Path) -> str:
    """A one-scene survey: the sample survey's first frame as a north-up GeoTIFF in UTM."""
    import numpy as np
    import rasterio
    from PIL import Image
    from rasterio.transform import from_origin

    frame = sorted((ROOT / "examples" / "sample-survey").glob("frame-*.jpg"))[0]
    pixels = np.asarray(Image.open(frame).convert("RGB")).transpose(2, 0, 1)
    path = folder / "scene.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=pixels.shape[2],
        height=pixels.shape[1],
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(500000, 5000000, 0.001, 0.001),
        tiled=True,
        blockxsize=512,
        blockysize=512,
    ) as ds:
        ds.write(pixels)
    return str(path)


def crackmap_run(scene: str, store: Path, tree: Path = ROOT) -> list[str]:
    """``crackmap run`` of one scene, as a user types it: the entry point of ``tree`` (PYTHONPATH names it)."""
    entry = "flows.launch" if (tree / "flows" / "launch.py").exists() else "flows.cli"
    cli = f"from {entry} import main; main()"
    return [sys.executable, "-c", cli, "run", scene, "--store", str(store), "--backend", "onnxruntime"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=None, help="another checkout whose crackmap run to time too")
    parser.add_argument("--scene", default=None, help="a GeoTIFF (default: made from the sample survey)")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    times: dict[str, list[float]] = {"pipeline": [], "cli": [], "baseline": []}
    with tempfile.TemporaryDirectory() as tmp:
        env["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        scene = args.scene or sample_scene(Path(tmp))
        # untimed: the first run creates Prefect's database (once per user, ~4 s more)
        timed(crackmap_run(scene, Path(tmp) / "first.gpkg"), env)
        for i in range(args.rounds):
            pipeline_store, cli_store = Path(tmp) / f"p{i}.gpkg", Path(tmp) / f"c{i}.gpkg"
            times["pipeline"].append(timed([sys.executable, "-c", PIPELINE, scene, str(pipeline_store)], env))
            times["cli"].append(timed(crackmap_run(scene, cli_store), env))
            if args.baseline:
                tree = Path(args.baseline).resolve()
                base_run = crackmap_run(scene, Path(tmp) / f"b{i}.gpkg", tree)
                times["baseline"].append(timed(base_run, dict(env, PYTHONPATH=str(tree)), cwd=tree))
            print(
                f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items() if v),
                flush=True,
            )
    p, c = statistics.median(times["pipeline"]), statistics.median(times["cli"])
    print(
        f"median: pipeline {p:.1f} s, crackmap run {c:.1f} s, fixed cost {c - p:.1f} s "
        f"(median of the rounds' differences {paired(times['cli'], times['pipeline']):.1f} s; "
        f"{args.rounds} rounds, {os.cpu_count()} CPUs)"
    )
    if times["baseline"]:
        b = statistics.median(times["baseline"])
        print(
            f"baseline ({args.baseline}): crackmap run {b:.1f} s, fixed cost {b - p:.1f} s "
            f"(median of the rounds' differences {paired(times['baseline'], times['pipeline']):.1f} s)"
        )


def paired(runs: list[float], pipeline: list[float]) -> float:
    """The median of each round's difference: a round's runs share the machine's state of the moment."""
    return statistics.median(r - p for r, p in zip(runs, pipeline, strict=True))


if __name__ == "__main__":
    main()
