"""GPU inference throughput (a benchmark, not a test).

Measures:
  1. network-only chips/s per backend (tensorrt, torch, onnxruntime) and batch size
     (1, 8, 32, 64): the same random uint8 chips through ``predict``, after a warm-up
     (engine build, CUDA graph capture), for at least ``--seconds`` per case;
  2. end-to-end chips/s of ``pipeline.scene.detect_cracks`` (read, network, stitch,
     probability COG, vectorize) on a synthetic scene, with the GPU's busy fraction
     sampled from ``nvidia-smi`` (utilization.gpu every 100 ms: the share of time a
     kernel was running) and the network thread's busy fraction (time in ``predict``).

GPU backends are skipped, with the reason, where there is no GPU, TensorRT or CUDA
torch; on a CPU machine only onnxruntime runs (keep ``--batches`` small there).

Usage: python benchmarks/gpu_throughput.py [--model NAME[:VERSION]] [--backends tensorrt,torch,onnxruntime]
       [--batches 1,8,32,64] [--precision fp16] [--seconds 5] [--scene-width 16384]
       [--scene-rows 16384] [--end-to-end auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models.registry import resolve  # noqa: E402
from pipeline.backends import OnnxRuntimeBackend, gpu_present, load_backend, select_backend  # noqa: E402
from pipeline.backends.pytorch import TorchBackend  # noqa: E402
from pipeline.errors import BackendUnavailableError  # noqa: E402


def gpu_info() -> dict:
    """GPU name and driver from nvidia-smi, and library versions; empty GPU fields without one."""
    info = {"gpu": None, "driver": None, "cpu": platform.processor() or platform.machine()}
    if shutil.which("nvidia-smi"):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if out:
            info["gpu"], info["driver"] = (s.strip() for s in out.split(",", 1))
    for module in ("tensorrt", "torch", "onnxruntime"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def unavailable(name: str) -> str | None:
    """Why a backend cannot be measured here, or None."""
    if name == "tensorrt":
        from pipeline.backends.tensorrt import require_tensorrt

        try:
            require_tensorrt()
        except BackendUnavailableError as exc:
            return str(exc)
    if name == "torch":
        if not gpu_present():
            return "no NVIDIA GPU here (torch on CPU is measured by pipeline_throughput.py)"
        import torch

        if not torch.cuda.is_available():
            return "torch has no CUDA here"
    return None


def make_backend(entry, name: str, batch: int, precision: str):
    if name == "tensorrt":
        from pipeline.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(entry, batch_size=batch, micro_batch=min(batch, 64), precision=precision)
    if name == "torch":
        return TorchBackend(entry, batch_size=batch)
    return OnnxRuntimeBackend(entry.file("onnx"), batch)


def network_only(backend, batch: int, seconds: float) -> float:
    chips = np.random.default_rng(1).integers(0, 256, (batch, 3, 400, 400), dtype=np.uint8)
    backend.predict(chips)  # warm-up: engine load, graph capture, kernel selection
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs == 0:
        backend.predict(chips)
        runs += 1
    return batch * runs / elapsed


class GpuSampler:
    """Samples nvidia-smi's utilization.gpu every 100 ms while running."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi") and gpu_present():
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "-i",
                    "0",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.samples.append(float(line) / 100)

    def __exit__(self, *exc) -> None:
        if self._proc:
            self._proc.terminate()
            self._proc.wait()

    @property
    def busy(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


class TimedBackend:
    """A backend that adds up the time spent in ``predict`` (the network thread's busy time)."""

    def __init__(self, backend) -> None:
        self.backend, self.name, self.batch_size, self.seconds = (
            backend,
            backend.name,
            backend.batch_size,
            0.0,
        )

    def predict(self, chips: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        try:
            return self.backend.predict(chips)
        finally:
            self.seconds += time.perf_counter() - started


def end_to_end(entry, requested: str, width: int, rows: int) -> dict:
    from pipeline_throughput import synthetic_scene

    from pipeline.scene import SceneOptions, detect_cracks
    from pipeline.stores import DEFAULT_CRS

    name, reason = select_backend(requested)
    backend = TimedBackend(load_backend(entry, requested))
    with tempfile.TemporaryDirectory() as tmp:
        scene = synthetic_scene(Path(tmp) / "scene.tif", width, rows)
        detect_cracks(str(scene), backend, entry, Path(tmp) / "warm.tif", DEFAULT_CRS, SceneOptions())
        backend.seconds = 0.0
        with GpuSampler() as gpu:
            started = time.perf_counter()
            result = detect_cracks(
                str(scene), backend, entry, Path(tmp) / "p.tif", DEFAULT_CRS, SceneOptions()
            )
            seconds = time.perf_counter() - started
    return {
        "backend": name,
        "why": reason,
        "batch": backend.batch_size,
        "chips": result.chip_count,
        "seconds": round(seconds, 3),
        "chips_per_s": round(result.chip_count / seconds, 1),
        "network_thread_busy": round(backend.seconds / seconds, 3),
        "gpu_busy": None if gpu.busy is None else round(gpu.busy, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--backends", default="tensorrt,torch,onnxruntime")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument(
        "--precision",
        default="fp16",
        choices=["fp16", "fp32"],
        help="TensorRT precision (torch on CUDA always uses FP16 autocast).",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="Minimum time per case.")
    parser.add_argument("--end-to-end", default="auto", help="Backend for the scene run; 'none' skips it.")
    parser.add_argument("--scene-width", type=int, default=16384)
    parser.add_argument("--scene-rows", type=int, default=16384)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    entry = resolve(args.model)
    report = {
        "model": entry.spec,
        "precision": args.precision,
        **gpu_info(),
        "network": [],
        "skipped": {},
        "end_to_end": None,
    }
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}))
    for name in args.backends.split(","):
        if why := unavailable(name):
            report["skipped"][name] = why
            print(f"skip {name}: {why}")
            continue
        for batch in (int(b) for b in args.batches.split(",")):
            rate = network_only(make_backend(entry, name, batch, args.precision), batch, args.seconds)
            report["network"].append({"backend": name, "batch": batch, "chips_per_s": round(rate, 1)})
            print(f"{name:<12} batch {batch:>3}: {rate:10.1f} chips/s")
    if args.end_to_end != "none":
        report["end_to_end"] = end_to_end(entry, args.end_to_end, args.scene_width, args.scene_rows)
        print("end to end:", json.dumps(report["end_to_end"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
