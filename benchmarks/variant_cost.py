"""What each HrSegNet variant costs per chip on this CPU, side by side (a benchmark, not a test).

The speed of a network does not depend on its weights, so each variant (B16, B32, B48) is
created untrained, exported as crackmap's float inference graph (``models.onnx_export``) and,
where ``--int8`` is given, quantized with the same recipe as ``crackmap models quantize``
(calibrated on random chips: only speed is measured here, never accuracy). Every graph runs
as a scene runs it on CPUs (``OnnxRuntimeBackend.submit``: two single-thread runs of whole
batches of 8 at once); rounds are interleaved and medians reported, with each variant's
ratio to B16. The paper (Li et al. 2023) reports B16 78.43 % and B48 80.32 % mIoU on
CrackSeg9k; this script answers the other half of "is a bigger variant worth it".

Usage: python benchmarks/variant_cost.py [--variants b16 b32 b48] [--int8] [--rounds 3] [--seconds 2.5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.hrsegnet import create  # noqa: E402
from models.onnx_export import export_onnx  # noqa: E402
from pipeline.precision import cpu_name, session  # noqa: E402


def chips_per_s(path: Path, seconds: float, pool: ThreadPoolExecutor, chips: np.ndarray) -> float:
    runner = session(path)
    step = lambda: list(pool.map(lambda _: runner.run(None, {"chips": chips}), range(2)))  # noqa: E731
    step()  # warm-up
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or done < 32:
        step()
        done += 2 * len(chips)
    return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=["b16", "b32", "b48"])
    parser.add_argument("--int8", action="store_true", help="Also the INT8 graph of each variant.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.5)
    args = parser.parse_args()
    chips = np.random.default_rng(1).integers(0, 256, (8, 3, 400, 400), dtype=np.uint8)
    pool = ThreadPoolExecutor(2)
    with tempfile.TemporaryDirectory() as tmp:
        graphs: dict[str, Path] = {}
        params: dict[str, float] = {}
        for variant in args.variants:
            net = create(variant).eval()
            params[variant] = round(sum(p.numel() for p in net.parameters()) / 1e6, 2)
            graphs[f"{variant} float"] = export_onnx(net, Path(tmp) / f"{variant}.onnx")
            if args.int8:
                from models.quantize import quantize_onnx

                calibration = np.random.default_rng(2).integers(0, 256, (8, 3, 400, 400), dtype=np.uint8)
                graphs[f"{variant} int8"] = quantize_onnx(
                    graphs[f"{variant} float"], Path(tmp) / f"{variant}-int8.onnx", calibration
                )
        rates: dict[str, list[float]] = {name: [] for name in graphs}
        for number in range(1, args.rounds + 1):
            for name, path in graphs.items():
                rates[name].append(chips_per_s(path, args.seconds, pool, chips))
            print(f"round {number}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()), flush=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "parameters_millions": params,
        "chips_per_s": {n: round(m, 1) for n, m in medians.items()},
        "ms_per_chip": {n: round(1000 / m, 2) for n, m in medians.items()},
        "over_b16": {
            n: round(m / medians[f"{args.variants[0]} {n.split()[1]}"], 2) for n, m in medians.items()
        },
        "per_round": {n: [round(v, 1) for v in r] for n, r in rates.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
