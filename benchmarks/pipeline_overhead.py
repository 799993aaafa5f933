"""Everything but the network: end-to-end chips/s with a zero-cost backend, 1 and 2 workers (a benchmark).

``pipeline.backends.FixedBackend`` returns one fixed chip probability (one short crack per
chip) instantly, so ``detect_cracks`` measures reading and decoding, stitching, the probability COG,
vectorizing and measuring: the ceiling a GPU worker process reaches whatever the GPU does.
Workers are processes, each mapping its own scene (as ``process-scene`` pods or process
workers do); with 2 workers both run at once and chips/s is their chips over the wall time.
Each worker warms skan up before timing. Then one worker maps both scenes with
``pipeline.sharing.map_scenes``, one at a time and both in flight. Rounds are interleaved; medians.

Usage: python benchmarks/pipeline_overhead.py [--width 4096] [--rows 24000] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_throughput import machine, synthetic_scene  # noqa: E402


def child(scene: str, out: str) -> None:
    """In a fresh process: wait for 'go' on stdin (so workers start together), map the scene, print JSON."""
    from models.registry import resolve
    from pipeline.backends import FixedBackend
    from pipeline.scene import SceneOptions, detect_cracks
    from pipeline.stores import DEFAULT_CRS
    from pipeline.vectorize import warm_up

    warm_up()
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    result = detect_cracks(scene, FixedBackend(), resolve(), Path(out), DEFAULT_CRS, SceneOptions())
    seconds = time.perf_counter() - started
    print(
        json.dumps({"chips": result.chip_count, "seconds": seconds, "cracks": len(result.cracks)}), flush=True
    )


def in_flight_child(scenes: list[str], workdir: str) -> None:
    """In a fresh process: map all scenes in one worker with 1, then len(scenes) in flight; prints JSON."""
    from models.registry import resolve
    from pipeline.backends import FixedBackend
    from pipeline.sharing import map_scenes
    from pipeline.stores import DEFAULT_CRS
    from pipeline.vectorize import warm_up

    warm_up()
    rates = {}
    for in_flight in (1, len(scenes)):
        started = time.perf_counter()
        results = map_scenes(
            scenes,
            FixedBackend(),
            resolve(),
            lambda uri, n=in_flight: Path(workdir) / f"f{n}-{Path(uri).stem}.tif",
            DEFAULT_CRS,
            in_flight=in_flight,
        )
        rates[in_flight] = sum(r.chip_count for r in results) / (time.perf_counter() - started)
    print(json.dumps(rates), flush=True)


def run_workers(scenes: list[Path], workdir: Path) -> dict:
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", str(scene), "--out", str(workdir / f"p{i}.tif")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i, scene in enumerate(scenes)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [json.loads(p.stdout.readline()) for p in procs]
    wall = time.perf_counter() - started
    for p in procs:
        p.wait()
    chips = sum(r["chips"] for r in results)
    return {
        "workers": len(scenes),
        "chips": chips,
        "wall_s": wall,
        "chips_per_s": chips / wall,
        "cracks": [r["cracks"] for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=24000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--in-flight-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.out)
        return
    if args.in_flight_child:
        in_flight_child(args.in_flight_child, args.out)
        return
    rates: dict[int, list[float]] = {1: [], 2: []}
    flights: dict[str, list[float]] = {"1": [], "2": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        scenes = [synthetic_scene(workdir / f"s{i}.tif", args.width, args.rows, seed=i) for i in range(2)]
        for number in range(1, args.rounds + 1):
            for workers in (1, 2):
                result = run_workers(scenes[:workers], workdir)
                rates[workers].append(result["chips_per_s"])
                print(
                    f"round {number}: {workers} worker(s): {result['chips_per_s']:.0f} chips/s "
                    f"({result['chips']} chips in {result['wall_s']:.1f} s)",
                    flush=True,
                )
            out = subprocess.run(
                [sys.executable, __file__, "--in-flight-child", *map(str, scenes), "--out", str(workdir)],
                check=True,
                capture_output=True,
                text=True,
            )
            for key, rate in json.loads(out.stdout.splitlines()[-1]).items():
                flights[key].append(rate)
            print(
                f"round {number}: one worker, scenes in flight 1 / 2: "
                f"{flights['1'][-1]:.0f} / {flights['2'][-1]:.0f} chips/s",
                flush=True,
            )
    report = {
        "machine": machine(),
        "scene": {"width": args.width, "height": args.rows},
        "rounds": args.rounds,
        "chips_per_s": {f"{w}_workers": round(statistics.median(r), 1) for w, r in rates.items()},
        "per_round": {f"{w}_workers": [round(v, 1) for v in r] for w, r in rates.items()},
    }
    report["two_over_one"] = round(statistics.median(rates[2]) / statistics.median(rates[1]), 2)
    report["one_worker_in_flight_chips_per_s"] = {
        k: round(statistics.median(v), 1) for k, v in flights.items()
    }
    report["in_flight_two_over_one"] = round(
        statistics.median(flights["2"]) / statistics.median(flights["1"]), 2
    )
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
