"""The float or the INT8 graph on CPUs: the accuracy gate, and the choice by measured speed.

An INT8 graph (``models.quantize``) is added to a model version with
``add_int8``: it is calibrated on the validation chips of the datasets the
model was trained on, then both graphs are scored on those validation images
through the same chips and stitching as ``crackmap eval``.  The card records
both scores; the INT8 graph passes the gate only if the mean val crack F1
drops by at most ``MAX_F1_DROP``.

At run time (``cpu_graph``) a graph that passed the gate is used only if it
is faster on this CPU: both are timed on a few batches once per machine and
model, and the choice is cached.  CPUs differ (VNNI and AMX make INT8 much
faster on recent Intel cores; older x86 cores lack VNNI, and there ONNX
Runtime's u8s8 kernels can saturate), so INT8 is never assumed: on an x86 CPU
without VNNI it is not used at all.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models import registry
from models.registry import ModelEntry
from pipeline.images import image_probability

log = logging.getLogger(__name__)
MAX_F1_DROP = 0.005
PRECISIONS = ("auto", "fp32", "int8")
CHOICES = Path.home() / ".cache" / "crackmap" / "cpu-graphs.json"


def cpu_name() -> str:
    """The CPU's model name, as the kernel reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                platform.processor(),
            )
    except OSError:
        return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def int8_supported(machine: str, flags: set[str]) -> bool:
    """Whether ONNX Runtime's INT8 kernels are exact here: any non-x86 CPU, or x86 with VNNI/AMX.

    >>> int8_supported("x86_64", {"avx2", "avx512_vnni"}), int8_supported("x86_64", {"avx2"})
    (True, False)
    >>> int8_supported("aarch64", set())
    True
    """
    if machine.lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def session(onnx_path: Path, threads: int = 1):
    """An ONNX Runtime CPU session with crackmap's settings (see ``OnnxRuntimeBackend``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def chips_per_s(paths: dict[str, Path], batch: int = 8, rounds: int = 3) -> dict[str, float]:
    """Single-thread chips/s of each graph on the same random chips, runs interleaved, medians."""
    chips = np.random.default_rng(0).integers(0, 256, (batch, 3, 400, 400), dtype=np.uint8)
    sessions = {name: session(path) for name, path in paths.items()}
    for s in sessions.values():
        s.run(None, {"chips": chips})  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            started = time.perf_counter()
            s.run(None, {"chips": chips})
            seconds[name].append(time.perf_counter() - started)
    return {name: round(batch / statistics.median(t), 1) for name, t in seconds.items()}


def cpu_graph(
    entry: ModelEntry, requested: str = "auto", choices: Path | None = None
) -> tuple[Path, str, str]:
    """(graph, "fp32" or "int8", why) for ONNX Runtime on this CPU.

    ``requested`` "fp32" or "int8" takes that graph (int8 only if the version
    has one); "auto" takes the INT8 graph only if it passed the accuracy gate,
    this CPU runs INT8 exactly, and it measured faster here (once per machine
    and model; the result is kept in ``choices``).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown CPU precision {requested!r}; choose one of {list(PRECISIONS)}")
    record = entry.card.get("int8")
    if requested == "fp32" or (requested == "auto" and not record):
        return entry.file("onnx"), "fp32", "asked for" if requested == "fp32" else "no INT8 graph"
    if not record:
        raise registry.ModelError(
            f"{entry.spec} has no INT8 graph; add one with `crackmap models quantize --model {entry.spec}`"
        )
    if requested == "int8":
        return entry.file("onnx_int8"), "int8", "asked for"
    if not record["accepted"]:
        return (
            entry.file("onnx"),
            "fp32",
            (f"the INT8 graph lost {record['f1_drop']:.4f} mean val F1 (more than {record['max_f1_drop']})"),
        )
    if not int8_supported(platform.machine(), cpu_flags()):
        return entry.file("onnx"), "fp32", "this x86 CPU has no VNNI: INT8 kernels may saturate"
    import onnxruntime as ort

    paths = {"fp32": entry.file("onnx"), "int8": entry.file("onnx_int8")}
    choices = choices or CHOICES
    key = "|".join(
        [
            entry.spec,
            entry.card["files"]["onnx"]["sha256"][:16],
            entry.card["files"]["onnx_int8"]["sha256"][:16],
            cpu_name(),
            ort.__version__,
        ]
    )
    known = _read_choices(choices)
    if key not in known:
        speed = chips_per_s(paths)
        known[key] = {"chips_per_s": speed, "measured": datetime.now(UTC).isoformat(timespec="seconds")}
        _write_choices(choices, known)
        log.info("measured %s on %s: %s chips/s (one thread)", entry.spec, cpu_name(), speed)
    speed = known[key]["chips_per_s"]
    choice = "int8" if speed["int8"] > speed["fp32"] else "fp32"
    return (
        paths[choice],
        choice,
        (f"measured on this CPU: INT8 {speed['int8']} vs float {speed['fp32']} chips/s per thread"),
    )


def _read_choices(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_choices(path: Path, known: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(known, f, indent=2)
        os.replace(f.name, path)
    except OSError as exc:  # a read-only home: measure again next time
        log.warning("cannot keep the CPU graph choice in %s (%s)", path, exc)


# --- the accuracy gate ---------------------------------------------------------------------------


def val_scores(
    onnx_path: Path, data_root: Path, datasets: list[str], threshold: float, split: str = "val"
) -> tuple[dict[str, dict], dict[str, list[np.ndarray]]]:
    """Scores of a graph on each dataset's split (as ``crackmap eval``), and its masks per dataset."""
    from PIL import Image

    from models.data import find_pairs
    from models.metrics import PixelCounts
    from pipeline.backends import OnnxRuntimeBackend
    from pipeline.images import read_rgb

    backend = OnnxRuntimeBackend(Path(onnx_path), batch_size=8)
    scores: dict[str, dict] = {}
    masks: dict[str, list[np.ndarray]] = {}
    for name in datasets:
        counts, masks[name] = PixelCounts(), []
        for image_path, mask_path in find_pairs(Path(data_root) / name / split):
            truth = np.asarray(Image.open(mask_path).convert("L")) > 127
            mask = image_probability(read_rgb(image_path), backend) >= threshold * 255.0
            counts.add(mask, truth)
            masks[name].append(mask)
        scores[name] = counts.scores()
    return scores, masks


def mean_f1(scores: dict[str, dict]) -> float:
    """The mean of the datasets' crack F1 (each dataset weighs the same).

    >>> mean_f1({"a": {"f1": 0.5}, "b": {"f1": 0.7}})
    0.6
    """
    return round(float(np.mean([s["f1"] for s in scores.values()])), 10)


def inference_graph(entry: ModelEntry, folder: Path) -> Path:
    """The version's float inference graph to quantize: its ONNX file if it is one (uint8 output),
    else (graphs exported before crackmap 1.1) a fresh export of its weights, verified against torch."""
    import onnx

    path = entry.file("onnx")
    if (
        onnx.load(str(path), load_external_data=False).graph.output[0].type.tensor_type.elem_type
        == onnx.TensorProto.UINT8
    ):
        return path
    from models.onnx_export import export_onnx, load_net, verify_onnx
    from models.package import MAX_ONNX_DIFF

    net = load_net(entry.variant, entry.file("weights"))
    fresh = export_onnx(net, folder / "inference.onnx", entry.size_px)
    if (diff := verify_onnx(net, fresh, size_px=entry.size_px)) > MAX_ONNX_DIFF:
        raise registry.ModelError(f"the inference graph of {entry.spec} differs from torch by {diff:.2e}")
    return fresh


def add_int8(entry: ModelEntry, data_root: Path, per_dataset: int = 16, split: str = "val") -> ModelEntry:
    """Quantize ``entry``'s graph to INT8, score both graphs on val, and record it in the card.

    Raises:
        ModelError: the version has an INT8 graph already.
        FileNotFoundError: a training dataset's split is not under ``data_root``.
    """
    from models.quantize import CALIBRATION, INT8_FILE, calibration_chips, quantize_onnx

    if "onnx_int8" in entry.card["files"]:
        raise registry.ModelError(f"{entry.spec} already has an INT8 graph; versions are immutable")
    datasets = list((entry.card.get("data") or {}).get("datasets") or entry.card.get("metrics") or {})
    if not datasets:
        raise registry.ModelError(f"the card of {entry.spec} names no training datasets to calibrate on")
    with tempfile.TemporaryDirectory() as tmp:
        source = inference_graph(entry, Path(tmp))
        chips = calibration_chips(data_root, datasets, split, per_dataset, entry.size_px)
        int8 = quantize_onnx(source, Path(tmp) / INT8_FILE, chips)
        fp32_scores, fp32_masks = val_scores(entry.file("onnx"), data_root, datasets, entry.threshold, split)
        int8_scores, int8_masks = val_scores(int8, data_root, datasets, entry.threshold, split)
        same = sum(int((a == b).sum()) for d in datasets for a, b in zip(fp32_masks[d], int8_masks[d]))
        total = sum(a.size for d in datasets for a in fp32_masks[d])
        drop = mean_f1(fp32_scores) - mean_f1(int8_scores)
        record = {
            "path": INT8_FILE,
            "calibration": {
                **CALIBRATION,
                "chips": len(chips),
                "per_dataset": per_dataset,
                "split": split,
                "datasets": datasets,
            },
            "quantized_from": "model.onnx"
            if source == entry.file("onnx")
            else "the inference graph exported from weights.pt (uint8 output)",
            "metrics": int8_scores,
            "fp32_metrics": fp32_scores,
            "mean_f1": mean_f1(int8_scores),
            "fp32_mean_f1": mean_f1(fp32_scores),
            "f1_drop": round(drop, 6),
            "max_f1_drop": MAX_F1_DROP,
            "accepted": drop <= MAX_F1_DROP,
            "mask_agreement": same / total,
            "speed": {
                "machine": f"{cpu_name()}, {os.cpu_count()} cores",
                **{
                    f"{k}_chips_per_s": v
                    for k, v in chips_per_s({"fp32": entry.file("onnx"), "int8": int8}).items()
                },
            },
        }
        return registry.add_derived(entry, "onnx_int8", int8, "int8", record)
