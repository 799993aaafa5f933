"""The registry of versioned model artifacts.  Needs no torch.

A model version is a folder ``<root>/<name>/<version>/`` holding its files
(``weights.pt``, ``model.onnx``) and its model card: ``card.json`` for
programs, ``MODEL_CARD.md`` for people.  The card records the sha256 of every
file; a file that does not match is refused, never loaded.  Versions are
semantic (``1.0.0``); a version's files, once added, never change, so results
made with it can always be reproduced.  Files derived from its weights (an
INT8 graph, ``add_derived``) may be added later, hashed into the card like
the others, with how they were made.

Roots searched: the folders in ``CRACKMAP_MODELS`` (``os.pathsep``-separated),
then the models shipped in this package (``models/zoo``).  ``<root>/DEFAULT``
names the default model of a root as ``name:version``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

ZOO = Path(__file__).parent / "zoo"
CARD = "card.json"


class ModelError(LookupError):
    """A model is unknown, or one of its files does not match its card."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@cache
def _verified(path: Path, size: int, mtime_ns: int, expected: str) -> bool:
    return sha256_file(path) == expected


def version_key(version: str) -> tuple[int, ...]:
    """Sort key of a semantic version.

    >>> sorted(["1.10.0", "1.2.0", "2.0.0"], key=version_key)
    ['1.2.0', '1.10.0', '2.0.0']
    """
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise ModelError(f"model version {version!r} is not semantic (like 1.0.0)") from None


@dataclass(frozen=True)
class ModelEntry:
    """One version of one model, with its card."""

    name: str
    version: str
    folder: Path
    card: dict = field(repr=False, compare=False)

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def variant(self) -> str:
        return self.card["variant"]

    @property
    def threshold(self) -> float:
        return float(self.card["threshold"])

    @property
    def line_settings(self) -> dict:
        """How this version's probabilities become crack lines, where they were chosen for it on
        val scenes (``threshold``, ``low_ratio``; ``benchmarks/vector_accuracy.py --choose``);
        empty where they were not (the pixel threshold and the vectorizer's defaults apply)."""
        chosen = self.card.get("vectorize") or {}
        return {key: float(chosen[key]) for key in ("threshold", "low_ratio") if key in chosen}

    @property
    def background_probability(self) -> float | None:
        """The crack probability this version gives plain road, where measured (the median over
        val background pixels, ``python -m models.evaluate --card``); None where not."""
        background = self.card.get("background") or {}
        return float(background["probability"]) if "probability" in background else None

    @property
    def size_px(self) -> int:
        return int(self.card["input"]["size_px"])

    @property
    def sha256(self) -> str:
        """The identity of this version: sha256 of its weights file."""
        return self.card["files"]["weights"]["sha256"]

    def file(self, role: str) -> Path:
        """Path of a file (``weights`` or ``onnx``), after checking its sha256 against the card."""
        files = self.card["files"]
        if role not in files:
            raise ModelError(f"{self.spec} has no {role} file; it has {sorted(files)}")
        path = self.folder / files[role]["path"]
        if not path.is_file():
            raise ModelError(f"{self.spec}: {path} is missing")
        stat = path.stat()
        if not _verified(path, stat.st_size, stat.st_mtime_ns, files[role]["sha256"]):
            raise ModelError(
                f"{self.spec}: {path} does not match the sha256 in its model card; "
                "refusing to load it (the file was changed or damaged)"
            )
        return path


def roots() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("CRACKMAP_MODELS", "").split(os.pathsep) if p]
    return [*extra, ZOO]


def list_models() -> list[ModelEntry]:
    """Every model version in every root, sorted by name and version."""
    entries = {}
    for root in reversed(roots()):  # earlier roots win
        for card_path in sorted(root.glob(f"*/*/{CARD}")):
            card = json.loads(card_path.read_text())
            entry = ModelEntry(card["name"], card["version"], card_path.parent, card)
            entries[entry.spec] = entry
    return sorted(entries.values(), key=lambda e: (e.name, version_key(e.version)))


def default_spec() -> str:
    for root in roots():
        marker = root / "DEFAULT"
        if marker.is_file():
            return marker.read_text().strip()
    raise ModelError(f"no default model: none of {[str(r) for r in roots()]} has a DEFAULT file")


def resolve(spec: str | None = None) -> ModelEntry:
    """The model named ``name:version``, ``name`` (its newest version), or the default.

    Raises:
        ModelError: no such model or version; the message lists what exists.
    """
    spec = spec or default_spec()
    name, _, version = spec.partition(":")
    entries = [e for e in list_models() if e.name == name]
    if not entries:
        known = sorted({e.name for e in list_models()})
        raise ModelError(f"unknown model {name!r}; known models: {known}")
    if not version:
        return entries[-1]
    for entry in entries:
        if entry.version == version:
            return entry
    raise ModelError(f"{name} has no version {version!r}; versions: {[e.version for e in entries]}")


def add(root: Path, card: dict, files: dict[str, Path], default: bool = False) -> ModelEntry:
    """Add a new model version to ``root``: copy its files, hash them, write its card.

    ``card`` holds everything but ``files`` and ``created``; it must name
    ``name``, ``version`` and ``variant``.  An existing version is never
    overwritten.
    """
    version_key(card["version"])
    folder = Path(root) / card["name"] / card["version"]
    if folder.exists():
        raise ModelError(
            f"{card['name']}:{card['version']} already exists in {root}; "
            "versions are immutable, add a new version instead"
        )
    folder.mkdir(parents=True)
    card = dict(card, created=card.get("created") or datetime.now(UTC).isoformat(timespec="seconds"))
    card["files"] = {}
    for role, source in files.items():
        target = folder / {"weights": "weights.pt", "onnx": "model.onnx"}.get(role, Path(source).name)
        shutil.copyfile(source, target)
        card["files"][role] = {
            "path": target.name,
            "sha256": sha256_file(target),
            "bytes": target.stat().st_size,
        }
    (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    (folder / "MODEL_CARD.md").write_text(render_card(card))
    if default:
        (Path(root) / "DEFAULT").write_text(f"{card['name']}:{card['version']}\n")
    return ModelEntry(card["name"], card["version"], folder, card)


def add_derived(entry: ModelEntry, role: str, source: Path, section: str, record: dict) -> ModelEntry:
    """Add a file derived from a version's weights (an INT8 graph) to that version.

    The version's existing files never change; the new file is hashed into the
    card like them, with ``record`` (how it was made, its metrics) under
    ``card[section]``.  A role that exists is never replaced.
    """
    if role in entry.card["files"]:
        raise ModelError(f"{entry.spec} already has a {role} file; versions are immutable")
    if section in entry.card:
        raise ModelError(f"{entry.spec}'s card already has '{section}'; a card section is never replaced")
    target = entry.folder / Path(source).name
    shutil.copyfile(source, target)
    files = {
        **entry.card["files"],
        role: {"path": target.name, "sha256": sha256_file(target), "bytes": target.stat().st_size},
    }
    return _write_card(entry, dict(entry.card, files=files, **{section: record}))


def add_record(entry: ModelEntry, section: str, record: dict) -> ModelEntry:
    """Add a measurement of a version's files (val scores, vector accuracy) to its card.

    Files never change; a card section, once written, is never replaced: measure
    again into a new version instead.
    """
    if section in entry.card:
        raise ModelError(f"{entry.spec}'s card already has '{section}'; a card section is never replaced")
    return _write_card(entry, dict(entry.card, **{section: record}))


def _write_card(entry: ModelEntry, card: dict) -> ModelEntry:
    """Both forms of the card, each replaced whole; rendered first, so a record that cannot be
    shown is refused before anything is written."""
    text, markdown = json.dumps(card, indent=2, allow_nan=False) + "\n", render_card(card)
    for name, content in ((CARD, text), ("MODEL_CARD.md", markdown)):
        staged = entry.folder / f".{name}.tmp"
        staged.write_text(content)
        os.replace(staged, entry.folder / name)
    return ModelEntry(entry.name, entry.version, entry.folder, card)


def render_card(card: dict) -> str:
    """The human-readable model card."""
    lines = [
        f"# {card['name']} {card['version']}",
        "",
        card.get("summary", ""),
        "",
        "| | |",
        "|---|---|",
        f"| variant | HrSegNet-{card['variant'].upper()} |",
        f"| created | {card['created']} |",
        f"| input | {card['input']['size_px']}x{card['input']['size_px']} RGB chips, "
        f"0-255, scaled to [0,1], normalized with mean {card['input']['mean']}, "
        f"std {card['input']['std']} |",
        f"| threshold | {card['threshold']:.3f} (crack probability; F1-optimal on validation) |",
    ]
    if card.get("rebuilt_from"):
        lines.append(
            f"| rebuilt from | {card['rebuilt_from']['spec']}: the same weights file, the current "
            "exporter's inference graph |"
        )
    lines += [
        "",
        "## Files",
        "",
        "| file | sha256 | bytes |",
        "|---|---|---|",
    ]
    lines += [f"| {f['path']} | `{f['sha256']}` | {f['bytes']} |" for f in card["files"].values()]
    metrics = card.get("metrics") or {}
    if metrics:
        lines += [
            "",
            "## Validation metrics",
            "",
            "| dataset | mIoU (2-class) | crack IoU | F1 | precision | recall |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {m['miou']:.3f} | {m['crack_iou']:.3f} | {m['f1']:.3f} | "
            f"{m['precision']:.3f} | {m['recall']:.3f} |"
            for name, m in metrics.items()
        ]
    if card.get("evaluation"):
        lines += ["", render_evaluation(card["evaluation"])]
    if card.get("vector_accuracy"):
        lines += ["", "## Vector accuracy on val scenes", "", render_vector_accuracy(card["vector_accuracy"])]
    if card.get("background"):
        lines += [
            "",
            "## Background",
            "",
            f"Plain road comes out near crack probability {card['background']['probability']:.3f} "
            f"({card['background']['what']}); crackmap refuses a line threshold whose lines would "
            "grow down to it.",
        ]
    if card.get("vectorize"):
        chosen = card["vectorize"]
        lines += [
            "",
            "## Crack lines",
            "",
            f"Lines are traced at crack probability {chosen['threshold']:.3f}, and grow down to "
            f"{chosen['low_ratio']:g} x that (hysteresis): chosen on the val scenes of the vector "
            f"accuracy benchmark ({chosen['command']}; {chosen['date']}): {chosen['rule']}",
        ]
    if card.get("int8"):
        lines += ["", "## INT8 graph (CPUs)", "", render_int8(card["int8"])]
    for title, key in (("Training data", "data"), ("Training recipe", "recipe")):
        if card.get(key):
            lines += ["", f"## {title}", "", "```json", json.dumps(card[key], indent=2), "```"]
    lines += ["", "## License", "", card.get("license", {}).get("text", "not stated"), ""]
    return "\n".join(lines)


def render_int8(record: dict) -> str:
    """The INT8 section of the human-readable model card."""
    verdict = (
        "passes the gate: CPUs run it where it measures faster than the float graph"
        if record["accepted"]
        else "fails the gate: CPUs run the float graph"
    )
    lines = [
        f"`{record['path']}`: static INT8 quantization ({record['calibration']['format']}, "
        f"{record['calibration']['chips']} calibration chips from the {record['calibration']['split']} "
        f"splits). Mean val crack F1 {record['mean_f1']:.4f} against {record['fp32_mean_f1']:.4f} "
        f"for the float graph (drop {record['f1_drop']:.4f}; gate {record['max_f1_drop']}): "
        f"{verdict}. Masks agree with the float graph's on {record['mask_agreement']:.4%} "
        "of val pixels.",
        "",
        "| dataset | F1 float | F1 INT8 |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {record['fp32_metrics'][name]['f1']:.4f} | {m['f1']:.4f} |"
        for name, m in record["metrics"].items()
    ]
    if record.get("speed"):
        speed = record["speed"]
        lines += [
            "",
            f"Measured when quantized ({speed['machine']}): float {speed['fp32_chips_per_s']} "
            f"chips/s, INT8 {speed['int8_chips_per_s']} chips/s, one thread.",
        ]
    return "\n".join(lines)


def render_evaluation(record: dict) -> str:
    """The card's val scores section (``python -m models.evaluate --card``): F1 exact and with a tolerance."""
    scores = record["datasets"]
    tol = next(iter(scores.values()))["tolerance_px"]
    lines = [
        f"## Val scores, pixel-exact and at {tol:g} px",
        "",
        f"Whole val images at the card's threshold ({record['command']}; {record['date']}). Crack F1 "
        f"pixel-exact and with a {tol:g} px tolerance, as papers report both kinds.",
        "",
        f"| dataset | images | F1 | F1 @{tol:g}px | precision | recall |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {s['images']} | {s['f1']:.3f} | {s['f1_tol']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} |"
        for name, s in scores.items()
    ]
    mean = sum(s["f1"] for s in scores.values()) / len(scores)
    mean_tol = sum(s["f1_tol"] for s in scores.values()) / len(scores)
    lines.append(f"| **mean** | | **{mean:.3f}** | **{mean_tol:.3f}** | | |")
    if record.get("release"):
        lines += ["", f"Release rule against {record['release']['against']}: {record['release']['verdict']}."]
    return "\n".join(lines)


def render_vector_accuracy(record: dict) -> str:
    """The card's vector accuracy (``benchmarks/vector_accuracy.py --card``): crack lines against true skeletons."""
    lines = [
        f"Crack lines of the whole pipeline against the skeletons of the true masks, on georeferenced "
        f"scenes tiled from val images ({record['command']}; {record['date']}; vectorizing: "
        f"{record['vectorizing']}). Targets: F1 >= 0.75 and total length 0.8-1.25x of the truth "
        "on every scene.",
        "",
        f"| scene | F1 @{record['tolerance_px']:g}px | precision | recall | length ratio | "
        "thin / medium / wide |",
        "|---|---|---|---|---|---|",
    ]
    for scene in record["scenes"]:
        by_width = " / ".join(
            "-" if r is None else f"{r:.2f}" for r in scene["length_ratio_by_width"].values()
        )
        ratio = "-" if scene["length_ratio"] is None else f"{scene['length_ratio']:.2f}"
        lines.append(
            f"| {scene['scene']} | {scene['f1']:.3f} | {scene['precision']:.3f} | {scene['recall']:.3f} | "
            f"{ratio} | {by_width} |"
        )
    return "\n".join(lines)
