import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.tiling import chip_offsets, chip_weights, chip_windows

sizes = st.integers(min_value=1, max_value=3000)


@settings(max_examples=200, deadline=None)
@given(length=sizes, size=st.integers(16, 512), overlap_frac=st.floats(0, 0.9))
def test_chip_offsets_cover_every_pixel_without_sticking_out(length, size, overlap_frac):
    overlap = int(size * overlap_frac)
    starts = chip_offsets(length, size, overlap)
    covered = np.zeros(max(length, size), dtype=bool)
    for s in starts:
        covered[s:s + size] = True
    assert covered[:length].all()
    assert starts == sorted(starts) and starts[0] == 0
    if length >= size:
        assert starts[-1] == length - size  # the last chip is shifted inward, not dropped
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 1500), height=st.integers(1, 1500))
def test_blend_weights_are_positive_on_every_pixel(width, height):
    total = np.zeros((max(height, 400), max(width, 400)))
    for w in chip_windows(width, height, 400, 64):
        r, c = int(w.row_off), int(w.col_off)
        total[r:r + 400, c:c + 400] += chip_weights(w, width, height, 16)
    assert (total[:height, :width] > 0).all()
