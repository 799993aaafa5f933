"""Score registry models on the val splits, per dataset: pixel-exact and with a 2 px tolerance.

Model cards show both kinds of crack F1 (papers report both), at the model's
own calibrated threshold, and the release rule for a new default is checked
here: a candidate becomes the default only if it beats the current default on
mean val F1 over all datasets *and* on every survey-like dataset.

Usage:
    python -m models.evaluate [--data-root DIR] [--datasets NAME ...] MODEL [MODEL ...]

MODEL is NAME:VERSION from the registry. Prints a table and, with ``--json``, writes
the scores; with ``--card``, each model's card gets them (``registry.add_record``),
the second model's with the release rule's verdict against the first. Reads only
the val splits.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import numpy as np
import torch

from models import registry
from models.metrics import PixelCounts, ToleranceCounts
from models.train import DATASETS, crack_probability, default_data_root, load_splits

SURVEY_LIKE = ("paveseg_preview", "gaps384", "aiglern", "uav_crackx", "crack500")


def evaluate_net(
    net: torch.nn.Module,
    threshold: float,
    data_root: Path,
    datasets: tuple[str, ...] = DATASETS,
    tolerance_px: float = 2.0,
) -> dict[str, dict]:
    """Crack scores per dataset's val split at ``threshold``.

    Returns:
        ``{dataset: {"f1", "precision", "recall", "miou", "crack_iou",
        "f1_tol", "precision_tol", "recall_tol", "tolerance_px", "images"}}``.
    """
    net = net.eval()
    scores = {}
    for split in load_splits(data_root, datasets, "val", refine=False):
        exact, tolerant = PixelCounts(), ToleranceCounts(tolerance_px)
        background = np.zeros(BACKGROUND_BINS, np.int64)  # histogram of the background's probabilities
        for sample in split.samples:
            truth = sample.mask.astype(bool)
            probability = crack_probability(net, sample.image, torch.device("cpu"))
            pred = probability >= threshold
            exact.add(pred, truth)
            tolerant.add(pred, truth)
            background += np.histogram(probability[~truth], BACKGROUND_BINS, (0.0, 1.0))[0]
        e, t = exact.scores(), tolerant.scores()
        scores[split.name] = {
            "f1": e["f1"],
            "precision": e["precision"],
            "recall": e["recall"],
            "miou": e["miou"],
            "crack_iou": e["crack_iou"],
            "f1_tol": t["f1"],
            "precision_tol": t["precision"],
            "recall_tol": t["recall"],
            "tolerance_px": tolerance_px,
            "images": len(split),
            "background_median": median_of(background),
        }
    return scores


BACKGROUND_BINS = 1024


def median_of(histogram: np.ndarray) -> float:
    """The median of values in [0, 1] binned in ``histogram`` (the upper edge of its bin).

    >>> median_of(np.array([0, 3, 1, 0]))
    0.5
    """
    cumulative = np.cumsum(histogram)
    if cumulative[-1] == 0:
        return float("nan")
    return float((np.searchsorted(cumulative, cumulative[-1] / 2) + 1) / len(histogram))


def evaluate_entry(
    entry: registry.ModelEntry, data_root: Path, datasets: tuple[str, ...] = DATASETS
) -> dict[str, dict]:
    """:func:`evaluate_net` for a registry version, at its card's threshold."""
    from models.onnx_export import load_net

    return evaluate_net(load_net(entry.variant, entry.file("weights")), entry.threshold, data_root, datasets)


def beats(
    candidate: dict[str, dict], current: dict[str, dict], survey_like: tuple[str, ...] = SURVEY_LIKE
) -> tuple[bool, str]:
    """The release rule: higher mean val F1 over the common datasets and higher on every survey-like one.

    >>> beats({"a": {"f1": .6}, "gaps384": {"f1": .5}}, {"a": {"f1": .5}, "gaps384": {"f1": .4}})
    (True, 'mean F1 0.550 vs 0.450; gaps384 0.500 vs 0.400')
    >>> beats({"a": {"f1": .9}, "gaps384": {"f1": .3}}, {"a": {"f1": .5}, "gaps384": {"f1": .4}})[0]
    False
    """
    common = [name for name in candidate if name in current]
    mean_new = float(np.mean([candidate[n]["f1"] for n in common]))
    mean_old = float(np.mean([current[n]["f1"] for n in common]))
    survey = [n for n in survey_like if n in common]
    ok = mean_new > mean_old and all(candidate[n]["f1"] > current[n]["f1"] for n in survey)
    detail = "; ".join(
        [f"mean F1 {mean_new:.3f} vs {mean_old:.3f}"]
        + [f"{n} {candidate[n]['f1']:.3f} vs {current[n]['f1']:.3f}" for n in survey]
    )
    return ok, detail


def table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per dataset, F1 exact / at tolerance per model."""
    models = list(results)
    datasets = list(next(iter(results.values())))
    head = "| dataset | " + " | ".join(f"{m} F1 | {m} F1 @2px" for m in models) + " |"
    rule = "|---|" + "---|---|" * len(models)
    rows = [
        f"| {d} | "
        + " | ".join(f"{results[m][d]['f1']:.3f} | {results[m][d]['f1_tol']:.3f}" for m in models)
        + " |"
        for d in datasets
    ]
    means = (
        "| **mean** | "
        + " | ".join(
            f"{np.mean([results[m][d]['f1'] for d in datasets]):.3f} | "
            f"{np.mean([results[m][d]['f1_tol'] for d in datasets]):.3f}"
            for m in models
        )
        + " |"
    )
    return "\n".join([head, rule, *rows, means])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="NAME:VERSION")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--card", action="store_true", help="Add the scores to each model's card.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.data_root or default_data_root()
    results = {}
    for spec in args.models:
        try:
            entry = registry.resolve(spec)
        except registry.ModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        results[entry.spec] = evaluate_entry(entry, root, tuple(args.datasets))
    print(table(results))
    release = None
    if len(results) == 2:
        (old, old_scores), (new, new_scores) = results.items()
        ok, detail = beats(new_scores, old_scores)
        release = {
            "against": old,
            "beats": ok,
            "verdict": f"{'beats' if ok else 'does not beat'} it: {detail}",
        }
        print(f"\n{new} {release['verdict']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.card:
        return add_to_cards(results, release)
    return 0


def add_background(entry: registry.ModelEntry, scores: dict[str, dict]) -> registry.ModelEntry:
    """Record the crack probability the version gives plain road (``ModelEntry.background_probability``):
    the median over each val split's background pixels, the lowest of the splits.  Lines that
    grow down to it would take in at least half of every split's road, so the pipeline
    refuses line thresholds that would."""
    medians = {
        name: s["background_median"] for name, s in scores.items() if np.isfinite(s["background_median"])
    }
    record = {
        "probability": min(medians.values()),
        "per_dataset": medians,
        "what": "the median crack probability of the val splits' background pixels, the lowest of the splits",
    }
    print(f"{entry.spec}: background probability {record['probability']:.3f} added to its card")
    return registry.add_record(entry, "background", record)


def add_to_cards(results: dict[str, dict[str, dict]], release: dict | None) -> int:
    """Each model's scores into its card (the second's with the release verdict), and its background
    level where the card has none; a card that has scores already keeps them (a card section is
    never replaced), and says so."""
    for k, (spec, scores) in enumerate(results.items()):
        entry = registry.resolve(spec)
        if "background" not in entry.card:
            entry = add_background(entry, scores)
        if "evaluation" in entry.card:
            print(f"{spec}: its card has scores already; they are kept", file=sys.stderr)
            continue
        record = {
            "command": "python -m models.evaluate",
            "date": date.today().isoformat(),
            "datasets": scores,
            **({"release": release} if release and k == 1 else {}),
        }
        registry.add_record(entry, "evaluation", record)
        print(f"{spec}: scores added to its card")
    return 0


if __name__ == "__main__":
    sys.exit(main())
