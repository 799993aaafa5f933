"""crackmap against the straightforward approach, on the same scenes in one run (a benchmark, not a test).

The straightforward approach is what a user would write around the same ONNX graph, as
geoai-style and CRESI-style tools do:
  - rasterio windows over the scene (the same 400 px chips with 64 px overlap as crackmap),
  - one ONNX Runtime call per chip (default session options: all cores),
  - a whole-scene float32 probability array (overlaps: the later chip wins),
  - a threshold and skimage ``skeletonize`` over the whole scene,
  - skan's skeleton graph, one shapely LineString (map coordinates) per skeleton path.
It writes no probability raster and measures nothing (length, width), so it does less work
than crackmap, which also writes the probability COG and measures every crack.

Both run on the same graph (the one crackmap picks on this CPU, see ``pipeline.precision``),
each scene in a fresh process (peak RSS) after warming the network and skan's numba code up.
Two scene sizes (the second 4x longer) show how memory grows with scene length.

Usage: python benchmarks/peer_baseline.py [--model NAME[:VERSION]] [--width 4096] [--rows 6000]
       [--rounds 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_throughput import end_to_end, machine, synthetic_scene  # noqa: E402

from models.registry import resolve  # noqa: E402


def peer_child(scene: str, spec: str) -> None:
    """Run in a fresh process: the straightforward approach on one scene; prints JSON."""
    import onnxruntime as ort
    import rasterio
    from rasterio.windows import Window
    from shapely.geometry import LineString
    from skan import Skeleton
    from skimage.morphology import skeletonize

    from pipeline.precision import cpu_graph
    from pipeline.tiling import chip_windows

    entry = resolve(spec)
    graph, precision, _ = cpu_graph(entry)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    session.run(None, {"chips": np.zeros((1, 3, 400, 400), np.uint8)})  # warm-ups, as crackmap's
    warm = np.zeros((9, 9), bool)
    warm[4, :] = warm[:, 4] = True
    Skeleton(skeletonize(warm)).path_coordinates(0)
    started = time.perf_counter()
    with rasterio.open(scene) as ds:
        probability = np.zeros((ds.height, ds.width), np.float32)
        windows = chip_windows(ds.width, ds.height, 400, 64)
        for w in windows:
            chip = ds.read(window=Window(w.col_off, w.row_off, 400, 400))
            p = session.run(None, {"chips": chip[None]})[0][0]
            p = p / np.float32(255.0) if p.dtype == np.uint8 else p
            probability[int(w.row_off) : int(w.row_off) + 400, int(w.col_off) : int(w.col_off) + 400] = p[
                : min(400, ds.height - int(w.row_off)), : min(400, ds.width - int(w.col_off))
            ]
        transform = ds.transform
    skeleton = skeletonize(probability >= entry.threshold)
    lines = []
    if skeleton.any():
        graph_ = Skeleton(skeleton)
        for i in range(graph_.n_paths):
            rc = graph_.path_coordinates(i)
            if len(rc) >= 2:
                xs, ys = transform * (rc[:, 1] + 0.5, rc[:, 0] + 0.5)
                lines.append(LineString(np.column_stack([xs, ys])))
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "chips": len(windows),
                "seconds": seconds,
                "chips_per_s": len(windows) / seconds,
                "lines": len(lines),
                "graph": precision,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def peer(scene: Path, spec: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(scene), "--model", spec]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=6000, help="rows of the smaller scene")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    spec = resolve(args.model).spec
    if args.child:
        peer_child(args.child, spec)
        return
    report: dict = {"machine": machine(), "model": spec, "rounds": args.rounds}
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        scenes = {
            label: synthetic_scene(workdir / f"{label}.tif", args.width, rows)
            for label, rows in (("small", args.rows), ("large", 4 * args.rows))
        }
        for number in range(1, args.rounds + 1):  # interleaved: a slow spell lands on both
            for label, scene in scenes.items():
                for who, run in (
                    ("crackmap", lambda s: end_to_end(s, spec, workdir)),
                    ("peer", lambda s: peer(s, spec)),
                ):
                    result = run(scene)
                    runs.setdefault(f"{who} {label}", []).append(result)
                    print(
                        f"round {number}: {who} {label}: {result['chips_per_s']:.1f} chips/s, "
                        f"{result['max_rss_mb']:.0f} MB",
                        flush=True,
                    )
    for name, results in runs.items():
        report[name] = {
            "chips": results[0]["chips"],
            "chips_per_s": round(statistics.median(r["chips_per_s"] for r in results), 1),
            "max_rss_mb": round(max(r["max_rss_mb"] for r in results)),
            "lines": results[0].get("cracks", results[0].get("lines")),
        }
    for label in ("small", "large"):
        c, p = report[f"crackmap {label}"], report[f"peer {label}"]
        report[f"{label}_speed_crackmap_over_peer"] = round(c["chips_per_s"] / p["chips_per_s"], 2)
        report[f"{label}_memory_peer_over_crackmap"] = round(p["max_rss_mb"] / c["max_rss_mb"], 2)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
