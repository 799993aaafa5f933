"""Crack probability rasters: written as uint8 Cloud-Optimized GeoTIFFs, read back in strips.

Probability p is stored as round(255 p); pixels without data are masked
(internal mask), not given a magic value.  A scene without such pixels has
no mask band.  Keeping the probability lets
vectors be extracted again, with other thresholds, without the network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import DatasetWriter
from rasterio.windows import Window

from pipeline import buckets
from pipeline.raster import gdal_env, open_raster
from pipeline.records import Scene

STRIP_ROWS = 512


def overview_factors(width: int, height: int, block: int = STRIP_ROWS) -> list[int]:
    """Overview levels as GDAL's COG driver picks them: halving until the image fits a block.

    (The overviews themselves are made by ``build_overviews``, which rounds their
    sizes up, as ``gdaladdo`` does; the COG driver rounded down.)

    >>> overview_factors(4096, 12000), overview_factors(900, 1025), overview_factors(300, 300)
    ([2, 4, 8, 16, 32], [2], [])
    """
    factors, factor = [], 1
    while max(width, height) // factor > block:
        factor *= 2
        factors.append(factor)
    return factors


class ProbabilityWriter:
    """A ``stitching.RowSink`` that writes rows to ``path`` as a COG, atomically.

    Rows go to an uncompressed tiled GeoTIFF beside the target (compressing it
    would be done twice); ``finish`` adds its overviews, uncompressed too,
    converts it to a COG (deflate level 1, on all cores: it runs after the
    network is done), and renames it into place, so ``path`` is either absent
    or complete.  (Left to make the overviews, the COG driver compresses them
    into a temporary file first, then again into the COG: 0.4 against 0.29
    CPU-seconds for 4096 x 12,000 px.)
    A storage URL (``s3://...``) is staged in a local temporary folder and
    uploaded by ``finish``: the object appears whole or not at all.

    ``overviews=False`` writes a COG without overviews: a survey frame's raster is in
    frame pixels, never drawn on a map, and small enough to read whole; its overviews,
    made with its road mask, cost more than the rest of the conversion (0.19 against
    0.11 s for a 1920 x 1080 frame; docs/benchmarks.md).

    Rows are buffered into whole rows of 512-pixel tiles, so each tile is
    written once and never read back; the file is opened by the thread that
    writes it.  (Partial tiles written from a worker thread made GDAL fail
    now and then with "TIFFReadEncodedTile() failed".)
    """

    def __init__(self, path: str | Path, scene: Scene, overviews: bool = True) -> None:
        self.uri = str(path) if buckets.is_url(path) else None
        self._staging: Path | None = None  # a URL is written here first, then uploaded
        if self.uri is not None:
            self._staging = Path(tempfile.mkdtemp(prefix="crackmap-"))
            self.path = self._staging / Path(self.uri).name
        else:
            self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # unique per writer: two runs of one survey at once never share a temporary file
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._partial = self.path.with_name(f"{self.path.name}.{tag}.partial.tif")
        self._staged = self.path.with_name(f"{self.path.name}.{tag}.cog.tif")
        self._scene = scene
        self._overviews = overviews
        self._ds: DatasetWriter | None = None
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self._written = 0  # rows on disk; always a multiple of STRIP_ROWS until the end
        self._masked = False  # a mask band exists: some pixel was invalid

    def __call__(self, row_off: int, probability: np.ndarray, valid: np.ndarray) -> None:
        if row_off != self._written + self._buffered:
            raise ValueError(
                f"rows must arrive in order: expected row {self._written + self._buffered}, got {row_off}"
            )
        self._rows.append((probability, valid))
        self._buffered += len(probability)
        if self._buffered >= STRIP_ROWS:
            self._write(self._buffered - self._buffered % STRIP_ROWS)

    def _write(self, rows: int) -> None:
        probability = np.concatenate([p for p, _ in self._rows])
        valid = np.concatenate([v for _, v in self._rows])
        with gdal_env():
            if self._ds is None:
                scene = self._scene
                with warnings.catch_warnings():  # a survey frame has frame pixels, no map: no CRS, on purpose
                    if scene.crs is None:
                        warnings.simplefilter("ignore", NotGeoreferencedWarning)
                    self._ds = rasterio.open(
                        self._partial,
                        "w",
                        driver="GTiff",
                        width=scene.width,
                        height=scene.height,
                        count=1,
                        dtype="uint8",
                        crs=scene.crs,
                        transform=scene.transform,
                        tiled=True,
                        blockxsize=STRIP_ROWS,
                        blockysize=STRIP_ROWS,
                    )
            window = Window(0, self._written, probability.shape[1], rows)
            self._ds.write(probability[:rows], 1, window=window)
            if self._masked or not valid[:rows].all():
                self._write_mask(self._ds, valid[:rows], window)
        self._rows = [(probability[rows:], valid[rows:])] if rows < len(probability) else []
        self._written += rows
        self._buffered -= rows

    def _write_mask(self, ds: DatasetWriter, valid: np.ndarray, window: Window) -> None:
        """Write mask rows; the first time, also mark every row written so far valid.

        A scene whose pixels are all valid gets no mask band at all: it would only
        say "valid" everywhere, and it tripled the COG conversion's time.
        """
        if not self._masked:
            self._masked = True
            width = self._scene.width
            for row in range(0, self._written, STRIP_ROWS):
                rows = min(STRIP_ROWS, self._written - row)
                ds.write_mask(np.ones((rows, width), bool), window=Window(0, row, width, rows))
        ds.write_mask(valid, window=window)

    def finish(self) -> str | Path:
        """Close, convert to COG, move (or upload) into place; returns the path or URL."""
        if self._buffered or self._ds is None:
            self._write(self._buffered)
        ds = self._ds
        assert ds is not None  # _write opened it
        staged = self._staged
        with gdal_env():
            scene = self._scene
            if self._overviews:
                ds.build_overviews(overview_factors(scene.width, scene.height), Resampling.average)
            ds.close()
            rasterio.shutil.copy(
                self._partial,
                staged,
                driver="COG",
                compress="deflate",
                level=1,
                num_threads="ALL_CPUS",
                blocksize=512,
                overview_resampling="average",
                overviews="AUTO" if self._overviews else "NONE",
            )
        os.replace(staged, self.path)
        self._partial.unlink()
        if self.uri is None:
            return self.path
        try:
            buckets.upload(self.path, self.uri)
        finally:
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
        return self.uri

    def abort(self) -> None:
        """Close and delete whatever was written."""
        if self._ds is not None and not self._ds.closed:
            self._ds.close()
        for leftover in (self._partial, self._staged):
            leftover.unlink(missing_ok=True)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)


def read_rows(path: str | Path, strip_rows: int = STRIP_ROWS) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (row_off, probability uint8, valid bool) strips of a probability raster (path or URL)."""
    with gdal_env(), open_raster(str(path)) as ds:
        for row in range(0, ds.height, strip_rows):
            window = Window(0, row, ds.width, min(strip_rows, ds.height - row))
            yield row, ds.read(1, window=window), ds.read_masks(1, window=window) > 0
