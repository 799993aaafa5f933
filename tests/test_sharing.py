"""Several scenes in flight sharing one backend: same output as one at a time, rows never mixed."""

import threading

import numpy as np
import pytest
import rasterio
from conftest import DarknessBackend, paint_crack, write_scene
from hypothesis import given, settings
from hypothesis import strategies as st

from models import registry
from pipeline.backends import FixedBackend
from pipeline.sharing import SharedBackend, map_scenes
from pipeline.stores import DEFAULT_CRS


class RowTagBackend:
    """Probability of a chip = its first pixel's value: tells exactly whose chip a row is."""

    name = "row-tag"
    batch_size = 4

    def predict(self, chips: np.ndarray) -> np.ndarray:
        return np.broadcast_to(chips[:, 0, :1, :1], (len(chips), *chips.shape[2:])).astype(np.uint8)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=2, max_size=6), st.integers(1, 12))
def test_shared_backend_hands_every_caller_exactly_its_own_rows(sizes, max_chips):
    shared = SharedBackend(RowTagBackend(), max_chips=max_chips)
    results, barrier = {}, threading.Barrier(len(sizes))

    def caller(i: int, n: int) -> None:
        chips = np.zeros((n, 3, 8, 8), np.uint8)
        chips[:, 0, 0, 0] = (10 * i + np.arange(n)) % 256  # caller and chip index in the pixel
        barrier.wait()  # all callers at once, so their requests are merged
        results[i] = (chips[:, 0, 0, 0], shared.predict(chips))

    threads = [threading.Thread(target=caller, args=(i, n)) for i, n in enumerate(sizes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared.close()
    for i, n in enumerate(sizes):
        tags, out = results[i]
        assert out.shape == (n, 8, 8)
        assert (out[:, 0, 0] == tags).all() and (out == tags[:, None, None]).all()
    assert shared.calls <= len(sizes)


def test_a_failing_network_call_reaches_every_waiting_caller():
    class Broken:
        name, batch_size = "broken", 4

        def predict(self, chips):
            raise RuntimeError("the GPU fell over")

    shared = SharedBackend(Broken())
    with pytest.raises(RuntimeError, match="fell over"):
        shared.predict(np.zeros((2, 3, 8, 8), np.uint8))
    shared.close()


def scenes(tmp_path, shapes):
    paths = []
    for i, (height, width) in enumerate(shapes):
        pixels = np.full((3, height, width), 170 + 10 * i, np.uint8)
        paint_crack(pixels, (20, 15), (height - 30, width - 20), 5)
        paths.append(str(write_scene(tmp_path / f"scene{i}.tif", pixels)))
    return paths


def outputs(results, folder):
    return [
        (
            r.chip_count,
            [c.geometry.wkb for c in r.cracks],
            rasterio.open(folder / f"{r.scene.scene_id}.tif").read(1),
        )
        for r in results
    ]


@pytest.mark.parametrize(
    "backend", [DarknessBackend(), FixedBackend(batch_size=3)], ids=["darkness", "fixed"]
)
def test_output_is_identical_whatever_the_number_of_scenes_in_flight(tmp_path, backend):
    model = registry.resolve("hrsegnet-b16:1.0.0")
    uris = scenes(tmp_path, [(420, 900), (800, 500), (400, 400), (1100, 760)])
    runs = {}
    for in_flight in (1, 2, 4):
        out = tmp_path / f"out{in_flight}"
        out.mkdir()
        results = map_scenes(
            uris,
            backend,
            model,
            lambda uri, out=out: out / f"{uri.split('/')[-1][:-4]}.tif",
            DEFAULT_CRS,
            in_flight=in_flight,
        )
        assert not [r for r in results if isinstance(r, Exception)], results
        runs[in_flight] = outputs(results, out)
    for in_flight in (2, 4):
        for (chips, cracks, probability), (chips1, cracks1, probability1) in zip(runs[in_flight], runs[1]):
            assert chips == chips1 and cracks == cracks1
            np.testing.assert_array_equal(probability, probability1)


@settings(max_examples=4, deadline=None)
@given(st.lists(st.tuples(st.integers(400, 900), st.integers(400, 900)), min_size=2, max_size=3))
def test_scenes_of_different_sizes_in_flight_never_mix_rows(tmp_path_factory, shapes):
    """Each scene is one grey level; the darkness backend turns it into one probability per scene."""
    tmp = tmp_path_factory.mktemp("mix")
    uris = []
    for i, (height, width) in enumerate(shapes):
        uris.append(str(write_scene(tmp / f"s{i}.tif", np.full((3, height, width), 40 + 60 * i, np.uint8))))
    results = map_scenes(
        uris,
        DarknessBackend(),
        registry.resolve("hrsegnet-b16:1.0.0"),
        lambda uri: tmp / f"p-{uri.split('/')[-1]}",
        DEFAULT_CRS,
        in_flight=len(uris),
    )
    for i, (uri, result) in enumerate(zip(uris, results)):
        assert not isinstance(result, Exception), result
        with rasterio.open(tmp / f"p-{uri.split('/')[-1]}") as ds:
            probability = ds.read(1)
        expected = np.rint((255.0 - (40 + 60 * i)) / 255.0 * 255.0)
        assert probability.shape == shapes[i]
        assert np.abs(probability.astype(int) - expected).max() <= 1  # only its own rows


def test_one_failing_scene_does_not_stop_the_others(tmp_path):
    uris = scenes(tmp_path, [(420, 600)]) + [str(tmp_path / "missing.tif")]
    results = map_scenes(
        uris,
        DarknessBackend(),
        registry.resolve("hrsegnet-b16:1.0.0"),
        lambda uri: tmp_path / f"p-{uri.split('/')[-1]}",
        DEFAULT_CRS,
        in_flight=2,
    )
    assert results[0].chip_count > 0 and isinstance(results[1], Exception)


def test_threads_asking_for_the_backend_at_once_wait_for_one_load(monkeypatch):
    """A CLI's warm-up and its first scene (or scenes in flight) ask for the model at once: one
    load, which the later caller waits for.  The first load waits (bounded) for a second one to
    begin: without the lock it does, and the test sees two."""
    from pipeline import survey

    second_load = threading.Event()
    loads = []

    def load_backend(entry, backend):
        loads.append(backend)
        if len(loads) == 1:
            second_load.wait(timeout=2)  # never set while the lock holds the other caller back
        else:
            second_load.set()
        return DarknessBackend()

    monkeypatch.setattr(survey, "load_backend", load_backend)
    monkeypatch.setattr(survey, "resolve", lambda spec: spec)
    survey._loaded_backend.cache_clear(), survey._shared_backend.cache_clear()
    try:
        got = []
        callers = [
            threading.Thread(target=lambda: got.append(survey.cached_backend("m:lock-test", "x")))
            for _ in range(2)
        ]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        assert len(loads) == 1 and got[0] is got[1]
        assert survey.shared_backend("m:lock-test", "x").backend is got[0][1]
    finally:
        survey._loaded_backend.cache_clear(), survey._shared_backend.cache_clear()
