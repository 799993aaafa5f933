"""Chip geometry: where the 400 x 400 chips of a scene lie.

Pure functions of sizes; no I/O.  Chips are ordered row-major, which the
streaming stitcher relies on.
"""

from __future__ import annotations

import numpy as np
from rasterio.windows import Window


def check_grid(size_px: int, overlap_px: int, border_px: int = 0) -> None:
    """Raise ValueError unless chips of ``size_px`` overlapping by ``overlap_px`` can drop a
    ``border_px`` band on each side and still cover every pixel.

    >>> check_grid(400, 20, 16)
    Traceback (most recent call last):
    ValueError: a border of 16 px needs chips overlapping by at least 32 px, not 20
    """
    if size_px <= 0 or not 0 <= overlap_px < size_px:
        raise ValueError(f"need size_px > 0 and 0 <= overlap_px < size_px, got {size_px}, {overlap_px}")
    if not 0 <= border_px <= overlap_px // 2:
        raise ValueError(
            f"a border of {border_px} px needs chips overlapping by at least "
            f"{2 * border_px} px, not {overlap_px}"
        )


def chip_offsets(length_px: int, size_px: int = 400, overlap_px: int = 64) -> list[int]:
    """Start offsets of chips along one axis, covering ``[0, length_px)``.

    Chips step by ``size_px - overlap_px``; the last chip is shifted inward so
    that it ends at the edge, never dropped and never sticking out.  An axis
    shorter than a chip gets one chip at 0 (the reader pads it).

    >>> chip_offsets(900, 400, 64)
    [0, 336, 500]
    >>> chip_offsets(250)
    [0]
    """
    check_grid(size_px, overlap_px)
    if length_px <= size_px:
        return [0]
    step = size_px - overlap_px
    starts = list(range(0, length_px - size_px, step))
    starts.append(length_px - size_px)
    return starts


def chip_windows(width: int, height: int, size_px: int = 400, overlap_px: int = 64) -> list[Window]:
    """All chip windows of a ``width`` x ``height`` scene, row-major.

    Every window is ``size_px`` square; in a scene smaller than a chip it
    reaches past the edge and the reader pads it.

    >>> [(w.col_off, w.row_off) for w in chip_windows(900, 400)]
    [(0, 0), (336, 0), (500, 0)]
    """
    return [
        Window(col, row, size_px, size_px)
        for row in chip_offsets(height, size_px, overlap_px)
        for col in chip_offsets(width, size_px, overlap_px)
    ]


def blend_profile(size_px: int, border_px: int, drop_start: bool, drop_end: bool) -> np.ndarray:
    """1-D blending weights of a chip along one axis.

    A chip's outermost ``border_px`` pixels see the least context, so they are
    dropped (weight 0) on every side where another chip covers them; at the
    scene edge they are kept.  Inside, weights rise linearly from a small
    positive value to 1 over the next ``border_px`` pixels, so overlapping
    chips cross-fade and no kept pixel has weight zero.

    >>> p = blend_profile(8, 2, True, False)
    >>> [round(float(v), 2) for v in p]
    [0.0, 0.0, 0.33, 0.67, 1.0, 1.0, 1.0, 1.0]
    """
    ramp = np.arange(1, border_px + 1, dtype=np.float32) / (border_px + 1)
    weights = np.ones(size_px, dtype=np.float32)
    for dropped, view in ((drop_start, weights), (drop_end, weights[::-1])):
        if dropped:
            view[:border_px] = 0.0
            view[border_px : 2 * border_px] = np.minimum(view[border_px : 2 * border_px], ramp)
    return weights


def blend_weights(
    length_px: int, size_px: int = 400, overlap_px: int = 64, border_px: int = 16
) -> dict[int, np.ndarray]:
    """Each chip offset's 1-D blending weights along one axis, normalized to sum to 1.

    ``blend_profile`` weights, divided by the sum of the weights of all chips
    at each position.  A chip's 2-D weights are the outer product of its row
    and column weights; the chips cover a product grid, so these sum to 1 at
    every pixel too, and blending is a weighted sum with no division.

    >>> w = blend_weights(900, 400, 64, 16)
    >>> sorted(w), [round(float(w[0][i] + w[336][i - 336]), 6) for i in (340, 360, 390)]
    ([0, 336, 500], [1.0, 1.0, 1.0])
    """
    check_grid(size_px, overlap_px, border_px)
    offsets = chip_offsets(length_px, size_px, overlap_px)
    profiles = {
        offset: blend_profile(size_px, border_px, offset > 0, offset + size_px < length_px)
        for offset in offsets
    }
    total = np.zeros(max(length_px, size_px), dtype=np.float32)
    for offset, profile in profiles.items():
        total[offset : offset + size_px] += profile
    return {offset: profile / total[offset : offset + size_px] for offset, profile in profiles.items()}


def mirror_pad(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """(bands, h, w) pixels grown to (bands, height, width) by mirroring them at the bottom and right.

    A chip that reaches past a small scene's edge sees the scene continue rather
    than a black border, which the network would take for the road surface
    meeting something dark (it hid the cracks of scenes smaller than a chip).

    >>> mirror_pad(np.arange(3).reshape(1, 1, 3), 2, 7).tolist()
    [[[0, 1, 2, 2, 1, 0, 0], [0, 1, 2, 2, 1, 0, 0]]]
    """
    _, rows, cols = pixels.shape
    if rows == 0 or cols == 0 or (rows, cols) == (height, width):
        return pixels
    return np.pad(pixels, ((0, 0), (0, height - rows), (0, width - cols)), mode="symmetric")
