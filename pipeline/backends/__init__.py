"""Inference backends: chips in, crack probabilities out.

Every backend implements the contract of the exported graph (see
``models.onnx_export``): ``predict`` takes uint8 chips (N, 3, H, W) and returns
crack probabilities (N, H, W) as uint8 0-255 (the probability times 255,
rounded: a GPU copies a quarter of the bytes back that float32 would need).
Graphs exported before crackmap 1.1 return float32; ``as_uint8`` converts
their output, so the contract is the same whatever the model version.  ONNX
Runtime is the CPU default (it measured faster than torch on CPUs; see
docs/benchmarks.md).  On NVIDIA GPUs
TensorRT (``backends.tensorrt``) is preferred, torch on CUDA is the fallback
and the reference.  torch, tensorrt and pycuda are imported only by their
backends.

The contract and shared helpers are in ``base``; one module per backend;
``load_backend`` here picks and loads one.
"""

from __future__ import annotations

import importlib.util
import logging

from models.registry import ModelEntry
from pipeline.backends.base import (
    Backend,
    as_uint8,
    gpu_present,
    inference_of,
    pad_batch,
    predictions,
    split_batches,
)
from pipeline.backends.fixed import FixedBackend, short_crack
from pipeline.backends.onnx_runtime import OnnxRuntimeBackend
from pipeline.errors import BackendUnavailableError

__all__ = [
    "BACKENDS",
    "CPU_DEFAULT",
    "Backend",
    "FixedBackend",
    "OnnxRuntimeBackend",
    "as_uint8",
    "auto_backend",
    "choose_backend",
    "gpu_present",
    "inference_of",
    "load_backend",
    "pad_batch",
    "predictions",
    "select_backend",
    "short_crack",
    "split_batches",
]

log = logging.getLogger(__name__)
BACKENDS = ("auto", "tensorrt", "torch", "onnxruntime")
CPU_DEFAULT = "onnxruntime"


def auto_backend(gpu: bool, tensorrt: bool, torch_cuda: bool) -> tuple[str, str]:
    """The backend ``auto`` picks, and why, given what this machine has.

    >>> auto_backend(gpu=True, tensorrt=True, torch_cuda=True)[0]
    'tensorrt'
    >>> auto_backend(gpu=True, tensorrt=False, torch_cuda=True)[0]
    'torch'
    >>> auto_backend(gpu=False, tensorrt=True, torch_cuda=False)
    ('onnxruntime', 'no NVIDIA GPU: the CPU default')
    """
    if gpu and tensorrt:
        return "tensorrt", "an NVIDIA GPU with tensorrt and pycuda installed"
    if gpu and torch_cuda:
        return "torch", (
            "an NVIDIA GPU with CUDA torch, but tensorrt/pycuda are not installed "
            "(pip install 'crackmap[gpu]' for TensorRT)"
        )
    if gpu:
        return CPU_DEFAULT, "an NVIDIA GPU, but neither tensorrt+pycuda nor CUDA torch: the CPU default"
    return CPU_DEFAULT, "no NVIDIA GPU: the CPU default"


def select_backend(requested: str = "auto") -> tuple[str, str]:
    """(backend, reason): ``requested`` itself, or for ``auto`` the best available here.

    >>> select_backend("torch")
    ('torch', 'asked for')
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {list(BACKENDS)}")
    if requested != "auto":
        return requested, "asked for"
    gpu = gpu_present()
    tensorrt = gpu and all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "pycuda"))
    torch_cuda = False
    if gpu and not tensorrt and importlib.util.find_spec("torch") is not None:
        import torch

        torch_cuda = torch.cuda.is_available()
    return auto_backend(gpu, tensorrt, torch_cuda)


def choose_backend(requested: str = "auto") -> str:
    """The backend to use: ``requested`` itself, or for ``auto`` the best available here.

    auto picks TensorRT on an NVIDIA GPU with tensorrt and pycuda installed,
    torch on a CUDA GPU without them, the CPU default (ONNX Runtime) otherwise.

    >>> choose_backend("torch")
    'torch'
    """
    return select_backend(requested)[0]


def load_backend(
    entry: ModelEntry, requested: str = "auto", batch_size: int | None = None, cpu_precision: str = "auto"
) -> Backend:
    """Load ``entry`` on a backend (see ``choose_backend``); logs which one was picked and why.

    ``batch_size`` (chips per ``predict``) defaults per backend: 8 on CPUs,
    32 for torch on CUDA, 128 for TensorRT (four double-buffered micro-batches of 32).
    ``cpu_precision`` (auto, fp32, int8) picks ONNX Runtime's graph: auto runs
    the version's INT8 graph where it passed its accuracy gate and measures
    faster on this CPU (``pipeline.precision.cpu_graph``).

    Raises:
        BackendUnavailableError: the backend asked for is not installed or has no GPU;
            the message says how to install it.
    """
    name, reason = select_backend(requested)
    backend: Backend
    if name == "tensorrt":
        from pipeline.backends.tensorrt import TensorRTBackend, require_tensorrt

        require_tensorrt()
        backend = TensorRTBackend(entry, batch_size or 128)
    elif name == "torch":
        if importlib.util.find_spec("torch") is None:
            raise BackendUnavailableError("the torch backend needs PyTorch: pip install 'crackmap[torch]'")
        from pipeline.backends.pytorch import TorchBackend

        backend = TorchBackend(entry, batch_size)
    else:
        from pipeline.precision import cpu_graph

        graph, precision, why = cpu_graph(entry, cpu_precision)
        onnx = OnnxRuntimeBackend(graph, batch_size or 8)
        onnx.precision = precision
        backend = onnx
        reason = f"{reason}; {precision} graph: {why}"
    log.info("model %s on backend %s (%s)", entry.spec, name, reason)
    return backend
