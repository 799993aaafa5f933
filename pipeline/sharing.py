"""Several scenes in flight in one worker process, sharing one network backend.

A GPU runs large batches far better than small ones, and one scene's reader
and stitcher cannot keep it busy.  ``map_scenes`` maps up to ``in_flight``
scenes at once, each with its own reader, stitcher and vectorizer threads (so
decoding and vectorizing spread over the cores), and one ``SharedBackend``
merges the batches the scenes are waiting on into one call of the network.
Memory grows with ``in_flight`` (each scene holds a few chip rows of its own
width), never with scene length.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rasterio.crs import CRS

from models.registry import ModelEntry
from pipeline.backends import Backend
from pipeline.errors import OptionsError

_STOP = object()
GPU_IN_FLIGHT = 4  # scenes in flight by default where the network runs on a GPU


def default_in_flight(backend: str = "auto", gpu: bool | None = None) -> int:
    """Scenes mapped at once in one process unless told: ``GPU_IN_FLIGHT`` where the network runs on
    an NVIDIA GPU (one scene's reading and vectorizing cannot keep it busy), 1 on CPUs (there the
    network is the limit already).  ``gpu``: whether one is present (default: look).

    >>> default_in_flight("tensorrt", gpu=True), default_in_flight("onnxruntime", gpu=True)
    (4, 1)
    >>> default_in_flight("torch", gpu=False)
    1
    """
    from pipeline.backends import choose_backend, gpu_present

    gpu = gpu_present() if gpu is None else gpu
    return GPU_IN_FLIGHT if gpu and choose_backend(backend) in ("tensorrt", "torch") else 1


def scenes_in_flight(in_flight: int | None, backend: str = "auto") -> int:
    """``in_flight`` as given (checked), or ``default_in_flight(backend)`` for None.

    Raises:
        OptionsError: fewer than one scene at once.
    """
    if in_flight is None:
        return default_in_flight(backend)
    if in_flight < 1:
        raise OptionsError(f"in_flight: {in_flight} scenes at once; give 1 or more")
    return in_flight


class SharedBackend:
    """One backend for several callers at once: waiting batches are merged into one call.

    Each caller's ``predict`` waits while a server thread runs the requests
    that are waiting together, up to ``max_chips`` chips in one call of the
    wrapped backend (a larger request runs alone), and hands each caller
    exactly the rows of its own chips.
    """

    name = "shared"

    def __init__(self, backend: Backend, max_chips: int | None = None) -> None:
        self.backend = backend
        self.batch_size = backend.batch_size
        self.max_chips = max_chips or 4 * backend.batch_size
        self.calls = 0  # calls of the wrapped backend, for tests and benchmarks
        self._requests: queue.Queue = queue.Queue()
        self._server = threading.Thread(target=self._serve, name="crackmap-shared-backend", daemon=True)
        self._server.start()

    def predict(self, chips: np.ndarray) -> np.ndarray:
        future: Future = Future()
        self._requests.put((chips, future))
        return future.result()

    def close(self) -> None:
        """Stop the server thread once the requests already made are answered."""
        self._requests.put(_STOP)
        self._server.join()

    def _serve(self) -> None:
        carry = None  # a request taken off the queue that did not fit the last call
        while True:
            first = carry if carry is not None else self._requests.get()
            carry = None
            if first is _STOP:
                return
            group, chips = [first], len(first[0])
            while chips < self.max_chips:
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP or chips + len(item[0]) > self.max_chips:
                    carry = item
                    break
                group.append(item)
                chips += len(item[0])
            self._run(group)

    def _run(self, group: list[tuple[np.ndarray, Future]]) -> None:
        try:
            merged = group[0][0] if len(group) == 1 else np.concatenate([c for c, _ in group])
            out = self.backend.predict(merged)
            self.calls += 1
        except BaseException as exc:  # every waiting caller gets the error
            for _, future in group:
                future.set_exception(exc)
            return
        start = 0
        for chips, future in group:
            future.set_result(out[start : start + len(chips)])
            start += len(chips)


def map_scenes(
    uris: Sequence[str],
    backend: Backend,
    model: ModelEntry,
    probability_path: Callable[[str], str | Path],
    store_crs: CRS,
    in_flight: int = 2,
    **scene_kwargs,
) -> list:
    """Map ``uris`` with up to ``in_flight`` scenes at once over one shared backend.

    Returns, in the order of ``uris``, each scene's ``SceneResult`` or the
    exception that stopped it (one failing scene never stops the others).
    ``scene_kwargs`` go to ``pipeline.scene.detect_cracks`` (options, ...).
    """
    from pipeline.scene import detect_cracks

    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, not {in_flight}")
    shared = SharedBackend(backend)

    def one(uri: str):
        try:
            return detect_cracks(uri, shared, model, probability_path(uri), store_crs, **scene_kwargs)
        except Exception as exc:  # noqa: BLE001  (returned to the caller, scene by scene)
            return exc

    try:
        with ThreadPoolExecutor(in_flight, thread_name_prefix="crackmap-scene") as pool:
            return list(pool.map(one, uris))
    finally:
        shared.close()
