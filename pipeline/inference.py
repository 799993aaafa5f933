"""Inference backends: chips in, crack probabilities out.

Every backend implements the contract of the exported graph (see
``models.export``): ``predict`` takes uint8 chips (N, 3, H, W) and returns
float32 crack probabilities (N, H, W).  ONNX Runtime is the CPU default (it
measured faster than torch on CPUs; see docs/benchmarks.md).  torch is
imported only by the torch backend.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from models.registry import ModelEntry
from pipeline.errors import BackendUnavailableError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "onnxruntime", "torch")
CPU_DEFAULT = "onnxruntime"


class Backend(Protocol):
    """Runs a model on batches of chips."""

    name: str
    batch_size: int

    def predict(self, chips: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, H, W) RGB chips -> float32 (N, H, W) crack probability."""


class OnnxRuntimeBackend:
    """The model's ONNX graph on ONNX Runtime's CPU provider."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, batch_size: int = 8, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(onnx_path), options,
                                             providers=["CPUExecutionProvider"])
        self.batch_size = batch_size

    def predict(self, chips: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"chips": np.ascontiguousarray(chips, dtype=np.uint8)})[0]


class TorchBackend:
    """The model's weights in PyTorch, on CUDA when present, else on the CPU."""

    name = "torch"

    def __init__(self, entry: ModelEntry, batch_size: int = 8, device: str | None = None) -> None:
        import torch

        from models.export import ChipsToProbability, load_net

        self._torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._module = ChipsToProbability(load_net(entry.variant, entry.file("weights")))
        self._module.to(self.device).eval()
        self.batch_size = batch_size

    def predict(self, chips: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self._module(torch.from_numpy(np.ascontiguousarray(chips)).to(self.device))
        return out.float().cpu().numpy()


def gpu_present() -> bool:
    """True where an NVIDIA driver exposes a device (checked without importing CUDA libraries)."""
    return Path("/dev/nvidiactl").exists()


def choose_backend(requested: str = "auto") -> str:
    """The backend to use: ``requested`` itself, or for ``auto`` the best available here.

    auto picks torch on a machine with a CUDA GPU and torch installed, the CPU
    default (ONNX Runtime) otherwise.

    >>> choose_backend("torch")
    'torch'
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {list(BACKENDS)}")
    if requested != "auto":
        return requested
    if gpu_present() and importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return "torch"
    return CPU_DEFAULT


def load_backend(entry: ModelEntry, requested: str = "auto", batch_size: int = 8) -> Backend:
    """Load ``entry`` on a backend (see ``choose_backend``); logs which one was picked."""
    name = choose_backend(requested)
    if name == "torch" and importlib.util.find_spec("torch") is None:
        raise BackendUnavailableError("the torch backend needs PyTorch: pip install 'crackmap[torch]'")
    backend = (TorchBackend(entry, batch_size) if name == "torch"
               else OnnxRuntimeBackend(entry.file("onnx"), batch_size))
    log.info("model %s on backend %s%s", entry.spec, name,
             " (chosen automatically)" if requested == "auto" else "")
    return backend
