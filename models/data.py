"""Crack segmentation datasets for training: loading, validation and augmentation.

A split folder holds ``images/`` (RGB .jpg/.png) and ``masks/`` (single-channel
PNG, 0 = background, 255 = crack, same stem and size as the image). A split is
decoded into memory once (the datasets are small).

Training samples are a pure function of ``(seed, sample number)``
(:class:`BalancedSampler`), so a run that resumes at iteration ``i`` sees exactly
the batches an uninterrupted run would: no data-order state needs saving.

Where a split also has ``masks_multiclass/`` (PaveSeg, UAV75), :data:`MULTICLASS`
says which original classes are left unlabelled (alligator cracking drawn as
areas, not lines) and which are *hard negatives*: structures that look like
cracks but are not (slab and expansion joints, sealed cracks, formwork
planking). Hard-negative pixels stay background; some training crops are
centred on them so the network sees them often.

Datasets of small crack-only tiles (gaps384, aiglern, crack500, shadowcrack)
are trained as mosaics: a crop is a grid of several tiles of the same dataset
(:func:`mosaic_crop`), so a crop holds more labelled pixels than padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IGNORE_INDEX = 255
MAX_FOCUS_POINTS = 2048  # crack / hard-negative pixel positions kept per image for centred crops


@dataclass(frozen=True, slots=True)
class MulticlassRule:
    """How a dataset's ``masks_multiclass/`` values refine its binary masks."""

    ignore: tuple[int, ...] = ()  # original classes left unlabelled in training
    hard_negative: tuple[int, ...] = ()  # original classes that are not cracks but look like them


MULTICLASS = {
    # 150 alligator crack is labelled as whole areas; 90 sealed crack, 180 utility cover and
    # 210 expansion joint are background that looks like cracks (see the dataset README).
    "paveseg_preview": MulticlassRule(ignore=(150,), hard_negative=(90, 180, 210)),
    # 1 = planking: formwork joints of the concrete structure.
    "uav75": MulticlassRule(hard_negative=(1,)),
}


@dataclass(frozen=True, slots=True)
class Sample:
    """One decoded image and its mask."""

    name: str  # file stem
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8, 0 = background, 1 = crack, IGNORE_INDEX = unlabelled
    crack_points: np.ndarray | None = None  # (K, 2) int32 (row, col) of some crack pixels
    hard_negative_points: np.ndarray | None = None  # (K, 2) int32 (row, col) of some hard negatives


@dataclass(frozen=True, slots=True)
class CrackSplit:
    """All samples of one split of one dataset, decoded."""

    name: str  # dataset name, e.g. "deepcrack"
    root: Path  # the split folder
    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True, slots=True)
class Augment:
    """Training augmentation, after the published HrSegNet (PaddleSeg) recipe.

    Random scale in ``[scale_min, scale_max]`` (in steps of ``scale_step``; 0 means
    continuous), random crop of ``crop_px`` (image padded with 0, mask with
    :data:`IGNORE_INDEX` where the scaled image is smaller), horizontal flip with
    probability 0.5, and brightness / contrast / saturation jitter, each applied
    with probability 0.5 with a factor in ``[1 - x, 1 + x]``.
    """

    crop_px: int = 400
    scale_min: float = 0.5
    scale_max: float = 2.0
    scale_step: float = 0.25
    flip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    focus_crack: float = 0.0  # probability that a crop is centred on a crack pixel
    focus_hard_negative: float = 0.0  # probability that a crop is centred on a hard negative
    mosaic_below_px: int = 0  # datasets whose median long side is below this are mosaics


def find_pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    """List (image, mask) paths of a split folder, paired by file stem.

    Args:
        split_dir: Folder with ``images/`` and ``masks/``.

    Returns:
        Pairs sorted by stem.

    Raises:
        FileNotFoundError: If ``images/`` or ``masks/`` is missing.
        ValueError: If some images have no mask or some masks no image (the
            message names them), or two images share a stem.
    """
    split_dir = Path(split_dir)
    image_dir, mask_dir = split_dir / "images", split_dir / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist; a split folder needs images/ and masks/")
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            if path.stem in images:
                raise ValueError(
                    f"{images[path.stem].name} and {path.name} in {image_dir} share a stem; "
                    "keep one image per mask"
                )
            images[path.stem] = path
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() == ".png"}
    unpaired = [f"images/{images[s].name}" for s in sorted(images.keys() - masks.keys())] + [
        f"masks/{masks[s].name}" for s in sorted(masks.keys() - images.keys())
    ]
    if unpaired:
        raise ValueError(
            f"unpaired files in {split_dir} (every image needs masks/<stem>.png and "
            f"every mask an image): {', '.join(unpaired)}"
        )
    if not images:
        raise ValueError(f"no images (.jpg/.png) in {image_dir}")
    return [(images[s], masks[s]) for s in sorted(images)]


def load_pair(image_path: Path, mask_path: Path) -> Sample:
    """Decode one image and its mask and check that they belong together.

    Raises:
        ValueError: If the mask's size differs from the image's, the mask is not
            single-channel, or it holds values other than 0 and 255.
    """
    with Image.open(image_path) as image_file:
        image = np.asarray(image_file.convert("RGB"))
    with Image.open(mask_path) as mask_file:
        if mask_file.mode not in ("L", "1", "P", "I", "I;16"):
            raise ValueError(f"{mask_path} has mode {mask_file.mode}; masks must be single-channel PNG")
        mask = np.asarray(mask_file.convert("L") if mask_file.mode == "1" else mask_file)
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} px but {image_path} is "
            f"{image.shape[1]}x{image.shape[0]} px; a mask must match its image's size"
        )
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 255}:
        raise ValueError(
            f"{mask_path} is not binary: it holds values {values[:10].tolist()}; "
            "masks must be 0 (background) and 255 (crack)"
        )
    return Sample(name=image_path.stem, image=image, mask=(mask == 255).astype(np.uint8))


def _points(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Up to :data:`MAX_FOCUS_POINTS` (row, col) positions of ``mask``, a seeded subset."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    keep = (
        rng.choice(rows.size, MAX_FOCUS_POINTS, replace=False)
        if rows.size > MAX_FOCUS_POINTS
        else slice(None)
    )
    return np.stack([rows[keep], cols[keep]], axis=1).astype(np.int32)


def apply_multiclass(sample: Sample, multiclass: np.ndarray, rule: MulticlassRule, path: Path) -> Sample:
    """Refine ``sample`` with its original class mask: unlabelled areas and hard negatives.

    Raises:
        ValueError: If the class mask's size differs from the image's.
    """
    if multiclass.shape != sample.mask.shape:
        raise ValueError(
            f"{path} is {multiclass.shape[1]}x{multiclass.shape[0]} px but its image is "
            f"{sample.mask.shape[1]}x{sample.mask.shape[0]} px"
        )
    mask = sample.mask.copy()
    mask[np.isin(multiclass, rule.ignore) & (mask == 0)] = IGNORE_INDEX
    hard = np.isin(multiclass, rule.hard_negative) & (mask == 0)
    rng = np.random.default_rng(_stable_seed(sample.name))
    return Sample(sample.name, sample.image, mask, sample.crack_points, _points(hard, rng))


def _stable_seed(text: str) -> int:
    return int.from_bytes(text.encode("utf-8")[-8:].rjust(8, b"\0"), "little") % 2**32


def load_split(split_dir: Path, name: str | None = None, refine: bool = True) -> CrackSplit:
    """Decode and check a whole split folder.

    Crack pixel positions are kept for crack-centred crops; where the dataset has
    a :data:`MULTICLASS` rule and a ``masks_multiclass/`` folder, masks are refined
    with it.

    Args:
        split_dir: Folder with ``images/`` and ``masks/``.
        name: Dataset name; defaults to the parent folder's name.
        refine: Apply the dataset's :data:`MULTICLASS` rule (training); validation
            scores against the binary masks as published (``refine=False``).

    Returns:
        The decoded split.
    """
    split_dir = Path(split_dir)
    name = name or split_dir.parent.name
    rule = MULTICLASS.get(name) if refine else None
    multiclass_dir = split_dir / "masks_multiclass"
    samples = []
    for image_path, mask_path in find_pairs(split_dir):
        sample = load_pair(image_path, mask_path)
        points = _points(sample.mask == 1, np.random.default_rng(_stable_seed(sample.name)))
        sample = Sample(sample.name, sample.image, sample.mask, points)
        class_path = multiclass_dir / mask_path.name
        if rule is not None and class_path.is_file():
            with Image.open(class_path) as class_file:
                sample = apply_multiclass(sample, np.asarray(class_file.convert("L")), rule, class_path)
        samples.append(sample)
    return CrackSplit(name=name, root=split_dir, samples=tuple(samples))


def _scale(rng: np.random.Generator, augment: Augment) -> float:
    if augment.scale_step <= 0:
        return float(rng.uniform(augment.scale_min, augment.scale_max))
    steps = int(round((augment.scale_max - augment.scale_min) / augment.scale_step))
    return augment.scale_min + augment.scale_step * int(rng.integers(0, steps + 1))


def scaled_window(
    image: np.ndarray,
    mask: np.ndarray,
    scale: float,
    crop_px: int,
    rng: np.random.Generator,
    focus: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale by ``scale`` and take a random window of up to ``crop_px`` square (no padding).

    Only the window is resampled (PIL ``resize(box=...)``), so large scales of
    large images stay cheap. The window is smaller than ``crop_px`` along a side
    where the scaled image is.

    Args:
        image: (H, W, 3) uint8.
        mask: (H, W) uint8 0/1 (or :data:`IGNORE_INDEX`).
        scale: Scale factor.
        crop_px: Largest side of the window.
        rng: Source of the window offset.
        focus: Optional (row, col) pixel of the unscaled image that the window
            must contain (at a random place in it).

    Returns:
        ``(image, mask)`` of the window, bilinear and nearest resampled.
    """
    height, width = mask.shape
    scaled_h, scaled_w = max(1, round(height * scale)), max(1, round(width * scale))
    out_h, out_w = min(crop_px, scaled_h), min(crop_px, scaled_w)
    top = _offset(rng, scaled_h, out_h, None if focus is None else focus[0] * scaled_h / height)
    left = _offset(rng, scaled_w, out_w, None if focus is None else focus[1] * scaled_w / width)
    sy, sx = height / scaled_h, width / scaled_w
    box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
    image_window = np.asarray(
        Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
    )
    mask_window = np.asarray(Image.fromarray(mask).resize((out_w, out_h), Image.Resampling.NEAREST, box=box))
    return image_window, mask_window


def _offset(rng: np.random.Generator, size: int, window: int, focus: float | None) -> int:
    """Random window start in ``[0, size - window]``; with ``focus``, one whose window holds it."""
    low, high = 0, size - window
    if focus is not None:
        low, high = max(low, int(focus) - window + 1), min(high, int(focus))
        low = min(low, high)
    return int(rng.integers(low, high + 1))


def pad_to(image: np.ndarray, mask: np.ndarray, crop_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad at the bottom and right to ``crop_px`` square: image with 0, mask with :data:`IGNORE_INDEX`."""
    height, width = mask.shape
    image_out = np.zeros((crop_px, crop_px, 3), np.uint8)
    mask_out = np.full((crop_px, crop_px), IGNORE_INDEX, np.uint8)
    image_out[:height, :width] = image
    mask_out[:height, :width] = mask
    return image_out, mask_out


def scaled_crop(
    image: np.ndarray, mask: np.ndarray, scale: float, crop_px: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Scale by ``scale``, then take a random ``crop_px`` crop, padding where too small.

    Returns:
        ``(image, mask)`` of shape (crop_px, crop_px, 3) and (crop_px, crop_px).
    """
    return pad_to(*scaled_window(image, mask, scale, crop_px, rng), crop_px)


def jitter_colour(image: np.ndarray, rng: np.random.Generator, augment: Augment) -> np.ndarray:
    """Brightness, contrast and saturation jitter, each with probability 0.5.

    Args:
        image: (H, W, 3) uint8 RGB.
        rng: Source of the decisions and factors.
        augment: The jitter ranges.

    Returns:
        Jittered (H, W, 3) uint8 image.
    """
    pixels = image.astype(np.float32)
    draws = rng.random(3) < 0.5
    factors = rng.uniform(-1.0, 1.0, 3)
    if draws[0]:
        pixels *= 1.0 + augment.brightness * factors[0]
    if draws[1]:
        grey_mean = float((pixels @ np.array([0.299, 0.587, 0.114], np.float32)).mean())
        pixels = grey_mean + (pixels - grey_mean) * (1.0 + augment.contrast * factors[1])
    if draws[2]:
        grey = (pixels @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        pixels = grey + (pixels - grey) * (1.0 + augment.saturation * factors[2])
    return np.clip(pixels, 0.0, 255.0).astype(np.uint8)


def focus_point(sample: Sample, rng: np.random.Generator, augment: Augment) -> tuple[int, int] | None:
    """A crack or hard-negative pixel to centre the crop on, or None for a uniform crop."""
    draw = rng.random()
    if draw < augment.focus_crack:
        points = sample.crack_points
    elif draw < augment.focus_crack + augment.focus_hard_negative:
        points = sample.hard_negative_points
    else:
        return None
    if points is None or len(points) == 0:
        return None
    row, col = points[int(rng.integers(0, len(points)))]
    return int(row), int(col)


def augment_window(
    sample: Sample, rng: np.random.Generator, augment: Augment, crop_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scale, focus, crop and flip one sample into a window of up to ``crop_px`` (unpadded)."""
    focus = focus_point(sample, rng, augment)
    image, mask = scaled_window(sample.image, sample.mask, _scale(rng, augment), crop_px, rng, focus)
    if augment.flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return image, mask


def augment_sample(
    sample: Sample, rng: np.random.Generator, augment: Augment
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training crop of a sample: scale, crop, flip, jitter, then pad.

    Returns:
        ``(image, mask)``: (crop_px, crop_px, 3) uint8 RGB and (crop_px, crop_px)
        uint8 with 0 / 1 / :data:`IGNORE_INDEX`.
    """
    image, mask = augment_window(sample, rng, augment, augment.crop_px)
    return pad_to(jitter_colour(image, rng, augment), mask, augment.crop_px)


def mosaic_cells(typical_px: float, scale: float, crop_px: int) -> int:
    """Cells per side of a mosaic crop: as many tiles of ``typical_px`` at ``scale`` as fit (1-4).

    >>> mosaic_cells(133, 1.0, 400), mosaic_cells(133, 2.0, 400), mosaic_cells(240, 0.5, 400)
    (3, 2, 3)
    """
    return int(np.clip(np.floor(crop_px / max(1.0, typical_px * scale) + 0.5), 1, 4))


def mosaic_crop(
    split: CrackSplit, first: int, rng: np.random.Generator, augment: Augment, typical_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """A crop made of a grid of augmented tiles of one dataset; the first tile is ``first``.

    Every tile has the same scale (so crack widths stay consistent within a
    crop); the others are drawn from ``rng``. Each cell is padded with
    :data:`IGNORE_INDEX` where its tile is smaller.

    Returns:
        ``(image, mask)`` as :func:`augment_sample`.
    """
    scale = _scale(rng, augment)
    cells = mosaic_cells(typical_px, scale, augment.crop_px)
    cell_px = augment.crop_px // cells
    fixed = replace(augment, scale_min=scale, scale_max=scale, scale_step=0.0)
    image = np.zeros((augment.crop_px, augment.crop_px, 3), np.uint8)
    mask = np.full((augment.crop_px, augment.crop_px), IGNORE_INDEX, np.uint8)
    for cell in range(cells * cells):
        index = first if cell == 0 else int(rng.integers(0, len(split)))
        tile, tile_mask = augment_window(split.samples[index], rng, fixed, cell_px)
        top, left = (cell // cells) * cell_px, (cell % cells) * cell_px
        image[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
        mask[top : top + tile.shape[0], left : left + tile.shape[1]] = tile_mask
    return jitter_colour(image, rng, augment), mask


def typical_long_side(split: CrackSplit) -> float:
    """Median long side of a split's images, in pixels."""
    return float(np.median([max(s.mask.shape) for s in split.samples]))


@lru_cache(maxsize=64)
def _permutation(seed: int, stream: int, key: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, key, epoch]).permutation(size)


@lru_cache(maxsize=64)
def _round_order(seed: int, round_: int, counts: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Dataset of each position of a round, and how many draws of that dataset precede it."""
    order = np.repeat(np.arange(len(counts)), counts)[_permutation(seed, 0, 0, round_, sum(counts))]
    seen = np.zeros(len(counts), np.int64)
    rank = np.empty(order.size, np.int64)
    for position, dataset in enumerate(order):
        rank[position] = seen[dataset]
        seen[dataset] += 1
    return order, rank


@dataclass(frozen=True, slots=True)
class BalancedSampler:
    """Deterministic, stateless choice of training samples, balanced over datasets.

    Sample number ``n`` (``n = iteration * batch_size + position``) belongs to
    round ``n // R``, where a round holds ``counts[d]`` draws of dataset ``d``
    (one each by default, ``R = sum(counts)``) in a seeded random order. Within a
    dataset, draws walk through a fresh seeded permutation per epoch of that
    dataset. So every dataset contributes its share to training regardless of
    its size (a 39-image dataset is revisited more often than a 1,441-image
    one), and the whole stream is a pure function of ``(seed, n)``.
    """

    sizes: tuple[int, ...]  # number of samples per dataset
    seed: int = 0
    counts: tuple[int, ...] | None = None  # draws per round of each dataset (default: 1 each)

    def draw(self, number: int) -> tuple[int, int]:
        """The (dataset index, sample index) of sample number ``number``."""
        counts = self.counts or (1,) * len(self.sizes)
        round_, position = divmod(number, sum(counts))
        order, rank = _round_order(self.seed, round_, tuple(counts))
        dataset = int(order[position])
        epoch, offset = divmod(round_ * counts[dataset] + int(rank[position]), self.sizes[dataset])
        return dataset, int(_permutation(self.seed, 1, dataset, epoch, self.sizes[dataset])[offset])

    def rng(self, number: int) -> np.random.Generator:
        """The augmentation random generator of sample number ``number``."""
        return np.random.default_rng([self.seed, 2, number])


def training_batch(
    splits: tuple[CrackSplit, ...],
    sampler: BalancedSampler,
    iteration: int,
    batch_size: int,
    augment: Augment,
) -> tuple[np.ndarray, np.ndarray]:
    """The augmented batch of one training iteration.

    Datasets whose median long side is below ``augment.mosaic_below_px`` give
    mosaic crops (:func:`mosaic_crop`), the others one crop of one image.

    Args:
        splits: Training splits, in the order of ``sampler.sizes``.
        sampler: Chooses the samples.
        iteration: 0-based iteration number.
        batch_size: Samples per batch.
        augment: Augmentation settings.

    Returns:
        ``(images, masks)``: (N, crop, crop, 3) uint8 and (N, crop, crop) uint8.
    """
    images, masks = [], []
    typical: dict[int, float] = {}  # per dataset, computed once per batch
    for number in range(iteration * batch_size, (iteration + 1) * batch_size):
        dataset, index = sampler.draw(number)
        split, rng = splits[dataset], sampler.rng(number)
        if dataset not in typical:
            typical[dataset] = typical_long_side(split) if augment.mosaic_below_px else 0.0
        if typical[dataset] < augment.mosaic_below_px:
            image, mask = mosaic_crop(split, index, rng, augment, typical[dataset])
        else:
            image, mask = augment_sample(split.samples[index], rng, augment)
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)
