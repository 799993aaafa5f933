import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.tiling import blend_weights, chip_offsets

sizes = st.integers(min_value=1, max_value=3000)


@settings(max_examples=200, deadline=None)
@given(length=sizes, size=st.integers(16, 512), overlap_frac=st.floats(0, 0.9))
def test_chip_offsets_cover_every_pixel_without_sticking_out(length, size, overlap_frac):
    overlap = int(size * overlap_frac)
    starts = chip_offsets(length, size, overlap)
    covered = np.zeros(max(length, size), dtype=bool)
    for s in starts:
        covered[s : s + size] = True
    assert covered[:length].all()
    assert starts == sorted(starts) and starts[0] == 0
    if length >= size:
        assert starts[-1] == length - size  # the last chip is shifted inward, not dropped
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))


@settings(max_examples=100, deadline=None)
@given(
    length=st.integers(1, 3000),
    size=st.integers(32, 512),
    overlap_frac=st.floats(0, 0.9),
    border_frac=st.floats(0, 0.5),
)
def test_blend_weights_sum_to_one_on_every_pixel_and_drop_covered_borders(
    length, size, overlap_frac, border_frac
):
    overlap = int(size * overlap_frac)
    border = int(overlap * border_frac)
    weights = blend_weights(length, size, overlap, border)
    assert list(weights) == chip_offsets(length, size, overlap)
    total = np.zeros(max(length, size))
    for offset, w in weights.items():
        assert w.shape == (size,) and (w >= 0).all()
        total[offset : offset + size] += w
        if border and offset > 0:
            assert (w[:border] == 0).all()  # the border band another chip covers
        if border and offset + size < length:
            assert (w[-border:] == 0).all()
    assert np.allclose(total[:length], 1.0, atol=1e-6)


def test_a_border_wider_than_half_the_overlap_is_refused():
    with pytest.raises(ValueError, match="overlapping by at least 40 px, not 32"):
        blend_weights(1000, 400, 32, 20)


def test_scene_options_refuse_a_grid_that_leaves_holes():
    from pipeline.scene import SceneOptions

    with pytest.raises(ValueError, match="overlapping by at least 32 px, not 24"):
        SceneOptions(overlap_px=24, border_px=16)
