import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import levels  # noqa: E402

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


def test_the_exported_module_converts_with_module_methods():
    from models.onnx_export import ChipsToProbability

    module = ChipsToProbability(create("b16"))
    module.half()  # nn.Module.half(), once hidden by a bool attribute of the same name
    assert module.probability.margin.weight.dtype == torch.float16 and not module.fp16


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
    from pipeline.backends import load_backend

    entry = registry.resolve()
    onnx, torch_net = load_backend(entry, "onnxruntime"), load_backend(entry, "torch")
    for batch in (1, 5):
        chips = np.random.default_rng(batch).integers(0, 256, (batch, 3, 400, 400), dtype=np.uint8)
        a, b = onnx.predict(chips), torch_net.predict(chips)
        assert a.shape == b.shape == (batch, 400, 400)
        assert levels(a, b) <= 1


def test_batch_size_does_not_change_a_chip_result(test_models):
    from pipeline.backends import load_backend

    entry = registry.resolve()
    chips = np.random.default_rng(3).integers(0, 256, (5, 3, 400, 400), dtype=np.uint8)
    for name in ("onnxruntime", "torch"):
        backend = load_backend(entry, name)
        together = backend.predict(chips)
        alone = np.concatenate([backend.predict(chips[i : i + 1]) for i in range(5)])
        assert together.shape == (5, 400, 400) and together.dtype == np.uint8
        assert levels(together, alone) <= 1


def test_torch_and_onnxruntime_backends_agree(test_models):
    from pipeline.backends import load_backend

    entry = registry.resolve()
    chips = np.random.default_rng(4).integers(0, 256, (3, 3, 400, 400), dtype=np.uint8)
    a = load_backend(entry, "onnxruntime").predict(chips)
    b = load_backend(entry, "torch").predict(chips)
    assert a.dtype == b.dtype == np.uint8
    assert levels(a, b) <= 1


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
    import cv2

    from pipeline.backends import load_backend
    from pipeline.images import image_probability

    # a meandering dark crack on grainy grey road (1.1.0 learned that a perfectly straight,
    # uniform dark bar on a flat background is a joint or a marking, not a crack)
    rng = np.random.default_rng(0)
    rgb = cv2.GaussianBlur(np.clip(rng.normal(170, 14, (300, 500, 3)), 0, 255).astype(np.uint8), (3, 3), 0)
    x = np.arange(20, 480)
    y = 150 + 25 * np.sin(x / 37.0) + np.cumsum(rng.normal(0, 0.6, x.size))
    crack = np.zeros((300, 500), np.uint8)
    cv2.polylines(crack, [np.stack([x, y], 1).astype(np.int32).reshape(-1, 1, 2)], False, 1, 3)
    rgb[crack > 0] = 60
    probability = image_probability(rgb, load_backend(entry, "onnxruntime"))
    mask = probability >= entry.threshold * 255
    assert mask[crack > 0].mean() > 0.5  # the crack is found
    assert mask[crack == 0].mean() < 0.02  # and little else


@pytest.mark.parametrize("size", [(7, 9), (100, 100)])
def test_subpixel_convolution_equals_the_transposed_convolution_and_its_batch_norm(size):
    from models.hrsegnet import subpixel_conv

    torch.manual_seed(3)
    up = torch.nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1, output_padding=1)
    bn = torch.nn.BatchNorm2d(16).eval()
    with torch.no_grad():  # non-trivial statistics and affine terms
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 16, *size)
    with torch.no_grad():
        expected = bn(up(x))
        got = torch.nn.functional.pixel_shuffle(
            subpixel_conv(up, bn)(torch.nn.functional.pad(x, (0, 1, 0, 1))), 2
        )
    assert got.shape == expected.shape == (2, 16, 2 * size[0], 2 * size[1])
    assert (got - expected).abs().max() <= 1e-5 and expected.abs().max() > 1  # the borders included
    with pytest.raises(TypeError, match="stride-2 transposed"):
        subpixel_conv(torch.nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1), bn)


def test_hrsegnet_b16_1_0_0_computes_exactly_what_it_always_did():
    """Loaded from the zoo, 1.0.0 (trained with padding-inclusive pooling) is bit-identical.

    The reference was computed by the code before exclusive pooling existed, on one
    thread. Floating-point kernels differ between CPU kinds (AVX512 vs AVX2), so
    elsewhere the outputs must agree to float32 rounding instead.
    """
    from models.onnx_export import load_net

    reference = np.load(Path(__file__).parent / "data" / "hrsegnet_b16_1.0.0_reference.npz")
    entry = registry.resolve("hrsegnet-b16:1.0.0")
    net = load_net(entry.variant, entry.file("weights"))
    assert net.exclusive_pool is False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            logits = net(torch.from_numpy(reference["chips"]).float() / 255.0).numpy()
    finally:
        torch.set_num_threads(threads)
    same_kernels = (
        str(reference["cpu"]) == torch.backends.cpu.get_cpu_capability()
        and str(reference["torch"]) == torch.__version__
    )
    if same_kernels:
        np.testing.assert_array_equal(logits, reference["logits"])
    else:
        np.testing.assert_allclose(logits, reference["logits"], rtol=0, atol=1e-4)
    exclusive = create("b16")
    exclusive.load_state_dict(net.state_dict())
    with torch.inference_mode():
        changed = exclusive.eval()(torch.from_numpy(reference["chips"]).float() / 255.0).numpy()
    assert np.abs(changed - reference["logits"]).max() > 1e-3  # the pooling matters: the test can fail


def test_exclusive_pooling_matches_a_hand_computed_border_average():
    net = create("b16")
    pool = net.blocks[1].l_conv[0][0]
    assert isinstance(pool, torch.nn.AvgPool2d)
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    out = pool(x)[0, 0]
    # 3x3 windows with stride 2 and padding 1: the corner window covers rows/cols -1..1.
    assert out[0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 4)  # padding left out
    assert out[0, 1].item() == pytest.approx((1 + 2 + 3 + 5 + 6 + 7) / 6)
    assert out[1, 1].item() == pytest.approx(sum(range(16)[i] for i in (5, 6, 7, 9, 10, 11, 13, 14, 15)) / 9)
    inclusive = create("b16", exclusive_pool=False).blocks[1].l_conv[0][0](x)[0, 0]
    assert inclusive[0, 0].item() == pytest.approx((0 + 1 + 4 + 5) / 9)


def test_vector_accuracy_is_added_to_the_card_and_rendered(test_models, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(test_models, copy)
    monkeypatch.setenv("CRACKMAP_MODELS", str(copy))
    scene = {
        "scene": "gaps384-wgs84",
        "f1": 0.8,
        "precision": 0.9,
        "recall": 0.72,
        "length_ratio": 1.05,
        "length_ratio_by_width": {"thin": 0.9, "medium": None, "wide": 1.1},
    }
    record = {
        "command": "benchmarks/vector_accuracy.py",
        "date": "2026-11-30",
        "tolerance_px": 5.0,
        "vectorizing": "bridging 12 px",
        "scenes": [scene],
    }
    entry = registry.add_record(registry.resolve("test-b16:1.0.0"), "vector_accuracy", record)
    assert registry.resolve("test-b16:1.0.0").card["vector_accuracy"] == record
    text = (entry.folder / "MODEL_CARD.md").read_text()
    assert "| gaps384-wgs84 | 0.800 | 0.900 | 0.720 | 1.05 | 0.90 / - / 1.10 |" in text
    with pytest.raises(registry.ModelError, match="never replaced"):
        registry.add_record(entry, "vector_accuracy", record)


def test_line_settings_chosen_for_a_version_drive_its_vectorizing(test_models, tmp_path, monkeypatch):
    """A version's card may carry the line threshold and hysteresis chosen for it on val scenes
    (``vector_accuracy.py --choose``): the pipeline uses them, a threshold asked for still wins,
    and a version without them keeps its pixel threshold and the vectorizer's hysteresis."""
    import shutil

    from pipeline.scene import SceneOptions
    from pipeline.vectorize import VectorizeParams

    copy = tmp_path / "models"
    shutil.copytree(test_models, copy)
    monkeypatch.setenv("CRACKMAP_MODELS", str(copy))
    plain = registry.resolve("test-b16:1.0.0")
    params = SceneOptions().vectorize_params(plain)
    assert (params.threshold, params.low_ratio) == (plain.threshold, VectorizeParams().low_ratio)

    chosen = {
        "threshold": 0.123,
        "low_ratio": 0.3,
        "rule": "the best mean line F1",
        "command": "benchmarks/vector_accuracy.py --choose",
        "date": "2026-11-30",
    }
    entry = registry.add_record(plain, "vectorize", chosen)
    assert entry.line_settings == {"threshold": 0.123, "low_ratio": 0.3}
    params = SceneOptions().vectorize_params(registry.resolve("test-b16:1.0.0"))
    assert (params.threshold, params.low_ratio) == (0.123, 0.3)
    asked = SceneOptions(threshold=0.3).vectorize_params(entry)  # lines still grow down to 0.123 x 0.3
    assert asked.threshold == 0.3 and asked.threshold * asked.low_ratio == pytest.approx(0.123 * 0.3)
    assert SceneOptions(threshold=0.03).vectorize_params(entry).low_ratio == 1.0  # never above the seed
    assert "traced at crack probability 0.123" in (entry.folder / "MODEL_CARD.md").read_text()
