"""Train HrSegNet on the crack datasets (``crackmap train``).

Recipe (after the published HrSegNet / PaddleSeg configuration): SGD with
momentum 0.9 and weight decay 5e-4, learning rate 0.01 with a linear warm-up
over the first 3 % of iterations, then polynomial decay (power 0.9) to 0 at the
last iteration; OHEM cross-entropy (probability threshold 0.7, at least 1/16 of
the batch pixels kept, ignore index 255) on the main head, plain cross-entropy on
the two auxiliary heads (``--ohem-heads all`` puts OHEM on all three, as the
reference does, at 20-40 % more time per step), weighted 1 / 0.5 / 0.5.
Augmentation: see :class:`models.data.Augment`.

Data: the union of the ``train`` splits of the chosen datasets, sampled by
domain, not by file count (:class:`models.data.BalancedSampler` with
:data:`DATASET_WEIGHTS`): every round of draws takes a fixed number of crops
of each dataset, more of the survey-like ones. Tile datasets become mosaic
crops; a share of crops is centred on crack pixels and on hard negatives
(joints, sealed cracks, planking; see :data:`models.data.MULTICLASS`).

Speed on CPUs: all cores by default; on CPUs with AVX512-BF16 or AMX the
forward and backward passes run under bf16 autocast with channels-last
tensors (1.4-2x fewer CPU-seconds per step); elsewhere fp32. The choice is
part of the recipe, so a run resumes with the precision it started with.

Model selection: after every validation, whole images of each dataset's ``val``
split are segmented; the F1-optimal threshold is found on the pooled val pixels
of all datasets, and the checkpoint with the highest mean over datasets of crack
F1 at that threshold is kept as ``best.pt``.

Outputs in ``--out``: ``last.pt`` (for resuming), ``best.pt``, ``metrics.jsonl``
and ``config.json``. Both checkpoints hold the full training state (model,
optimizer, iteration, RNG state); the data order is a pure function of the seed
and the iteration, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import data as crackdata
from models import hrsegnet
from models.metrics import PixelCounts, ThresholdSweep

log = logging.getLogger(__name__)

DATASETS = (
    "deepcrack",
    "crackforest_cfd",
    "paveseg_preview",
    "uav75",
    "gaps384",
    "aiglern",
    "crack500",
    "shadowcrack",
    "uav_crackx",
    "uav_kaggle",
    "sut_crack",
    "crack_sc",
)
# Crops per sampling round of each dataset: balanced by domain, survey-like data (vehicle and
# drone views of real roads) weighted up, the concrete-structure set (not pavement) down.
DATASET_WEIGHTS = {
    "paveseg_preview": 3,
    "gaps384": 3,
    "aiglern": 3,
    "uav_crackx": 3,
    "crack500": 3,
    "deepcrack": 2,
    "shadowcrack": 2,
    "uav_kaggle": 2,
    "crackforest_cfd": 1,
    "sut_crack": 1,
    "crack_sc": 1,
    "uav75": 1,
}
CHECKPOINT_FORMAT = "crackmap-hrsegnet-checkpoint/1"
# Config fields that change the training trajectory; a resume must not change them.
RECIPE_FIELDS = (
    "variant",
    "datasets",
    "dataset_weights",
    "iters",
    "batch_size",
    "crop_px",
    "scale_min",
    "scale_max",
    "scale_step",
    "jitter",
    "focus_crack",
    "focus_hard_negative",
    "mosaic_below_px",
    "lr",
    "momentum",
    "weight_decay",
    "warmup_fraction",
    "power",
    "ohem_thresh",
    "ohem_min_kept_fraction",
    "ohem_heads",
    "aux_weights",
    "avg_pool",
    "precision",
    "seed",
    "init",
)
PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_bf16() -> bool:
    """True if this CPU computes bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo.

    Other systems (no /proc/cpuinfo) answer False: fp32 is the safe choice there.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``auto`` -> ``bf16`` on CPUs with native bf16, else ``fp32`` (CUDA: ``fp32``, as tested)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device == "cpu" and cpu_has_bf16() else "fp32"


def default_data_root() -> Path:
    """``$CRACKMAP_DATA``, else ``../shared/data/cracks`` relative to the current directory.

    Kept as given (not made absolute): it is recorded in the model card, which must not
    carry one machine's file system layout.
    """
    return Path(os.environ.get("CRACKMAP_DATA", "../shared/data/cracks"))


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything a training run depends on; written to ``config.json`` next to its outputs."""

    out: Path
    data_root: Path = field(default_factory=default_data_root)
    datasets: tuple[str, ...] = DATASETS
    dataset_weights: tuple[int, ...] | None = None  # None: DATASET_WEIGHTS (1 where absent)
    variant: str = "b16"
    iters: int = 10_000
    batch_size: int = 8
    crop_px: int = 400
    scale_min: float = 0.5
    scale_max: float = 2.0
    scale_step: float = 0.25
    jitter: float = 0.4
    focus_crack: float = 0.3
    focus_hard_negative: float = 0.3
    mosaic_below_px: int = 280
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.03
    power: float = 0.9
    ohem_thresh: float = 0.7
    ohem_min_kept_fraction: float = 1 / 16
    ohem_heads: str = "main"  # "main" or "all"
    aux_weights: tuple[float, float] = (0.5, 0.5)
    avg_pool: str = "exclusive"  # "exclusive" as the reference; "inclusive" as 1.0.0
    precision: str = "auto"  # auto | bf16 | fp32; resolved when the run starts
    seed: int = 0
    val_every: int | None = None  # None: every 10 % of iters
    checkpoint_every: int = 250
    log_every: int = 50
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_minutes: float | None = None
    resume: Path | None = None
    stop_at: int | None = None  # stop after this iteration (schedule unchanged)
    device: str = "auto"
    # start from these weights (a registry NAME:VERSION or a weights file), not at random: a new
    # schedule from a trained network.  Recorded in the recipe with the weights' sha256.
    init: str | None = None

    def validation_interval(self) -> int:
        """Iterations between validations."""
        return self.val_every or max(1, self.iters // 10)

    def augment(self) -> crackdata.Augment:
        """The augmentation settings of this run."""
        return crackdata.Augment(
            crop_px=self.crop_px,
            scale_min=self.scale_min,
            scale_max=self.scale_max,
            scale_step=self.scale_step,
            brightness=self.jitter,
            contrast=self.jitter,
            saturation=self.jitter,
            focus_crack=self.focus_crack,
            focus_hard_negative=self.focus_hard_negative,
            mosaic_below_px=self.mosaic_below_px,
        )

    def weights(self) -> tuple[int, ...]:
        """Crops per sampling round of each dataset."""
        weights = self.dataset_weights or tuple(DATASET_WEIGHTS.get(name, 1) for name in self.datasets)
        if len(weights) != len(self.datasets) or min(weights) < 1:
            raise ValueError(
                f"dataset_weights {weights} must be one whole number >= 1 per dataset ({len(self.datasets)})"
            )
        return tuple(int(w) for w in weights)

    def recipe(self) -> dict:
        """All hyperparameters, JSON-ready (``precision`` as resolved for this machine)."""
        recipe = {name: _jsonable(getattr(self, name)) for name in RECIPE_FIELDS}
        recipe.update(
            dataset_weights=list(self.weights()),
            precision=resolve_precision(self.precision, resolve_device(self.device).type),
            init=init_record(self.init) if self.init else None,
        )
        heads = "main head" if self.ohem_heads == "main" else "main + 2 aux heads"
        recipe.update(
            optimizer="SGD",
            lr_schedule="linear warm-up, then poly decay to 0",
            warmup_iters=warmup_iters(self),
            loss=f"OHEM cross-entropy on the {heads}, plain cross-entropy on the others; "
            "weights 1 + aux_weights",
            ignore_index=crackdata.IGNORE_INDEX,
            flip=True,
            pad_image=0,
            sampling="by domain: dataset_weights crops of each dataset per round",
            validation="whole images, val split; threshold F1-optimal on pooled val pixels",
        )
        return recipe


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# --------------------------------------------------------------------------- loss and schedule


def ohem_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = crackdata.IGNORE_INDEX,
) -> torch.Tensor:
    """Online hard example mining cross-entropy (PaddleSeg ``OhemCrossEntropyLoss``).

    Keeps the pixels whose probability of the true class is below ``thresh``;
    if those are fewer than ``min_kept``, keeps the ``min_kept`` hardest pixels.

    Args:
        logits: (N, C, H, W) class logits.
        target: (N, H, W) int64 class indices, ``ignore_index`` where unlabelled.
        thresh: Probability threshold for "hard".
        min_kept: Least number of pixels kept.
        ignore_index: Label of unlabelled pixels.

    Returns:
        Scalar mean loss over the kept pixels (0 when nothing is labelled).
    """
    pixel_loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    losses = pixel_loss.flatten()[target.flatten() != ignore_index]
    if losses.numel() == 0:
        return logits.sum() * 0.0
    prob = torch.exp(-losses.detach())
    if 0 < min_kept < prob.numel():
        kth = torch.kthvalue(prob, min_kept).values
        losses = losses[prob <= torch.clamp(kth, min=thresh)]
    return losses.mean()


def plain_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels (0 when nothing is labelled)."""
    if not bool((target != crackdata.IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=crackdata.IGNORE_INDEX)


def total_loss(outputs: list[torch.Tensor], target: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Weighted loss of the main head and the auxiliary heads, in fp32 whatever the compute precision.

    OHEM on the main head (all heads with ``ohem_heads="all"``); plain
    cross-entropy elsewhere.
    """
    if config.ohem_heads not in ("main", "all"):
        raise ValueError(f"ohem_heads must be 'main' or 'all', not {config.ohem_heads!r}")
    min_kept = int(target.numel() * config.ohem_min_kept_fraction)
    weights = (1.0, *config.aux_weights)
    total: torch.Tensor | float = 0.0
    for head, (weight, logits) in enumerate(zip(weights, outputs)):
        logits = logits.float()
        if head == 0 or config.ohem_heads == "all":
            total = total + weight * ohem_cross_entropy(logits, target, config.ohem_thresh, min_kept)
        else:
            total = total + weight * plain_cross_entropy(logits, target)
    assert isinstance(total, torch.Tensor)  # the main head's loss at least
    return total


def warmup_iters(config: TrainConfig) -> int:
    """Number of linear warm-up iterations."""
    return round(config.iters * config.warmup_fraction)


def learning_rate(iteration: int, config: TrainConfig) -> float:
    """Learning rate of 0-based ``iteration``: linear warm-up, then poly decay.

    >>> config = TrainConfig(out=Path("."), iters=100, lr=0.01)
    >>> [round(learning_rate(i, config), 5) for i in (0, 2, 3, 99)]
    [0.00333, 0.01, 0.01, 0.00016]
    """
    warmup = warmup_iters(config)
    if iteration < warmup:
        return config.lr * (iteration + 1) / warmup
    progress = (iteration - warmup) / max(1, config.iters - warmup)
    return config.lr * max(0.0, 1.0 - progress) ** config.power


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay on all parameters."""
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def to_tensors(
    images: np.ndarray, masks: np.ndarray, device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W, 3) uint8 and (N, H, W) uint8 -> float [0, 1] NCHW and int64 NHW."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.from_numpy(masks).to(device).long()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format), y


def autocast(precision: str, device: torch.device):
    """bf16 autocast for ``precision == "bf16"``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    masks: torch.Tensor,
    iteration: int,
    config: TrainConfig,
    precision: str = "fp32",
) -> float:
    """One SGD step at the scheduled learning rate; returns the loss.

    ``precision="bf16"`` runs forward and backward under bf16 autocast; the
    weights, the optimizer and the loss stay fp32.
    """
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(iteration, config)
    model.train()
    with autocast(precision, images.device):
        outputs = model(images)
    loss = total_loss(outputs, masks, config)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"training loss is {loss.item()} at iteration {iteration}; lower --lr or check the data"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- data


def load_splits(
    root: Path, names: tuple[str, ...], split: str, refine: bool = True
) -> tuple[crackdata.CrackSplit, ...]:
    """Decode ``root/<name>/<split>`` for every dataset name (``refine``: see ``load_split``).

    Raises:
        FileNotFoundError: If a dataset split folder is missing.
    """
    splits = []
    for name in names:
        folder = Path(root) / name / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{folder} does not exist; set --data-root (or $CRACKMAP_DATA) "
                f"to the folder holding {', '.join(names)}"
            )
        splits.append(crackdata.load_split(folder, name, refine=refine))
    return tuple(splits)


def dataset_licences(root: Path, names: tuple[str, ...]) -> dict[str, str | None]:
    """Short licence per dataset from the data root's README table (None where absent)."""
    readme = Path(root) / "README.md"
    rows = readme.read_text(encoding="utf-8").splitlines() if readme.is_file() else []
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows if row.startswith("|")]
    found = {row[0]: row[-1] for row in cells if len(row) > 1}
    return {name: found.get(name) for name in names}


def data_summary(config: TrainConfig, train: tuple, val: tuple) -> dict:
    """Dataset names, splits, image counts and licences, for the checkpoint."""
    return {
        "root": str(config.data_root),
        "splits": {"train": "train", "val": "val"},
        "datasets": {t.name: {"train": len(t), "val": len(v)} for t, v in zip(train, val)},
        "sampling": "by domain: " + ", ".join(f"{n} x{w}" for n, w in zip(config.datasets, config.weights())),
        "hard_negatives": {
            name: {"ignore": list(rule.ignore), "hard_negative": list(rule.hard_negative)}
            for name, rule in crackdata.MULTICLASS.items()
            if name in config.datasets
        },
        "licences": dataset_licences(config.data_root, config.datasets),
    }


# --------------------------------------------------------------------------- validation


@torch.inference_mode()
def crack_probability(model: torch.nn.Module, image: np.ndarray, device: torch.device) -> np.ndarray:
    """Whole-image crack probability (H, W) float32 of one (H, W, 3) uint8 image."""
    x = torch.tensor(image, device=device).permute(2, 0, 1)[None].float().div_(255.0)
    return torch.softmax(model(x), dim=1)[0, 1].float().cpu().numpy()


def validate(
    model: torch.nn.Module, splits: tuple[crackdata.CrackSplit, ...], device: torch.device
) -> dict[str, tuple[PixelCounts, ThresholdSweep]]:
    """Counts at probability 0.5 and a threshold sweep per dataset (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    results = {}
    for split in splits:
        counts, sweep = PixelCounts(), ThresholdSweep()
        for sample in split.samples:
            prob, truth = crack_probability(model, sample.image, device), sample.mask.astype(bool)
            counts.add(prob >= 0.5, truth)
            sweep.add(prob, truth)
        results[split.name] = (counts, sweep)
    model.train(was_training)
    return results


SCORE_KEYS = ("miou", "crack_iou", "f1", "precision", "recall")


def summarise_validation(results: dict[str, tuple[PixelCounts, ThresholdSweep]]) -> dict:
    """Pooled F1-optimal threshold, per-dataset scores at it, and the selection score.

    Returns:
        Dict with ``threshold``, ``score`` (mean over datasets of crack F1 at the
        threshold), ``val_metrics`` (per dataset, at the threshold) and
        ``diagnostics`` (per dataset: scores at 0.5 and its own best threshold).
    """
    pooled = ThresholdSweep()
    for _, sweep in results.values():
        pooled = pooled + sweep
    threshold, pooled_scores = pooled.best_f1()
    val_metrics, diagnostics = {}, {}
    for name, (counts, sweep) in results.items():
        at_threshold = sweep.scores_at(threshold)
        val_metrics[name] = {key: at_threshold[key] for key in SCORE_KEYS}
        own_threshold, own_scores = sweep.best_f1()
        diagnostics[name] = {
            "at_0.5": {key: counts.scores()[key] for key in SCORE_KEYS},
            "own_best_threshold": own_threshold,
            "own_best_f1": own_scores["f1"],
        }
    score = float(np.mean([m["f1"] for m in val_metrics.values()]))
    return {
        "threshold": threshold,
        "score": score,
        "pooled_f1": pooled_scores["f1"],
        "val_metrics": val_metrics,
        "diagnostics": diagnostics,
    }


# --------------------------------------------------------------------------- checkpoints


def model_card(config: TrainConfig, model: hrsegnet.HrSegNet, device: torch.device) -> dict:
    """Git-free metadata for a model card."""
    return {
        "architecture": "HrSegNet (Li et al., Automation in Construction 2023)",
        "variant": config.variant,
        "base_channels": model.base,
        "avg_pool": config.avg_pool,
        "parameters": sum(p.numel() for p in model.parameters()),
        "in_channels": 3,
        "classes": ["background", "crack"],
        "input": "RGB float32 NCHW in [0, 1]; normalised inside the model",
        "mean": list(hrsegnet.MEAN),
        "std": list(hrsegnet.STD),
        "output": "class logits at input size; crack probability = softmax(logits, 1)[:, 1]",
        "decision": "crack where crack probability >= threshold",
        "selection": "highest mean over val datasets of crack F1 at the pooled F1-optimal threshold",
        "software": {
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "numpy": np.__version__,
        },
        "device": str(device),
        "threads": torch.get_num_threads(),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically (temporary file, then rename) so a kill never leaves half a checkpoint."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If it is not a crackmap training checkpoint.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return payload


def init_weights(init: str) -> tuple[dict, dict]:
    """The state dict a run starts from, and its record: ``{"from", "sha256", "variant", "avg_pool"}``.

    ``init`` is a registry version (``NAME:VERSION``) or a file: a ``weights.pt`` or a
    training checkpoint.

    Raises:
        ValueError: Naming ``init`` when it is neither, or holds no weights.
    """
    path = Path(init)
    variant = avg_pool = None
    if not path.is_file():
        from models import registry

        try:
            entry = registry.resolve(init)
        except registry.ModelError as exc:
            raise ValueError(f"--init {init}: not a weights file, and {exc}") from None
        path, variant, avg_pool = entry.file("weights"), entry.variant, entry.card.get("avg_pool")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"--init {init}: {path} holds no network weights")
    record = {
        "from": init,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "variant": variant or payload.get("variant"),
        "avg_pool": avg_pool or payload.get("avg_pool") or "inclusive",  # files before the setting
    }
    return state, record


@functools.lru_cache(maxsize=4)
def init_record(init: str) -> dict:
    """The recipe's record of ``init`` (``init_weights``), read once per process: the recipe is
    written into every checkpoint."""
    return init_weights(init)[1]


def check_init(record: dict, config: TrainConfig) -> None:
    """Refuse weights of another variant or pooling than the run's.

    Raises:
        ValueError: Naming what differs.
    """
    wrong = [
        f"{key} {record[key]!r}, the run's {getattr(config, key)!r}"
        for key in ("variant", "avg_pool")
        if record[key] is not None and record[key] != getattr(config, key)
    ]
    if wrong:
        raise ValueError(f"--init {record['from']} does not fit this run: {'; '.join(wrong)}")


def check_resumable(payload: dict, config: TrainConfig, path: Path) -> None:
    """Refuse to resume with a different recipe (the run would not be reproducible).

    Raises:
        ValueError: Naming the checkpoint and every changed hyperparameter.
    """
    saved, current = payload["recipe"], config.recipe()
    changed = [
        f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in RECIPE_FIELDS if saved.get(k) != current[k]
    ]
    if changed:
        raise ValueError(
            f"cannot resume from {path}: the recipe changed ({'; '.join(changed)}). "
            "Resume with the original options or start a new --out folder."
        )


@dataclass
class RunState:
    """Mutable bookkeeping of a run, saved in every checkpoint."""

    iteration: int = 0
    train_seconds: float = 0.0
    best_score: float = -1.0
    best_iteration: int | None = None
    last_validation: dict | None = None


# --------------------------------------------------------------------------- the run


class _StopFlag:
    """Set by SIGTERM/SIGINT so the loop can save and stop cleanly."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("signal %s: stopping after this iteration and saving last.pt", signum)
        self.raised = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Holds the model, optimizer, data and bookkeeping of one run."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(config.seed)
        self.precision = resolve_precision(config.precision, self.device.type)
        self.channels_last = self.device.type == "cpu"
        self.model = hrsegnet.create(config.variant, **hrsegnet.pool_kwargs(config.avg_pool)).to(self.device)
        if self.channels_last:
            # nn.Module.to documents memory_format=; torch's overloads leave it out
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.optimizer = make_optimizer(self.model, config)
        self.state = RunState()
        started = time.monotonic()
        self.train_splits = load_splits(config.data_root, config.datasets, "train")
        self.val_splits = load_splits(config.data_root, config.datasets, "val", refine=False)
        log.info(
            "decoded %d train and %d val images in %.1f s",
            sum(map(len, self.train_splits)),
            sum(map(len, self.val_splits)),
            time.monotonic() - started,
        )
        self.sampler = crackdata.BalancedSampler(
            tuple(len(s) for s in self.train_splits), config.seed, config.weights()
        )
        self.augment = config.augment()
        self.data = data_summary(config, self.train_splits, self.val_splits)
        if config.resume is not None:
            self.restore(Path(config.resume))
        elif config.init:
            state, record = init_weights(config.init)
            check_init(record, config)
            self.model.load_state_dict(state)
            log.info("starting from the weights of %s (sha256 %s)", record["from"], record["sha256"][:12])

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, iteration, RNG and bookkeeping."""
        payload = load_checkpoint(path)
        check_resumable(payload, self.config, path)
        self.model.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["rng"]["torch"])
        run = payload["run"]
        self.state = RunState(
            iteration=payload["iteration"],
            train_seconds=payload["train_seconds"],
            best_score=run["best_score"],
            best_iteration=run["best_iteration"],
            last_validation=run["last_validation"],
        )
        log.info("resumed from %s at iteration %d", path, self.state.iteration)

    def payload(self, validation: dict | None) -> dict:
        """Checkpoint contents; ``validation`` fills threshold and val_metrics."""
        validation = validation or {}
        return {
            "format": CHECKPOINT_FORMAT,
            "state_dict": self.model.state_dict(),
            "variant": self.config.variant,
            "avg_pool": self.config.avg_pool,
            "precision": self.precision,
            "threshold": validation.get("threshold"),
            "val_metrics": validation.get("val_metrics"),
            "val_score": validation.get("score"),
            "iteration": self.state.iteration,
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "data_order": {
                "sampler": "BalancedSampler",
                "seed": self.config.seed,
                "next_sample": self.state.iteration * self.config.batch_size,
            },
            "run": {
                "best_score": self.state.best_score,
                "best_iteration": self.state.best_iteration,
                "last_validation": self.state.last_validation,
            },
            "recipe": self.config.recipe(),
            "data": self.data,
            "train_seconds": self.state.train_seconds,
            "model_card": model_card(self.config, self.model, self.device),
        }

    def log_event(self, event: str, **fields) -> None:
        """Append one JSON line to ``metrics.jsonl``."""
        record = {
            "event": event,
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
            "iteration": self.state.iteration,
            **fields,
        }
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")

    def step(self) -> float:
        """Train one iteration."""
        images, masks = crackdata.training_batch(
            self.train_splits, self.sampler, self.state.iteration, self.config.batch_size, self.augment
        )
        x, y = to_tensors(images, masks, self.device, self.channels_last)
        loss = train_step(self.model, self.optimizer, x, y, self.state.iteration, self.config, self.precision)
        self.state.iteration += 1
        return loss

    def validate(self) -> dict:
        """Validate, log, and save ``best.pt`` on improvement."""
        started = time.monotonic()
        summary = summarise_validation(validate(self.model, self.val_splits, self.device))
        summary["seconds"] = round(time.monotonic() - started, 2)
        self.state.last_validation = summary
        improved = summary["score"] > self.state.best_score
        if improved:
            self.state.best_score, self.state.best_iteration = summary["score"], self.state.iteration
        self.log_event("val", best=improved, **summary)
        log.info(
            "val @%d: mean F1 %.4f (threshold %.3f, pooled F1 %.4f) %s in %.1f s",
            self.state.iteration,
            summary["score"],
            summary["threshold"],
            summary["pooled_f1"],
            {k: round(v["f1"], 3) for k, v in summary["val_metrics"].items()},
            summary["seconds"],
        )
        if improved:
            save_checkpoint(self.out / "best.pt", self.payload(summary))
        return summary

    def save_last(self) -> None:
        """Write ``last.pt`` with the latest validation's threshold and metrics."""
        save_checkpoint(self.out / "last.pt", self.payload(self.state.last_validation))


def resolve_device(name: str) -> torch.device:
    """``auto`` means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _write_config(config: TrainConfig) -> None:
    record = {k: _jsonable(v) for k, v in asdict(config).items()}
    (Path(config.out) / "config.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


class _Clock:
    """Running estimates of step and validation time against an optional deadline."""

    def __init__(self, max_minutes: float | None) -> None:
        self.start = time.monotonic()
        self.deadline = None if max_minutes is None else self.start + 60.0 * max_minutes
        self.step_seconds = 0.0
        self.val_seconds = 0.0

    def record_step(self, seconds: float) -> None:
        self.step_seconds = seconds if not self.step_seconds else 0.9 * self.step_seconds + 0.1 * seconds

    def out_of_time(self, validation_due: bool) -> bool:
        """True when the next step (and a due validation) plus saving would pass the deadline."""
        if self.deadline is None:
            return False
        needed = 2 * self.step_seconds + (self.val_seconds if validation_due else 0.0) + 15.0
        return time.monotonic() + needed > self.deadline


def _loop(trainer: Trainer, config: TrainConfig, clock: _Clock, stop: _StopFlag) -> str:
    """Run iterations until done, stopped or out of time; returns why it ended."""
    end = min(config.iters, config.stop_at or config.iters)
    interval, losses = config.validation_interval(), []
    bar = tqdm(
        total=config.iters,
        initial=trainer.state.iteration,
        desc="train",
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    try:
        while trainer.state.iteration < end:
            upcoming = trainer.state.iteration + 1
            if stop.raised or clock.out_of_time(upcoming % interval == 0 or upcoming == config.iters):
                return "signal" if stop.raised else "time budget"
            started = time.monotonic()
            losses.append(trainer.step())
            clock.record_step(time.monotonic() - started)
            trainer.state.train_seconds += time.monotonic() - started
            bar.update(1)
            _after_step(trainer, config, clock, losses, bar)
        return "done" if trainer.state.iteration >= config.iters else "stop_at"
    finally:
        bar.close()


def _after_step(trainer: Trainer, config: TrainConfig, clock: _Clock, losses: list[float], bar) -> None:
    iteration = trainer.state.iteration
    if iteration % config.log_every == 0 or iteration == config.iters:
        mean_loss = float(np.mean(losses))
        bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
        trainer.log_event(
            "train",
            loss=mean_loss,
            lr=learning_rate(iteration - 1, config),
            step_seconds=round(clock.step_seconds, 4),
        )
        losses.clear()
    if iteration % config.validation_interval() == 0 or iteration == config.iters:
        started = time.monotonic()
        trainer.validate()
        clock.val_seconds = time.monotonic() - started
        trainer.state.train_seconds += clock.val_seconds
        trainer.save_last()
    elif iteration % config.checkpoint_every == 0:
        trainer.save_last()


def train(config: TrainConfig) -> Path:
    """Train (or resume) a run and return the path of its ``best.pt``.

    Args:
        config: The run configuration.

    Returns:
        ``config.out / "best.pt"`` (it exists once a validation has run).

    Raises:
        FileNotFoundError: If a dataset split or the resume checkpoint is missing.
        ValueError: On bad data (unpaired, wrong-size or non-binary masks) or a
            resume with a changed recipe.
    """
    torch.set_num_threads(config.threads)
    clock = _Clock(config.max_minutes)
    trainer = Trainer(config)
    _write_config(config)
    trainer.log_event(
        "resume" if config.resume else "start",
        recipe=config.recipe(),
        data=trainer.data,
        device=str(trainer.device),
        threads=config.threads,
        precision=trainer.precision,
    )
    with _StopFlag() as stop:
        reason = _loop(trainer, config, clock, stop)
    trainer.save_last()
    trainer.log_event(
        "end",
        reason=reason,
        train_seconds=round(trainer.state.train_seconds, 1),
        best_score=trainer.state.best_score,
        best_iteration=trainer.state.best_iteration,
    )
    log.info(
        "%s at iteration %d; best mean F1 %.4f at iteration %s; checkpoints in %s",
        reason,
        trainer.state.iteration,
        trainer.state.best_score,
        trainer.state.best_iteration,
        trainer.out,
    )
    if not (trainer.out / "best.pt").is_file():
        log.warning(
            "no validation has run yet, so %s/best.pt does not exist; resume to continue", trainer.out
        )
    return trainer.out / "best.pt"


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the training options to ``parser`` (shared with ``crackmap train``)."""
    defaults = TrainConfig(out=Path("runs/b16"))
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder with the datasets (default: $CRACKMAP_DATA or ../shared/data/cracks)",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=list(DATASETS),
        metavar="NAME",
        help=f"datasets to train and validate on (default: {' '.join(DATASETS)})",
    )
    parser.add_argument("--variant", default="b16", choices=sorted(hrsegnet.VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<variant>)")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="total iterations of the schedule")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--crop-px", type=int, default=defaults.crop_px, help="training crop side")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--val-every",
        type=int,
        default=None,
        help="iterations between validations (default: 10 %% of --iters)",
    )
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CHECKPOINT",
        help="resume from CHECKPOINT (default: <out>/last.pt)",
    )
    parser.add_argument(
        "--stop-at", type=int, default=None, help="stop after this iteration, schedule unchanged"
    )
    parser.add_argument(
        "--threads", type=int, default=defaults.threads, help="torch CPU threads (default: all cores)"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=defaults.precision,
        help="auto: bf16 autocast on CPUs with AVX512-BF16/AMX, else fp32",
    )
    parser.add_argument(
        "--ohem-heads",
        choices=("main", "all"),
        default=defaults.ohem_heads,
        help="heads with OHEM; the others get plain cross-entropy",
    )
    parser.add_argument(
        "--avg-pool",
        choices=hrsegnet.AVG_POOL,
        default=defaults.avg_pool,
        help="exclusive: padding left out of border averages (as the reference)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop cleanly (saving last.pt) before this wall-clock budget runs out",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda")
    parser.add_argument(
        "--init",
        default=None,
        metavar="NAME:VERSION|WEIGHTS",
        help="start from these weights (a registry version or a weights file) with a new schedule",
    )
    parser.add_argument(
        "--dataset-weights",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="crops per sampling round of each of --datasets, in order (default: models.train.DATASET_WEIGHTS)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a :class:`TrainConfig` from parsed :func:`add_arguments` options."""
    out = args.out or Path("runs") / args.variant
    resume = (
        None if args.resume is None else (out / "last.pt" if args.resume == "last" else Path(args.resume))
    )
    config = TrainConfig(
        out=out,
        datasets=tuple(args.datasets),
        variant=args.variant,
        iters=args.iters,
        batch_size=args.batch_size,
        crop_px=args.crop_px,
        lr=args.lr,
        seed=args.seed,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        threads=args.threads,
        max_minutes=args.max_minutes,
        resume=resume,
        stop_at=args.stop_at,
        device=args.device,
        precision=args.precision,
        ohem_heads=args.ohem_heads,
        avg_pool=args.avg_pool,
        init=args.init,
        dataset_weights=tuple(args.dataset_weights) if args.dataset_weights else None,
    )
    if args.data_root is not None:
        config = replace(config, data_root=args.data_root)
    return config


def run(args: argparse.Namespace) -> Path:
    """Run training from parsed options; returns the path of ``best.pt``."""
    return train(config_from_args(args))


def main(argv: list[str] | None = None) -> int:
    """``python -m models.train``."""
    parser = argparse.ArgumentParser(prog="crackmap train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    best = run(args)
    print(best)
    return 0


if __name__ == "__main__":
    sys.exit(main())
