"""The inference graph (rewrites, uint8 output) and the INT8 graph: exactness, agreement, choice."""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import paint_crack
from PIL import Image

from models import registry
from pipeline import precision


def pavement_chips(n: int, seed: int = 0) -> np.ndarray:
    """Grey, grainy 400 px chips, each with two painted dark cracks of 2-6 px."""
    rng = np.random.default_rng(seed)
    chips = rng.normal(165, 18, (n, 3, 400, 400)).clip(0, 255).astype(np.uint8)
    for chip in chips:
        for _ in range(2):
            start, end = rng.uniform(0, 400, 2), rng.uniform(0, 400, 2)
            paint_crack(chip, tuple(start), tuple(end), rng.uniform(2, 6), int(rng.integers(20, 70)))
    return chips


def run(path, chips):
    return precision.session(path).run(None, {"chips": chips})[0]


@pytest.fixture(scope="module")
def trained_like_net():
    """The shipped hrsegnet-b16 1.0.0 weights: trained, so the probabilities vary across a chip."""
    pytest.importorskip("torch")
    from models.onnx_export import load_net

    entry = registry.resolve("hrsegnet-b16:1.0.0")
    return load_net(entry.variant, entry.file("weights"))


def test_rewritten_inference_graph_equals_the_published_order(trained_like_net, tmp_path):
    from models.onnx_export import export_onnx

    fast = export_onnx(trained_like_net, tmp_path / "fast.onnx", output="float")
    literal = export_onnx(trained_like_net, tmp_path / "literal.onnx", output="float", literal=True)
    chips = np.concatenate(
        [pavement_chips(2), np.random.default_rng(9).integers(0, 256, (2, 3, 400, 400), dtype=np.uint8)]
    )
    a, b = run(fast, chips), run(literal, chips)
    assert a.dtype == b.dtype == np.float32 and a.shape == (4, 400, 400)
    assert np.abs(a - b).max() <= 1e-5
    assert b.min() < 0.1 and b.max() > 0.9  # the probabilities span the range, so equality says something


def test_uint8_output_stays_within_one_level_of_the_float_probability(trained_like_net, tmp_path):
    from models.onnx_export import export_onnx

    u8 = export_onnx(trained_like_net, tmp_path / "u8.onnx")
    literal = export_onnx(trained_like_net, tmp_path / "literal.onnx", output="float", literal=True)
    chips = pavement_chips(3, seed=2)
    got, float_p = run(u8, chips), run(literal, chips)
    assert got.dtype == np.uint8
    assert np.abs(got / 255.0 - float_p).max() <= 1 / 255
    assert np.abs(got / 255.0 - float_p).max() <= 0.5 / 255 + 1e-5  # rounded, not truncated


def test_int8_graph_reads_the_uint8_chips_as_they_are(trained_like_net, tmp_path, monkeypatch):
    """The input's cast, padding and quantization become one uint8 pad: no change in any output."""
    import onnx

    from models import quantize
    from models.onnx_export import export_onnx

    graph = export_onnx(trained_like_net, tmp_path / "model.onnx")
    # black and white chips: the plain input quantization then has scale 1 and zero point 0
    # too, which the rewrite sets (lossless for integers 0-255), so the two must agree exactly
    calibration = np.concatenate(
        [
            pavement_chips(4, seed=6),
            np.full((2, 3, 400, 400), 255, np.uint8) * np.array([0, 1], np.uint8)[:, None, None, None],
        ]
    )
    quantize.quantize_onnx(graph, tmp_path / "int8.onnx", calibration)
    monkeypatch.setattr(quantize, "uint8_input", lambda model: False)
    quantize.quantize_onnx(graph, tmp_path / "plain.onnx", calibration)
    first = [n for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node if "chips" in n.input]
    assert [n.op_type for n in first] == ["Pad"]
    plain_first = [n for n in onnx.load(str(tmp_path / "plain.onnx")).graph.node if "chips" in n.input]
    assert "Cast" in {n.op_type for n in plain_first}
    chips = np.concatenate([pavement_chips(2, seed=7), np.zeros((1, 3, 400, 400), np.uint8) + 255])
    got, plain = run(tmp_path / "int8.onnx", chips), run(tmp_path / "plain.onnx", chips)
    np.testing.assert_array_equal(got, plain)
    assert got.max() > 128  # cracks found: the comparison says something


def test_rebuild_adds_the_same_weights_with_the_current_graph_as_a_new_version(quantizable):
    from pipeline.cli import cli

    source = registry.resolve("q-b16:1.0.0")
    root = str(quantizable / "models")
    result = CliRunner().invoke(
        cli, ["models", "rebuild", "q-b16:1.0.0", "--version", "1.0.1", "--root", root]
    )
    assert result.exit_code == 0, result.output
    entry = registry.resolve("q-b16:1.0.1")
    assert entry.card["files"]["weights"]["sha256"] == source.card["files"]["weights"]["sha256"]
    assert entry.card["rebuilt_from"] == {
        "spec": "q-b16:1.0.0",
        "weights_sha256": source.card["files"]["weights"]["sha256"],
    }
    assert entry.threshold == source.threshold and "int8" not in entry.card
    assert "rebuilt from | q-b16:1.0.0" in (entry.folder / "MODEL_CARD.md").read_text()
    out = run(entry.file("onnx"), pavement_chips(1, seed=8))
    assert out.dtype == np.uint8 and out.shape == (1, 400, 400)
    again = CliRunner().invoke(
        cli, ["models", "rebuild", "q-b16:1.0.1", "--version", "1.0.1", "--root", root]
    )
    assert again.exit_code == 2 and "higher version" in again.output


# INT8 masks agree with the float graph's on at least this share of pixels of the fixture chips,
# and the INT8 crack mask covers at least this share of the float graph's (hrsegnet-b16 1.0.0;
# on its val images the card records 99.976 % agreement and a mean F1 drop of 0.0001).
INT8_PIXEL_AGREEMENT = 0.995
INT8_CRACK_IOU = 0.90


def test_shipped_int8_graph_masks_agree_with_the_float_graph_on_fixture_chips():
    entry = registry.resolve("hrsegnet-b16:1.0.0")  # the zoo's, never the test registry
    chips = pavement_chips(8, seed=3)
    threshold = entry.threshold * 255
    fp32 = run(entry.file("onnx"), chips)
    fp32 = (fp32 * 255 if fp32.dtype != np.uint8 else fp32) >= threshold
    int8 = run(entry.file("onnx_int8"), chips) >= threshold
    assert fp32.mean() > 0.005  # the float graph finds the painted cracks
    assert (fp32 == int8).mean() >= INT8_PIXEL_AGREEMENT
    assert (fp32 & int8).sum() / (fp32 | int8).sum() >= INT8_CRACK_IOU
    assert entry.card["int8"]["accepted"] and entry.card["int8"]["f1_drop"] <= precision.MAX_F1_DROP


def write_dataset(root, name, count, seed):
    for split in ("val",):
        images, masks = root / name / split / "images", root / name / split / "masks"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i, chip in enumerate(pavement_chips(count, seed)):
            rgb = np.ascontiguousarray(chip.transpose(1, 2, 0)[:360, :380])
            Image.fromarray(rgb).save(images / f"{i}.png")
            Image.fromarray(((rgb.mean(axis=2) < 100) * 255).astype(np.uint8)).save(masks / f"{i}.png")


@pytest.fixture
def quantizable(tmp_path, monkeypatch):
    """A registry with one (untrained) version whose card names a training dataset, and that dataset."""
    torch = pytest.importorskip("torch")
    from models.hrsegnet import create
    from models.package import package

    torch.manual_seed(0)
    checkpoint = tmp_path / "net.pt"
    torch.save(
        {
            "state_dict": create("b16").state_dict(),
            "variant": "b16",
            "threshold": 0.5,
            "val_metrics": {},
            "data": {"datasets": ["roads"]},
        },
        checkpoint,
    )
    package(checkpoint, "q-b16", "1.0.0", tmp_path / "models")
    write_dataset(tmp_path / "data", "roads", 3, seed=4)
    monkeypatch.setenv("CRACKMAP_MODELS", str(tmp_path / "models"))
    return tmp_path


def test_quantize_command_adds_a_verified_int8_graph_to_the_version(quantizable):
    from pipeline.cli import cli

    args = [
        "models",
        "quantize",
        "--model",
        "q-b16:1.0.0",
        "--data-root",
        str(quantizable / "data"),
        "--per-dataset",
        "2",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "the gate" in result.output
    entry = registry.resolve("q-b16:1.0.0")
    record = entry.card["int8"]
    assert record["calibration"]["chips"] == 2 and record["calibration"]["datasets"] == ["roads"]
    assert set(record["metrics"]) == set(record["fp32_metrics"]) == {"roads"}
    assert record["accepted"] == (record["f1_drop"] <= 0.005)
    assert json.loads((entry.folder / "card.json").read_text())["files"]["onnx_int8"]["sha256"]
    assert "INT8 graph" in (entry.folder / "MODEL_CARD.md").read_text()
    graph, chosen, _ = precision.cpu_graph(entry, "int8")
    out = run(graph, pavement_chips(2, seed=5))
    assert chosen == "int8" and out.dtype == np.uint8 and out.shape == (2, 400, 400)
    again = CliRunner().invoke(cli, args)  # versions are immutable: no second INT8 graph
    assert again.exit_code == 2 and "already has an INT8 graph" in again.output


def test_quantize_names_a_missing_dataset_folder(quantizable):
    from pipeline.cli import cli

    result = CliRunner().invoke(
        cli, ["models", "quantize", "--model", "q-b16:1.0.0", "--data-root", str(quantizable)]
    )
    assert result.exit_code == 2
    assert "roads/val does not exist" in result.output and "--data-root" in result.output


def test_auto_runs_the_graph_measured_faster_here_and_remembers(tmp_path, monkeypatch):
    entry = registry.resolve("hrsegnet-b16:1.0.0")
    choices = tmp_path / "choices.json"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_vnni"})
    monkeypatch.setattr(precision, "chips_per_s", lambda paths: {"fp32": 10.0, "int8": 25.0})
    graph, chosen, why = precision.cpu_graph(entry, "auto", choices)
    assert (graph.name, chosen) == ("model-int8.onnx", "int8") and "25.0" in why
    monkeypatch.setattr(precision, "chips_per_s", lambda paths: pytest.fail("measured twice"))
    assert precision.cpu_graph(entry, "auto", choices)[1] == "int8"  # from the file
    stored = json.loads(choices.read_text())
    assert [v["chips_per_s"] for v in stored.values()] == [{"fp32": 10.0, "int8": 25.0}]
    key = next(iter(stored))
    stored[key]["chips_per_s"] = {"fp32": 30.0, "int8": 25.0}  # a CPU where INT8 is slower
    choices.write_text(json.dumps(stored))
    assert precision.cpu_graph(entry, "auto", choices)[:2] == (entry.file("onnx"), "fp32")


def test_auto_keeps_the_float_graph_without_vnni_or_when_int8_failed_its_gate(tmp_path, monkeypatch):
    entry = registry.resolve("hrsegnet-b16:1.0.0")
    monkeypatch.setattr(precision, "chips_per_s", lambda paths: pytest.fail("nothing to measure"))
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    assert precision.cpu_graph(entry, "auto", tmp_path / "c.json")[1:] == (
        "fp32",
        "this x86 CPU has no VNNI: INT8 kernels may saturate",
    )
    failed = dataclasses.replace(
        entry, card={**entry.card, "int8": {**entry.card["int8"], "accepted": False, "f1_drop": 0.02}}
    )
    _, chosen, why = precision.cpu_graph(failed, "auto", tmp_path / "c.json")
    assert chosen == "fp32" and "0.0200" in why
    assert precision.cpu_graph(entry, "fp32")[1] == "fp32"


def test_a_version_without_int8_runs_float_and_int8_asked_for_says_how_to_add_it(test_models):
    entry = registry.resolve()
    assert precision.cpu_graph(entry, "auto")[1:] == ("fp32", "no INT8 graph")
    with pytest.raises(registry.ModelError, match="crackmap models quantize"):
        precision.cpu_graph(entry, "int8")
