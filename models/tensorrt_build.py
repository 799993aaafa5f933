"""Build TensorRT engines from the exported ONNX graph.

Only ``build_engine`` touches TensorRT, imported when it is called: a machine
without TensorRT can import this module.  Which engine to build for which
GPU, and the cache of built engines, are ``pipeline.tensorrt``'s business.

Precision: TensorRT 10 takes the FP32 graph and the ``FP16`` builder flag
(weak typing: TensorRT picks FP16 kernels where it likes).  TensorRT 11
removed weak typing; there an FP16 engine comes from an FP16 ONNX graph
(``models.onnx_export.export_onnx(..., half=True)``) built as a strongly typed
network, so the graph's types are the engine's types.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
PRECISIONS = ("fp16", "fp32")
INPUT, OUTPUT = "chips", "probability"  # the tensor names of models.onnx_export
WORKSPACE_BYTES = 4 << 30
# Bump when build_engine's settings change (workspace, flags, ...): cached engines carry it
# in their key (pipeline.backends.tensorrt.EngineKey) and are rebuilt.
BUILD_VERSION = "1"
TENSORRT_INSTALL = (
    "pip install 'crackmap[gpu]' --extra-index-url https://pypi.nvidia.com "
    "(tensorrt comes from NVIDIA's package index; pycuda is built from source "
    "and needs the CUDA toolkit's nvcc on PATH)"
)


@dataclass(frozen=True, slots=True)
class Profile:
    """The batch sizes an engine accepts (min..max) and is tuned for (opt), for square chips.

    >>> Profile.for_max_batch(64)
    Profile(min_batch=1, opt_batch=32, max_batch=64, size_px=400)
    >>> Profile.for_max_batch(8).opt_batch
    8
    """

    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 64
    size_px: int = 400

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"an optimization profile needs 1 <= min <= opt <= max batch, "
                f"got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )

    @classmethod
    def for_max_batch(cls, max_batch: int = 64, size_px: int = 400) -> Profile:
        """min 1, opt 32 (or ``max_batch`` when smaller), max ``max_batch``."""
        return cls(1, min(32, max_batch), max_batch, size_px)

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, 3, self.size_px, self.size_px)

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) input shapes, as ``IOptimizationProfile.set_shape`` takes them."""
        return (
            self.input_shape(self.min_batch),
            self.input_shape(self.opt_batch),
            self.input_shape(self.max_batch),
        )


def strongly_typed(tensorrt_version: str) -> bool:
    """Whether this TensorRT builds strongly typed networks only (11 and later).

    >>> strongly_typed("10.13.0.35"), strongly_typed("11.0.0")
    (False, True)
    """
    return int(tensorrt_version.split(".")[0]) >= 11


def build_engine(
    onnx_path: Path, precision: str, profile: Profile, timing_cache: Path | None = None
) -> bytes:
    """Serialized TensorRT engine of an ONNX graph with one optimization profile.

    Args:
        onnx_path: the graph (an FP16 graph on TensorRT >= 11 for ``fp16``).
        precision: ``fp16`` or ``fp32``.
        profile: batch sizes the engine accepts and is tuned for.
        timing_cache: file of kernel timings, read if it exists and rewritten
            after the build, so later builds on the same GPU are faster.

    Raises:
        ImportError: TensorRT is not installed (the message says how to install it).
        RuntimeError: the ONNX graph cannot be parsed or the build fails.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ImportError(f"building an engine needs TensorRT: {TENSORRT_INSTALL}") from exc

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    typed = strongly_typed(trt.__version__)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16" and not typed:
        config.set_flag(trt.BuilderFlag.FP16)
    shapes = builder.create_optimization_profile()
    shapes.set_shape(INPUT, *profile.shapes())
    config.add_optimization_profile(shapes)
    old = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    try:
        timings = config.create_timing_cache(old) if old else None
    except (RuntimeError, TypeError, ValueError):
        timings = None
    if timings is None:  # none yet, or unreadable: start afresh
        timings = config.create_timing_cache(b"")
    config.set_timing_cache(timings, ignore_mismatch=False)
    log.info(
        "building a %s TensorRT %s engine from %s (batch %d/%d/%d)%s",
        precision,
        trt.__version__,
        onnx_path,
        profile.min_batch,
        profile.opt_batch,
        profile.max_batch,
        ", strongly typed" if typed else "",
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; rerun with -v for its log")
    if timing_cache:  # replaced whole, so that a worker sharing the folder never reads half of it
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=timing_cache.parent, delete=False) as f:
            f.write(bytes(config.get_timing_cache().serialize()))
        os.replace(f.name, timing_cache)
    return bytes(serialized)
