"""One scene through the three threads: batches in order, and every failure raised, never a hang."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import DarknessBackend, paint_crack, write_scene
from rasterio.enums import MaskFlags

from pipeline import vectorize
from pipeline.backends import predictions
from pipeline.probability import read_rows
from pipeline.scene import detect_cracks
from pipeline.stores import DEFAULT_CRS


class PooledDarkness(DarknessBackend):
    """Darkness through ``submit``, with the later of two batches often finishing first."""

    threads = 2

    def __init__(self, fail_at: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(self.threads)
        self._count = 0
        self.fail_at = fail_at

    def submit(self, chips):
        self._count += 1
        count = self._count

        def run():
            time.sleep(0.02 if count % 2 else 0.0)
            if count == self.fail_at:
                raise RuntimeError(f"network failed on batch {count}")
            return self.predict(chips)

        return self._pool.submit(run)


class FailingDarkness(DarknessBackend):
    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def predict(self, chips):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(f"network failed on batch {self.calls}")
        return super().predict(chips)


@pytest.fixture
def scene(tmp_path):
    pixels = np.full((3, 1500, 1500), 200, np.uint8)
    paint_crack(pixels, (20, 40), (1480, 1300), width_px=5)
    return write_scene(tmp_path / "scene.tif", pixels)


def test_batches_in_flight_come_back_in_order():
    backend = PooledDarkness()
    items = [np.full((1, 3, 4, 4), i, np.uint8) for i in range(9)]
    got = list(predictions(backend, items, lambda chips: chips))
    assert [item[0, 0, 0, 0] for item, _ in got] == list(range(9))
    assert all(np.allclose(p, (255 - item[0, 0, 0, 0]) / 255) for item, p in got)


def test_a_pooled_backend_maps_the_same_cracks(scene, tmp_path, test_models):
    from models.registry import resolve

    model = resolve(None)
    plain = detect_cracks(str(scene), DarknessBackend(), model, tmp_path / "a.tif", DEFAULT_CRS)
    pooled = detect_cracks(str(scene), PooledDarkness(), model, tmp_path / "b.tif", DEFAULT_CRS)
    assert len(plain.cracks) == 1
    assert [c.geometry.wkb for c in pooled.cracks] == [c.geometry.wkb for c in plain.cracks]


@pytest.mark.parametrize(
    "backend", [FailingDarkness(fail_at=3), PooledDarkness(fail_at=3)], ids=["predict", "submit"]
)
def test_a_network_failure_is_raised_and_nothing_is_left(scene, tmp_path, test_models, backend):
    from models.registry import resolve

    threads = threading.active_count()
    with pytest.raises(RuntimeError, match="network failed on batch 3"):
        detect_cracks(str(scene), backend, resolve(None), tmp_path / "p.tif", DEFAULT_CRS)
    assert list(tmp_path.glob("p.tif*")) == []
    assert threading.active_count() <= threads + 2  # the pooled backend's own threads at most


def test_a_failure_after_the_network_is_raised_without_blocking_it(scene, tmp_path, test_models, monkeypatch):
    from models.registry import resolve

    def broken(*args, **kwargs):
        raise ValueError("vectorizing failed")

    monkeypatch.setattr(vectorize, "band_pieces", broken)
    # one chip per batch: many more batches than the queues hold, all after the failure
    backend = DarknessBackend()
    backend.batch_size = 1
    done = []

    def run():
        with pytest.raises(ValueError, match="vectorizing failed"):
            detect_cracks(str(scene), backend, resolve(None), tmp_path / "p.tif", DEFAULT_CRS)
        done.append(True)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert done == [True], "detect_cracks hung after the stitching thread failed"
    assert list(tmp_path.glob("p.tif*")) == []


def test_the_probability_cog_masks_exactly_the_pixels_without_data(tmp_path, test_models):
    from models.registry import resolve

    model = resolve(None)
    pixels = np.full((3, 1700, 900), 200, np.uint8)
    pixels[:, 1200:1300, 100:400] = 0  # nodata first met below two full tile rows
    with_gap = write_scene(tmp_path / "gap.tif", pixels, nodata=0)
    full = write_scene(tmp_path / "full.tif", np.full((3, 1700, 900), 200, np.uint8))
    for scene, name in ((with_gap, "gap"), (full, "full")):
        detect_cracks(str(scene), DarknessBackend(), model, tmp_path / f"{name}-p.tif", DEFAULT_CRS)
    valid = np.concatenate([v for _, _, v in read_rows(tmp_path / "gap-p.tif")])
    expected = np.ones((1700, 900), bool)
    expected[1200:1300, 100:400] = False
    assert (valid == expected).all()
    with rasterio.open(tmp_path / "full-p.tif") as ds:  # all valid: no mask band at all
        assert ds.mask_flag_enums == ([MaskFlags.all_valid],)
    assert np.concatenate([v for _, _, v in read_rows(tmp_path / "full-p.tif")]).all()


def test_a_float_scene_with_nan_pixels_finds_its_crack(tmp_path, test_models):
    from models.registry import resolve

    pixels = np.random.default_rng(2).normal(1000.0, 20.0, (3, 600, 700)).astype(np.float32)
    paint_crack(pixels, (20, 140), (580, 650), width_px=5, value=300)
    plain = detect_cracks(
        str(write_scene(tmp_path / "plain.tif", pixels)),
        DarknessBackend(),
        resolve(None),
        tmp_path / "plain-p.tif",
        DEFAULT_CRS,
    )
    pixels[:, :, :100] = np.nan  # beside the crack: nodata, not black
    with_nan = detect_cracks(
        str(write_scene(tmp_path / "nan.tif", pixels)),
        DarknessBackend(),
        resolve(None),
        tmp_path / "nan-p.tif",
        DEFAULT_CRS,
    )
    assert len(plain.cracks) == len(with_nan.cracks) == 1
    assert with_nan.cracks[0].length_m == pytest.approx(plain.cracks[0].length_m, rel=0.02)


def test_a_scene_smaller_than_a_chip_finds_the_cracks_the_full_scene_shows(tmp_path):
    """A 100 x 80 crop of a PaveSeg photo, around a crack the shipped model finds in the full scene.

    Padded with black, the network read the border as the scene and found nothing here
    (probability at most 27/255); mirrored, the crop looks like the road it was cut from.
    """
    import shutil

    from models.registry import resolve
    from pipeline.backends import load_backend

    entry = resolve("hrsegnet-b16:1.0.0")
    path = tmp_path / "crop.tif"
    shutil.copyfile(Path(__file__).parent / "data" / "paveseg-crack-crop.tif", path)  # tests/data/README.md
    result = detect_cracks(
        str(path), load_backend(entry, "onnxruntime"), entry, tmp_path / "crop-p.tif", DEFAULT_CRS
    )
    with rasterio.open(tmp_path / "crop-p.tif") as ds:
        probability = ds.read(1)
    assert probability.max() >= entry.threshold * 255 and len(result.cracks) >= 1
