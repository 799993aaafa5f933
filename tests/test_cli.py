import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli


def make_images(folder, sizes):
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i, (h, w) in enumerate(sizes):
        rgb = np.full((h, w, 3), 200, np.uint8)
        rgb[h // 2 : h // 2 + 3] = 40
        Image.fromarray(rgb).save(folder / "images" / f"im{i}.jpg")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 2 : h // 2 + 3] = 255
        Image.fromarray(mask).save(folder / "masks" / f"im{i}.png")


def test_segment_writes_one_mask_per_image_with_its_size(tmp_path, test_models):
    make_images(tmp_path, [(300, 500), (700, 450)])
    result = CliRunner().invoke(cli, ["segment", str(tmp_path / "images"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for name, size in (("im0", (500, 300)), ("im1", (450, 700))):
        mask = Image.open(tmp_path / "out" / f"{name}.png")
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}


def test_eval_prints_pixel_metrics(tmp_path):
    """The shipped model on a painted crack: scores checked against counts made here from its masks."""
    make_images(tmp_path, [(300, 500)])
    model = ["--model", "hrsegnet-b16:1.0.0"]
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "images"), str(tmp_path / "masks"), *model])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output[result.output.index("{") :])
    assert scores["model"] == "hrsegnet-b16:1.0.0" and scores["images"] == 1
    segmented = CliRunner().invoke(cli, ["segment", str(tmp_path / "images"), str(tmp_path / "pred"), *model])
    assert segmented.exit_code == 0, segmented.output
    pred = np.asarray(Image.open(tmp_path / "pred" / "im0.png")) > 127
    truth = np.asarray(Image.open(tmp_path / "masks" / "im0.png")) > 127
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    tn = (~pred & ~truth).sum()
    assert tp > 0  # the crack is found, so every score below means something
    assert scores["precision"] == pytest.approx(tp / (tp + fp), abs=1e-6)
    assert scores["recall"] == pytest.approx(tp / (tp + fn), abs=1e-6)
    assert scores["crack_iou"] == pytest.approx(tp / (tp + fp + fn), abs=1e-6)
    assert scores["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)
    assert scores["miou"] == pytest.approx((tp / (tp + fp + fn) + tn / (tn + fp + fn)) / 2, abs=1e-6)


def test_eval_names_images_without_masks(tmp_path, test_models):
    make_images(tmp_path, [(100, 100)])
    (tmp_path / "masks" / "im0.png").unlink()
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "images"), str(tmp_path / "masks")])
    assert result.exit_code == 2 and "no mask for im0.jpg" in result.output


def test_models_list_and_show(test_models):
    listing = CliRunner().invoke(cli, ["models", "list"])
    assert "* test-b16:1.0.0" in listing.output
    card = CliRunner().invoke(cli, ["models", "show", "test-b16"])
    assert "# test-b16 1.0.0" in card.output and "sha256" in card.output
    missing = CliRunner().invoke(cli, ["models", "show", "nope:1.0.0"])
    assert missing.exit_code == 2 and "unknown model 'nope'" in missing.output


def test_models_export_reports_the_difference_to_torch(tmp_path, test_models):
    result = CliRunner().invoke(cli, ["models", "export", "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    diff = float(result.output.split("max abs difference to torch ")[1].split()[0])
    assert diff < 0.5 / 255 + 1e-4 and (tmp_path / "m.onnx").stat().st_size > 1e6


def test_an_unknown_model_is_one_line_not_a_traceback(tmp_path, test_models):
    (tmp_path / "images").mkdir()
    result = CliRunner().invoke(
        cli, ["segment", str(tmp_path / "images"), str(tmp_path / "out"), "--model", "nope:1.0.0"]
    )
    assert result.exit_code == 2 and "error: unknown model 'nope'" in result.output
