"""The network alone on CPUs: graphs and ONNX Runtime settings, side by side (a benchmark, not a test).

Graphs of one model version:
  old     the version's ``model.onnx`` as exported before crackmap 1.1 (two-class softmax at full
          resolution, float32 out), where it is one;
  float   the inference graph exported from its weights now (1x1 before upsample, sigmoid of one
          upsampled margin channel, uint8 out; needs torch);
  int8    the version's INT8 graph (``crackmap models quantize``).
Settings (all with ONNX Runtime's CPU provider, graph optimizations on):
  split     ``OnnxRuntimeBackend.predict``: a batch of 8 split over 2 single-thread runs (model-only)
  2x1       2 single-thread runs of whole batches of 8 at once (what a scene does, ``submit``)
  2x1-b4 / 2x1-b16   the same with batches of 4 / 16
  1x2       one run of a batch of 8 with 2 intra-op threads
  2x1-spin  2x1 with idle threads spinning instead of sleeping
With ``--openvino`` (where the ``openvino`` package is installed; crackmap does not depend on
it), OpenVINO's CPU plugin runs the same graphs, two streams with two requests in flight:
  ov-f32 / ov-bf16   the float graph at that inference precision (bf16 where the CPU has it)
  ov                 the INT8 graph
``--only`` keeps the cases whose name contains one of the words given.  With several
``--model`` versions (``--model hrsegnet-b16:1.1.0 hrsegnet-b16:1.1.1``) each case name begins
with its version, all run in the same interleaved rounds, and ratios are to the first case.
Every case runs ``--seconds`` per round; rounds are interleaved (a slow spell of a shared machine
lands on all cases) and medians reported, with each case's ratio to ``old split`` (or ``float split``).

Usage: python benchmarks/cpu_network.py [--model NAME[:VERSION] ...] [--rounds 3] [--seconds 2.5] [--json FILE]
                                        [--openvino] [--only WORD ...]
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

from models.registry import resolve  # noqa: E402
from pipeline.backends import OnnxRuntimeBackend  # noqa: E402
from pipeline.precision import cpu_flags, cpu_name  # noqa: E402

SETTINGS = {  # name -> (runs at once, intra-op threads, chips per run, spinning)
    "split": (2, 1, 4, False),
    "2x1": (2, 1, 8, False),
    "2x1-b4": (2, 1, 4, False),
    "2x1-b16": (2, 1, 16, False),
    "1x2": (1, 2, 8, False),
    "2x1-spin": (2, 1, 8, True),
}


def session(path: Path, threads: int, spin: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Case:
    def __init__(self, graph: str, path: Path, setting: str) -> None:
        self.name = f"{graph} {setting}"
        runs, threads, self.batch, spin = SETTINGS[setting]
        self.runs = runs
        if setting == "split":  # the backend itself, as the pipeline's model-only figure uses it
            backend = OnnxRuntimeBackend(path, batch_size=8, threads=2)
            chips = np.random.default_rng(1).integers(0, 256, (8, 3, 400, 400), dtype=np.uint8)
            self.step, self.chips_per_step = (lambda: backend.predict(chips)), 8
        else:
            s, pool = session(path, threads, spin), ThreadPoolExecutor(runs)
            chips = np.random.default_rng(1).integers(0, 256, (self.batch, 3, 400, 400), dtype=np.uint8)
            self.step = lambda: list(pool.map(lambda _: s.run(None, {"chips": chips}), range(runs)))
            self.chips_per_step = runs * self.batch
        self.step()  # warm-up

    def measure(self, seconds: float) -> float:
        done, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds or done < 2 * self.chips_per_step:
            self.step()
            done += self.chips_per_step
        return done / elapsed


class OpenVinoCase(Case):
    """A graph on OpenVINO's CPU plugin: 2 streams, 2 batches of 8 in flight (as ``2x1``)."""

    def __init__(self, graph: str, path: Path, precision: str | None) -> None:
        import openvino as ov

        self.name = f"{graph} ov" + (f"-{precision}" if precision else "")
        core = ov.Core()
        config = {
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": 2,
            "INFERENCE_NUM_THREADS": os.cpu_count() or 1,
        }
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        queue = ov.AsyncInferQueue(core.compile_model(core.read_model(str(path)), "CPU", config), 2)
        chips = np.random.default_rng(1).integers(0, 256, (8, 3, 400, 400), dtype=np.uint8)

        def step() -> None:
            for _ in range(2):
                queue.start_async({0: chips})
            queue.wait_all()

        self.step, self.chips_per_step = step, 16
        self.step()  # warm-up


def version_graphs(entry, tmp: Path) -> dict[str, Path]:
    """The graphs of one version: its ``old`` export (where it is one) and a ``float`` graph
    exported now, else its own float graph; its ``int8`` graph where it has one."""
    import onnx

    graphs: dict[str, Path] = {}
    output = onnx.load(str(entry.file("onnx"))).graph.output[0].type.tensor_type.elem_type
    if output == onnx.TensorProto.FLOAT:
        graphs["old"] = entry.file("onnx")
        try:
            from models.onnx_export import export_onnx, load_net

            tmp.mkdir(parents=True, exist_ok=True)
            graphs["float"] = export_onnx(
                load_net(entry.variant, entry.file("weights")), tmp / "float.onnx", entry.size_px
            )
        except ImportError:
            print("torch is not installed: no fresh float inference graph", file=sys.stderr)
    else:
        graphs["float"] = entry.file("onnx")
    if "onnx_int8" in entry.card["files"]:
        graphs["int8"] = entry.file("onnx_int8")
    return graphs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", default=[None], metavar="NAME[:VERSION]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--openvino", action="store_true", help="Also run the graphs on OpenVINO.")
    parser.add_argument("--only", nargs="+", default=None, metavar="WORD")
    args = parser.parse_args()
    entries = [resolve(spec) for spec in args.model]
    with tempfile.TemporaryDirectory() as tmp:
        plan: list[tuple[str, str]] = []
        graphs: dict[str, Path] = {}
        for entry in entries:
            own = version_graphs(entry, Path(tmp) / entry.version)
            prefix = f"{entry.version} " if len(entries) > 1 else ""
            graphs.update({prefix + g: path for g, path in own.items()})
            plan += [(prefix + g, s) for g in own for s in (("split", "2x1") if g != "int8" else SETTINGS)]
        if args.openvino:
            plan += [
                (g, p)
                for g in graphs
                if not g.endswith("old")
                for p in (("ov-f32", "ov-bf16") if g.endswith("float") else ("ov",))
            ]
        if args.only:
            plan = [(g, s) for g, s in plan if any(word in f"{g} {s}" for word in args.only)]
        cases = [
            OpenVinoCase(g, graphs[g], s.removeprefix("ov").removeprefix("-") or None)
            if s.startswith("ov")
            else Case(g, graphs[g], s)
            for g, s in plan
        ]
        rates: dict[str, list[float]] = {c.name: [] for c in cases}
        for number in range(1, args.rounds + 1):
            for case in cases:
                rates[case.name].append(case.measure(args.seconds))
            print(f"round {number}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()), flush=True)
    base = next(iter(rates))
    if len(entries) == 1:
        base = next((b for b in ("old split", "float split", "int8 2x1") if b in rates), base)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"})
    report = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, flags {' '.join(flags)}",
        "model": ", ".join(entry.spec for entry in entries),
        "rounds": args.rounds,
        "seconds_per_case": args.seconds,
        "chips_per_s": {n: round(m, 1) for n, m in medians.items()},
        f"over_{base.replace(' ', '_')}": {n: round(m / medians[base], 2) for n, m in medians.items()},
        "per_round": {n: [round(v, 1) for v in r] for n, r in rates.items()},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
