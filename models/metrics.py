"""Pixel metrics for binary crack segmentation (numpy only).

Two accumulators:

* :class:`PixelCounts` counts true/false positives/negatives of a binary crack
  mask against the truth and turns them into scores.
* :class:`ThresholdSweep` keeps 256-bin histograms of crack probability for crack
  and background truth pixels, so that the scores at every threshold
  ``k / 255`` (``k = 0 .. 255``) can be read off with two cumulative sums.
* :class:`ToleranceCounts` scores a mask with a tolerance of a few pixels, as
  crack papers also report: a predicted crack pixel counts as right if a true
  one lies within ``tolerance_px``, a true one as found if a predicted one does.

Conventions for empty denominators (documented once, used everywhere):

* no crack in the truth and none predicted: crack IoU, F1, precision and recall
  are 1.0 (a perfect answer);
* crack in the truth but nothing predicted: precision is 0.0 (as are recall,
  F1 and crack IoU);
* crack predicted but none in the truth: recall is 1.0 (nothing was missed),
  precision, F1 and crack IoU are 0.0;
* every pixel is crack in both: background IoU is 1.0.

F1 is computed as ``2 tp / (2 tp + fp + fn)``, which equals the harmonic mean of
precision and recall wherever both are defined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 256


def _ratio(numerator: int, denominator: int, empty: float) -> float:
    return float(numerator) / float(denominator) if denominator else empty


def _check_pair(pred: np.ndarray, truth: np.ndarray, pred_name: str) -> None:
    if pred.shape != truth.shape:
        raise ValueError(
            f"{pred_name} has shape {pred.shape} but truth has shape {truth.shape}; "
            "they must match pixel for pixel."
        )
    if truth.dtype != np.bool_:
        raise ValueError(
            f"truth must be a bool array (crack = True), got dtype {truth.dtype}; "
            "convert a 0/255 mask with `mask > 0`."
        )


@dataclass
class PixelCounts:
    """Confusion counts of a binary crack mask (crack = positive class).

    >>> counts = PixelCounts()
    >>> counts.add(np.array([True, True, False, False]), np.array([True, False, True, False]))
    >>> counts
    PixelCounts(tp=1, fp=1, fn=1, tn=1)
    >>> round(counts.scores()["f1"], 3), round(counts.scores()["miou"], 3)
    (0.5, 0.333)
    """

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Count one predicted mask against its truth.

        Args:
            pred: Bool array, True where crack is predicted.
            truth: Bool array of the same shape, True where the truth is crack.

        Raises:
            ValueError: If the shapes differ or either array is not bool.
        """
        pred, truth = np.asarray(pred), np.asarray(truth)
        _check_pair(pred, truth, "pred")
        if pred.dtype != np.bool_:
            raise ValueError(
                f"pred must be a bool array, got dtype {pred.dtype}; "
                "threshold probabilities first, e.g. `prob >= threshold`."
            )
        tp = int(np.count_nonzero(pred & truth))
        positives = int(np.count_nonzero(pred))
        crack = int(np.count_nonzero(truth))
        self.tp += tp
        self.fp += positives - tp
        self.fn += crack - tp
        self.tn += truth.size - positives - crack + tp

    def __add__(self, other: PixelCounts) -> PixelCounts:
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def scores(self) -> dict:
        """Scores of the counts so far (see the module docstring for empty cases).

        Returns:
            Dict with float ``miou`` (mean of background and crack IoU),
            ``crack_iou``, ``background_iou``, ``f1``, ``precision``, ``recall``
            and int ``pixels``.
        """
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        crack_iou = _ratio(tp, tp + fp + fn, 1.0)
        background_iou = _ratio(tn, tn + fn + fp, 1.0)
        return {
            "miou": (crack_iou + background_iou) / 2.0,
            "crack_iou": crack_iou,
            "background_iou": background_iou,
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
            "precision": _ratio(tp, tp + fp, 0.0 if fn else 1.0),
            "recall": _ratio(tp, tp + fn, 1.0),
            "pixels": tp + fp + fn + tn,
        }


def probability_bins(prob: np.ndarray) -> np.ndarray:
    """Map crack probabilities to histogram bins 0..255.

    uint8 input is used as is (``value / 255`` is the probability). Float input
    in [0, 1] goes to bin ``floor(prob * 255)``, so that ``prob >= k / 255``
    holds exactly when ``bin >= k`` (up to float rounding at the bin edges).

    Args:
        prob: uint8 array (0..255) or float array in [0, 1].

    Returns:
        Integer array of bins, same shape.

    Raises:
        ValueError: If the dtype is neither uint8 nor float, or floats leave [0, 1].

    >>> probability_bins(np.array([0.0, 0.5, 1.0])).tolist()
    [0, 127, 255]
    """
    prob = np.asarray(prob)
    if prob.dtype == np.uint8:
        return prob
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(
            f"crack probability must be uint8 (0..255) or float in [0, 1], got dtype {prob.dtype}"
        )
    if prob.size and (np.nanmin(prob) < 0.0 or np.nanmax(prob) > 1.0 or np.isnan(prob).any()):
        raise ValueError(
            "float crack probability must lie in [0, 1] (no NaN); "
            f"got range [{np.nanmin(prob)}, {np.nanmax(prob)}]"
        )
    bins = np.floor(prob.astype(np.float64) * (BINS - 1) + 1e-6)
    return np.clip(bins, 0, BINS - 1).astype(np.uint8)


def _threshold_index(threshold: float) -> int:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    return int(np.ceil(threshold * (BINS - 1) - 1e-6))


class ThresholdSweep:
    """Histograms of crack probability that give scores at every threshold.

    Decision rule: a pixel is crack when ``prob >= threshold``. Thresholds are
    resolved to multiples of 1/255; :meth:`scores_at` rounds other thresholds up
    to the next multiple.

    >>> sweep = ThresholdSweep()
    >>> sweep.add(np.array([0.1, 0.4, 0.6, 0.9]), np.array([False, True, False, True]))
    >>> threshold, scores = sweep.best_f1()
    >>> round(threshold, 3), round(scores["f1"], 3)  # any threshold in (0.1, 0.4] is best
    (0.251, 0.8)
    """

    def __init__(self) -> None:
        self.crack = np.zeros(BINS, dtype=np.int64)
        self.background = np.zeros(BINS, dtype=np.int64)

    def add(self, prob: np.ndarray, truth: np.ndarray) -> None:
        """Add the probabilities of one image.

        Args:
            prob: Crack probability, uint8 (0..255) or float in [0, 1].
            truth: Bool array of the same shape, True where the truth is crack.

        Raises:
            ValueError: On a shape mismatch, a non-bool truth or bad probabilities.
        """
        prob, truth = np.asarray(prob), np.asarray(truth)
        _check_pair(prob, truth, "prob")
        bins = probability_bins(prob)
        self.crack += np.bincount(bins[truth], minlength=BINS)
        self.background += np.bincount(bins[~truth], minlength=BINS)

    def __add__(self, other: ThresholdSweep) -> ThresholdSweep:
        pooled = ThresholdSweep()
        pooled.crack = self.crack + other.crack
        pooled.background = self.background + other.background
        return pooled

    def _counts_per_threshold(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """tp, fp, fn, tn for thresholds k/255, k = 0..255 (reverse cumulative sums)."""
        tp = np.cumsum(self.crack[::-1])[::-1]
        fp = np.cumsum(self.background[::-1])[::-1]
        return tp, fp, self.crack.sum() - tp, self.background.sum() - fp

    def counts_at(self, threshold: float) -> PixelCounts:
        """Confusion counts for the rule ``prob >= threshold``.

        Raises:
            ValueError: If the threshold is outside [0, 1].
        """
        k = _threshold_index(threshold)
        tp, fp, fn, tn = (int(c[k]) for c in self._counts_per_threshold())
        return PixelCounts(tp=tp, fp=fp, fn=fn, tn=tn)

    def scores_at(self, threshold: float) -> dict:
        """Scores (as :meth:`PixelCounts.scores`) for the rule ``prob >= threshold``."""
        return self.counts_at(threshold).scores()

    def f1_curve(self) -> np.ndarray:
        """Crack F1 at thresholds ``k / 255`` for k = 0..255 (empty cases as in the module doc)."""
        tp, fp, fn, _ = self._counts_per_threshold()
        denominator = 2 * tp + fp + fn
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)

    def best_f1(self) -> tuple[float, dict]:
        """The threshold with the highest crack F1.

        When several thresholds tie (a gap between the probabilities of crack
        and background pixels), the median of the tied thresholds is returned,
        the one farthest from both sides in the usual contiguous case.

        Returns:
            ``(threshold, scores)``: the threshold as a probability ``k / 255``
            and the scores at it.

        Raises:
            ValueError: If no pixels were added.
        """
        if not (self.crack.sum() + self.background.sum()):
            raise ValueError("ThresholdSweep is empty: add() probabilities before asking for scores")
        f1 = self.f1_curve()
        tied = np.flatnonzero(f1 == f1.max())
        threshold = int(tied[len(tied) // 2]) / (BINS - 1)
        return threshold, self.scores_at(threshold)


@dataclass
class ToleranceCounts:
    """Crack precision / recall / F1 with a distance tolerance (pixels), accumulated over images.

    >>> truth = np.zeros((5, 9), bool); truth[2, 1:8] = True
    >>> pred = np.zeros((5, 9), bool); pred[3, 1:8] = True          # one pixel off
    >>> counts = ToleranceCounts(tolerance_px=2); counts.add(pred, truth)
    >>> counts.scores()["f1"], ToleranceCounts(tolerance_px=0).scores()["f1"]
    (1.0, 1.0)
    """

    tolerance_px: float = 2.0
    predicted: int = 0  # predicted crack pixels
    predicted_near: int = 0  # ... within the tolerance of a true crack pixel
    true: int = 0  # true crack pixels
    true_near: int = 0  # ... within the tolerance of a predicted crack pixel

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Count one predicted bool mask against its bool truth (same shape)."""
        from scipy import ndimage

        pred, truth = np.asarray(pred), np.asarray(truth)
        _check_pair(pred, truth, "pred")
        self.predicted += int(pred.sum())
        self.true += int(truth.sum())
        if pred.any() and truth.any():
            self.predicted_near += int(
                (ndimage.distance_transform_edt(~truth)[pred] <= self.tolerance_px).sum()
            )
            self.true_near += int((ndimage.distance_transform_edt(~pred)[truth] <= self.tolerance_px).sum())

    def scores(self) -> dict:
        """``precision``, ``recall`` and ``f1`` (empty cases as in the module docstring)."""
        precision = _ratio(self.predicted_near, self.predicted, 0.0 if self.true else 1.0)
        recall = _ratio(self.true_near, self.true, 1.0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1}
