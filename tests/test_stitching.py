import numpy as np
import pytest
from rasterio.windows import Window

from pipeline.stitching import StripStitcher
from pipeline.tiling import chip_windows


def stitch(width, height, chip_probability):
    out = np.zeros((height, width), dtype=np.uint8)
    rows_seen = []

    def sink(row_off, p, valid):
        rows_seen.extend(range(row_off, row_off + len(p)))
        out[row_off : row_off + len(p)] = p

    stitcher = StripStitcher(width, height, sink)
    for i, w in enumerate(chip_windows(width, height)):
        stitcher.add(w, chip_probability(i, w), np.ones((400, 400), bool))
    stitcher.finish()
    assert rows_seen == list(range(height))  # every row emitted once, in order
    return out.astype(float) / 255


def test_identical_chip_predictions_stitch_to_the_same_field():
    rows, cols = np.mgrid[0:1000, 0:1200]
    field = (np.sin(rows / 50) * np.cos(cols / 70) + 1) / 2

    def chip(i, w):
        r, c = int(w.row_off), int(w.col_off)
        return field[r : r + 400, c : c + 400]

    assert (
        np.abs(stitch(1200, 1000, chip) - field).max() <= 0.5 / 255 + 1e-5
    )  # uint8 rounding of float32 sums


def test_no_seam_where_neighbouring_chips_disagree():
    # Each chip is biased by +-0.1 (a network sees different context in each chip).
    # Averaging labels or cutting at the chip edge would jump by 0.2 at seams.
    def chip(i, w):
        return np.full((400, 400), 0.5 + (0.1 if i % 2 else -0.1), np.float32)

    stitched = stitch(1200, 800, chip)
    jumps = max(np.abs(np.diff(stitched, axis=0)).max(), np.abs(np.diff(stitched, axis=1)).max())
    assert jumps < 0.02


def test_nodata_pixels_are_invalid_and_zero_and_chips_without_data_can_be_left_out():
    height, width = 1000, 1200
    valid = np.ones((height, width), bool)
    valid[:, 800:] = False  # a collar: the chip column at 800 has no data and is never run
    valid[300:420, 100:180] = False  # a hole inside chips
    rows, cols = np.mgrid[0:height, 0:width]
    field = ((np.sin(rows / 50) * np.cos(cols / 70) + 1) / 2).astype(np.float32)
    out = np.zeros((height, width), np.uint8)
    out_valid = np.zeros((height, width), bool)

    def sink(row_off, p, v):
        out[row_off : row_off + len(p)], out_valid[row_off : row_off + len(p)] = p, v

    stitcher = StripStitcher(width, height, sink)
    for w in chip_windows(width, height):
        r, c = slice(int(w.row_off), int(w.row_off) + 400), slice(int(w.col_off), int(w.col_off) + 400)
        if valid[r, c].any():
            garbage = np.where(valid[r, c], field[r, c], np.float32(0.9))  # what a network says about nodata
            stitcher.add(w, garbage, valid[r, c])
    stitcher.finish()
    assert (out_valid == valid).all() and not out[~valid].any()
    assert np.abs(out[valid] / 255 - field[valid]).max() <= 0.5 / 255 + 1e-5


def test_chips_off_the_grid_are_refused():
    stitcher = StripStitcher(1200, 1000, lambda *a: None, overlap_px=64)
    with pytest.raises(ValueError, match="row 0, column 300 is not on the chip grid"):
        stitcher.add(Window(300, 0, 400, 400), np.zeros((400, 400), np.float32), np.ones((400, 400), bool))
