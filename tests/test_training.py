"""Dataset checks, augmentation, loss, and training with resume on a tiny generated dataset."""

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from models import data as crackdata
from models import train as training

torch.set_num_threads(1)

SIZE_PX = 64


def write_pair(split_dir: Path, stem: str, rng: np.random.Generator) -> None:
    """A noisy grey 64x64 jpg with a dark random line, and its 0/255 png mask."""
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "masks").mkdir(parents=True, exist_ok=True)
    pixels = rng.normal(150, 12, (SIZE_PX, SIZE_PX, 3)).clip(0, 255).astype(np.uint8)
    image, mask = Image.fromarray(pixels), Image.new("L", (SIZE_PX, SIZE_PX), 0)
    points = [tuple(int(v) for v in rng.integers(0, SIZE_PX, 2)) for _ in range(3)]
    ImageDraw.Draw(image).line(points, fill=(50, 50, 50), width=3)
    ImageDraw.Draw(mask).line(points, fill=255, width=3)
    image.save(split_dir / "images" / f"{stem}.jpg", quality=95)
    mask.save(split_dir / "masks" / f"{stem}.png")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Two datasets with 4 train and 2 val images each."""
    root = tmp_path_factory.mktemp("cracks")
    rng = np.random.default_rng(0)
    for name in ("alpha", "beta"):
        for split, count in (("train", 4), ("val", 2)):
            for index in range(count):
                write_pair(root / name / split, f"{name}{index:02d}", rng)
    return root


def tiny_config(data_root: Path, out: Path, **changes) -> training.TrainConfig:
    config = training.TrainConfig(out=out, data_root=data_root, datasets=("alpha", "beta"), iters=6,
                                  batch_size=2, crop_px=48, val_every=3, checkpoint_every=100,
                                  log_every=2, threads=1)
    return replace(config, **changes)


# --------------------------------------------------------------------------- data checks

def test_load_split_decodes_images_and_binary_masks(data_root):
    split = crackdata.load_split(data_root / "alpha" / "train")
    assert split.name == "alpha" and len(split) == 4
    sample = split.samples[0]
    assert sample.image.shape == (SIZE_PX, SIZE_PX, 3) and sample.image.dtype == np.uint8
    assert set(np.unique(sample.mask)) == {0, 1}


def copy_split(data_root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "split"
    for kind in ("images", "masks"):
        (target / kind).mkdir(parents=True)
        for path in (data_root / "alpha" / "train" / kind).iterdir():
            (target / kind / path.name).write_bytes(path.read_bytes())
    return target


def test_unpaired_files_are_named(data_root, tmp_path):
    split = copy_split(data_root, tmp_path)
    (split / "masks" / "alpha01.png").unlink()
    Image.new("L", (SIZE_PX, SIZE_PX)).save(split / "masks" / "orphan.png")
    with pytest.raises(ValueError, match=r"images/alpha01\.jpg.*masks/orphan\.png"):
        crackdata.load_split(split)


def test_wrong_size_mask_is_named(data_root, tmp_path):
    split = copy_split(data_root, tmp_path)
    Image.new("L", (SIZE_PX, SIZE_PX + 1)).save(split / "masks" / "alpha02.png")
    with pytest.raises(ValueError, match=r"alpha02\.png is 64x65 px but .*alpha02\.jpg is 64x64"):
        crackdata.load_split(split)


def test_non_binary_mask_is_named(data_root, tmp_path):
    split = copy_split(data_root, tmp_path)
    Image.new("L", (SIZE_PX, SIZE_PX), 128).save(split / "masks" / "alpha03.png")
    with pytest.raises(ValueError, match=r"alpha03\.png is not binary.*128"):
        crackdata.load_split(split)


def test_missing_dataset_names_the_folder(data_root, tmp_path):
    config = tiny_config(data_root, tmp_path, datasets=("alpha", "gamma"))
    with pytest.raises(FileNotFoundError, match="gamma"):
        training.train(config)


# --------------------------------------------------------------------------- sampling and augmentation

def test_sampler_is_balanced_and_deterministic():
    sampler = crackdata.BalancedSampler(sizes=(3, 10), seed=5)
    draws = [sampler.draw(n) for n in range(60)]
    assert draws == [crackdata.BalancedSampler((3, 10), 5).draw(n) for n in range(60)]
    assert sum(d == 0 for d, _ in draws) == 30
    small = [i for d, i in draws if d == 0]
    assert all(sorted(small[k:k + 3]) == [0, 1, 2] for k in range(0, 30, 3))  # each epoch a permutation
    assert draws != [crackdata.BalancedSampler((3, 10), 6).draw(n) for n in range(60)]


def test_augmentation_pads_with_ignore_and_is_reproducible(data_root):
    sample = crackdata.load_split(data_root / "alpha" / "train").samples[0]
    augment = crackdata.Augment(crop_px=100, scale_min=1.0, scale_max=1.0)
    image, mask = crackdata.augment_sample(sample, np.random.default_rng(1), augment)
    assert image.shape == (100, 100, 3) and mask.shape == (100, 100)
    assert (mask[SIZE_PX:] == crackdata.IGNORE_INDEX).all() and (image[SIZE_PX:] == 0).all()
    assert set(np.unique(mask[:SIZE_PX, :SIZE_PX])) <= {0, 1}
    again = crackdata.augment_sample(sample, np.random.default_rng(1), augment)
    np.testing.assert_array_equal(image, again[0])
    np.testing.assert_array_equal(mask, again[1])


def test_scaled_crop_keeps_the_crack_where_it_was():
    image = np.zeros((40, 60, 3), np.uint8)
    mask = np.zeros((40, 60), np.uint8)
    mask[:, 30] = 1
    _, crop = crackdata.scaled_crop(image, mask, 2.0, 200, np.random.default_rng(0))
    assert crop.shape == (200, 200)
    assert set(np.flatnonzero(crop[:80, :120].any(axis=0))) <= {59, 60, 61}
    assert (crop[80:] == crackdata.IGNORE_INDEX).all()


# --------------------------------------------------------------------------- loss and training

def test_ohem_keeps_at_least_min_kept_and_ignores_padding():
    logits = torch.zeros(1, 2, 4, 4)
    logits[0, 1] = 4.0                             # confident crack everywhere
    target = torch.ones(1, 4, 4, dtype=torch.long)
    target[0, 0] = 0                               # 4 hard pixels
    target[0, 3] = crackdata.IGNORE_INDEX
    hard = torch.nn.functional.cross_entropy(logits[:, :, 0], target[:, 0]).item()
    assert training.ohem_cross_entropy(logits, target, 0.7, min_kept=2).item() == pytest.approx(hard)
    all_valid = torch.nn.functional.cross_entropy(logits, target, ignore_index=255).item()
    assert training.ohem_cross_entropy(logits, target, 0.7, min_kept=100).item() == pytest.approx(all_valid)


def plain_cross_entropy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Cross-entropy of the main head over all pixels (train-mode batch norm, no grad)."""
    model.train()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x)[0], y).item()


def test_a_few_steps_lower_the_loss(data_root, tmp_path):
    config = tiny_config(data_root, tmp_path, iters=100, warmup_fraction=0.0)
    splits = training.load_splits(data_root, config.datasets, "train")
    images = np.stack([s.image for split in splits for s in split.samples])
    masks = np.stack([s.mask for split in splits for s in split.samples])
    x, y = training.to_tensors(images, masks, torch.device("cpu"))
    torch.manual_seed(0)
    model = training.hrsegnet.create("b16")
    optimizer = training.make_optimizer(model, config)
    before = plain_cross_entropy(model, x, y)
    ohem_losses = [training.train_step(model, optimizer, x, y, i, config) for i in range(10)]
    assert all(np.isfinite(ohem_losses))
    # The OHEM loss itself is not monotone (its kept pixels get harder); the plain loss must fall.
    assert plain_cross_entropy(model, x, y) < 0.7 * before


def test_training_writes_checkpoints_and_metrics(data_root, tmp_path):
    best = training.train(tiny_config(data_root, tmp_path / "run"))
    assert best == tmp_path / "run" / "best.pt" and best.is_file()
    payload = training.load_checkpoint(best)
    assert payload["variant"] == "b16" and 0.0 <= payload["threshold"] <= 1.0
    assert set(payload["val_metrics"]) == {"alpha", "beta"}
    assert set(payload["val_metrics"]["alpha"]) == {"miou", "crack_iou", "f1", "precision", "recall"}
    assert payload["data"]["datasets"] == {"alpha": {"train": 4, "val": 2}, "beta": {"train": 4, "val": 2}}
    assert payload["recipe"]["lr"] == 0.01 and payload["recipe"]["iters"] == 6
    assert payload["iteration"] in (3, 6) and payload["train_seconds"] > 0
    model = training.hrsegnet.create("b16").eval()
    model.load_state_dict(payload["state_dict"])
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "val"' in line for line in lines) == 2
    assert training.load_checkpoint(tmp_path / "run" / "last.pt")["iteration"] == 6


def test_resume_continues_to_the_same_state(data_root, tmp_path):
    training.train(tiny_config(data_root, tmp_path / "straight"))
    training.train(tiny_config(data_root, tmp_path / "split", stop_at=3))
    assert training.load_checkpoint(tmp_path / "split" / "last.pt")["iteration"] == 3
    training.train(tiny_config(data_root, tmp_path / "split", resume=tmp_path / "split" / "last.pt"))
    straight = training.load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = training.load_checkpoint(tmp_path / "split" / "last.pt")
    assert resumed["iteration"] == straight["iteration"] == 6
    for key, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][key]), key
    for key, state in straight["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"])
    assert resumed["threshold"] == straight["threshold"]


def test_resume_with_a_changed_recipe_is_refused(data_root, tmp_path):
    training.train(tiny_config(data_root, tmp_path / "run", stop_at=1, val_every=1))
    changed = tiny_config(data_root, tmp_path / "run", lr=0.02, resume=tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt.*lr: 0\.01 -> 0\.02"):
        training.train(changed)


def test_command_line_options_build_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    training.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--iters", "80", "--crop-px", "320",
                              "--datasets", "uav75", "--resume", "--max-minutes", "5"])
    config = training.config_from_args(args)
    assert config.iters == 80 and config.crop_px == 320 and config.datasets == ("uav75",)
    assert config.resume == tmp_path / "last.pt" and config.max_minutes == 5.0
    assert config.validation_interval() == 8
