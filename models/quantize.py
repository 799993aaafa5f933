"""INT8 static quantization of the inference graph (ONNX Runtime, QDQ format).

The graph's convolutions, additions, pooling and fusion upsamples run in
INT8 (weights per output channel, activations per tensor, ranges calibrated
on validation chips); the last steps stay in float: the upsample of the
one-channel margin, the sigmoid and the rounding to uint8, where a coarse
step would move pixels across the threshold.  Inputs and outputs are those
of the float graph (uint8 chips in, uint8 probability out), so every CPU
backend can run either.

Whether an INT8 graph becomes a CPU default is decided elsewhere, by its
validation F1 against the float graph (``pipeline.precision``) and by
measured speed on the machine that runs it.  Calibration reads dataset
images (``models.data``) and is done when a model is packaged, never in tests
of the pipeline.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from models.data import find_pairs

log = logging.getLogger(__name__)
INT8_FILE = "model-int8.onnx"
# ONNX Runtime's quantizer supports these in QDQ form on CPUs; the rest stay float.
QUANTIZED_OPS = ("Conv", "ConvTranspose", "Add", "Mul", "Relu", "AveragePool", "Resize", "Concat")
CALIBRATION = {
    "method": "MinMax",
    "format": "QDQ",
    "weights": "int8, per output channel",
    "activations": "uint8, per tensor",
}


def chip_offsets(length_px: int, size_px: int, stride_px: int) -> list[int]:
    """Chip offsets along one axis: every ``stride_px``, the last one flush with the end.

    >>> chip_offsets(900, 400, 336)
    [0, 336, 500]
    >>> chip_offsets(300, 400, 336)
    [0]
    """
    if length_px <= size_px:
        return [0]
    offsets = list(range(0, length_px - size_px, stride_px))
    return [*offsets, length_px - size_px]


def image_chips(rgb: np.ndarray, size_px: int = 400, overlap_px: int = 64) -> np.ndarray:
    """All chips (N, 3, size_px, size_px) uint8 of an (H, W, 3) image, zero-padded where it is smaller."""
    height, width = rgb.shape[:2]
    padded = np.zeros((3, max(height, size_px), max(width, size_px)), np.uint8)
    padded[:, :height, :width] = rgb.transpose(2, 0, 1)
    stride = size_px - overlap_px
    return np.stack(
        [
            padded[:, r : r + size_px, c : c + size_px]
            for r in chip_offsets(height, size_px, stride)
            for c in chip_offsets(width, size_px, stride)
        ]
    )


def calibration_chips(
    data_root: Path, datasets: list[str], split: str = "val", per_dataset: int = 16, size_px: int = 400
) -> np.ndarray:
    """Chips for calibration: ``per_dataset`` from each dataset's split, spread evenly over its chips.

    Raises:
        FileNotFoundError: a dataset has no ``<data_root>/<dataset>/<split>`` folder.
    """
    from PIL import Image

    picked: list[np.ndarray] = []
    for name in datasets:
        folder = Path(data_root) / name / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist: calibration reads the {split} images "
                f"of every dataset the model was trained on; pass --data-root"
            )
        chips: list[np.ndarray] = []
        for image_path, _ in find_pairs(folder):
            with Image.open(image_path) as image:
                chips.extend(image_chips(np.asarray(image.convert("RGB")), size_px))
        take = np.linspace(0, len(chips) - 1, min(per_dataset, len(chips))).round().astype(int)
        picked.extend(chips[i] for i in take)
    return np.stack(picked)


def float_tail(model) -> list[str]:
    """Names of the nodes that stay float: the sigmoid, what follows it, and the upsample feeding it."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producer = {out: node for node in model.graph.node for out in node.output}
    tail = []
    for node in model.graph.node:
        if node.op_type != "Sigmoid":
            continue
        before = producer.get(node.input[0])
        if before is not None and before.op_type == "Resize":
            tail.append(before.name)
        todo = [node]
        while todo:
            current = todo.pop()
            tail.append(current.name)
            for out in current.output:
                todo.extend(consumers.get(out, []))
    return tail


def quantize_onnx(fp32_onnx: Path, out: Path, chips: np.ndarray, batch: int = 8) -> Path:
    """Write the INT8 (QDQ) graph of ``fp32_onnx`` to ``out``, calibrated on ``chips``."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Chips(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(np.array_split(chips, max(1, len(chips) // batch)))

        def get_next(self) -> dict | None:
            part = next(self._batches, None)
            return None if part is None else {"chips": np.ascontiguousarray(part)}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        exclude = float_tail(onnx.load(str(prepared)))
        quantize_static(
            str(prepared),
            str(out),
            Chips(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    log.info("INT8 graph %s calibrated on %d chips; float tail: %s", out, len(chips), exclude)
    return Path(out)
