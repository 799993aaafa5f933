"""Vector accuracy of crack lines against true crack masks (for benchmarks and model cards).

A crack map is judged by whether its lines lie on real cracks and whether its
lengths add up. The truth is the skeleton of a true crack mask (one pixel wide
centrelines); the lines under test are polylines in the same scene's pixel
coordinates with their measured lengths in metres.

* **F1 at a tolerance**: precision is the share of the predicted line length
  within ``tolerance_px`` of a truth skeleton pixel; recall is the share of
  truth skeleton pixels within ``tolerance_px`` of a predicted line.
* **Length ratio**: predicted total length / true total length (both metres).
  The true length is the skeleton's path length (skan, with the scene's
  per-axis pixel spacing), the predicted length is what the pipeline measured.
* **Length ratio by width class**: the predicted length near truth pixels of a
  width class (the nearest truth pixel decides) over the true length of that
  class; it shows whether wide or hairline cracks are under- or over-counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skan import Skeleton
from skimage.morphology import skeletonize

WIDTH_CLASSES_PX = (3.0, 8.0)  # thin < 3 px <= medium < 8 px <= wide (true width in pixels)
CLASS_NAMES = ("thin", "medium", "wide")


@dataclass(frozen=True, slots=True)
class TruthSkeleton:
    """Centrelines of a true crack mask, with their true widths and lengths."""

    skeleton: np.ndarray  # (H, W) bool
    width_px: np.ndarray  # (H, W) float32: true width at skeleton pixels (2 d - 1), 0 elsewhere
    paths_rc: tuple[np.ndarray, ...]  # skeleton paths as (row, col) vertices
    length_m: float


@dataclass(frozen=True, slots=True)
class VectorScore:
    """Scores of one scene's lines (see the module docstring)."""

    precision: float
    recall: float
    f1: float
    length_ratio: float
    true_length_m: float
    predicted_length_m: float
    length_ratio_by_width: dict = field(default_factory=dict)  # class -> ratio (None: no truth)

    def as_dict(self) -> dict:
        return {
            "f1": self.f1,
            "precision": self.precision,
            "recall": self.recall,
            "length_ratio": self.length_ratio,
            "true_length_m": self.true_length_m,
            "predicted_length_m": self.predicted_length_m,
            "length_ratio_by_width": dict(self.length_ratio_by_width),
        }


def truth_skeleton(mask: np.ndarray, spacing_m: tuple[float, float]) -> TruthSkeleton:
    """Skeleton, widths and length of a true crack mask.

    Args:
        mask: (H, W) bool or 0/1 crack mask.
        spacing_m: Ground size of a pixel as (row, col) metres.

    >>> m = np.zeros((20, 60), bool); m[8:13, 5:55] = True
    >>> t = truth_skeleton(m, (0.001, 0.001))
    >>> round(t.length_m, 3), round(float(t.width_px[t.skeleton].mean()), 1)
    (0.046, 4.9)
    """
    mask = np.asarray(mask, bool)
    skeleton = skeletonize(mask)
    half = ndimage.distance_transform_edt(mask).astype(np.float32)
    width = np.where(skeleton, np.maximum(2.0 * half - 1.0, 1.0), 0.0).astype(np.float32)
    if np.count_nonzero(skeleton) < 2:
        return TruthSkeleton(skeleton, width, (), 0.0)
    graph = Skeleton(skeleton, spacing=spacing_m)
    paths = tuple(np.asarray(graph.path_coordinates(i), float) for i in range(graph.n_paths))
    return TruthSkeleton(skeleton, width, paths, float(graph.path_lengths().sum()))


def sample_lines(lines_rc: list[np.ndarray], step_px: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Points along polylines every ``step_px`` at most, and the line length (px) each stands for.

    >>> points, weights = sample_lines([np.array([[0.0, 0.0], [0.0, 4.0]])], step_px=1.0)
    >>> points[:, 1].tolist(), float(weights.sum())
    ([0.5, 1.5, 2.5, 3.5], 4.0)
    """
    points, weights = [], []
    for rc in lines_rc:
        rc = np.asarray(rc, float)
        for a, b in zip(rc[:-1], rc[1:]):
            length = float(np.hypot(*(b - a)))
            if length == 0:
                continue
            count = max(1, int(np.ceil(length / step_px)))
            t = (np.arange(count) + 0.5) / count
            points.append(a + t[:, None] * (b - a))
            weights.append(np.full(count, length / count))
    if not points:
        return np.zeros((0, 2)), np.zeros(0)
    return np.concatenate(points), np.concatenate(weights)


def score_lines(
    lines_rc: list[np.ndarray],
    predicted_length_m: float,
    truth: TruthSkeleton,
    tolerance_px: float = 5.0,
    valid: np.ndarray | None = None,
    width_classes_px: tuple[float, float] = WIDTH_CLASSES_PX,
) -> VectorScore:
    """Score predicted lines (scene pixel coordinates) against a truth skeleton.

    Args:
        lines_rc: Predicted polylines as (row, col) vertex arrays in scene pixels.
        predicted_length_m: Their total measured length.
        truth: The truth skeleton of the same scene.
        tolerance_px: Distance within which a line and a truth pixel match.
        valid: Optional (H, W) bool of pixels that hold data; truth outside is not counted.
        width_classes_px: Bounds of the thin / medium / wide classes.

    Returns:
        The scene's :class:`VectorScore`.
    """
    shape = truth.skeleton.shape
    skeleton = truth.skeleton if valid is None else truth.skeleton & valid
    points, weights = sample_lines(lines_rc)
    inside = (
        (points[:, 0] > -0.5)
        & (points[:, 0] < shape[0] - 0.5)
        & (points[:, 1] > -0.5)
        & (points[:, 1] < shape[1] - 0.5)
    )
    points, weights = points[inside], weights[inside]
    cells = np.clip(np.rint(points).astype(np.int64), 0, np.array(shape) - 1)
    to_truth, nearest = ndimage.distance_transform_edt(~skeleton, return_indices=True)
    near_truth = to_truth[cells[:, 0], cells[:, 1]] <= tolerance_px
    drawn = np.zeros(shape, bool)
    drawn[cells[:, 0], cells[:, 1]] = True
    to_line = ndimage.distance_transform_edt(~drawn) if drawn.any() else np.full(shape, np.inf)
    true_count = int(skeleton.sum())
    precision = (
        float(weights[near_truth].sum() / weights.sum()) if weights.size else (1.0 if not true_count else 0.0)
    )
    recall = float((to_line[skeleton] <= tolerance_px).sum() / true_count) if true_count else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    true_length = (
        truth.length_m if valid is None else truth.length_m * true_count / max(1, truth.skeleton.sum())
    )
    by_width = _length_ratio_by_width(
        truth, skeleton, to_truth, nearest, cells[near_truth], weights[near_truth], width_classes_px
    )
    return VectorScore(
        precision,
        recall,
        f1,
        predicted_length_m / true_length if true_length else float("inf"),
        true_length,
        predicted_length_m,
        by_width,
    )


def _length_ratio_by_width(
    truth: TruthSkeleton,
    skeleton: np.ndarray,
    to_skeleton: np.ndarray,
    nearest: np.ndarray,
    cells: np.ndarray,
    weights: np.ndarray,
    bounds: tuple[float, float],
) -> dict[str, float | None]:
    """Matched predicted length over true length, per true width class (both in pixel lengths).

    The true length of a class is measured on the truth's own skeleton paths,
    sampled like the predicted lines; every sample takes the class of its
    nearest counted skeleton pixel, so the two sides are measured alike.
    """

    def classes(sample_cells: np.ndarray) -> np.ndarray:
        rows = nearest[0][sample_cells[:, 0], sample_cells[:, 1]]
        cols = nearest[1][sample_cells[:, 0], sample_cells[:, 1]]
        return np.digitize(truth.width_px[rows, cols], bounds)

    truth_points, truth_weights = sample_lines(list(truth.paths_rc))
    truth_cells = np.clip(np.rint(truth_points).astype(np.int64), 0, np.array(skeleton.shape) - 1)
    to_counted = to_skeleton[truth_cells[:, 0], truth_cells[:, 1]] <= 1.0
    true_class, predicted_class = classes(truth_cells), classes(cells)
    ratios: dict[str, float | None] = {}
    for index, name in enumerate(CLASS_NAMES):
        truth_px = float(truth_weights[to_counted & (true_class == index)].sum())
        ratios[name] = float(weights[predicted_class == index].sum()) / truth_px if truth_px else None
    return ratios


def choose_line_settings(rows: list[dict], f1_margin: float = 0.01) -> tuple[float, float, str]:
    """(low_ratio, threshold_scale, why): the line settings of a model version, from its scores on
    val scenes (``benchmarks/vector_accuracy.py``), one row per scene and setting with
    ``low_ratio``, ``threshold_scale``, ``f1`` and ``length_ratio``.

    The rule: the best mean line F1 over the scenes; among the settings within ``f1_margin``
    of it, total lengths nearest the truth (the smallest mean |ln length ratio|).

    >>> row = lambda lr, s, f1, ratio: dict(low_ratio=lr, threshold_scale=s, f1=f1, length_ratio=ratio)
    >>> choose_line_settings([row(.5, 1, .60, .5), row(.3, 1, .605, .9), row(.3, .6, .5, 1.0)])[:2]
    (0.3, 1)
    >>> choose_line_settings([row(.5, 1, .60, .5), row(.3, 1, .70, .2)])[:2]  # F1 first
    (0.3, 1)
    """
    groups: dict[tuple[float, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["low_ratio"], row["threshold_scale"]), []).append(row)
    f1 = {key: float(np.mean([r["f1"] for r in scenes])) for key, scenes in groups.items()}
    off = {
        key: float(np.mean([abs(np.log(max(r["length_ratio"], 1e-3))) for r in scenes]))
        for key, scenes in groups.items()
    }
    best = max(f1.values())
    key = min((k for k in groups if f1[k] >= best - f1_margin), key=lambda k: off[k])
    why = (
        f"the best mean line F1 over {len(groups[key])} scenes ({best:.3f}); among settings within "
        f"{f1_margin} of it, total lengths nearest the truth (this one: mean F1 {f1[key]:.3f}, "
        f"mean |ln length ratio| {off[key]:.3f})"
    )
    return key[0], key[1], why
