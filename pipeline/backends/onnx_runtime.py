"""ONNX Runtime on CPUs: the default where there is no NVIDIA GPU."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.backends.base import as_uint8


class OnnxRuntimeBackend:
    """The model's ONNX graph on ONNX Runtime's CPU provider.

    ``threads`` single-threaded runs of one session go in parallel (ONNX
    Runtime sessions are safe to call concurrently), rather than one run with
    ``threads`` intra-op threads: independent runs never wait at each other's
    barriers, which measured 83 against 60 chips/s for B16 on 2 cores, and more
    when the reader and stitcher threads share the cores.  ``predict`` splits a
    batch across them; ``submit`` runs a whole batch on one of them, so a scene
    (``predictions``) keeps ``threads`` batches going without waiting for the
    slowest part of each.
    """

    name = "onnxruntime"
    precision = "fp32"  # or "int8": which of the version's graphs (see load_backend)

    def __init__(self, onnx_path: Path, batch_size: int = 8, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads must sleep, not spin: the reader and stitcher threads
        # need those cores between batches (spinning halved end-to-end throughput).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.batch_size = batch_size
        self.threads = threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="crackmap-onnx")

    def _run(self, chips: np.ndarray) -> np.ndarray:
        return as_uint8(self._session.run(None, {"chips": chips})[0])

    def submit(self, chips: np.ndarray) -> Future:
        return self._pool.submit(self._run, np.ascontiguousarray(chips, dtype=np.uint8))

    def predict(self, chips: np.ndarray) -> np.ndarray:
        chips = np.ascontiguousarray(chips, dtype=np.uint8)
        parts = [p for p in np.array_split(chips, min(self.threads, len(chips))) if len(p)]
        if len(parts) == 1:
            return self._run(chips)
        return np.concatenate(list(self._pool.map(self._run, parts)))
