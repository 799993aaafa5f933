"""Export HrSegNet to ONNX (and verify it against PyTorch).

The exported graph is the whole inference contract, so every backend shares
it: input ``chips`` uint8 (N, 3, H, W) RGB 0-255, output ``probability``
uint8 (N, H, W), the crack-class softmax times 255, rounded (within 1/510 of
the float probability; a GPU copies a quarter of the bytes back that float32
would need).  Scaling to [0, 1], the mean/std normalization, the softmax and
the rounding are inside the graph.  The batch dimension is dynamic.

The graph is the inference form of the network (``models.hrsegnet``): the 1x1
convolutions of the fusion paths run before the upsample (~18 % fewer
multiply-adds), and the two-class softmax is a sigmoid of one upsampled
margin channel; both exact in real arithmetic, checked against the literal
order in tests.  Graphs exported before 1.1 (hrsegnet-b16 1.0.0) return
float32; the backends accept both (``pipeline.backends.as_uint8``).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from models.hrsegnet import CrackProbability, HrSegNet, create, pool_kwargs

OPSET = 18
log = logging.getLogger(__name__)


def probability_to_uint8(probability: torch.Tensor) -> torch.Tensor:
    """Probabilities in [0, 1] as uint8 0..255, rounded half to even (as ``np.rint``)."""
    return torch.round(probability.float() * 255.0).to(torch.uint8)


class ChipsToProbability(torch.nn.Module):
    """uint8 chips in, uint8 crack probability (0-255) out: the graph that is exported.

    ``half=True`` computes in FP16 (the network's weights are converted): the
    graph for strongly typed TensorRT engines.  Input and output types stay
    the same, so every backend keeps the same contract.  ``output="float"``
    returns the float32 probability instead (for tests and comparisons);
    ``literal=True`` computes the published order (see ``CrackProbability``).
    """

    def __init__(
        self, net: HrSegNet, half: bool = False, output: str = "uint8", literal: bool = False
    ) -> None:
        super().__init__()
        if output not in ("uint8", "float"):
            raise ValueError(f"output must be 'uint8' or 'float', not {output!r}")
        self.fp16, self.output = half, output  # not self.half: that would hide nn.Module.half()
        self.probability = CrackProbability(net, literal=literal)
        if half:
            self.probability.half()

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        probability = self.probability(chips.half() if self.fp16 else chips.float())
        if self.output == "uint8":
            return probability_to_uint8(probability)
        return probability.float()


def load_net(variant: str, weights: Path) -> HrSegNet:
    """An eval-mode network with weights from a ``weights.pt`` state dict."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net = create(variant, **pool_kwargs(state.get("avg_pool") if "state_dict" in state else None))
    net.load_state_dict(state.get("state_dict", state))
    return net.eval()


def export_onnx(
    net: HrSegNet,
    out: Path,
    size_px: int = 400,
    half: bool = False,
    output: str = "uint8",
    literal: bool = False,
) -> Path:
    """Write the ONNX graph of ``net`` for (N, 3, size_px, size_px) uint8 chips.

    ``half=True`` writes the FP16 graph (see ``ChipsToProbability``) for
    TensorRT >= 11; it converts a copy of ``net``, never ``net`` itself.
    ``output`` and ``literal`` as in ``ChipsToProbability`` (the defaults are
    the inference graph every backend runs).
    """
    if half:
        net = copy.deepcopy(net)
    module = ChipsToProbability(net, half=half, output=output, literal=literal).eval()
    example = torch.zeros((2, 3, size_px, size_px), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(out),
            input_names=["chips"],
            output_names=["probability"],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes={"chips": {0: batch}},
            verbose=False,
            external_data=False,
        )
    return Path(out)


def verify_onnx(
    net: HrSegNet, onnx_path: Path, batch_sizes=(1, 5), size_px: int = 400, seed: int = 0
) -> float:
    """Max abs difference of probabilities (0-1) between ONNX Runtime and PyTorch on random chips.

    PyTorch computes the literal published order in float32; a uint8 graph's
    output is divided by 255, so its rounding (at most 1/510) is part of the figure.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    module = ChipsToProbability(net, output="float", literal=True).eval()
    rng = np.random.default_rng(seed)
    worst = 0.0
    for n in batch_sizes:
        chips = rng.integers(0, 256, (n, 3, size_px, size_px), dtype=np.uint8)
        got = session.run(None, {"chips": chips})[0]
        if got.dtype == np.uint8:
            got = got / np.float32(255.0)
        with torch.no_grad():
            expected = module(torch.from_numpy(chips)).numpy()
        worst = max(worst, float(np.abs(got - expected).max()))
    log.info("ONNX %s matches torch: max abs difference %.2e", onnx_path, worst)
    return worst
