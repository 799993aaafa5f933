import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models import registry  # noqa: E402
from models.hrsegnet import HrSegNet, create  # noqa: E402


def inference_params(net):
    return sum(p.numel() for name, p in net.named_parameters() if not name.startswith("aux"))


@pytest.mark.parametrize("variant, millions", [("b16", 0.605), ("b32", 2.414), ("b48", 5.426)])
def test_parameter_counts_match_the_paper(variant, millions):
    assert inference_params(create(variant)) / 1e6 == pytest.approx(millions, abs=0.001)


def test_training_mode_returns_main_and_two_auxiliary_logits_at_input_size():
    out = create("b16").train()(torch.rand(2, 3, 96, 128))
    assert [tuple(o.shape) for o in out] == [(2, 2, 96, 128)] * 3


def test_conv_before_upsample_equals_the_published_order():
    torch.manual_seed(1)
    fast = HrSegNet(16).eval()
    literal = HrSegNet(16, conv_before_upsample=False).eval()
    literal.load_state_dict(fast.state_dict())
    for m in (fast, literal):  # non-trivial BN statistics
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                torch.manual_seed(bn.num_features)
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 400, 400)
    with torch.no_grad():
        assert torch.allclose(fast(x), literal(x), atol=1e-4)


def test_onnx_matches_torch_at_batch_1_and_5(test_models):
    from pipeline.inference import load_backend

    entry = registry.resolve()
    onnx, torch_net = load_backend(entry, "onnxruntime"), load_backend(entry, "torch")
    for batch in (1, 5):
        chips = np.random.default_rng(batch).integers(0, 256, (batch, 3, 400, 400), dtype=np.uint8)
        a, b = onnx.predict(chips), torch_net.predict(chips)
        assert a.shape == b.shape == (batch, 400, 400)
        assert np.abs(a - b).max() < 1e-4


def test_batch_size_does_not_change_a_chip_result(test_models):
    from pipeline.inference import load_backend

    entry = registry.resolve()
    chips = np.random.default_rng(3).integers(0, 256, (5, 3, 400, 400), dtype=np.uint8)
    for name in ("onnxruntime", "torch"):
        backend = load_backend(entry, name)
        together = backend.predict(chips)
        alone = np.concatenate([backend.predict(chips[i:i + 1]) for i in range(5)])
        assert together.shape == (5, 400, 400)
        assert np.abs(together - alone).max() < 1e-4


def test_torch_and_onnxruntime_backends_agree(test_models):
    from pipeline.inference import load_backend

    entry = registry.resolve()
    chips = np.random.default_rng(4).integers(0, 256, (3, 3, 400, 400), dtype=np.uint8)
    a = load_backend(entry, "onnxruntime").predict(chips)
    b = load_backend(entry, "torch").predict(chips)
    assert np.abs(a - b).max() < 1e-4


def test_registry_refuses_a_tampered_file(test_models, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(test_models, copy)
    monkeypatch.setenv("CRACKMAP_MODELS", str(copy))
    entry = registry.resolve("test-b16:1.0.0")
    onnx = entry.folder / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(registry.ModelError, match="model.onnx does not match the sha256"):
        entry.file("onnx")


def test_registry_names_what_exists_when_asked_for_something_else(test_models):
    with pytest.raises(registry.ModelError, match="known models"):
        registry.resolve("nope")
    with pytest.raises(registry.ModelError, match=r"versions: \['1.0.0'\]"):
        registry.resolve("test-b16:9.9.9")
    assert registry.resolve("test-b16").version == "1.0.0"


def test_versions_are_immutable(test_models):
    entry = registry.resolve()
    with pytest.raises(registry.ModelError, match="immutable"):
        registry.add(test_models, dict(entry.card), {})


def test_model_card_says_what_the_training_data_allows():
    from models.package import license_text

    text = license_text(["deepcrack", "paveseg_preview"])
    assert "NON-COMMERCIAL RESEARCH USE ONLY" in text and "deepcrack" in text
    assert "NON-COMMERCIAL" not in license_text(["paveseg_preview"])


def test_shipped_default_model_loads_and_segments_a_fixture_image():
    entry = registry.resolve()  # the default of models/zoo
    card = json.loads((entry.folder / "card.json").read_text())
    assert "non-commercial" in card["license"]["text"].lower()
    from pipeline.images import image_probability
    from pipeline.inference import load_backend

    rgb = np.full((300, 500, 3), 200, np.uint8)
    rgb[148:153, 20:480] = 30  # a dark crack
    probability = image_probability(rgb, load_backend(entry, "onnxruntime"))
    mask = probability >= entry.threshold * 255
    assert mask[148:153, 60:440].mean() > 0.5  # the crack is found
    assert mask[:100].mean() < 0.01  # and little else
