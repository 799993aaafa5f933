"""INT8 static quantization of the inference graph (ONNX Runtime, QDQ format).

The graph's convolutions, additions, pooling and fusion upsamples run in
INT8 (weights per output channel, activations per tensor, ranges calibrated
on validation chips); the last steps stay in float: the upsample of the
one-channel margin, the sigmoid and the rounding to uint8, where a coarse
step would move pixels across the threshold.  The first convolution reads the
uint8 chips as they are (``uint8_input``): the inference graph folds the
normalization into it, so its input needs no conversion.  Inputs and outputs are those
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
    model = onnx.load(str(out))
    if uint8_input(model):
        onnx.save(model, str(out))
    log.info("INT8 graph %s calibrated on %d chips; float tail: %s", out, len(chips), exclude)
    return Path(out)


def uint8_input(model) -> bool:
    """Let the first convolution read the uint8 chips without converting them; False if not applicable.

    The inference graph (``models.hrsegnet.CrackProbability``) pads the chips with the mean
    grey and folds the normalization into the first convolution, so after quantization
    its input reads ``chips -> Cast(float) -> Pad(127.5) -> QuantizeLinear``.  With scale 1
    and zero point 0 that quantization is the identity on the integers 0-255 and maps
    the pad value to its nearest integer (half to even), so the three steps equal one
    uint8 ``Pad`` with that integer: exact, and ~7 % of the graph's time saved.  Graphs of
    another form (1.0.0's) are left as they are.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only(name: str, op_type: str):
        nodes = consumers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op_type else None

    cast = next((n for n in consumers.get(graph.input[0].name, []) if n.op_type == "Cast"), None)
    pad = only(cast.output[0], "Pad") if cast is not None else None
    quantize = only(pad.output[0], "QuantizeLinear") if pad is not None else None
    if cast is None or pad is None or quantize is None:
        return False
    if len(pad.input) < 3 or pad.input[2] not in initializers:
        return False
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    if mode != b"constant" or len(quantize.input) < 3:
        return False
    scale, zero_point = (initializers[name] for name in quantize.input[1:3])
    if numpy_helper.to_array(zero_point).dtype != np.uint8:
        return False
    # the dequantization after it shares these: chips are read at their own values
    scale.CopyFrom(numpy_helper.from_array(np.array(1.0, np.float32), scale.name))
    zero_point.CopyFrom(numpy_helper.from_array(np.array(0, np.uint8), zero_point.name))
    value = float(numpy_helper.to_array(initializers[pad.input[2]]))
    graph.initializer.append(numpy_helper.from_array(np.array(np.rint(value), np.uint8), "chips_pad_value"))
    uint8_pad = helper.make_node(
        "Pad", [graph.input[0].name, pad.input[1], "chips_pad_value"], [quantize.output[0]], name="chips_pad"
    )
    nodes = [
        uint8_pad if node is cast else node for node in graph.node if node is not pad and node is not quantize
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(pad.input[2] in node.input for node in nodes):  # the float pad value, now unused
        graph.initializer.remove(initializers[pad.input[2]])
    return True
