"""The vector-accuracy scorer: the truth scores perfectly, and errors show up where they should."""

import numpy as np
import pytest
from conftest import paint_crack

from pipeline.accuracy import score_lines, truth_skeleton

SPACING = (0.002, 0.002)


def drawn_mask(shape=(300, 400)) -> np.ndarray:
    pixels = np.zeros((1,) + shape, np.uint8)
    paint_crack(pixels, (20, 20), (280, 380), width_px=2, value=1)  # thin
    paint_crack(pixels, (250, 30), (250, 200), width_px=10, value=1)  # wide
    paint_crack(pixels, (40, 300), (150, 320), width_px=5, value=1)  # medium
    return pixels[0].astype(bool)


def test_the_truth_itself_scores_f1_1_and_length_ratio_1():
    truth = truth_skeleton(drawn_mask(), SPACING)
    score = score_lines(list(truth.paths_rc), truth.length_m, truth)
    assert score.f1 == 1.0 and score.precision == 1.0 and score.recall == 1.0
    assert score.length_ratio == pytest.approx(1.0)
    for name, ratio in score.length_ratio_by_width.items():
        assert ratio == pytest.approx(1.0, abs=1e-9), name


def test_missing_and_invented_lines_lower_recall_and_precision():
    truth = truth_skeleton(drawn_mask(), SPACING)
    longest = max(truth.paths_rc, key=len)
    others = [p for p in truth.paths_rc if p is not longest]
    missing = score_lines(others, truth.length_m / 2, truth)
    assert missing.precision == 1.0 and missing.recall < 0.7 and missing.length_ratio == pytest.approx(0.5)
    invented = [np.array([[150.0, 100.0], [240.0, 100.0]])]  # far from every crack
    extra = score_lines(list(truth.paths_rc) + invented, truth.length_m * 1.2, truth)
    assert extra.recall == 1.0 and extra.precision < 0.9
    shifted = [p + [7, -7] for p in truth.paths_rc]  # beyond the 5 px tolerance
    assert score_lines(shifted, truth.length_m, truth).f1 < 0.3
    assert score_lines(shifted, truth.length_m, truth, tolerance_px=11).f1 > 0.9


def test_length_by_width_class_shows_a_missed_wide_crack():
    mask = drawn_mask()
    truth = truth_skeleton(mask, SPACING)
    wide = [p for p in truth.paths_rc if truth.width_px[tuple(np.rint(p[len(p) // 2]).astype(int))] >= 8]
    assert wide, "the drawn wide crack has a skeleton path"
    kept = [p for p in truth.paths_rc if not any(p is w for w in wide)]
    ratios = score_lines(kept, 0.0, truth).length_ratio_by_width
    assert ratios["wide"] < 0.2 and ratios["thin"] == pytest.approx(1.0, abs=0.05)


def test_truth_outside_the_valid_pixels_is_not_counted():
    mask = drawn_mask()
    truth = truth_skeleton(mask, SPACING)
    valid = np.zeros(mask.shape, bool)
    valid[:, :200] = True
    left = [p[p[:, 1] < 199.5] for p in truth.paths_rc]
    left = [p for p in left if len(p) > 1]
    score = score_lines(left, 0.0, truth, valid=valid)
    assert score.recall == pytest.approx(1.0, abs=0.01)
