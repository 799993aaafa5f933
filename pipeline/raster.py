"""Reading scenes: the only module that opens rasters and sets GDAL options.

Scenes are read strip by strip (one strip per row of chips), so memory depends
on the scene's width and the chip size, never on its length.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePath

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError
from rasterio.windows import Window

from pipeline.errors import SceneContentError, SceneReadError
from pipeline.records import ChipBatch, Scene
from pipeline.tiling import chip_offsets

GDAL_OPTIONS = {
    "GDAL_CACHEMAX": 256,  # MB; strips are read once, a large cache buys nothing
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.vrt,.jp2,.img",
}
STRETCH_PERCENTILES = (0.5, 99.5)
PREVIEW_PX = 1024


def scene_id_for(uri: str) -> str:
    """A scene's default id: its file name without extension.

    >>> scene_id_for("s3://survey/2026/road-12/0007.tif")
    '0007'
    """
    return PurePath(uri.rstrip("/")).stem


@contextmanager
def gdal_env() -> Iterator[None]:
    with rasterio.Env(**GDAL_OPTIONS):
        yield


class SceneReader:
    """An open scene that yields its chips as uint8 RGB batches.

    Use as a context manager; not thread-safe (give each thread its own).
    8- and 16-bit, RGB(A) and single-band rasters are accepted; nodata values,
    internal masks and alpha bands mark pixels invalid.  Other bit depths are
    stretched linearly between the 0.5 and 99.5 percentiles of a preview.
    """

    def __init__(self, uri: str, scene_id: str | None = None) -> None:
        self.uri = uri
        self._env = rasterio.Env(**GDAL_OPTIONS)
        self._env.__enter__()
        try:
            self._ds = rasterio.open(uri)
        except RasterioError as exc:
            self._env.__exit__(None, None, None)
            raise SceneReadError(uri, f"not a readable raster ({exc})") from exc
        try:
            self.scene = self._describe(scene_id or scene_id_for(uri))
            self._bands = self._rgb_bands()
            self._scale = self._stretch()
        except Exception:
            self.close()
            raise

    def _describe(self, scene_id: str) -> Scene:
        ds = self._ds
        if ds.crs is None:
            raise SceneContentError(self.uri, "has no CRS; crackmap needs a georeferenced scene "
                                              "(assign one, e.g. gdal_edit.py -a_srs EPSG:xxxx)")
        if ds.transform.is_identity:
            raise SceneContentError(self.uri, "has a CRS but no geotransform")
        return Scene(uri=self.uri, scene_id=scene_id, width=ds.width, height=ds.height,
                     band_count=ds.count, dtype=ds.dtypes[0], crs=ds.crs, transform=ds.transform)

    def _rgb_bands(self) -> list[int]:
        ds = self._ds
        interp = list(ds.colorinterp)
        wanted = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
        if all(c in interp for c in wanted):
            return [interp.index(c) + 1 for c in wanted]
        data = [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha]
        if len(data) >= 3:
            return data[:3]
        if len(data) >= 1:
            return [data[0]] * 3
        raise SceneContentError(self.uri, "has no image bands (only alpha)")

    def _stretch(self) -> tuple[float, float] | None:
        """(offset, scale) to 8 bits, or None for 8-bit data; also rejects all-nodata scenes."""
        ds = self._ds
        factor = max(1, max(ds.width, ds.height) // PREVIEW_PX)
        shape = (max(1, ds.height // factor), max(1, ds.width // factor))
        try:
            valid = ds.dataset_mask(out_shape=shape) > 0
            preview = None if ds.dtypes[0] == "uint8" else ds.read(
                sorted(set(self._bands)), out_shape=(len(set(self._bands)), *shape))
        except RasterioError as exc:
            raise SceneReadError(self.uri, f"truncated or corrupt ({exc})") from exc
        if not valid.any():
            raise SceneContentError(self.uri, "is all nodata")
        if preview is None:
            return None
        lo, hi = np.percentile(preview[:, valid], STRETCH_PERCENTILES)
        return float(lo), 255.0 / max(float(hi - lo), 1e-6)

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
            self._ds = None
            self._env.__exit__(None, None, None)

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_strip(self, row_off: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (3, height, width) and valid mask (height, width) of a row strip.

        Rows past the scene's bottom edge come back zero and invalid.
        """
        ds = self._ds
        width = max(ds.width, height)  # a scene narrower than a chip is padded on the right too
        rgb = np.zeros((3, height, width), dtype=np.uint8)
        valid = np.zeros((height, width), dtype=bool)
        rows = min(height, ds.height - row_off)
        window = Window(0, row_off, ds.width, rows)
        try:
            data = ds.read(self._bands, window=window)
            mask = ds.dataset_mask(window=window) > 0
        except RasterioError as exc:
            raise SceneReadError(self.uri, f"truncated or corrupt ({exc})") from exc
        if self._scale is not None:
            offset, scale = self._scale
            data = np.clip((data.astype(np.float32) - offset) * scale + 0.5, 0, 255)
        rgb[:, :rows, :ds.width] = data
        rgb[:, :rows, :ds.width] *= mask
        valid[:rows, :ds.width] = mask
        return rgb, valid

    def chip_batches(self, size_px: int, overlap_px: int, batch_size: int) -> Iterator[ChipBatch]:
        """Yield the scene's chips in row-major order, skipping chips with no valid pixel."""
        scene = self.scene
        cols = chip_offsets(scene.width, size_px, overlap_px)
        windows, pixels, valids = [], [], []
        for row in chip_offsets(scene.height, size_px, overlap_px):
            rgb, valid = self.read_strip(row, size_px)
            for col in cols:
                chip_valid = valid[:, col:col + size_px]
                if not chip_valid.any():
                    continue
                windows.append(Window(col, row, size_px, size_px))
                pixels.append(rgb[:, :, col:col + size_px])
                valids.append(chip_valid)
                if len(windows) == batch_size:
                    yield ChipBatch(tuple(windows), np.stack(pixels), np.stack(valids))
                    windows, pixels, valids = [], [], []
        if windows:
            yield ChipBatch(tuple(windows), np.stack(pixels), np.stack(valids))
