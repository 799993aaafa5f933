"""TensorRT engines on NVIDIA GPUs: the engine cache and the TensorRT backend.

An engine is specific to the ONNX graph, the TensorRT version, the GPU model
(name and compute capability), the precision and the optimization profile.
Those six make its ``EngineKey``.  Engines are cached in a folder (or an
fsspec URL) as ``<name>.engine`` with the key beside it in ``<name>.json``;
an engine is loaded only when the stored key equals the key of this machine,
otherwise it is rebuilt, with a log line saying why.

``tensorrt`` and ``pycuda`` are imported only when an engine is built or a
``TensorRTBackend`` is made; the plain functions here (keys, buffer sizes,
batch splitting and padding, the output contract) need neither and are
tested on CPUs.

CUDA contexts are per thread.  The backend uses the GPU's primary context
(the one PyTorch uses too) and makes it current for the duration of each
call, so it may be created in one thread and called from another; calls are
serialized by a lock.  Run the network in one thread per GPU, as
``pipeline.scene.run_network`` does (reading and stitching run in their own
threads); for several GPUs, one process or thread per GPU, each with its own
backend (``device=``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.registry import ModelEntry
from models.tensorrt_build import (
    BUILD_VERSION,
    INPUT,
    OUTPUT,
    PRECISIONS,
    TENSORRT_INSTALL,
    Profile,
    strongly_typed,
)
from pipeline import buckets
from pipeline.backends.base import as_uint8, gpu_present, split_batches
from pipeline.errors import BackendUnavailableError

log = logging.getLogger(__name__)
# Timing caches and FP16 graphs are local files; engines go to the cache (default_cache()).
LOCAL_CACHE = Path.home() / ".cache" / "crackmap" / "engines"


def default_cache() -> str:
    """The engine cache: ``CRACKMAP_ENGINE_CACHE`` (a folder or an fsspec URL), else ``LOCAL_CACHE``.

    Read when a cache is made, not at import, and kept a string: ``Path`` would
    turn ``s3://bucket/engines`` into ``s3:/bucket/engines``.
    """
    return os.environ.get("CRACKMAP_ENGINE_CACHE") or str(LOCAL_CACHE)


@dataclass(frozen=True, slots=True)
class EngineKey:
    """Everything a serialized engine depends on; a cached engine is used only for an equal key."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    precision: str
    profile: Profile
    build: str = BUILD_VERSION  # models.tensorrt_build.build_engine's settings (workspace, flags)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EngineKey:
        return cls(**{**data, "profile": Profile(**data["profile"])})

    def digest(self) -> str:
        """sha256 of the key's canonical JSON: the cached engine's identity."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> str:
        return (
            f"TensorRT {self.tensorrt_version} on {self.gpu_name} (sm {self.compute_capability}), "
            f"{self.precision}, batch {self.profile.min_batch}/{self.profile.opt_batch}/"
            f"{self.profile.max_batch}, ONNX {self.onnx_sha256[:12]}"
        )


def engine_name(entry: ModelEntry, key: EngineKey) -> str:
    """File stem of a cached engine: readable, and stable only for an equal key.

    The digest is in the name so that workers with different GPUs or TensorRT
    versions can share one cache without overwriting each other's engines.
    """
    p = key.profile
    return (
        f"{entry.name}-{entry.version}-{key.precision}-b{p.min_batch}-{p.opt_batch}-"
        f"{p.max_batch}-{key.digest()[:16]}"
    )


@dataclass(frozen=True, slots=True)
class BufferPlan:
    """Shapes and sizes of one set of I/O buffers, for a batch of ``batch`` chips."""

    input_shape: tuple[int, int, int, int]
    output_shape: tuple[int, int, int]
    input_bytes: int
    output_bytes: int


def buffer_plan(profile: Profile, batch: int | None = None, output_itemsize: int = 1) -> BufferPlan:
    """I/O buffers for ``batch`` chips (default: the profile's maximum, what device buffers hold).

    Input: uint8 chips (N, 3, H, W); output: probability (N, H, W), uint8
    (``output_itemsize`` 1) or, from graphs exported before crackmap 1.1, float32 (4).

    >>> buffer_plan(Profile.for_max_batch(64)).input_bytes
    30720000
    >>> buffer_plan(Profile.for_max_batch(64), 5).output_shape
    (5, 400, 400)
    >>> buffer_plan(Profile.for_max_batch(64), 5).output_bytes
    800000
    """
    batch = profile.max_batch if batch is None else batch
    if not profile.min_batch <= batch <= profile.max_batch:
        raise ValueError(
            f"batch {batch} is outside the engine's profile ({profile.min_batch}..{profile.max_batch} chips)"
        )
    s = profile.size_px
    return BufferPlan((batch, 3, s, s), (batch, s, s), batch * 3 * s * s, batch * s * s * output_itemsize)


def check_chips(chips: np.ndarray, size_px: int) -> np.ndarray:
    """The chips as a C-contiguous uint8 (N, 3, size_px, size_px) array, or ValueError naming the problem."""
    if chips.ndim != 4 or chips.shape[1:] != (3, size_px, size_px):
        raise ValueError(f"expected chips of shape (N, 3, {size_px}, {size_px}), got {chips.shape}")
    if chips.dtype != np.uint8:
        raise ValueError(f"expected uint8 chips, got {chips.dtype}")
    return np.ascontiguousarray(chips)


OUTPUT_DTYPES = {"UINT8": np.uint8, "FLOAT": np.float32}  # this graph's, and before crackmap 1.1


def check_engine_io(inputs: dict[str, str], outputs: dict[str, str]) -> type:
    """An engine's I/O (tensor name -> dtype name) must be the contract of ``models.onnx_export``.

    Returns the numpy dtype of its probability output.

    >>> check_engine_io({"chips": "UINT8"}, {"probability": "UINT8"}).__name__
    'uint8'
    >>> check_engine_io({"chips": "UINT8"}, {"probability": "FLOAT"}).__name__
    'float32'
    """
    want_in = {INPUT: "UINT8"}
    if inputs != want_in or set(outputs) != {OUTPUT} or outputs[OUTPUT] not in OUTPUT_DTYPES:
        raise ValueError(
            f"the engine has inputs {inputs} and outputs {outputs}; crackmap's graph has "
            f"{want_in} -> {{'{OUTPUT}': 'UINT8'}} (or 'FLOAT' before crackmap 1.1). "
            "Rebuild it with `crackmap models build-engine`."
        )
    return OUTPUT_DTYPES[outputs[OUTPUT]]


class EngineCache:
    """Serialized engines with their keys, in a local folder or under an fsspec URL."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = str(root) if root is not None else default_cache()

    def path(self, name: str) -> str:
        return buckets.join(self.root, name)

    def _read(self, name: str) -> bytes | None:
        path = self.path(name)
        if not buckets.is_url(path):
            return Path(path).read_bytes() if Path(path).is_file() else None
        fs = buckets.filesystem(path)
        try:
            with fs.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def _write(self, name: str, data: bytes) -> None:
        path = self.path(name)
        if not buckets.is_url(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=Path(path).parent, delete=False) as f:
                f.write(data)
            os.replace(f.name, path)  # readers see the old file or the whole new one
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "part"
            local.write_bytes(data)
            buckets.upload(local, path)

    def get(self, name: str, key: EngineKey) -> bytes | None:
        """The engine stored as ``name`` if its stored key equals ``key`` and its bytes are intact."""
        meta = self._read(f"{name}.json")
        if meta is None:
            log.info("no cached engine %s in %s: building it", name, self.root)
            return None
        try:
            stored = json.loads(meta)
            matches = stored.get("key") == key.to_dict()
            old = "" if matches else EngineKey.from_dict(stored["key"]).describe()
        except (ValueError, TypeError, KeyError, AttributeError):  # corrupt, or an older key's fields
            stored, matches, old = {}, False, "an unreadable or older key"
        if not matches:
            log.warning(
                "cached engine %s was built for %s; this is %s: rebuilding it", name, old, key.describe()
            )
            return None
        engine = self._read(f"{name}.engine")
        if engine is None or hashlib.sha256(engine).hexdigest() != stored.get("engine_sha256"):
            log.warning(
                "cached engine %s.engine is missing or does not match its sha256: rebuilding it", name
            )
            return None
        return engine

    def put(self, name: str, key: EngineKey, engine: bytes) -> str:
        """Store an engine, then its key (so a key is never beside a partial engine); returns its path."""
        self._write(f"{name}.engine", engine)
        meta = {"key": key.to_dict(), "engine_sha256": hashlib.sha256(engine).hexdigest()}
        self._write(f"{name}.json", (json.dumps(meta, indent=2) + "\n").encode())
        return self.path(f"{name}.engine")


def require_tensorrt() -> None:
    """Raise ``BackendUnavailableError`` unless tensorrt and pycuda import and a GPU is present.

    The message says how to install what is missing.
    """
    missing = [m for m in ("tensorrt", "pycuda") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendUnavailableError(
            f"the tensorrt backend needs {' and '.join(missing)}, "
            f"which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{TENSORRT_INSTALL}"
        )
    if not gpu_present():
        raise BackendUnavailableError(
            "TensorRT needs an NVIDIA GPU and its driver; this machine has none (use --backend onnxruntime)"
        )


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of a CUDA device, from pycuda."""
    import pycuda.driver as cuda

    cuda.init()
    gpu = cuda.Device(device)
    major, minor = gpu.compute_capability()
    return gpu.name(), f"{major}.{minor}"


def engine_onnx(entry: ModelEntry, precision: str, tensorrt_version: str, cache: EngineCache) -> Path:
    """The ONNX graph to build from: the registry's, or on TensorRT >= 11 for fp16 an FP16 export.

    The FP16 graph is exported from the registry's weights (this needs torch)
    into a local folder beside the engine cache, once per model version.
    """
    if precision != "fp16" or not strongly_typed(tensorrt_version):
        return entry.file("onnx")
    local = Path(cache.root) if not buckets.is_url(cache.root) else LOCAL_CACHE
    path = local / "onnx" / f"{entry.name}-{entry.version}-{entry.sha256[:16]}-fp16.onnx"
    if not path.is_file():
        from models.onnx_export import export_onnx, load_net

        path.parent.mkdir(parents=True, exist_ok=True)
        log.info("exporting the FP16 ONNX graph of %s for strongly typed TensorRT", entry.spec)
        export_onnx(load_net(entry.variant, entry.file("weights")), path, entry.size_px, half=True)
    return path


def engine_for(
    entry: ModelEntry,
    precision: str = "fp16",
    profile: Profile | None = None,
    cache: EngineCache | None = None,
    device: int = 0,
) -> tuple[bytes, EngineKey, str]:
    """A serialized engine of ``entry`` for this GPU and TensorRT: from the cache, else built and cached.

    Returns:
        (engine bytes, its key, its path in the cache).

    Raises:
        BackendUnavailableError: tensorrt or pycuda is not installed.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    require_tensorrt()
    import tensorrt as trt

    from models.registry import sha256_file
    from models.tensorrt_build import build_engine

    profile = profile or Profile.for_max_batch(64, entry.size_px)
    cache = cache or EngineCache()
    onnx_path = engine_onnx(entry, precision, trt.__version__, cache)
    gpu_name, capability = gpu_identity(device)
    key = EngineKey(sha256_file(onnx_path), trt.__version__, gpu_name, capability, precision, profile)
    name = engine_name(entry, key)
    engine = cache.get(name, key)
    if engine is None:
        timing = (Path(cache.root) if not buckets.is_url(cache.root) else LOCAL_CACHE) / (
            f"timing-{trt.__version__}-{gpu_name.replace(' ', '_')}-sm{capability}.cache"
        )
        engine = build_engine(onnx_path, precision, profile, timing)
        cache.put(name, key, engine)
        log.info("engine %s built and cached in %s", name, cache.root)
    return engine, key, cache.path(f"{name}.engine")


class _Slot:
    """One set of buffers: page-locked host input/output, device input/output, and events."""

    def __init__(self, cuda, plan: BufferPlan, output_dtype: type) -> None:
        self.host_in = cuda.pagelocked_empty(plan.input_shape, np.uint8)
        self.host_out = cuda.pagelocked_empty(plan.output_shape, output_dtype)
        self.device_in = cuda.mem_alloc(plan.input_bytes)
        self.device_out = cuda.mem_alloc(plan.output_bytes)
        untimed = cuda.event_flags.DISABLE_TIMING
        self.copied_in, self.computed = cuda.Event(untimed), cuda.Event(untimed)
        # the host waits on this one: block in the driver rather than spin a core
        self.copied_out = cuda.Event(untimed | cuda.event_flags.BLOCKING_SYNC)
        self.shape: tuple | None = None  # the input shape set on this slot's context
        self.execution: Any = None  # its TensorRT execution context, made by the backend


class TensorRTBackend:
    """The model as a TensorRT engine on one GPU, with double-buffered transfers.

    ``predict`` splits its chips into micro-batches (``micro_batch``, at most
    the profile's maximum) and pipelines them over two buffer sets: while the
    GPU runs micro-batch k, the host fills the page-locked input of k+1 and
    copies it to the device on a copy stream, and the output of k-1 comes
    back on another.  ``batch_size`` (the chips per ``predict`` that the
    scene reader hands over) is a few micro-batches, so the pipeline is full
    most of the time.
    """

    name = "tensorrt"

    def __init__(
        self,
        entry: ModelEntry,
        batch_size: int = 128,
        micro_batch: int = 32,
        precision: str = "fp16",
        max_batch: int = 64,
        cache: EngineCache | None = None,
        device: int = 0,
    ) -> None:
        require_tensorrt()
        import pycuda.driver as cuda
        import tensorrt as trt

        self.precision = precision
        self.profile = Profile.for_max_batch(max_batch, entry.size_px)
        self.micro_batch = min(micro_batch, self.profile.max_batch)
        self.batch_size = batch_size
        self._cuda, self._lock = cuda, threading.Lock()
        cuda.init()
        self._context = cuda.Device(device).retain_primary_context()
        self._context.push()
        try:
            engine_bytes, self.key, self.engine_path = engine_for(
                entry, precision, self.profile, cache, device
            )
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
            if self._engine is None:
                raise BackendUnavailableError(
                    f"TensorRT {trt.__version__} cannot load the engine "
                    f"{self.engine_path}; delete it to rebuild it"
                )
            io = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
            modes = {n: self._engine.get_tensor_mode(n) for n in io}
            dtypes = {n: self._engine.get_tensor_dtype(n).name for n in io}
            output_dtype = check_engine_io(
                {n: dtypes[n] for n in io if modes[n] == trt.TensorIOMode.INPUT},
                {n: dtypes[n] for n in io if modes[n] == trt.TensorIOMode.OUTPUT},
            )
            plan = buffer_plan(self.profile, output_itemsize=np.dtype(output_dtype).itemsize)
            self._slots = [_Slot(cuda, plan, output_dtype), _Slot(cuda, plan, output_dtype)]
            # One execution context per buffer set, its tensor addresses bound once: a
            # context's shape is only changed after its previous batch was collected.
            for slot in self._slots:
                slot.execution = self._engine.create_execution_context()
                slot.execution.set_tensor_address(INPUT, int(slot.device_in))
                slot.execution.set_tensor_address(OUTPUT, int(slot.device_out))
            self._copy_in, self._compute, self._copy_out = cuda.Stream(), cuda.Stream(), cuda.Stream()
        finally:
            self._context.pop()
        log.info("TensorRT engine %s (%s)", self.engine_path, self.key.describe())

    def predict(self, chips: np.ndarray) -> np.ndarray:
        chips = check_chips(chips, self.profile.size_px)
        out = np.empty((len(chips), *chips.shape[2:]), np.uint8)
        with self._lock:
            if not self._slots:
                raise RuntimeError("this TensorRT backend is closed")
            self._context.push()
            try:
                self._run(chips, out)
            finally:  # after an error too: no copy may still use the buffers the next call fills
                for stream in (self._copy_in, self._compute, self._copy_out):
                    stream.synchronize()
                self._context.pop()
        return out

    def close(self) -> None:
        """Free the GPU buffers, streams and contexts now, from whichever thread.

        (pycuda frees them on garbage collection only in the thread that made
        them, and silently leaks them in any other.)
        """
        with self._lock:
            if not self._slots:
                return
            self._context.push()
            try:
                for stream in (self._copy_in, self._compute, self._copy_out):
                    stream.synchronize()
                for slot in self._slots:
                    slot.execution = None
                    slot.device_in.free()
                    slot.device_out.free()
                    slot.host_in.base.free()
                    slot.host_out.base.free()
                self._slots = []
                self._engine = self._copy_in = self._compute = self._copy_out = None
            finally:
                self._context.pop()
            self._context.detach()

    def _run(self, chips: np.ndarray, out: np.ndarray) -> None:
        cuda = self._cuda
        pending: list[tuple[_Slot, slice]] = []
        for k, part in enumerate(split_batches(len(chips), self.micro_batch)):
            slot, n = self._slots[k % 2], part.stop - part.start
            if len(pending) == 2:  # this slot's previous batch: wait for it, hand it out
                self._collect(*pending.pop(0), out)
            slot.host_in[:n] = chips[part]  # overlaps the GPU's work on the other slot
            cuda.memcpy_htod_async(slot.device_in, slot.host_in[:n], self._copy_in)
            slot.copied_in.record(self._copy_in)
            self._compute.wait_for_event(slot.copied_in)
            shape = (n, *chips.shape[1:])
            if slot.shape != shape:
                if not slot.execution.set_input_shape(INPUT, shape):
                    raise RuntimeError(f"TensorRT refused the input shape {shape} (profile {self.profile})")
                slot.shape = shape
            if not slot.execution.execute_async_v3(self._compute.handle):
                raise RuntimeError(f"TensorRT failed to run a batch of {n} chips")
            slot.computed.record(self._compute)
            self._copy_out.wait_for_event(slot.computed)
            cuda.memcpy_dtoh_async(slot.host_out[:n], slot.device_out, self._copy_out)
            slot.copied_out.record(self._copy_out)
            pending.append((slot, part))
        for item in pending:
            self._collect(*item, out)

    @staticmethod
    def _collect(slot: _Slot, part: slice, out: np.ndarray) -> None:
        slot.copied_out.synchronize()
        out[part] = as_uint8(slot.host_out[: part.stop - part.start])
