"""Seam-free stitching of chip probabilities, streamed row strip by row strip.

Chips arrive in row-major order.  Each chip's probabilities are weighted by
``tiling.chip_weights`` (border band dropped where a neighbour covers it,
weights that never reach zero elsewhere) and averaged: probabilities, never
labels.  Rows above the current chip row can no longer change; they are handed
on as soon as the next chip row starts, so memory holds one chip row of the
scene (two float32 arrays of ``size_px`` x width), whatever the scene's length.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from rasterio.windows import Window

from pipeline.tiling import chip_weights

# (row_off, probability uint8 (rows, width), valid bool (rows, width)) -> None
RowSink = Callable[[int, np.ndarray, np.ndarray], None]


def to_uint8(probability: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as uint8 0..255 (rounded).

    >>> to_uint8(np.array([0.0, 0.5, 1.0])).tolist()
    [0, 128, 255]
    """
    scaled = np.clip(probability, 0.0, 1.0) * np.float32(255.0)
    return np.rint(scaled, out=scaled).astype(np.uint8)


class StripStitcher:
    """Blend chip probabilities of one scene and emit finished rows to ``sink``.

    Args:
        width: Scene width in pixels.
        height: Scene height in pixels.
        sink: Called with each run of finished rows, top to bottom, exactly once per row.
        size_px: Chip size.
        border_px: Width of the border band dropped where chips overlap.
    """

    def __init__(self, width: int, height: int, sink: RowSink, size_px: int = 400,
                 border_px: int = 16) -> None:
        self.width, self.height = width, height
        self.size_px, self.border_px = size_px, border_px
        self._sink = sink
        buf_width = max(width, size_px)
        self._sum = np.zeros((size_px, buf_width), dtype=np.float32)
        self._weight = np.zeros((size_px, buf_width), dtype=np.float32)
        self._top = 0  # scene row of buffer row 0; rows above it have been emitted
        self._weights: dict[tuple[bool, ...], np.ndarray] = {}  # by the sides a chip shares
        self._product = np.empty((size_px, size_px), dtype=np.float32)

    def add(self, window: Window, probability: np.ndarray, valid: np.ndarray) -> None:
        """Add one chip's crack probability (size_px, size_px) float and its valid mask."""
        row, col = int(window.row_off), int(window.col_off)
        if row < self._top:
            raise ValueError(f"chip at row {row} arrived after rows up to {self._top} were emitted; "
                             "chips must come in row-major order")
        self._emit_until(row)
        size = self.size_px
        sides = (row > 0, row + size < self.height, col > 0, col + size < self.width)
        if (weights := self._weights.get(sides)) is None:
            weights = self._weights[sides] = chip_weights(window, self.width, self.height,
                                                          self.border_px)
        if not valid.all():
            weights = weights * valid
        r = row - self._top
        np.multiply(probability, weights, out=self._product)
        self._sum[r:r + size, col:col + size] += self._product
        self._weight[r:r + size, col:col + size] += weights

    def finish(self) -> None:
        """Emit every row not yet emitted."""
        self._emit_until(self.height)

    def _emit_until(self, row: int) -> None:
        while self._top < min(row, self.height):
            n = min(row, self.height, self._top + self.size_px) - self._top
            weight = self._weight[:n, :self.width]
            valid = weight > 0
            # where the weight is zero so is the sum: dividing by a tiny number gives 0 there
            probability = np.maximum(weight, np.float32(1e-30))
            np.divide(self._sum[:n, :self.width], probability, out=probability)
            self._sink(self._top, to_uint8(probability), valid)
            self._sum[:-n] = self._sum[n:]
            self._weight[:-n] = self._weight[n:]
            self._sum[-n:] = 0.0
            self._weight[-n:] = 0.0
            self._top += n
