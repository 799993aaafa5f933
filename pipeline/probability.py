"""Crack probability rasters: written as uint8 Cloud-Optimized GeoTIFFs, read back in strips.

Probability p is stored as round(255 p); pixels without data are masked
(internal mask), not given a magic value.  Keeping the probability lets
vectors be extracted again, with other thresholds, without the network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from pipeline import storage
from pipeline.raster import gdal_env, open_raster
from pipeline.records import Scene

STRIP_ROWS = 512


class ProbabilityWriter:
    """A ``stitching.RowSink`` that writes rows to ``path`` as a COG, atomically.

    Rows go to a tiled GeoTIFF beside the target; ``finish`` converts it to a
    COG and renames it into place, so ``path`` is either absent or complete.
    A storage URL (``s3://...``) is staged in a local temporary folder and
    uploaded by ``finish``: the object appears whole or not at all.
    """

    def __init__(self, path: str | Path, scene: Scene) -> None:
        self.uri = str(path) if storage.is_url(path) else None
        self._staging = Path(tempfile.mkdtemp(prefix="crackmap-")) if self.uri else None
        self.path = self._staging / Path(self.uri).name if self.uri else Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial.tif")
        self._env = gdal_env()
        self._env.__enter__()
        self._ds = rasterio.open(self._partial, "w", driver="GTiff", width=scene.width,
                                 height=scene.height, count=1, dtype="uint8", crs=scene.crs,
                                 transform=scene.transform, tiled=True, blockxsize=512,
                                 blockysize=512, compress="deflate")

    def __call__(self, row_off: int, probability: np.ndarray, valid: np.ndarray) -> None:
        window = Window(0, row_off, probability.shape[1], probability.shape[0])
        self._ds.write(probability, 1, window=window)
        self._ds.write_mask(valid, window=window)

    def finish(self) -> str | Path:
        """Close, convert to COG, move (or upload) into place; returns the path or URL."""
        self._ds.close()
        staged = self.path.with_name(self.path.name + ".cog.tif")
        rasterio.shutil.copy(self._partial, staged, driver="COG", compress="deflate",
                             blocksize=512, overview_resampling="average")
        os.replace(staged, self.path)
        self._partial.unlink()
        self._env.__exit__(None, None, None)
        if self.uri is None:
            return self.path
        try:
            storage.upload(self.path, self.uri)
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)
        return self.uri

    def abort(self) -> None:
        """Close and delete whatever was written."""
        if not self._ds.closed:
            self._ds.close()
        for leftover in (self._partial, self.path.with_name(self.path.name + ".cog.tif")):
            leftover.unlink(missing_ok=True)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        self._env.__exit__(None, None, None)


def read_rows(path: str | Path, strip_rows: int = STRIP_ROWS) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (row_off, probability uint8, valid bool) strips of a probability raster (path or URL)."""
    with gdal_env(), open_raster(str(path)) as ds:
        for row in range(0, ds.height, strip_rows):
            window = Window(0, row, ds.width, min(strip_rows, ds.height - row))
            yield row, ds.read(1, window=window), ds.read_masks(1, window=window) > 0
