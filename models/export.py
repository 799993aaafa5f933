"""Export HrSegNet to ONNX (and verify it against PyTorch).

The exported graph is the whole inference contract, so every backend shares
it: input ``chips`` uint8 (N, 3, H, W) RGB 0-255, output ``probability``
float32 (N, H, W), the crack-class softmax.  Scaling to [0, 1], the mean/std
normalization and the softmax are inside the graph.  The batch dimension is
dynamic.  The 1x1 convolutions of the fusion paths run before the upsample
(exactly equal, ~18 % fewer multiply-adds; see ``models.hrsegnet``).
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


class ChipsToProbability(torch.nn.Module):
    """uint8 chips in, float32 crack probability out: the graph that is exported.

    ``half=True`` computes in FP16 (the network's weights are converted): the
    graph for strongly typed TensorRT engines.  Input and output types stay
    the same, so every backend keeps the same contract.
    """

    def __init__(self, net: HrSegNet, half: bool = False) -> None:
        super().__init__()
        self.half = half
        self.probability = CrackProbability(net.half() if half else net)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        if self.half:
            return self.probability(chips.half()).float()
        return self.probability(chips.float())


def load_net(variant: str, weights: Path) -> HrSegNet:
    """An eval-mode network with weights from a ``weights.pt`` state dict."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net = create(variant, **pool_kwargs(state.get("avg_pool") if "state_dict" in state else None))
    net.load_state_dict(state.get("state_dict", state))
    return net.eval()


def export_onnx(net: HrSegNet, out: Path, size_px: int = 400, half: bool = False) -> Path:
    """Write the ONNX graph of ``net`` for (N, 3, size_px, size_px) uint8 chips.

    ``half=True`` writes the FP16 graph (see ``ChipsToProbability``) for
    TensorRT >= 11; it converts a copy of ``net``, never ``net`` itself.
    """
    if half:
        net = copy.deepcopy(net)
    module = ChipsToProbability(net, half=half).eval()
    example = torch.zeros((2, 3, size_px, size_px), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(out), input_names=["chips"],
                          output_names=["probability"], opset_version=OPSET, dynamo=True,
                          dynamic_shapes={"chips": {0: batch}}, verbose=False,
                          external_data=False)
    return Path(out)


def verify_onnx(net: HrSegNet, onnx_path: Path, batch_sizes=(1, 5), size_px: int = 400,
                seed: int = 0) -> float:
    """Max abs difference of probabilities between ONNX Runtime and PyTorch on random chips."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    module = ChipsToProbability(net).eval()
    rng = np.random.default_rng(seed)
    worst = 0.0
    for n in batch_sizes:
        chips = rng.integers(0, 256, (n, 3, size_px, size_px), dtype=np.uint8)
        got = session.run(None, {"chips": chips})[0]
        with torch.no_grad():
            expected = module(torch.from_numpy(chips)).numpy()
        worst = max(worst, float(np.abs(got - expected).max()))
    log.info("ONNX %s matches torch: max abs difference %.2e", onnx_path, worst)
    return worst
