"""Crack segmentation datasets for training: loading, validation and augmentation.

A split folder holds ``images/`` (RGB .jpg/.png) and ``masks/`` (single-channel
PNG, 0 = background, 255 = crack, same stem and size as the image). A split is
decoded into memory once (the datasets are small).

Training samples are a pure function of ``(seed, sample number)``
(:class:`BalancedSampler`), so a run that resumes at iteration ``i`` sees exactly
the batches an uninterrupted run would: no data-order state needs saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IGNORE_INDEX = 255


@dataclass(frozen=True, slots=True)
class Sample:
    """One decoded image and its mask."""

    name: str           # file stem
    image: np.ndarray   # (H, W, 3) uint8 RGB
    mask: np.ndarray    # (H, W) uint8, 0 = background, 1 = crack


@dataclass(frozen=True, slots=True)
class CrackSplit:
    """All samples of one split of one dataset, decoded."""

    name: str                    # dataset name, e.g. "deepcrack"
    root: Path                   # the split folder
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
                raise ValueError(f"{images[path.stem].name} and {path.name} in {image_dir} share a stem; "
                                 "keep one image per mask")
            images[path.stem] = path
    masks = {p.stem: p for p in sorted(mask_dir.iterdir()) if p.suffix.lower() == ".png"}
    unpaired = ([f"images/{images[s].name}" for s in sorted(images.keys() - masks.keys())]
                + [f"masks/{masks[s].name}" for s in sorted(masks.keys() - images.keys())])
    if unpaired:
        raise ValueError(f"unpaired files in {split_dir} (every image needs masks/<stem>.png and "
                         f"every mask an image): {', '.join(unpaired)}")
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
        raise ValueError(f"{mask_path} is {mask.shape[1]}x{mask.shape[0]} px but {image_path} is "
                         f"{image.shape[1]}x{image.shape[0]} px; a mask must match its image's size")
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 255}:
        raise ValueError(f"{mask_path} is not binary: it holds values {values[:10].tolist()}; "
                         "masks must be 0 (background) and 255 (crack)")
    return Sample(name=image_path.stem, image=image, mask=(mask == 255).astype(np.uint8))


def load_split(split_dir: Path, name: str | None = None) -> CrackSplit:
    """Decode and check a whole split folder.

    Args:
        split_dir: Folder with ``images/`` and ``masks/``.
        name: Dataset name; defaults to the parent folder's name.

    Returns:
        The decoded split.
    """
    split_dir = Path(split_dir)
    samples = tuple(load_pair(image, mask) for image, mask in find_pairs(split_dir))
    return CrackSplit(name=name or split_dir.parent.name, root=split_dir, samples=samples)


def _scale(rng: np.random.Generator, augment: Augment) -> float:
    if augment.scale_step <= 0:
        return float(rng.uniform(augment.scale_min, augment.scale_max))
    steps = int(round((augment.scale_max - augment.scale_min) / augment.scale_step))
    return augment.scale_min + augment.scale_step * int(rng.integers(0, steps + 1))


def scaled_window(image: np.ndarray, mask: np.ndarray, scale: float, crop_px: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Scale by ``scale`` and take a random window of up to ``crop_px`` square (no padding).

    Only the window is resampled (PIL ``resize(box=...)``), so large scales of
    large images stay cheap. The window is smaller than ``crop_px`` along a side
    where the scaled image is.

    Args:
        image: (H, W, 3) uint8.
        mask: (H, W) uint8 0/1.
        scale: Scale factor.
        crop_px: Largest side of the window.
        rng: Source of the window offset.

    Returns:
        ``(image, mask)`` of the window, bilinear and nearest resampled.
    """
    height, width = mask.shape
    scaled_h, scaled_w = max(1, round(height * scale)), max(1, round(width * scale))
    out_h, out_w = min(crop_px, scaled_h), min(crop_px, scaled_w)
    top = int(rng.integers(0, scaled_h - out_h + 1))
    left = int(rng.integers(0, scaled_w - out_w + 1))
    sy, sx = height / scaled_h, width / scaled_w
    box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
    image_window = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR, box=box))
    mask_window = np.asarray(Image.fromarray(mask).resize((out_w, out_h), Image.NEAREST, box=box))
    return image_window, mask_window


def pad_to(image: np.ndarray, mask: np.ndarray, crop_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad at the bottom and right to ``crop_px`` square: image with 0, mask with :data:`IGNORE_INDEX`."""
    height, width = mask.shape
    image_out = np.zeros((crop_px, crop_px, 3), np.uint8)
    mask_out = np.full((crop_px, crop_px), IGNORE_INDEX, np.uint8)
    image_out[:height, :width] = image
    mask_out[:height, :width] = mask
    return image_out, mask_out


def scaled_crop(image: np.ndarray, mask: np.ndarray, scale: float, crop_px: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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
        grey_mean = float((pixels @ np.float32([0.299, 0.587, 0.114])).mean())
        pixels = grey_mean + (pixels - grey_mean) * (1.0 + augment.contrast * factors[1])
    if draws[2]:
        grey = (pixels @ np.float32([0.299, 0.587, 0.114]))[..., None]
        pixels = grey + (pixels - grey) * (1.0 + augment.saturation * factors[2])
    return np.clip(pixels, 0.0, 255.0).astype(np.uint8)


def augment_sample(sample: Sample, rng: np.random.Generator,
                   augment: Augment) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training crop of a sample: scale, crop, flip, jitter, then pad.

    Returns:
        ``(image, mask)``: (crop_px, crop_px, 3) uint8 RGB and (crop_px, crop_px)
        uint8 with 0 / 1 / :data:`IGNORE_INDEX`.
    """
    image, mask = scaled_window(sample.image, sample.mask, _scale(rng, augment), augment.crop_px, rng)
    if augment.flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return pad_to(jitter_colour(image, rng, augment), mask, augment.crop_px)


@lru_cache(maxsize=64)
def _permutation(seed: int, stream: int, key: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, key, epoch]).permutation(size)


@dataclass(frozen=True, slots=True)
class BalancedSampler:
    """Deterministic, stateless choice of training samples, balanced over datasets.

    Sample number ``n`` (``n = iteration * batch_size + position``) belongs to
    round ``n // D`` (D datasets); each round draws one sample from every
    dataset, in a seeded random order. Within a dataset, draws walk through a
    fresh seeded permutation per epoch of that dataset. So every dataset
    contributes equally to training regardless of its size (a 39-image dataset
    is revisited more often than a 240-image one), and the whole stream is a
    pure function of ``(seed, n)``.
    """

    sizes: tuple[int, ...]   # number of samples per dataset
    seed: int = 0

    def draw(self, number: int) -> tuple[int, int]:
        """The (dataset index, sample index) of sample number ``number``."""
        count = len(self.sizes)
        round_, position = divmod(number, count)
        dataset = int(_permutation(self.seed, 0, 0, round_, count)[position])
        epoch, offset = divmod(round_, self.sizes[dataset])
        return dataset, int(_permutation(self.seed, 1, dataset, epoch, self.sizes[dataset])[offset])

    def rng(self, number: int) -> np.random.Generator:
        """The augmentation random generator of sample number ``number``."""
        return np.random.default_rng([self.seed, 2, number])


def training_batch(splits: tuple[CrackSplit, ...], sampler: BalancedSampler, iteration: int,
                   batch_size: int, augment: Augment) -> tuple[np.ndarray, np.ndarray]:
    """The augmented batch of one training iteration.

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
    for number in range(iteration * batch_size, (iteration + 1) * batch_size):
        dataset, index = sampler.draw(number)
        image, mask = augment_sample(splits[dataset].samples[index], sampler.rng(number), augment)
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)
