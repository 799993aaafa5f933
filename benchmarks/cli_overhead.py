"""The fixed cost of ``crackmap run`` over the pipeline's own work, for a one-scene survey.

Each round runs, in fresh interpreters, side by side:

- ``pipeline``: ``pipeline.survey.map_scene`` on the scene into a new GeoPackage (imports,
  model load, the scene, publishing: what any runner must do);
- ``cli``: ``crackmap run`` on the same scene into another new GeoPackage (the same work
  plus Prefect: its import, the embedded API server, flow and task runs, artifacts).

Wall seconds of each, medians over the rounds, and their difference: the CLI's fixed cost.

    python benchmarks/cli_overhead.py [--rounds 3] [--scene examples/sample-survey/road-0001.tif]
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
import sys
from pipeline.survey import RunSettings, SceneSource, map_scene
settings = RunSettings.resolve(sys.argv[2], "bench", "bench-run", None, "onnxruntime")
row = map_scene(SceneSource(sys.argv[1], "scene"), settings)
print(row.status, row.chips, row.cracks)
"""


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scene", default=str(ROOT / "examples" / "sample-survey" / "road-0001.tif"))
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    times: dict[str, list[float]] = {"pipeline": [], "cli": []}
    with tempfile.TemporaryDirectory() as tmp:
        env["PREFECT_HOME"] = str(Path(tmp) / "prefect")  # a warm database after the first round
        for i in range(args.rounds):
            pipeline_store, cli_store = Path(tmp) / f"p{i}.gpkg", Path(tmp) / f"c{i}.gpkg"
            times["pipeline"].append(timed([sys.executable, "-c", PIPELINE, args.scene, str(pipeline_store)], env))
            times["cli"].append(timed([sys.executable, "-c", "from flows.cli import main; main()", "run",
                                       args.scene, "--store", str(cli_store), "--backend", "onnxruntime"], env))
            print(f"round {i + 1}: pipeline {times['pipeline'][-1]:.1f} s, cli {times['cli'][-1]:.1f} s",
                  flush=True)
    p, c = statistics.median(times["pipeline"]), statistics.median(times["cli"])
    print(f"median: pipeline {p:.1f} s, crackmap run {c:.1f} s, fixed cost {c - p:.1f} s "
          f"({args.rounds} rounds, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
