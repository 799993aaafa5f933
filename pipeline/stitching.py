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
    return np.rint(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)


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

    def add(self, window: Window, probability: np.ndarray, valid: np.ndarray) -> None:
        """Add one chip's crack probability (size_px, size_px) float and its valid mask."""
        row, col = int(window.row_off), int(window.col_off)
        if row < self._top:
            raise ValueError(f"chip at row {row} arrived after rows up to {self._top} were emitted; "
                             "chips must come in row-major order")
        self._emit_until(row)
        weights = chip_weights(window, self.width, self.height, self.border_px) * valid
        r = row - self._top
        self._sum[r:r + self.size_px, col:col + self.size_px] += probability * weights
        self._weight[r:r + self.size_px, col:col + self.size_px] += weights

    def finish(self) -> None:
        """Emit every row not yet emitted."""
        self._emit_until(self.height)

    def _emit_until(self, row: int) -> None:
        while self._top < min(row, self.height):
            n = min(row, self.height, self._top + self.size_px) - self._top
            weight = self._weight[:n, :self.width]
            valid = weight > 0
            probability = np.divide(self._sum[:n, :self.width], weight, where=valid,
                                    out=np.zeros_like(weight))
            self._sink(self._top, to_uint8(probability), valid)
            self._sum[:-n] = self._sum[n:]
            self._weight[:-n] = self._weight[n:]
            self._sum[-n:] = 0.0
            self._weight[-n:] = 0.0
            self._top += n
