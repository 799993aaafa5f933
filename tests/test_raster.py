import numpy as np
import pytest
import rasterio
import rasterio.transform
from conftest import write_scene
from rasterio.windows import Window

from pipeline.errors import SceneContentError, SceneReadError
from pipeline.raster import SceneReader
from pipeline.tiling import chip_offsets, mirror_pad


def chips_of(path, size=400, overlap=64):
    with SceneReader(str(path)) as reader:
        return list(reader.chip_batches(size, overlap, batch_size=100))


def test_16_bit_single_band_is_stretched_to_8_bit_rgb(tmp_path):
    pixels = np.linspace(1000, 5000, 500 * 600, dtype=np.float64).reshape(1, 500, 600).astype(np.uint16)
    (batch,) = chips_of(write_scene(tmp_path / "a.tif", pixels))
    assert batch.pixels.dtype == np.uint8 and batch.pixels.shape[1] == 3
    assert batch.pixels.min() <= 2 and batch.pixels.max() >= 253
    assert (batch.pixels[:, 0] == batch.pixels[:, 1]).all()


def test_nodata_values_are_invalid_and_all_nodata_chips_are_skipped(tmp_path):
    pixels = np.full((3, 400, 1200), 100, np.uint8)
    pixels[:, :, 700:] = 0  # right part: nodata
    (batch,) = chips_of(write_scene(tmp_path / "a.tif", pixels, nodata=0))
    assert [int(w.col_off) for w in batch.windows] == [0, 336, 672]  # the chip at 800 is all nodata
    assert not batch.valid[1][:, 700 - 336 :].any() and batch.valid[1][:, :364].all()


def test_internal_mask_is_respected(tmp_path):
    path = write_scene(tmp_path / "a.tif", np.full((3, 400, 400), 100, np.uint8))
    with rasterio.open(path, "r+") as ds:
        mask = np.full((400, 400), 255, np.uint8)
        mask[:, :100] = 0
        ds.write_mask(mask)
    (batch,) = chips_of(path)
    assert not batch.valid[0][:, :100].any() and batch.valid[0][:, 100:].all()


def test_scene_smaller_than_a_chip_is_padded_by_mirroring(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 255, (3, 120, 250), dtype=np.uint8)
    (batch,) = chips_of(write_scene(tmp_path / "a.tif", pixels))
    assert batch.pixels.shape == (1, 3, 400, 400)
    assert batch.valid[0].sum() == 120 * 250 and batch.valid[0, :120, :250].all()
    chip = batch.pixels[0]
    assert (chip[:, :120, :250] == pixels).all()
    assert (chip[:, 120:240, :250] == pixels[:, ::-1]).all()  # below the scene: its rows mirrored
    assert (chip[:, :120, 250:400] == pixels[:, :, ::-1][:, :, :150]).all()  # right of it: columns mirrored
    assert (chip[:, 240:360, :250] == pixels).all()  # and mirrored again further on, never black


def test_a_narrow_scene_is_mirrored_at_its_right_edge_in_every_chip_row(tmp_path):
    pixels = np.random.default_rng(4).integers(0, 255, (3, 900, 150), dtype=np.uint8)
    batches = list(SceneReader(str(write_scene(tmp_path / "n.tif", pixels))).chip_batches(400, 64, 8))
    chips = np.concatenate([b.pixels for b in batches])
    assert len(chips) == 3
    for chip, batch_window in zip(chips, [w for b in batches for w in b.windows]):
        row = int(batch_window.row_off)
        assert (chip[:, :, 150:300] == pixels[:, row : row + 400, ::-1]).all()


def test_not_a_raster(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("not an image")
    with pytest.raises(SceneReadError, match="notes.tif: not a readable raster"):
        SceneReader(str(path))


def test_truncated_geotiff(tmp_path):
    path = write_scene(tmp_path / "t.tif", np.random.default_rng(0).integers(0, 255, (3, 800, 800), np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SceneReadError, match="t.tif: (truncated or corrupt|not a readable raster)"):
        chips_of(path)


def test_scene_without_crs(tmp_path):
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=50, height=50, count=3, dtype="uint8") as ds:
        ds.write(np.zeros((3, 50, 50), np.uint8))
    with pytest.raises(SceneContentError, match="plain.tif: has no CRS"):
        SceneReader(str(path))


def test_all_nodata_scene(tmp_path):
    path = write_scene(tmp_path / "empty.tif", np.zeros((3, 300, 300), np.uint8), nodata=0)
    with pytest.raises(SceneContentError, match="empty.tif: is all nodata"):
        SceneReader(str(path))


@pytest.mark.parametrize(
    "profile",
    [
        dict(tiled=True, blockxsize=256, blockysize=256),
        dict(blockysize=7),  # striped, small strips
        dict(),
    ],
)
def test_strips_equal_direct_window_reads_in_any_order(tmp_path, profile):
    """Rows are decoded in block-aligned runs and kept; any strip must still be exact."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(1, 255, (3, 1100, 300), dtype=np.uint8)
    pixels[:, 500:520, :50] = 0
    path = write_scene(tmp_path / "a.tif", pixels, nodata=0, **profile)
    with rasterio.open(path) as ds:
        expected_valid = ds.dataset_mask() > 0
    strips = [0, 336, 672, 1008, 0, 700, 701, 300, 1099, 20, 900, 899]  # down, back up, overlapping
    with SceneReader(str(path)) as reader:
        for row in strips:
            rgb, valid = reader.read_strip(row, 400)
            rows = min(400, 1100 - row)
            assert rgb.shape == (3, 400, 400) and valid.shape == (400, 400)
            assert (valid[:rows, :300] == expected_valid[row : row + rows]).all(), row
            assert (
                rgb[:, :rows, :300] == pixels[:, row : row + rows] * expected_valid[row : row + rows]
            ).all(), row
            assert not valid[rows:].any() and not valid[:, 300:].any()
            assert (rgb == mirror_pad(rgb[:, :rows, :300], 400, 400)).all()  # beyond the scene: mirrored


def pavement(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour with grain and a dark crack, as road imagery looks (RGB uint8)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width]
    base = np.stack([110 + 30 * np.sin(cols / 97), 105 + 20 * np.cos(rows / 61), 100 + 0 * rows])
    pixels = (base + rng.normal(0, 12, (3, height, width))).clip(0, 255).astype(np.uint8)
    pixels[:, :, width // 3 : width // 3 + 4] = 30
    return pixels


@pytest.mark.parametrize("photometric", ["ycbcr", "rgb"])
@pytest.mark.parametrize(
    "profile",
    [dict(tiled=True, blockxsize=256, blockysize=256), dict(blockysize=16)],
    ids=["tiled", "striped"],
)
@pytest.mark.parametrize("masked", [False, True])
def test_jpeg_blocks_decoded_by_libjpeg_turbo_match_gdal(tmp_path, monkeypatch, photometric, profile, masked):
    path = write_scene(
        tmp_path / "j.tif", pavement(1000, 700), compress="jpeg", photometric=photometric, **profile
    )
    if masked:
        with rasterio.open(path, "r+") as ds:
            ds.write_mask(np.arange(700)[None].repeat(1000, 0) >= 100)
    strips = {}
    for turbo in (True, False):
        monkeypatch.setattr("pipeline.raster.TURBO_JPEG", turbo)
        with SceneReader(str(path)) as reader:
            assert reader.decoder == ("libjpeg-turbo" if turbo else "gdal")
            strips[turbo] = [reader.read_strip(row, 400) for row in (0, 336, 672, 100)]
    for row, (ours, our_valid), (gdal, gdal_valid) in zip((0, 336, 672, 100), strips[True], strips[False]):
        assert (our_valid == gdal_valid).all()
        difference = np.abs(ours.astype(int) - gdal)
        if photometric == "rgb":
            assert difference.max() == 0
        else:  # libjpeg 9 and libjpeg-turbo upsample chroma differently
            assert difference.mean() < 0.5 and difference.max() <= 16
        inside = min(400, 1000 - row)  # rows below the scene mirror it
        assert not ours[:, :inside][:, ~our_valid[:inside]].any()


def test_jpeg_with_a_nodata_value_is_decoded_by_gdal(tmp_path):
    pixels = pavement(300, 300)
    pixels[:, :, :50] = 0
    path = write_scene(tmp_path / "j.tif", pixels, compress="jpeg", nodata=0, tiled=True)
    with SceneReader(str(path)) as reader:
        assert reader.decoder == "gdal"  # the nodata mask comes from decoded pixels: GDAL's


def test_truncated_jpeg_geotiff_is_a_clear_error(tmp_path):
    path = write_scene(
        tmp_path / "t.tif",
        pavement(1200, 800),
        compress="jpeg",
        photometric="ycbcr",
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SceneReadError, match="t.tif: truncated or corrupt"):
        chips_of(path)


def test_jpeg_as_a_file_uri_is_decoded_by_libjpeg_turbo(tmp_path):
    path = write_scene(
        tmp_path / "j.tif",
        pavement(500, 500),
        compress="jpeg",
        photometric="ycbcr",
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    with SceneReader(str(path)) as by_path, SceneReader(path.as_uri()) as by_uri:
        assert by_uri.decoder == by_path.decoder == "libjpeg-turbo"
        assert all((a == b).all() for a, b in zip(by_uri.read_strip(0, 400), by_path.read_strip(0, 400)))


def test_three_grey_jpeg_bands_are_decoded_by_gdal(tmp_path):
    """Three MINISBLACK bands carry no colour-space marker: libjpeg would take them for YCbCr."""
    path = write_scene(
        tmp_path / "g.tif",
        pavement(300, 300),
        compress="jpeg",
        photometric="minisblack",
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    with SceneReader(str(path)) as reader:
        assert reader.decoder == "gdal"


def test_the_decoder_check_uses_a_block_that_is_in_the_file(tmp_path):
    from pipeline.raster import _JpegBlocks

    pixels = np.random.default_rng(2).integers(0, 255, (3, 512, 512), dtype=np.uint8)  # colourful
    pixels[:, :256, :256] = 0  # a sparse file leaves this block out
    path = write_scene(
        tmp_path / "s.tif",
        pixels,
        compress="jpeg",
        photometric="ycbcr",
        tiled=True,
        blockxsize=256,
        blockysize=256,
        sparse_ok=True,
    )
    with rasterio.open(path) as ds, open(path, "rb") as file:
        assert ds.get_tag_item("BLOCK_OFFSET_0_0", "TIFF", bidx=1) is None
        assert _JpegBlocks(ds, file)._difference_from_gdal() > 0  # decoded and compared, not zeros


def test_a_jpeg_block_of_the_wrong_size_is_a_clear_error(tmp_path):
    path = write_scene(
        tmp_path / "c.tif",
        pavement(600, 600),
        compress="jpeg",
        photometric="ycbcr",
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    with rasterio.open(path) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0", offset)  # start of frame: marker, length, precision, height, width
    data[sof + 7 : sof + 9] = (128).to_bytes(2, "big")
    path.write_bytes(bytes(data))
    with pytest.raises(SceneReadError, match=r"c.tif: truncated or corrupt \(JPEG block 1,1 is a 128 x 256"):
        chips_of(path)


def test_nan_pixels_are_nodata_and_the_rest_is_stretched_as_without_them(tmp_path):
    rng = np.random.default_rng(5)
    pixels = rng.normal(1000.0, 50.0, (3, 300, 420)).astype(np.float32)
    pixels[:, 100:110, 30:380] = 300.0  # a dark crack
    with_nan = pixels.copy()
    with_nan[:, :, :60] = np.nan  # a strip outside the crack: nodata
    with_nan[:, 200, 200] = np.inf
    plain = np.concatenate([b.pixels for b in chips_of(write_scene(tmp_path / "p.tif", pixels))])
    batches = chips_of(write_scene(tmp_path / "n.tif", with_nan))
    valid = np.concatenate([b.valid for b in batches])[0]
    chip = np.concatenate([b.pixels for b in batches])[0]
    assert not valid[:300, :60].any() and not valid[200, 200] and valid[:300, 60:400].sum() == 300 * 340 - 1
    assert (chip[:, :300, :60] == 0).all()
    # the stretch ignores the NaN: the crack is as dark against the road as without them
    crack, road = chip[:, 100:110, 100:300].mean(), chip[:, 150:190, 100:300].mean()
    plain_crack, plain_road = plain[0][:, 100:110, 100:300].mean(), plain[0][:, 150:190, 100:300].mean()
    assert road - crack > 100 and abs((road - crack) - (plain_road - plain_crack)) < 10


class ReadSpy:
    """A dataset that records the first row of every pixel read asked of GDAL."""

    def __init__(self, ds) -> None:
        self._ds, self.rows_read = ds, []

    def read(self, *args, window=None, **kwargs):
        self.rows_read.append(int(window.row_off))
        return self._ds.read(*args, window=window, **kwargs)

    def __getattr__(self, name):
        return getattr(self._ds, name)


def sparse_scene(path, size_px: int, tile_px: int, written: tuple[int, int]) -> None:
    """A tiled GeoTIFF of size_px x size_px in which only the tile at ``written`` (row, col) exists."""
    row, col = written
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=size_px,
        height=size_px,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=rasterio.transform.from_origin(500000, 5600000, 0.002, 0.002),
        tiled=True,
        blockxsize=tile_px,
        blockysize=tile_px,
        sparse_ok=True,
    ) as ds:
        ds.write(
            np.full((3, tile_px, tile_px), 120, np.uint8),
            window=Window(col * tile_px, row * tile_px, tile_px, tile_px),
        )


def test_absent_tiles_of_a_sparse_geotiff_are_nodata_and_never_become_chips(tmp_path):
    path = tmp_path / "sparse.tif"
    sparse_scene(path, 20_000, 512, (20, 30))  # 400 million pixels, one tile of them written
    assert path.stat().st_size < 1_000_000  # the one tile
    with SceneReader(str(path)) as reader:
        reader._ds = ReadSpy(reader._ds)
        batches = list(reader.chip_batches(400, 64, 64))
        decoded = reader._ds.rows_read
    windows = [w for b in batches for w in b.windows]
    tile = (20 * 512, 21 * 512, 30 * 512, 31 * 512)  # rows, then columns
    assert windows and all(
        w.row_off < tile[1]
        and w.row_off + 400 > tile[0]
        and w.col_off < tile[3]
        and w.col_off + 400 > tile[2]
        for w in windows
    )
    offsets = chip_offsets(20_000, 400, 64)
    rows = [r for r in offsets if r < tile[1] and r + 400 > tile[0]]
    cols = [c for c in offsets if c < tile[3] and c + 400 > tile[2]]
    assert len(windows) == len(rows) * len(cols) == 6  # the chips over the tile, nothing else
    valid = sum(int(b.valid.sum()) for b in batches)
    assert valid > 0 and all(((b.pixels == 120) | ~b.valid[:, None]).all() for b in batches)
    # GDAL decodes only the run of rows that holds the tile
    assert decoded == [20 * 512]
