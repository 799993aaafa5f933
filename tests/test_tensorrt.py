"""GPU backends: TensorRT (needs tensorrt, pycuda and an NVIDIA GPU) and torch on CUDA.

Every test here skips, with the reason, on a machine without them; the parts
of both backends that need no GPU are tested in test_backends.py.
"""

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import levels

from pipeline.backends import gpu_present

NO_GPU = not gpu_present()
NO_TENSORRT = not all(importlib.util.find_spec(m) for m in ("tensorrt", "pycuda"))
needs_tensorrt = pytest.mark.skipif(
    NO_GPU or NO_TENSORRT,
    reason="needs an NVIDIA GPU with tensorrt and pycuda (pip install 'crackmap[gpu]')"
    + (": no GPU here" if NO_GPU else ": tensorrt/pycuda not installed here"),
)


def cuda_torch() -> bool:
    if NO_GPU or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


needs_cuda_torch = pytest.mark.skipif(not cuda_torch(), reason="needs PyTorch with CUDA and a GPU")


def random_chips(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 400, 400), dtype=np.uint8)


@pytest.fixture
def entry(test_models):
    from models import registry

    return registry.resolve()


@pytest.fixture
def reference(entry):
    from pipeline.backends import load_backend

    return load_backend(entry, "onnxruntime")


@needs_tensorrt
def test_fp32_engine_matches_onnxruntime_whatever_the_batch(entry, reference, tmp_path):
    from pipeline.backends.tensorrt import EngineCache, TensorRTBackend

    backend = TensorRTBackend(
        entry, batch_size=70, micro_batch=32, precision="fp32", cache=EngineCache(tmp_path)
    )
    chips = random_chips(70, seed=1)  # three micro-batches, the last one short, over both buffer sets
    got = backend.predict(chips)
    assert got.dtype == np.uint8 and got.shape == (70, 400, 400)
    expected = np.concatenate([reference.predict(chips[i : i + 8]) for i in range(0, 70, 8)])
    assert levels(got, expected) <= 1
    alone = np.concatenate([backend.predict(chips[i : i + 1]) for i in (0, 33, 69)])
    assert levels(alone, got[[0, 33, 69]]) <= 1


@needs_tensorrt
def test_fp16_engine_is_close_to_fp32(entry, reference, tmp_path):
    from pipeline.backends.tensorrt import EngineCache, TensorRTBackend

    backend = TensorRTBackend(entry, precision="fp16", cache=EngineCache(tmp_path))
    chips = random_chips(16, seed=2)
    assert levels(backend.predict(chips), reference.predict(chips)) <= 6  # 2e-2, in 1/255


@needs_tensorrt
def test_cached_engine_is_reused_and_rebuilt_when_its_key_does_not_match(entry, tmp_path, caplog):
    from pipeline.backends.tensorrt import EngineCache, Profile, engine_for

    cache, profile = EngineCache(tmp_path), Profile.for_max_batch(8)
    engine, key, path = engine_for(entry, "fp32", profile, cache)
    assert engine_for(entry, "fp32", profile, cache)[0] == engine
    meta = Path(path).with_suffix(".json")
    stored = json.loads(meta.read_text())
    stored["key"] = dataclasses.replace(key, tensorrt_version="0.0.0").to_dict()
    meta.write_text(json.dumps(stored))
    with caplog.at_level(logging.WARNING, logger="pipeline.backends.tensorrt"):
        engine_for(entry, "fp32", profile, cache)
    assert "was built for TensorRT 0.0.0" in caplog.text
    assert json.loads(meta.read_text())["key"] == key.to_dict()  # rebuilt and stored again


@needs_tensorrt
def test_auto_picks_tensorrt_on_a_gpu_with_tensorrt():
    from pipeline.backends import select_backend

    assert select_backend("auto")[0] == "tensorrt"


@needs_cuda_torch
def test_torch_cuda_graphs_pad_a_short_batch_and_match_the_cpu(entry, reference):
    from pipeline.backends.pytorch import TorchBackend

    backend = TorchBackend(entry, batch_size=8)
    assert backend.device.type == "cuda"
    chips = random_chips(11, seed=3)  # one full batch and a short one, padded to the same graph
    got = backend.predict(chips)
    assert got.dtype == np.uint8 and got.shape == (11, 400, 400)
    assert len(backend._graphs) == 1
    assert levels(got, reference.predict(chips)) <= 6  # FP16 autocast vs FP32: 2e-2
    assert levels(backend.predict(chips[3:4]), got[3:4]) <= 1


@needs_tensorrt
def test_tensorrt_from_other_threads_after_a_failed_call_and_closed_from_another(entry, reference, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.backends.tensorrt import EngineCache, TensorRTBackend

    backend = TensorRTBackend(entry, precision="fp32", micro_batch=32, cache=EngineCache(tmp_path))
    chips = random_chips(130, seed=3)  # micro-batches 32/32/32/32/2 over two buffer sets
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(ValueError):  # a bad call in between changes nothing
            pool.submit(backend.predict, chips[:, :, :200]).result()
        got = pool.submit(backend.predict, chips).result()
        singles = np.concatenate([reference.predict(chips[i : i + 1]) for i in range(0, 130, 13)])
        assert levels(got[::13], singles) <= 1
        pool.submit(backend.close).result()  # freed from a thread that did not create it
    with pytest.raises(RuntimeError, match="closed"):
        backend.predict(chips[:1])
    backend.close()  # twice is fine
