"""Plain (not georeferenced) images: the same chips and stitching as scenes, in memory.

For photos and dataset images of any size; a scene goes through
``pipeline.scene`` instead, which streams.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.backends import Backend
from pipeline.errors import SceneReadError
from pipeline.stitching import StripStitcher
from pipeline.tiling import chip_windows, mirror_pad

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise SceneReadError(str(path), f"not a readable image ({exc})") from exc


def image_probability(
    rgb: np.ndarray, backend: Backend, size_px: int = 400, overlap_px: int = 64, border_px: int = 16
) -> np.ndarray:
    """Crack probability (H, W) uint8 of an (H, W, 3) uint8 image."""
    height, width = rgb.shape[:2]
    padded = mirror_pad(rgb.transpose(2, 0, 1), max(height, size_px), max(width, size_px))
    inside = np.zeros(padded.shape[1:], dtype=bool)
    inside[:height, :width] = True
    out = np.zeros((height, width), dtype=np.uint8)

    def sink(row_off: int, probability: np.ndarray, valid: np.ndarray) -> None:
        out[row_off : row_off + len(probability)] = probability

    stitcher = StripStitcher(width, height, sink, size_px, border_px, overlap_px)
    windows = chip_windows(width, height, size_px, overlap_px)
    for start in range(0, len(windows), backend.batch_size):
        batch = windows[start : start + backend.batch_size]
        slices = [
            (slice(int(w.row_off), int(w.row_off) + size_px), slice(int(w.col_off), int(w.col_off) + size_px))
            for w in batch
        ]
        probability = backend.predict(np.stack([padded[:, r, c] for r, c in slices]))
        for window, p, (r, c) in zip(batch, probability, slices):
            stitcher.add(window, p, inside[r, c])
    stitcher.finish()
    return out


def image_files(folder: Path) -> list[Path]:
    """Image files in a folder (not recursive), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
