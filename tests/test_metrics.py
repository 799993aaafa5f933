"""Pixel metrics and the threshold sweep on hand-made masks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.metrics import PixelCounts, ThresholdSweep, probability_bins


def masks(rows: list[str]) -> np.ndarray:
    """A bool mask from rows of '#' (crack) and '.' (background)."""
    return np.array([[c == "#" for c in row] for row in rows])


def test_counts_and_scores_on_a_hand_made_mask():
    truth = masks(["..#.", "..#.", "..#.", "...."])
    pred = masks(["..##", "..#.", "....", "...."])
    counts = PixelCounts()
    counts.add(pred, truth)
    assert counts == PixelCounts(tp=2, fp=1, fn=1, tn=12)
    scores = counts.scores()
    assert scores["crack_iou"] == pytest.approx(2 / 4)
    assert scores["background_iou"] == pytest.approx(12 / 14)
    assert scores["miou"] == pytest.approx((2 / 4 + 12 / 14) / 2)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["pixels"] == 16


def test_counts_accumulate_over_images():
    counts = PixelCounts()
    counts.add(masks(["#."]), masks(["##"]))
    counts.add(masks(["#."]), masks([".."]))
    assert counts == PixelCounts(tp=1, fp=1, fn=1, tn=1)
    assert counts + counts == PixelCounts(tp=2, fp=2, fn=2, tn=2)


def test_all_background_predicted_as_background_is_perfect():
    counts = PixelCounts()
    counts.add(np.zeros((5, 5), bool), np.zeros((5, 5), bool))
    scores = counts.scores()
    for key in ("miou", "crack_iou", "background_iou", "f1", "precision", "recall"):
        assert scores[key] == 1.0, key
    assert scores["pixels"] == 25


def test_missed_crack_has_zero_precision_and_recall():
    counts = PixelCounts()
    counts.add(np.zeros((2, 2), bool), masks(["#.", ".."]))
    scores = counts.scores()
    assert scores["precision"] == 0.0
    assert scores["recall"] == 0.0
    assert scores["f1"] == 0.0
    assert scores["crack_iou"] == 0.0
    assert scores["miou"] == pytest.approx(3 / 4 / 2)


def test_false_alarm_on_crack_free_image():
    counts = PixelCounts()
    counts.add(masks(["#.", ".."]), np.zeros((2, 2), bool))
    scores = counts.scores()
    assert scores["recall"] == 1.0
    assert scores["precision"] == 0.0
    assert scores["f1"] == 0.0


def test_all_crack_background_iou_is_one():
    counts = PixelCounts()
    counts.add(np.ones((2, 2), bool), np.ones((2, 2), bool))
    assert counts.scores()["background_iou"] == 1.0
    assert counts.scores()["miou"] == 1.0


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        PixelCounts().add(np.zeros((2, 2), bool), np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match="bool"):
        PixelCounts().add(np.zeros((2, 2), np.float32), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="shape"):
        ThresholdSweep().add(np.zeros((2, 2), np.float32), np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ThresholdSweep().add(np.full((2, 2), 1.5), np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="threshold"):
        ThresholdSweep().scores_at(1.2)
    with pytest.raises(ValueError, match="empty"):
        ThresholdSweep().best_f1()


def constructed_example() -> tuple[np.ndarray, np.ndarray]:
    """10 crack pixels at 0.8, 2 at 0.5; 100 background pixels at 0.1, 3 at 0.6.

    Any threshold in (0.6, 0.8] gives tp=10, fp=0, fn=2: F1 = 20/22, the best.
    """
    prob = np.array([0.8] * 10 + [0.5] * 2 + [0.1] * 100 + [0.6] * 3)
    truth = np.array([True] * 12 + [False] * 103)
    return prob, truth


def test_threshold_sweep_finds_the_f1_optimal_threshold():
    prob, truth = constructed_example()
    sweep = ThresholdSweep()
    sweep.add(prob.reshape(5, 23), truth.reshape(5, 23))
    threshold, scores = sweep.best_f1()
    assert 0.6 < threshold <= 0.8
    assert scores["f1"] == pytest.approx(20 / 22)
    assert scores["precision"] == 1.0
    direct = PixelCounts()
    direct.add(prob >= threshold, truth)
    assert sweep.counts_at(threshold) == direct


def test_threshold_sweep_scores_at_known_thresholds():
    prob, truth = constructed_example()
    sweep = ThresholdSweep()
    sweep.add(prob, truth)
    assert sweep.scores_at(0.55)["f1"] == pytest.approx(20 / 25)
    assert sweep.scores_at(0.3)["f1"] == pytest.approx(24 / 27)
    assert sweep.scores_at(0.0)["recall"] == 1.0
    assert sweep.counts_at(0.0) == PixelCounts(tp=12, fp=103, fn=0, tn=0)


def test_uint8_and_float_probabilities_agree():
    prob, truth = constructed_example()
    as_float, as_uint8 = ThresholdSweep(), ThresholdSweep()
    as_float.add(prob, truth)
    as_uint8.add(np.floor(prob * 255 + 1e-6).astype(np.uint8), truth)
    np.testing.assert_array_equal(as_float.crack, as_uint8.crack)
    np.testing.assert_array_equal(as_float.background, as_uint8.background)


def test_pooled_sweep_equals_one_sweep_over_all_pixels():
    prob, truth = constructed_example()
    first, second, together = ThresholdSweep(), ThresholdSweep(), ThresholdSweep()
    first.add(prob[:50], truth[:50])
    second.add(prob[50:], truth[50:])
    together.add(prob, truth)
    pooled = first + second
    np.testing.assert_array_equal(pooled.crack, together.crack)
    assert pooled.best_f1() == together.best_f1()


def test_probability_bins_edges():
    assert probability_bins(np.array([0.0, 1 / 255, 0.999, 1.0])).tolist() == [0, 1, 254, 255]
    assert probability_bins(np.array([7], np.uint8)).tolist() == [7]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(0, 255))
def test_sweep_matches_direct_counting_for_uint8(seed, k):
    rng = np.random.default_rng(seed)
    prob = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    truth = rng.random((16, 16)) < 0.3
    sweep = ThresholdSweep()
    sweep.add(prob, truth)
    direct = PixelCounts()
    direct.add(prob >= k, truth)
    assert sweep.counts_at(k / 255) == direct
