"""The backend contract: uint8 chips in, uint8 crack probabilities out; and what backends share."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np


def split_batches(n: int, batch: int) -> list[slice]:
    """Slices of at most ``batch`` chips that cover ``n`` chips in order.

    >>> split_batches(70, 32)
    [slice(0, 32, None), slice(32, 64, None), slice(64, 70, None)]
    """
    return [slice(start, min(start + batch, n)) for start in range(0, n, batch)]


def pad_batch(chips: np.ndarray, batch: int) -> np.ndarray:
    """``chips`` with zero chips appended up to ``batch`` (for fixed-shape graphs); unchanged if full.

    >>> pad_batch(np.ones((3, 3, 2, 2), np.uint8), 4).shape
    (4, 3, 2, 2)
    """
    if len(chips) > batch:
        raise ValueError(f"{len(chips)} chips do not fit a batch of {batch}")
    if len(chips) == batch:
        return chips
    padded = np.zeros((batch, *chips.shape[1:]), dtype=chips.dtype)
    padded[: len(chips)] = chips
    return padded


def as_uint8(probability: np.ndarray) -> np.ndarray:
    """Probabilities as uint8 0..255: unchanged if already uint8, else float [0, 1] rounded.

    >>> as_uint8(np.array([0.0, 0.5, 1.0], np.float32)).tolist()
    [0, 128, 255]
    """
    if probability.dtype == np.uint8:
        return probability
    scaled = np.clip(probability, 0.0, 1.0) * np.float32(255.0)
    return np.rint(scaled, out=scaled).astype(np.uint8)


T = TypeVar("T")


class Backend(Protocol):
    """Runs a model on batches of chips."""

    name: str
    batch_size: int

    def predict(self, chips: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, H, W) RGB chips -> uint8 (N, H, W) crack probability x 255."""


def inference_of(backend: Backend) -> str:
    """Which network ran, as recorded with each scene: the backend and, where it chose one, its
    precision ("onnxruntime int8", "onnxruntime fp32", "tensorrt fp16", "torch cuda fp16")."""
    inner = getattr(backend, "backend", backend)  # a SharedBackend wraps the one that runs
    precision = getattr(inner, "precision", None)
    return f"{inner.name} {precision}" if precision else inner.name


@runtime_checkable
class SubmittingBackend(Backend, Protocol):
    """A backend that also runs batches asynchronously, up to ``threads`` at once."""

    threads: int

    def submit(self, chips: np.ndarray) -> Future[np.ndarray]:
        """``predict(chips)`` started in the background."""


def predictions(
    backend: Backend, items: Iterable[T], chips: Callable[[T], np.ndarray]
) -> Iterator[tuple[T, np.ndarray]]:
    """``(item, backend.predict(chips(item)))`` for each item, in order.

    A backend with ``submit(chips) -> Future`` keeps up to ``backend.threads``
    batches in flight, so the next batch starts while one is still running.
    """
    if not isinstance(backend, SubmittingBackend):
        for item in items:
            yield item, backend.predict(chips(item))
        return
    pending: deque[tuple[T, Future[np.ndarray]]] = deque()
    for item in items:
        pending.append((item, backend.submit(chips(item))))
        if len(pending) >= backend.threads:
            item, future = pending.popleft()
            yield item, future.result()
    while pending:
        item, future = pending.popleft()
        yield item, future.result()


def gpu_present() -> bool:
    """True where an NVIDIA driver exposes a device (checked without importing CUDA libraries)."""
    return Path("/dev/nvidiactl").exists()
