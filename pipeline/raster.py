"""Reading scenes: the only module that opens rasters and sets GDAL options.

Scenes are read strip by strip (one strip per row of chips), so memory depends
on the scene's width and the chip size, never on its length.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import PurePath
from urllib.parse import urlsplit

import numpy as np
import rasterio
import simplejpeg
from PIL import Image, features
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.session import DummySession
from rasterio.windows import Window

from pipeline import buckets
from pipeline.errors import SceneContentError, SceneReadError
from pipeline.records import ChipBatch, Scene
from pipeline.tiling import chip_offsets, mirror_pad

log = logging.getLogger(__name__)

GDAL_OPTIONS = {
    "GDAL_CACHEMAX": 256,  # MB; strips are read once, a large cache buys nothing
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.vrt,.jp2,.img",
    # Object storage (/vsis3/, /vsigs/, /vsiaz/, /vsicurl/): transient errors (429, 5xx) are
    # retried with exponential backoff; what GDAL learnt about an object (size, blocks) is
    # forgotten when its handle closes, so a re-uploaded scene is read afresh.
    "GDAL_HTTP_MAX_RETRY": 6,
    "GDAL_HTTP_RETRY_DELAY": 0.5,  # seconds, doubled on each retry
    "GDAL_HTTP_TIMEOUT": 60,
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "CPL_VSIL_CURL_NON_CACHED": "/vsis3/:/vsigs/:/vsiaz/:/vsicurl/",
    "VSI_CACHE": "TRUE",
}
# How object storage is read (benchmarks/s3_read.py, docs/benchmarks.md).  "fsspec": GDAL
# decodes from an fsspec file object whose next block is fetched in a background thread
# while the current one is decoded; "gdal": GDAL's own /vsis3/ (rasterio maps s3:// and
# friends to it), which fetches and decodes in turn.  The first was measured faster on
# s3:// COGs; GDAL_SCHEMES are the schemes "gdal" can read, every other scheme uses fsspec.
GDAL_SCHEMES = ("s3", "gs", "az", "http", "https")
READ_METHOD = "fsspec"
READ_AHEAD_BLOCKS = 4  # blocks of buckets.S3_BLOCK_BYTES held per open scene, the next one prefetched
# JPEG GeoTIFFs: decode blocks with libjpeg-turbo (SIMD; simplejpeg) rather than the IJG libjpeg
# in rasterio's wheels, ~3x faster (_JpegBlocks); survey frames with Pillow's libjpeg-turbo.
# False leaves all decoding to GDAL.
TURBO_JPEG = features.check_feature("libjpeg_turbo")
STRETCH_PERCENTILES = (0.5, 99.5)
PREVIEW_PX = 1024


def scene_id_for(uri: str) -> str:
    """A scene's default id: its file name without extension.

    >>> scene_id_for("s3://survey/2026/road-12/0007.tif")
    '0007'
    """
    return PurePath(uri.rstrip("/")).stem


def endpoint_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """GDAL's S3 endpoint options, derived from ``AWS_ENDPOINT_URL`` (botocore's variable).

    GDAL reads credentials and profiles (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
    ``~/.aws/*``) itself; only the endpoint needs translating.

    >>> endpoint_options({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})
    {'AWS_S3_ENDPOINT': '127.0.0.1:9000', 'AWS_HTTPS': 'NO', 'AWS_VIRTUAL_HOSTING': 'FALSE'}
    """
    environ = os.environ if environ is None else environ
    url = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if not url:
        return {}
    parts = urlsplit(url)
    return {
        "AWS_S3_ENDPOINT": parts.netloc + parts.path.rstrip("/"),
        "AWS_HTTPS": "NO" if parts.scheme == "http" else "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


def gdal_env() -> rasterio.Env:
    """The GDAL environment every raster is opened in.

    A ``DummySession`` leaves AWS credentials to GDAL, which reads the same
    variables and profiles as botocore; they are never copied into options.
    """
    return rasterio.Env(DummySession(), **GDAL_OPTIONS, **endpoint_options())


def open_raster(uri: str, method: str | None = None) -> rasterio.DatasetReader:
    """Open a local path or a storage URL for reading, without downloading it.

    ``method`` is ``gdal`` (GDAL's /vsis3/ and friends; the default for the
    schemes GDAL knows) or ``fsspec`` (GDAL reads through fsspec file objects;
    used for every other scheme).  Call inside ``gdal_env()``.
    """
    if not buckets.is_url(uri):
        return rasterio.open(uri)
    scheme = urlsplit(uri).scheme
    if (method or READ_METHOD) == "gdal" and scheme in GDAL_SCHEMES:
        return rasterio.open(uri)
    fs, path = buckets.filesystem(uri), uri.split("://", 1)[1]
    try:
        return rasterio.open(path, opener=_ReadAhead(fs))
    except RasterioError:
        fs.cat_file(path, 0, 1)  # rasterio hides why it could not read the object: ask storage
        raise


class _ReadAhead:
    """An fsspec filesystem as a rasterio opener whose files fetch the next block in the background.

    Memory per open file: ``READ_AHEAD_BLOCKS`` blocks (fsspec's "background" block cache).
    """

    def __init__(self, fs) -> None:
        self._fs = fs

    def open(self, path: str, mode: str = "rb", **kwargs):
        return self._fs.open(
            path, "rb", cache_type="background", cache_options={"maxblocks": READ_AHEAD_BLOCKS}
        )

    def __getattr__(self, name: str):  # isfile, isdir, ls, size, mtime: the filesystem's own
        return getattr(self._fs, name)


def read_error(uri: str, exc: BaseException, otherwise: str = "not a readable raster") -> SceneReadError:
    """A one-line ``SceneReadError``: a storage problem per ``buckets.ERROR_POLICY``, or ``otherwise``."""
    rule = buckets.policy(exc) if buckets.is_url(uri) else None
    return SceneReadError(
        uri,
        f"{rule.problem if rule else otherwise} ({buckets.first_line(exc)})",
        transient=bool(rule and rule.transient),
    )


class SceneReader:
    """An open scene that yields its chips as uint8 RGB batches.

    Use as a context manager; not thread-safe (give each thread its own).
    8- and 16-bit, RGB(A) and single-band rasters are accepted; nodata values,
    internal masks and alpha bands mark pixels invalid.  Other bit depths are
    stretched linearly between the 0.5 and 99.5 percentiles of a preview.
    """

    def __init__(
        self,
        uri: str,
        scene_id: str | None = None,
        method: str | None = None,
        georeferenced: bool = True,
        road: np.ndarray | None = None,
    ) -> None:
        self.uri = uri
        self._georeferenced = georeferenced  # False: a survey frame (JPEG/PNG), no CRS needed
        self._road = road  # a frame's (height, width) road pixels: the rest counts as nodata
        self._env = gdal_env()
        self._env.__enter__()
        try:
            with warnings.catch_warnings():  # a survey frame has no CRS, on purpose
                if not georeferenced:
                    warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._ds = open_raster(uri, method)
        except (RasterioError, OSError) as exc:
            self._env.__exit__(None, None, None)
            raise read_error(uri, exc) from exc
        try:
            self.scene = self._describe(scene_id or scene_id_for(uri))
            self._bands = self._rgb_bands()
            self._scale = self._stretch()
            self._method = method
            self._jpeg: _JpegBlocks | None = None
            self._jpeg_tried = False  # _blocks() attaches it on the first decode
            self._frame: np.ndarray | None = None  # a JPEG frame decoded whole by Pillow (_whole_frame)
            block_rows = self._ds.block_shapes[0][0]  # decode in runs of whole blocks (>= 256 rows)
            self._run_rows = block_rows * max(1, 256 // block_rows) if block_rows <= 1024 else 512
            self._runs: list[tuple[int, np.ndarray, np.ndarray]] = []  # decoded (row_off, rgb, valid)
            # a GeoTIFF may leave blocks out (sparse): see _present; other formats have them all
            self._may_be_sparse = self._ds.driver == "GTiff"
        except Exception:
            self.close()
            raise

    def _describe(self, scene_id: str) -> Scene:
        ds = self._ds
        if not self._georeferenced:
            return Scene(
                uri=self.uri,
                scene_id=scene_id,
                width=ds.width,
                height=ds.height,
                band_count=ds.count,
                dtype=ds.dtypes[0],
                crs=None,
                transform=ds.transform,
            )
        if ds.crs is None:
            raise SceneContentError(
                self.uri,
                "has no CRS; crackmap needs a georeferenced scene "
                "(assign one, e.g. gdal_edit.py -a_srs EPSG:xxxx)",
            )
        if ds.transform.is_identity:
            raise SceneContentError(self.uri, "has a CRS but no geotransform")
        return Scene(
            uri=self.uri,
            scene_id=scene_id,
            width=ds.width,
            height=ds.height,
            band_count=ds.count,
            dtype=ds.dtypes[0],
            crs=ds.crs,
            transform=ds.transform,
        )

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
        # no nodata, mask or alpha: every pixel is valid, and GDAL need not decode a preview
        all_valid = all(MaskFlags.all_valid in flags for flags in ds.mask_flag_enums)
        try:
            valid = np.ones(shape, bool) if all_valid else ds.dataset_mask(out_shape=shape) > 0
            preview = (
                None
                if ds.dtypes[0] == "uint8"
                else ds.read(sorted(set(self._bands)), out_shape=(len(set(self._bands)), *shape))
            )
        except (RasterioError, OSError) as exc:
            raise read_error(self.uri, exc, "truncated or corrupt") from exc
        if preview is not None and np.issubdtype(preview.dtype, np.floating):
            valid &= np.isfinite(preview).all(axis=0)  # NaN and infinity are nodata
        if not valid.any():
            raise SceneContentError(self.uri, "is all nodata")
        if preview is None:
            return None
        lo, hi = np.percentile(preview[:, valid], STRETCH_PERCENTILES)
        return float(lo), 255.0 / max(float(hi - lo), 1e-6)

    def close(self) -> None:
        try:
            jpeg = getattr(self, "_jpeg", None)  # absent when __init__ failed before setting it
            if jpeg is not None:
                jpeg.close()
        finally:
            self._jpeg = None
            if self._ds is not None:
                self._ds.close()
                self._ds = None
                self._env.__exit__(None, None, None)

    def __enter__(self) -> SceneReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def decoder(self) -> str:
        """What decodes the pixels: "libjpeg-turbo" (JPEG GeoTIFFs, see ``_JpegBlocks``) or "gdal"."""
        return "gdal" if self._blocks() is None else "libjpeg-turbo"

    def _blocks(self) -> _JpegBlocks | None:
        """The JPEG block decoder, attached on the first decode: a reader opened for its
        metadata reads no block."""
        if not self._jpeg_tried:
            self._jpeg_tried = True
            if TURBO_JPEG:
                self._jpeg = _JpegBlocks.attach(self._ds, self.uri, self._bands, self._method)
        return self._jpeg

    def _whole_frame(self) -> np.ndarray | None:
        """A survey frame that is an 8-bit JPEG, decoded whole with libjpeg-turbo (simplejpeg).

        GDAL's JPEG driver uses the IJG libjpeg of rasterio's wheels (no SIMD): twice the time
        for a 1920 x 1080 frame, the same pixels.  None for every other raster.
        """
        if (
            self._frame is None
            and not self._georeferenced
            and TURBO_JPEG
            and self._ds.driver == "JPEG"
            and self._ds.dtypes[0] == "uint8"
            and self._ds.count in (1, 3)
        ):
            fs = buckets.filesystem(self.uri)
            with fs.open(self.uri if buckets.is_url(self.uri) else str(self.uri), "rb") as f:
                data = f.read()
            try:
                if simplejpeg.decode_jpeg_header(data)[2] in ("Gray", "YCbCr", "RGB"):  # straight into numpy
                    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
                else:  # CMYK and the like: Pillow converts them
                    with Image.open(io.BytesIO(data)) as image:
                        pixels = np.asarray(image.convert("RGB"))
            except ValueError as exc:  # simplejpeg: cut short or corrupt
                raise OSError(f"JPEG: {exc}") from exc
            self._frame = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        return self._frame

    def read_strip(self, row_off: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (3, height, width) and valid mask (height, width) of a row strip.

        Rows past the scene's bottom edge and columns past its right edge (a scene smaller
        than a chip) mirror the scene's pixels (``tiling.mirror_pad``) and are invalid.  Rows are
        decoded in runs aligned to the file's blocks and kept until a later strip
        starts below them, so overlapping strips read top to bottom decode each
        block once (400-row strips over 512-row blocks decoded them 2.4 times).
        """
        ds = self._ds
        width = max(ds.width, height)  # a scene narrower than a chip is padded on the right too
        rgb = np.zeros((3, height, width), dtype=np.uint8)
        valid = np.zeros((height, width), dtype=bool)
        stop = row_off + min(height, ds.height - row_off)
        for start, data, mask in self._decoded_runs(row_off, stop):
            a, b = max(row_off, start), min(stop, start + len(mask))
            rgb[:, a - row_off : b - row_off, : ds.width] = data[:, a - start : b - start]
            valid[a - row_off : b - row_off, : ds.width] = mask[a - start : b - start]
        if stop - row_off < height or width > ds.width:
            rgb = mirror_pad(rgb[:, : stop - row_off, : ds.width], height, width)
        return rgb, valid

    def _decoded_runs(self, first: int, stop: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Decoded runs (row_off, rgb, valid) that cover scene rows first..stop, top to bottom."""
        runs = self._runs
        if not runs or not runs[0][0] <= first <= runs[-1][0] + len(runs[-1][2]):
            runs = []  # not the next strip down: start afresh at the run holding ``first``
            end = first - first % self._run_rows
        else:
            runs = [run for run in runs if run[0] + len(run[2]) > first]  # drop runs above the strip
            end = runs[-1][0] + len(runs[-1][2]) if runs else first
        while end < stop:
            run_stop = min(end + self._run_rows - end % self._run_rows, self._ds.height)
            runs.append((end, *self._decode(end, run_stop - end)))
            end = run_stop
        self._runs = runs
        return [run for run in runs if run[0] < stop]

    def _decode(self, row_off: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (invalid pixels zero) and valid mask of scene rows row_off..row_off + rows."""
        ds = self._ds
        window = Window(0, row_off, ds.width, rows)
        present = self._present(row_off, rows)
        if present is not None and not present.any():  # only absent (sparse) blocks: nothing to decode
            return np.zeros((3, rows, ds.width), np.uint8), np.zeros((rows, ds.width), bool)
        try:
            if (frame := self._whole_frame()) is not None:
                data = frame[:, row_off : row_off + rows].copy()
            elif blocks := self._blocks():
                data = blocks.read(row_off, rows)
            else:
                data = ds.read(self._bands, window=window)
            mask = ds.dataset_mask(window=window) > 0
        except (RasterioError, OSError) as exc:
            raise read_error(self.uri, exc, "truncated or corrupt") from exc
        if present is not None and not present.all():
            mask &= present
        if np.issubdtype(data.dtype, np.floating):
            finite = np.isfinite(data)
            mask &= finite.all(axis=0)  # NaN and infinity are nodata
            data = np.where(finite, data, 0)
        if self._scale is not None:
            offset, scale = self._scale
            data = np.clip((data.astype(np.float32) - offset) * scale + 0.5, 0, 255).astype(np.uint8)
        if self._road is not None:
            mask &= self._road[row_off : row_off + rows]
        if not mask.all():
            data *= mask
        return data, mask

    def _present(self, row_off: int, rows: int) -> np.ndarray | None:
        """Which pixels of rows row_off..row_off + rows lie in blocks the file holds (sparse
        GeoTIFFs leave blocks out: they are nodata); None when every block is there.

        GDAL reports a block's place as ``BLOCK_OFFSET_x_y`` (TIFF metadata), 0 or nothing when
        the file has no bytes for it; such blocks are never decoded.
        """
        if not self._may_be_sparse:
            return None
        ds = self._ds
        block_rows, block_cols = ds.block_shapes[0]
        band = self._bands[0]
        first, last = row_off // block_rows, (row_off + rows - 1) // block_rows
        across = -(-ds.width // block_cols)
        absent = [
            (x, y)
            for y in range(first, last + 1)
            for x in range(across)
            if not int(ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=band) or 0)
        ]
        if not absent:
            return None
        present = np.ones((rows, ds.width), bool)
        for x, y in absent:
            top, bottom = max(y * block_rows - row_off, 0), min((y + 1) * block_rows - row_off, rows)
            present[top:bottom, x * block_cols : (x + 1) * block_cols] = False
        return present

    def chip_batches(self, size_px: int, overlap_px: int, batch_size: int) -> Iterator[ChipBatch]:
        """Yield the scene's chips in row-major order, skipping chips with no valid pixel."""
        scene = self.scene
        cols = chip_offsets(scene.width, size_px, overlap_px)
        windows, pixels, valids = [], [], []
        for row in chip_offsets(scene.height, size_px, overlap_px):
            rgb, valid = self.read_strip(row, size_px)
            for col in cols:
                chip_valid = valid[:, col : col + size_px]
                if not chip_valid.any():
                    continue
                windows.append(Window(col, row, size_px, size_px))
                pixels.append(rgb[:, :, col : col + size_px])
                valids.append(chip_valid)
                if len(windows) == batch_size:
                    yield ChipBatch(tuple(windows), np.stack(pixels), np.stack(valids))
                    windows, pixels, valids = [], [], []
        if windows:
            yield ChipBatch(tuple(windows), np.stack(pixels), np.stack(valids))


class _JpegBlocks:
    """Decodes the blocks of a JPEG-compressed GeoTIFF with libjpeg-turbo (simplejpeg).

    rasterio's wheels decode JPEG with the IJG libjpeg, which has no SIMD code;
    libjpeg-turbo decodes the same blocks 2.6x faster, and survey imagery is
    mostly JPEG.  GDAL still opens the file and says where each block is
    (``BLOCK_OFFSET_x_y`` in the TIFF metadata domain) and which tables the
    blocks share (``JPEGTABLES``); this class reads those bytes and decodes them.

    Taken: 8-bit RGB or YCbCr (not three grey bands), pixel-interleaved JPEG
    GeoTIFFs with blocks of at most 1024 rows and no nodata value, as local
    files, or in object storage read through fsspec when they have no mask
    either (GDAL would fetch the blocks again for the mask).  ``attach``
    decodes the first block present both ways and gives up (GDAL decodes)
    unless they agree.  Where colours change from pixel to pixel, the two can
    differ by a few levels: libjpeg 9 upsamples chroma in the DCT domain,
    libjpeg-turbo by interpolation; both are valid JPEG decoders.
    """

    MAX_MEAN_DIFFERENCE = 2.0  # levels, first block against GDAL's decoding of it
    MAX_BLOCK_PIXELS = 1 << 24  # larger blocks (whole-width strips of huge scenes): GDAL

    def __init__(self, ds: rasterio.DatasetReader, file) -> None:
        self._ds, self._file = ds, file
        self.block_rows, self.block_cols = ds.block_shapes[0]
        self._blocks_across = -(-ds.width // self.block_cols)
        tables = ds.get_tag_item("JPEGTABLES", "TIFF", bidx=1)
        self._tables = bytes.fromhex(tables)[:-2] if tables else None  # without its end marker

    @classmethod
    def attach(
        cls, ds: rasterio.DatasetReader, uri: str, bands: list[int], method: str | None
    ) -> _JpegBlocks | None:
        """A decoder for ``ds``'s blocks, or None where GDAL should decode them."""
        structure = ds.tags(ns="IMAGE_STRUCTURE")
        masks = [set(flags) for flags in ds.mask_flag_enums]
        all_valid = all(MaskFlags.all_valid in flags for flags in masks)
        if (
            ds.driver != "GTiff"
            or structure.get("COMPRESSION") not in ("JPEG", "YCbCr JPEG")
            or structure.get("INTERLEAVE") != "PIXEL"
            or bands != [1, 2, 3]
            or ds.count != 3
            or tuple(ds.colorinterp) != (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
            or ds.dtypes[0] != "uint8"
            or ds.block_shapes[0][0] > 1024
            or ds.block_shapes[0][0] * ds.block_shapes[0][1] > cls.MAX_BLOCK_PIXELS
            or not all(flags & {MaskFlags.all_valid, MaskFlags.per_dataset} for flags in masks)
        ):
            return None  # a mask from a nodata value needs GDAL's pixels anyway
        scheme = urlsplit(uri).scheme
        try:
            if scheme == "file" or not buckets.is_url(uri):
                if uri.startswith("/vsi"):  # GDAL's virtual file systems: only GDAL reads those
                    return None
                file = open(urlsplit(uri).path if scheme == "file" else uri, "rb")  # noqa: SIM115  (the reader owns it)
            elif all_valid and ((method or READ_METHOD) == "fsspec" or scheme not in GDAL_SCHEMES):
                file = _ReadAhead(buckets.filesystem(uri)).open(uri.split("://", 1)[1])
            else:
                return None
        except OSError as exc:
            log.debug("%s: JPEG blocks left to GDAL (%s)", uri, exc)
            return None
        blocks = None
        try:
            blocks = cls(ds, file)
            difference = blocks._difference_from_gdal()
        except Exception as exc:  # whatever goes wrong here, GDAL decodes (and reports) instead
            log.debug("%s: JPEG blocks left to GDAL (%s)", uri, exc)
            difference = None
        if difference is None or difference > cls.MAX_MEAN_DIFFERENCE:
            log.debug("%s: JPEG blocks left to GDAL (mean difference %s)", uri, difference)
            file.close()
            return None
        return blocks

    def _difference_from_gdal(self) -> float | None:
        """Mean absolute difference from GDAL's decoding of the first block in the file; None if none is."""
        ds = self._ds
        for y in range(-(-ds.height // self.block_rows)):
            for x in range(self._blocks_across):
                ours = self._block(x, y)
                if ours is not None:
                    top, left = y * self.block_rows, x * self.block_cols
                    rows, cols = min(self.block_rows, ds.height - top), min(self.block_cols, ds.width - left)
                    gdal = ds.read(window=Window(left, top, cols, rows)).transpose(1, 2, 0)
                    return float(np.abs(ours[:rows, :cols].astype(np.int16) - gdal).mean())
        return None

    def read(self, row_off: int, rows: int) -> np.ndarray:
        """RGB uint8 (3, rows, width) of scene rows ``row_off..row_off + rows``; ``row_off``
        must be a multiple of the block height."""
        ds = self._ds
        if row_off % self.block_rows:
            raise ValueError(f"row {row_off} is not at the top of a block")
        out = np.zeros((3, rows, ds.width), dtype=np.uint8)
        for top in range(row_off, row_off + rows, self.block_rows):
            block_y = top // self.block_rows
            height = min(self.block_rows, row_off + rows - top, ds.height - top)
            for block_x in range(self._blocks_across):
                left = block_x * self.block_cols
                width = min(self.block_cols, ds.width - left)
                pixels = self._block(block_x, block_y)
                if pixels is not None:
                    out[:, top - row_off : top - row_off + height, left : left + width] = pixels[
                        :height, :width
                    ].transpose(2, 0, 1)
        return out

    def _block(self, x: int, y: int) -> np.ndarray | None:
        """One block as (rows, cols, 3) RGB; None for a block absent from the file (sparse: zeros).

        Raises:
            OSError: the block is cut short, or is not a JPEG of the block's size.
        """
        offset = int(self._ds.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=1) or 0)
        size = int(self._ds.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=1) or 0)
        if not offset or not size:
            return None
        self._file.seek(offset)
        data = self._file.read(size)
        if len(data) != size:
            raise OSError(f"JPEG block {x},{y} is cut short ({len(data)} of {size} bytes)")
        stream = self._tables + data[2:] if self._tables else data  # shared tables + the block's own
        # a tile is a whole block; a strip is as wide as the scene and may end early at the bottom
        rows = (min(self.block_rows, self._ds.height - y * self.block_rows), self.block_rows)
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(stream)
            if (
                colorspace not in ("YCbCr", "RGB")
                or width != self.block_cols
                or not rows[0] <= height <= rows[1]
            ):
                raise OSError(
                    f"is a {width} x {height} {colorspace} JPEG in a "
                    f"{self.block_cols} x {self.block_rows} RGB block"
                )
            # straight into a numpy array (Pillow's copy out of its image cost as much as decoding);
            # strict: what libjpeg only warns about (corrupt data) raises
            return simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True)
        except (OSError, ValueError) as exc:
            raise OSError(f"JPEG block {x},{y} {exc}") from exc

    def close(self) -> None:
        self._file.close()
