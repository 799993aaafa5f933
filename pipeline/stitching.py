"""Seam-free stitching of chip probabilities, streamed row strip by row strip.

Chips arrive in row-major order on the grid ``tiling.chip_windows`` lays out.
Each chip's probabilities are weighted by ``tiling.blend_weights`` (border
band dropped where a neighbour covers it, weights that never reach zero
elsewhere, normalized so that the chips over any pixel weigh 1 together) and
summed: a weighted average of probabilities, never of labels.  Rows above the
current chip row can no longer change; they are handed on as soon as the next
chip row starts, so memory holds one chip row of the scene (a float32 and a
bool array of ``size_px`` x width), whatever the scene's length.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from rasterio.windows import Window

from pipeline.tiling import blend_weights

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
        overlap_px: Overlap of the chip grid (``tiling.chip_windows``); chips off it are refused.

    A pixel is valid if any chip over it says so.  Nodata is a property of the
    scene's pixel, not of the chip, and a chip with no valid pixel is the only
    one ever left out, so every chip over a valid pixel is there and the
    normalized weights still sum to 1.
    """

    def __init__(
        self,
        width: int,
        height: int,
        sink: RowSink,
        size_px: int = 400,
        border_px: int = 16,
        overlap_px: int = 64,
    ) -> None:
        self.width, self.height = width, height
        self.size_px, self.border_px = size_px, border_px
        self._sink = sink
        along_rows = blend_weights(height, size_px, overlap_px, border_px)
        along_cols = blend_weights(width, size_px, overlap_px, border_px)
        # chips share a few distinct 1-D profiles (first, inner, last); their products are cached
        self._row_profile: dict[int, tuple[int, np.ndarray]] = {}
        self._col_profile: dict[int, tuple[int, np.ndarray]] = {}
        profiles: dict[bytes, tuple[int, np.ndarray]] = {}
        for offsets, weights in ((self._row_profile, along_rows), (self._col_profile, along_cols)):
            for offset, w in weights.items():
                offsets[offset] = profiles.setdefault(w.tobytes(), (len(profiles), w))
        self._weights: dict[tuple[int, int, bool], np.ndarray] = {}
        buf_width = max(width, size_px)
        self._sum = np.zeros((size_px, buf_width), dtype=np.float32)
        self._valid = np.zeros((size_px, buf_width), dtype=bool)
        self._top = 0  # scene row of buffer row 0; rows above it have been emitted
        self._product = np.empty((size_px, size_px), dtype=np.float32)

    def add(self, window: Window, probability: np.ndarray, valid: np.ndarray) -> None:
        """Add one chip's crack probability (size_px, size_px) and its valid mask.

        ``probability`` is uint8 0-255 (what backends return) or float 0-1.
        """
        row, col = int(window.row_off), int(window.col_off)
        if row < self._top:
            raise ValueError(
                f"chip at row {row} arrived after rows up to {self._top} were emitted; "
                "chips must come in row-major order"
            )
        weights = self._chip_weights(row, col, probability.dtype == np.uint8)
        self._emit_until(row)
        size, r = self.size_px, row - self._top
        np.multiply(probability, weights, out=self._product)
        self._sum[r : r + size, col : col + size] += self._product
        if valid.all():
            self._valid[r : r + size, col : col + size] = True
        else:
            self._valid[r : r + size, col : col + size] |= valid

    def _chip_weights(self, row: int, col: int, uint8: bool = False) -> np.ndarray:
        if row not in self._row_profile or col not in self._col_profile:
            raise ValueError(
                f"chip at row {row}, column {col} is not on the chip grid "
                f"({self.size_px} px chips over {self.width} x {self.height} px)"
            )
        (row_id, along_y), (col_id, along_x) = self._row_profile[row], self._col_profile[col]
        if (weights := self._weights.get((row_id, col_id, uint8))) is None:
            weights = np.outer(along_y, along_x)
            if uint8:  # probabilities 0-255: the weights take the division by 255
                weights *= np.float32(1.0 / 255.0)
            self._weights[row_id, col_id, uint8] = weights
        return weights

    def finish(self) -> None:
        """Emit every row not yet emitted."""
        self._emit_until(self.height)

    def _emit_until(self, row: int) -> None:
        while self._top < min(row, self.height):
            n = min(row, self.height, self._top + self.size_px) - self._top
            valid = self._valid[:n, : self.width].copy()
            probability = to_uint8(self._sum[:n, : self.width])
            if not valid.all():
                probability *= valid  # what the network said about nodata is not kept
            self._sink(self._top, probability, valid)
            self._sum[:-n] = self._sum[n:]
            self._valid[:-n] = self._valid[n:]
            self._sum[-n:] = 0.0
            self._valid[-n:] = False
            self._top += n
