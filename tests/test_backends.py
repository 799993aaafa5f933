"""Backends on a CPU machine: selection, the install hint, and the TensorRT code that needs no GPU."""

import dataclasses
import importlib.util
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import levels
from hypothesis import given
from hypothesis import strategies as st

from models.tensorrt_build import Profile, strongly_typed
from pipeline import backends
from pipeline.backends import auto_backend, pad_batch, select_backend, split_batches
from pipeline.backends.tensorrt import (
    BufferPlan,
    EngineCache,
    EngineKey,
    buffer_plan,
    check_chips,
    check_engine_io,
    engine_name,
)
from pipeline.cli import cli

TENSORRT_HERE = all(importlib.util.find_spec(m) for m in ("tensorrt", "pycuda"))
KEY = EngineKey("ab" * 32, "10.13.0.35", "NVIDIA H200", "9.0", "fp16", Profile())


def random_chips(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 400, 400), dtype=np.uint8)


# --- ONNX export and the dynamic batch -------------------------------------------------------


def test_registry_onnx_matches_torch_at_batch_1_and_5(test_models):
    from models import registry
    from models.onnx_export import load_net, verify_onnx
    from models.package import MAX_ONNX_DIFF

    entry = registry.resolve()
    net = load_net(entry.variant, entry.file("weights"))
    assert verify_onnx(net, entry.file("onnx"), batch_sizes=(1, 5), seed=7) < MAX_ONNX_DIFF  # 1/510 + 1e-4


def test_fp16_onnx_keeps_the_contract_and_matches_torch_at_batch_1_and_5(test_models, tmp_path):
    onnx = pytest.importorskip("onnx")
    from models import registry
    from models.onnx_export import export_onnx, load_net, verify_onnx

    entry = registry.resolve()
    net = load_net(entry.variant, entry.file("weights"))
    path = export_onnx(net, tmp_path / "fp16.onnx", half=True)
    assert next(net.parameters()).dtype.is_floating_point and next(net.parameters()).element_size() == 4
    graph = onnx.load(str(path)).graph
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [
        ("chips", onnx.TensorProto.UINT8)
    ]
    assert [(o.name, o.type.tensor_type.elem_type) for o in graph.output] == [
        ("probability", onnx.TensorProto.UINT8)
    ]
    assert verify_onnx(net, path, batch_sizes=(1, 5)) < 1e-2


def test_dynamic_batch_gives_the_same_per_chip_result_whatever_the_batch(test_models):
    onnx = pytest.importorskip("onnx")
    from models import registry

    entry = registry.resolve()
    batch_dim = onnx.load(str(entry.file("onnx"))).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch
    backend = backends.load_backend(entry, "onnxruntime")
    chips = random_chips(4, seed=5)
    whole = backend.predict(chips)
    for size in (1, 3):
        parts = np.concatenate([backend.predict(chips[s]) for s in split_batches(4, size)])
        assert parts.dtype == np.uint8 and parts.shape == (4, 400, 400)
        assert levels(parts, whole) <= 1  # float noise may round a pixel to the next level


def test_the_inference_recorded_names_the_graph_that_ran(test_models):
    """What ``scenes.inference`` records: the backend and the precision of the graph it runs,
    also through the shared backend of scenes in flight."""
    from models import registry
    from pipeline.sharing import SharedBackend

    entry = registry.resolve()
    fp32 = backends.load_backend(entry, "onnxruntime", cpu_precision="fp32")
    assert backends.inference_of(fp32) == "onnxruntime fp32"
    if "onnx_int8" in entry.card["files"]:  # the shipped 1.0.0 has an INT8 graph
        assert backends.inference_of(backends.load_backend(entry, "onnxruntime", cpu_precision="int8")) == (
            "onnxruntime int8"
        )
    shared = SharedBackend(fp32)
    try:
        assert backends.inference_of(shared) == "onnxruntime fp32"
    finally:
        shared.close()
    assert backends.inference_of(backends.FixedBackend()) == "fixed"  # no precision to choose


# --- batching helpers --------------------------------------------------------------------------


@given(st.integers(0, 500), st.integers(1, 64))
def test_split_batches_covers_every_chip_once_in_order(n, batch):
    slices = split_batches(n, batch)
    assert [i for s in slices for i in range(s.start, s.stop)] == list(range(n))
    assert all(0 < s.stop - s.start <= batch for s in slices)


def test_pad_batch_appends_zero_chips_and_keeps_the_real_ones():
    chips = random_chips(3)[:, :, :8, :8]
    padded = pad_batch(chips, 5)
    assert padded.shape == (5, 3, 8, 8) and padded.dtype == np.uint8
    assert np.array_equal(padded[:3], chips) and not padded[3:].any()
    assert pad_batch(chips, 3) is chips
    with pytest.raises(ValueError, match="do not fit"):
        pad_batch(chips, 2)


# --- engine cache keys, profiles, buffers, contract ----------------------------------------------


def test_engine_cache_key_changes_with_each_of_its_parts():
    changes = {
        "onnx_sha256": "cd" * 32,
        "tensorrt_version": "10.14.1",
        "gpu_name": "NVIDIA A100",
        "compute_capability": "8.0",
        "precision": "fp32",
        "build": "0",
    }
    digests = {KEY.digest()}
    for field, value in changes.items():
        digests.add(dataclasses.replace(KEY, **{field: value}).digest())
    for field, value in {"min_batch": 2, "opt_batch": 16, "max_batch": 128, "size_px": 512}.items():
        digests.add(
            dataclasses.replace(KEY, profile=dataclasses.replace(Profile(), **{field: value})).digest()
        )
    assert len(digests) == 1 + len(changes) + 4
    assert dataclasses.replace(KEY).digest() == KEY.digest()  # and only with them
    assert EngineKey.from_dict(json.loads(json.dumps(KEY.to_dict()))) == KEY


def test_engine_name_says_what_it_is_and_differs_per_key(test_models):
    from models import registry

    entry = registry.resolve()
    name = engine_name(entry, KEY)
    assert name.startswith("test-b16-1.0.0-fp16-b1-32-64-")
    assert name != engine_name(entry, dataclasses.replace(KEY, gpu_name="NVIDIA L4"))


def test_profile_is_min_1_opt_32_max_64_and_checked():
    assert Profile.for_max_batch(64).shapes() == ((1, 3, 400, 400), (32, 3, 400, 400), (64, 3, 400, 400))
    assert Profile.for_max_batch(16).opt_batch == 16
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile(1, 32, 16)


def test_strong_typing_from_tensorrt_11():
    assert [strongly_typed(v) for v in ("8.6.1", "10.0.1", "10.13.0.35", "11.0.0", "12.1")] == [
        False,
        False,
        False,
        True,
        True,
    ]


def test_buffers_are_sized_for_the_profile_maximum():
    profile = Profile.for_max_batch(64)
    assert buffer_plan(profile) == BufferPlan((64, 3, 400, 400), (64, 400, 400), 64 * 480_000, 64 * 160_000)
    assert buffer_plan(profile, 1).output_bytes == 160_000  # uint8 probability: a quarter of float32
    assert buffer_plan(profile, 1, output_itemsize=4).output_bytes == 640_000  # graphs before 1.1
    for batch in (0, 65):
        with pytest.raises(ValueError, match="outside the engine's profile"):
            buffer_plan(profile, batch)


def test_output_and_input_contract_is_checked():
    assert check_engine_io({"chips": "UINT8"}, {"probability": "UINT8"}) is np.uint8
    assert check_engine_io({"chips": "UINT8"}, {"probability": "FLOAT"}) is np.float32
    with pytest.raises(ValueError, match="Rebuild it"):
        check_engine_io({"chips": "UINT8"}, {"probability": "HALF"})
    assert check_chips(random_chips(2), 400).flags.c_contiguous
    with pytest.raises(ValueError, match="uint8"):
        check_chips(random_chips(2).astype(np.float32), 400)
    with pytest.raises(ValueError, match=r"\(N, 3, 400, 400\)"):
        check_chips(random_chips(2)[:, :, :200], 400)


@pytest.mark.parametrize("root", ["local", "memory://crackmap-engine-cache"])
def test_engine_cache_returns_an_engine_only_for_its_key(root, tmp_path, caplog):
    cache = EngineCache(tmp_path / "engines" if root == "local" else root)
    name = "test-b16-1.0.0-fp16"
    assert cache.get(name, KEY) is None
    cache.put(name, KEY, b"serialized engine")
    assert cache.get(name, KEY) == b"serialized engine"
    with caplog.at_level(logging.WARNING, logger="pipeline.backends.tensorrt"):
        assert cache.get(name, dataclasses.replace(KEY, tensorrt_version="10.14.1")) is None
    assert "was built for TensorRT 10.13.0.35" in caplog.text and "rebuilding it" in caplog.text
    cache.put(name, KEY, b"serialized engine")
    engine_path = cache.path(f"{name}.engine")
    if root == "local":
        with open(engine_path, "wb") as f:
            f.write(b"damaged")
    else:
        import fsspec

        with fsspec.open(engine_path, "wb") as f:
            f.write(b"damaged")
    assert cache.get(name, KEY) is None  # the stored sha256 no longer matches


def test_an_unreadable_or_older_cache_entry_is_rebuilt_not_a_crash(tmp_path, caplog):
    cache = EngineCache(tmp_path)
    name = "test-b16-1.0.0-fp16"
    cache.put(name, KEY, b"serialized engine")
    meta = tmp_path / f"{name}.json"
    stored = json.loads(meta.read_text())
    older = {k: v for k, v in stored["key"].items() if k != "build"}  # written before "build" existed
    for text in (
        "{not json",
        json.dumps({**stored, "key": {**older, "retired_field": 1}}),
        json.dumps({**stored, "key": "x"}),
        json.dumps([1]),
    ):
        meta.write_text(text)
        with caplog.at_level(logging.WARNING, logger="pipeline.backends.tensorrt"):
            assert cache.get(name, KEY) is None
        assert "unreadable or older key" in caplog.text and "rebuilding it" in caplog.text
        caplog.clear()


# --- backend selection ---------------------------------------------------------------------------


def test_auto_picks_tensorrt_then_torch_then_the_cpu_default():
    assert auto_backend(True, True, True)[0] == "tensorrt"
    assert auto_backend(True, False, True)[0] == "torch"
    assert auto_backend(True, False, False)[0] == "onnxruntime"
    assert auto_backend(False, True, True)[0] == "onnxruntime"


def test_auto_selection_without_a_gpu_picks_onnxruntime(monkeypatch):
    monkeypatch.setattr(backends, "gpu_present", lambda: False)
    name, reason = select_backend("auto")
    assert name == "onnxruntime" and "no NVIDIA GPU" in reason


def test_load_backend_logs_what_auto_picked_and_why(test_models, monkeypatch, caplog):
    from models import registry

    monkeypatch.setattr(backends, "gpu_present", lambda: False)
    with caplog.at_level(logging.INFO, logger="pipeline.backends"):
        backend = backends.load_backend(registry.resolve(), "auto")
    assert backend.name == "onnxruntime" and backend.batch_size == 8
    assert "on backend onnxruntime (no NVIDIA GPU: the CPU default; fp32 graph: no INT8 graph)" in caplog.text


def test_backends_are_the_cli_choices():
    assert backends.BACKENDS == ("auto", "tensorrt", "torch", "onnxruntime")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        select_backend("cuda")


@pytest.mark.skipif(TENSORRT_HERE, reason="tensorrt and pycuda are installed here")
@pytest.mark.parametrize(
    "command",
    [
        ["segment", "{images}", "{out}", "--backend", "tensorrt"],
        ["models", "build-engine", "--cache", "{out}"],
    ],
)
def test_tensorrt_without_tensorrt_fails_with_the_install_hint(command, test_models, tmp_path):
    (tmp_path / "images").mkdir()
    args = [a.format(images=tmp_path / "images", out=tmp_path / "out") for a in command]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "pip install 'crackmap[gpu]'" in result.output and "pypi.nvidia.com" in result.output


def test_gpu_modules_import_nothing_heavy():
    code = (
        "import sys, pipeline.backends.tensorrt, pipeline.backends, models.tensorrt_build; "
        "heavy = {'torch', 'tensorrt', 'pycuda', 'prefect'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fixed_backend_returns_its_chip_for_every_chip_at_no_cost(tmp_path):
    from conftest import write_scene

    from models import registry
    from pipeline.backends import FixedBackend, short_crack
    from pipeline.scene import detect_cracks
    from pipeline.stores import DEFAULT_CRS

    backend = FixedBackend(batch_size=3)
    out = backend.predict(random_chips(5))
    assert out.shape == (5, 400, 400) and out.dtype == np.uint8 and not out.flags.writeable
    assert (out == short_crack()).all()
    with pytest.raises(ValueError, match="fixed probability"):
        backend.predict(random_chips(1)[:, :, :200, :200])
    scene = write_scene(tmp_path / "s.tif", np.full((3, 400, 1072), 128, np.uint8))  # 3 chips
    result = detect_cracks(
        str(scene), backend, registry.resolve("hrsegnet-b16:1.0.0"), tmp_path / "p.tif", DEFAULT_CRS
    )
    assert result.chip_count == 3 and len(result.cracks) == 3  # one crack per chip, none joined
