"""Shared fixtures: small real rasters made by code, and a model registry of our own."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
FIXTURES = Path(__file__).parent / "data"


def paint_crack(
    pixels: np.ndarray, start: tuple[float, float], end: tuple[float, float], width_px: float, value: int = 20
) -> None:
    """Paint a straight dark crack of ``width_px`` from ``start`` to ``end`` ((row, col)) into (bands, H, W)."""
    rows, cols = np.indices(pixels.shape[1:])
    p0, p1 = np.array(start, float), np.array(end, float)
    length = np.linalg.norm(p1 - p0)
    u = (p1 - p0) / length
    along = (rows - p0[0]) * u[0] + (cols - p0[1]) * u[1]
    across = np.abs((rows - p0[0]) * u[1] - (cols - p0[1]) * u[0])
    pixels[:, (across <= width_px / 2) & (along >= 0) & (along <= length)] = value


def write_scene(path: Path, pixels: np.ndarray, crs: str = "EPSG:32633", transform=None, **profile) -> Path:
    transform = transform or from_origin(500000.0, 5600000.0, 0.002, 0.002)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=pixels.shape[2],
        height=pixels.shape[1],
        count=pixels.shape[0],
        dtype=pixels.dtype,
        crs=crs,
        transform=transform,
        **profile,
    ) as ds:
        ds.write(pixels)
    return path


def levels(a: np.ndarray, b: np.ndarray) -> int:
    """Largest difference of two uint8 probability arrays, in levels of 1/255 (no wrap-around)."""
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


class DarknessBackend:
    """A test backend with known output: probability = darkness of the chip.

    It stands in for a trained network in geometry tests, where the expected
    crack lines must be known exactly; the real backends are tested elsewhere.
    """

    name = "darkness"
    batch_size = 4

    def predict(self, chips: np.ndarray) -> np.ndarray:
        return (255.0 - chips.mean(axis=1, dtype=np.float32)) / 255.0


# ``crackmap`` as a user runs it (the console script's entry point), in a fresh interpreter
CRACKMAP = [sys.executable, "-c", "from flows.launch import main; main()"]


@pytest.fixture(autouse=True, scope="session")
def cpu_graph_choices(tmp_path_factory):
    """Keep the CPU graph choices (``pipeline.precision``) of a test run out of the home folder."""
    from pipeline import precision

    precision.CHOICES = tmp_path_factory.mktemp("cache") / "cpu-graphs.json"


@pytest.fixture
def darkness() -> DarknessBackend:
    return DarknessBackend()


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """A registry with an untrained (seeded) HrSegNet-B16, made like every real version."""
    torch = pytest.importorskip("torch")
    from models.hrsegnet import create
    from models.package import package

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = create("b16")
    checkpoint = root / "untrained.pt"
    torch.save(
        {
            "state_dict": net.state_dict(),
            "variant": "b16",
            "threshold": 0.5,
            "val_metrics": {},
            "data": {"datasets": []},
            "recipe": {"untrained": True},
        },
        checkpoint,
    )
    package(checkpoint, "test-b16", "1.0.0", root, default=True, summary="untrained, for tests")
    return root


@pytest.fixture
def test_models(model_root, monkeypatch) -> Path:
    """Use the test registry (and its default model) for the duration of a test."""
    monkeypatch.setenv("CRACKMAP_MODELS", str(model_root))
    return model_root


from postgis_fixtures import pg_database, postgis, store_url  # noqa: E402,F401  (PostGIS, see there)
