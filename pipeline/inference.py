"""Inference backends: chips in, crack probabilities out.

Every backend implements the contract of the exported graph (see
``models.export``): ``predict`` takes uint8 chips (N, 3, H, W) and returns
crack probabilities (N, H, W) as uint8 0-255 (the probability times 255,
rounded: a GPU copies a quarter of the bytes back that float32 would need).
Graphs exported before crackmap 1.1 return float32; ``as_uint8`` converts
their output, so the contract is the same whatever the model version.  ONNX
Runtime is the CPU default (it measured faster than torch on CPUs; see
docs/benchmarks.md).  On NVIDIA GPUs
TensorRT (``pipeline.engines``) is preferred, torch on CUDA is the fallback
and the reference.  torch, tensorrt and pycuda are imported only by their
backends.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from models.registry import ModelEntry
from pipeline.errors import BackendUnavailableError

log = logging.getLogger(__name__)
BACKENDS = ("auto", "tensorrt", "torch", "onnxruntime")
CPU_DEFAULT = "onnxruntime"


def split_batches(n: int, batch: int) -> list[slice]:
    """Slices of at most ``batch`` chips that cover ``n`` chips in order.

    >>> split_batches(70, 32)
    [slice(0, 32, None), slice(32, 64, None), slice(64, 70, None)]
    """
    return [slice(start, min(start + batch, n)) for start in range(0, n, batch)]


def pad_batch(chips: np.ndarray, batch: int) -> np.ndarray:
    """``chips`` with zero chips appended up to ``batch`` (for fixed-shape graphs); unchanged if full.

    >>> pad_batch(np.ones((3, 3, 2, 2), np.uint8), 4).shape
    (4, 3, 2, 2)
    """
    if len(chips) > batch:
        raise ValueError(f"{len(chips)} chips do not fit a batch of {batch}")
    if len(chips) == batch:
        return chips
    padded = np.zeros((batch, *chips.shape[1:]), dtype=chips.dtype)
    padded[:len(chips)] = chips
    return padded


def as_uint8(probability: np.ndarray) -> np.ndarray:
    """Probabilities as uint8 0..255: unchanged if already uint8, else float [0, 1] rounded.

    >>> as_uint8(np.array([0.0, 0.5, 1.0], np.float32)).tolist()
    [0, 128, 255]
    """
    if probability.dtype == np.uint8:
        return probability
    scaled = np.clip(probability, 0.0, 1.0) * np.float32(255.0)
    return np.rint(scaled, out=scaled).astype(np.uint8)


T = TypeVar("T")


class Backend(Protocol):
    """Runs a model on batches of chips."""

    name: str
    batch_size: int

    def predict(self, chips: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, H, W) RGB chips -> uint8 (N, H, W) crack probability x 255."""


def predictions(backend: Backend, items: Iterable[T], chips: Callable[[T], np.ndarray]
                ) -> Iterator[tuple[T, np.ndarray]]:
    """``(item, backend.predict(chips(item)))`` for each item, in order.

    A backend with ``submit(chips) -> Future`` keeps up to ``backend.threads``
    batches in flight, so the next batch starts while one is still running.
    """
    submit = getattr(backend, "submit", None)
    if submit is None:
        for item in items:
            yield item, backend.predict(chips(item))
        return
    pending: deque = deque()
    for item in items:
        pending.append((item, submit(chips(item))))
        if len(pending) >= backend.threads:
            item, future = pending.popleft()
            yield item, future.result()
    while pending:
        item, future = pending.popleft()
        yield item, future.result()


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
        self._session = ort.InferenceSession(str(onnx_path), options,
                                             providers=["CPUExecutionProvider"])
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


def short_crack(size_px: int = 400, length_px: int = 120, width_px: int = 5) -> np.ndarray:
    """A chip's probability (uint8) with one short crack across its centre, 0 elsewhere.

    Chips overlap by less than a third of their size, so the cracks of
    neighbouring chips never touch: a scene of them has one crack per chip,
    about as many as a cracked road, where a pattern reaching the chip edges
    would make one lattice of cracks over the whole scene.

    >>> p = short_crack(); p.dtype, p.shape, int(p[200, 200]), int(p[200, 10]), int(p.sum() // 255)
    (dtype('uint8'), (400, 400), 255, 0, 600)
    """
    p = np.zeros((size_px, size_px), np.uint8)
    top, left = (size_px - width_px) // 2, (size_px - length_px) // 2
    p[top:top + width_px, left:left + length_px] = 255
    return p


class FixedBackend:
    """Returns one fixed chip probability for every chip, at no cost: the network taken out.

    For measuring everything around the network (reading, stitching, vectorizing,
    the probability COG): a batch's result is a read-only broadcast view of the
    one chip, so no time goes into computing or even copying it.  The default
    chip holds one short crack (``short_crack``), so vectorizing and measuring
    have one crack per chip to do.
    """

    name = "fixed"

    def __init__(self, probability: np.ndarray | None = None, batch_size: int = 8) -> None:
        self.probability = short_crack() if probability is None else as_uint8(probability)
        self.batch_size = batch_size

    def predict(self, chips: np.ndarray) -> np.ndarray:
        if chips.shape[2:] != self.probability.shape:
            raise ValueError(f"chips of {chips.shape[2:]} px, but the fixed probability is "
                             f"{self.probability.shape} px")
        return np.broadcast_to(self.probability, (len(chips), *self.probability.shape))


class TorchBackend:
    """The model's weights in PyTorch, on CUDA when present, else on the CPU.

    On CUDA it runs in FP16 autocast with channels-last activations, and
    replays one CUDA graph per batch shape (captured on first use): a batch
    shorter than ``batch_size`` is padded to it, so one graph serves a whole
    scene.  On the CPU it runs the plain FP32 module, batch as given.
    """

    name = "torch"

    def __init__(self, entry: ModelEntry, batch_size: int | None = None, device: str | None = None,
                 cuda_graphs: bool = True) -> None:
        import torch

        from models.export import ChipsToProbability, load_net

        self._torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._module = ChipsToProbability(load_net(entry.variant, entry.file("weights")))
        self._module.to(self.device).eval()
        self.batch_size = batch_size or (32 if self.device.type == "cuda" else 8)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, ...], tuple] = {}  # input shape -> (graph, input, output, pinned)
        if self.device.type == "cuda":
            self._module.to(memory_format=torch.channels_last)

    def predict(self, chips: np.ndarray) -> np.ndarray:
        torch = self._torch
        if self.device.type == "cuda":
            return self._predict_cuda(np.ascontiguousarray(chips, dtype=np.uint8))
        with torch.inference_mode():
            out = self._module(torch.from_numpy(np.ascontiguousarray(chips)).to(self.device))
        return out.cpu().numpy()

    def _forward(self, chips):
        torch = self._torch
        with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
            return self._module(chips)

    def _predict_cuda(self, chips: np.ndarray) -> np.ndarray:
        torch = self._torch
        out = np.empty((len(chips), *chips.shape[2:]), np.uint8)
        with torch.inference_mode():
            for part in split_batches(len(chips), self.batch_size):
                start, n = part.start, part.stop - part.start
                part = chips[part]
                if not self.cuda_graphs:
                    x = torch.from_numpy(part).to(self.device, non_blocking=True)
                    out[start:start + n] = self._forward(
                        x.contiguous(memory_format=torch.channels_last)).cpu().numpy()
                    continue
                graph, static_in, static_out, pinned = self._graph((self.batch_size, *part.shape[1:]))
                # a short last batch is padded: the graph has a fixed shape
                pinned.copy_(torch.from_numpy(pad_batch(part, self.batch_size)))
                static_in.copy_(pinned, non_blocking=True)
                graph.replay()
                out[start:start + n] = static_out[:n].cpu().numpy()
        return out

    def _graph(self, shape: tuple[int, ...]) -> tuple:
        """The CUDA graph for input ``shape``: captured once, after warm-up on a side stream."""
        if shape in self._graphs:
            return self._graphs[shape]
        torch = self._torch
        static_in = torch.zeros(shape, dtype=torch.uint8, device=self.device).contiguous(
            memory_format=torch.channels_last)
        pinned = torch.zeros(shape, dtype=torch.uint8).pin_memory()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # cuDNN picks its kernels before capture
                self._forward(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the reader and stitcher threads keep working during the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self._forward(static_in)
        log.info("captured a CUDA graph for torch batches of shape %s", shape)
        self._graphs[shape] = (graph, static_in, static_out, pinned)
        return self._graphs[shape]


def gpu_present() -> bool:
    """True where an NVIDIA driver exposes a device (checked without importing CUDA libraries)."""
    return Path("/dev/nvidiactl").exists()


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
        return "torch", ("an NVIDIA GPU with CUDA torch, but tensorrt/pycuda are not installed "
                         "(pip install 'crackmap[gpu]' for TensorRT)")
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


def load_backend(entry: ModelEntry, requested: str = "auto", batch_size: int | None = None,
                 cpu_precision: str = "auto") -> Backend:
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
    if name == "tensorrt":
        from pipeline.engines import TensorRTBackend, require_tensorrt

        require_tensorrt()
        backend = TensorRTBackend(entry, batch_size or 128)
    elif name == "torch":
        if importlib.util.find_spec("torch") is None:
            raise BackendUnavailableError("the torch backend needs PyTorch: pip install 'crackmap[torch]'")
        backend = TorchBackend(entry, batch_size)
    else:
        from pipeline.precision import cpu_graph

        graph, precision, why = cpu_graph(entry, cpu_precision)
        backend = OnnxRuntimeBackend(graph, batch_size or 8)
        backend.precision = precision
        reason = f"{reason}; {precision} graph: {why}"
    log.info("model %s on backend %s (%s)", entry.spec, name, reason)
    return backend
