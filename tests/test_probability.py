import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from pipeline.probability import ProbabilityWriter, overview_factors, read_rows
from pipeline.records import Scene


def scene(width: int, height: int) -> Scene:
    return Scene(
        "/data/a.tif",
        "a",
        width,
        height,
        3,
        "uint8",
        CRS.from_epsg(32633),
        from_origin(500000.0, 5600000.0, 0.002, 0.002),
    )


def write(path, probability, valid, run_rows=336, **options):
    writer = ProbabilityWriter(path, scene(probability.shape[1], probability.shape[0]), **options)
    for row in range(0, len(probability), run_rows):  # as the stitcher hands rows on
        writer(row, probability[row : row + run_rows], valid[row : row + run_rows])
    writer.finish()
    return path


@pytest.mark.parametrize("masked", [False, True])
def test_probability_is_a_cog_with_overviews_that_reads_back_exactly(tmp_path, masked):
    rng = np.random.default_rng(3)
    probability = rng.integers(0, 256, (1300, 700), dtype=np.uint8)
    valid = np.ones(probability.shape, bool)
    if masked:
        valid[200:900, :123] = False  # rows on both sides of a 512-row tile seam
    path = write(tmp_path / "p.tif", probability, valid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.tif"]  # nothing partial left
    with rasterio.open(path) as cog:
        assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert cog.profile["compress"] == "deflate" and cog.block_shapes == [(512, 512)]
        assert cog.overviews(1) == overview_factors(700, 1300) == [2, 4]
        assert cog.mask_flag_enums[0] == (
            [rasterio.enums.MaskFlags.per_dataset] if masked else [rasterio.enums.MaskFlags.all_valid]
        )
        if not masked:  # the first overview averages 2 x 2 pixels
            half = cog.read(1, out_shape=(650, 350))
            mean = probability.reshape(650, 2, 350, 2).mean(axis=(1, 3))
            assert np.abs(half - mean).max() <= 1
    rows = list(read_rows(path))
    assert (np.concatenate([r[1] for r in rows]) == probability).all()
    assert (np.concatenate([r[2] for r in rows]) == valid).all()


def test_a_frame_raster_is_a_cog_without_overviews_that_reads_back_exactly(tmp_path):
    """Survey frames (frame pixels, no map): no overviews, the road mask kept."""
    probability = np.random.default_rng(4).integers(0, 256, (1080, 1920), dtype=np.uint8)
    valid = np.ones(probability.shape, bool)
    valid[:430] = False  # above the horizon
    path = write(tmp_path / "f.tif", probability, valid, overviews=False)
    with rasterio.open(path) as cog:
        assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and cog.overviews(1) == []
        assert cog.mask_flag_enums[0] == [rasterio.enums.MaskFlags.per_dataset]
    rows = list(read_rows(path))
    assert (np.concatenate([r[1] for r in rows]) == probability).all()
    assert (np.concatenate([r[2] for r in rows]) == valid).all()
