"""PyTorch: the reference, and the GPU fallback where TensorRT is not installed."""

from __future__ import annotations

import logging

import numpy as np

from models.registry import ModelEntry
from pipeline.backends.base import pad_batch, split_batches

log = logging.getLogger(__name__)


class TorchBackend:
    """The model's weights in PyTorch, on CUDA when present, else on the CPU.

    On CUDA it runs in FP16 autocast with channels-last activations, and
    replays one CUDA graph per batch shape (captured on first use): a batch
    shorter than ``batch_size`` is padded to it, so one graph serves a whole
    scene.  On the CPU it runs the plain FP32 module, batch as given.
    """

    name = "torch"

    def __init__(
        self,
        entry: ModelEntry,
        batch_size: int | None = None,
        device: str | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        import torch

        from models.onnx_export import ChipsToProbability, load_net

        self._torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._module = ChipsToProbability(load_net(entry.variant, entry.file("weights")))
        self._module.to(self.device).eval()
        self.batch_size = batch_size or (32 if self.device.type == "cuda" else 8)
        self.precision = "cuda fp16" if self.device.type == "cuda" else "fp32"  # autocast on CUDA
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, ...], tuple] = {}  # input shape -> (graph, input, output, pinned)
        if self.device.type == "cuda":
            # nn.Module.to documents memory_format=; torch's overloads leave it out
            self._module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

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
            for rows in split_batches(len(chips), self.batch_size):
                start, n = rows.start, rows.stop - rows.start
                part = chips[rows]
                if not self.cuda_graphs:
                    x = torch.from_numpy(part).to(self.device, non_blocking=True)
                    out[start : start + n] = (
                        self._forward(x.contiguous(memory_format=torch.channels_last)).cpu().numpy()
                    )
                    continue
                graph, static_in, static_out, pinned = self._graph((self.batch_size, *part.shape[1:]))
                # a short last batch is padded: the graph has a fixed shape
                pinned.copy_(torch.from_numpy(pad_batch(part, self.batch_size)))
                static_in.copy_(pinned, non_blocking=True)
                graph.replay()
                out[start : start + n] = static_out[:n].cpu().numpy()
        return out

    def _graph(self, shape: tuple[int, ...]) -> tuple:
        """The CUDA graph for input ``shape``: captured once, after warm-up on a side stream."""
        if shape in self._graphs:
            return self._graphs[shape]
        torch = self._torch
        static_in = torch.zeros(shape, dtype=torch.uint8, device=self.device).contiguous(
            memory_format=torch.channels_last
        )
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
