import numpy as np
import pytest
from affine import Affine
from conftest import paint_crack, write_scene
from hypothesis import given, settings
from hypothesis import strategies as st
from pyproj import Geod
from rasterio.crs import CRS
from rasterio.transform import from_origin
from shapely.geometry import LineString

from pipeline import vectorize
from pipeline.measure import pixel_to_map
from pipeline.scene import SceneOptions, detect_cracks
from pipeline.stores import DEFAULT_CRS
from pipeline.vectorize import BandVectorizer, Piece, SeamJoiner, VectorizeParams, band_pieces, cut_to_rows

PIXEL_M = 0.002
UTM = CRS.from_epsg(32633)


class Model:
    spec, threshold, line_settings = "test:1", 0.5, {}  # no line settings chosen for it


def run_scene(
    tmp_path, darkness, pixels, crs="EPSG:32633", transform=None, store_crs=DEFAULT_CRS, **option_args
):
    path = write_scene(tmp_path / "scene.tif", pixels, crs, transform)
    return detect_cracks(
        str(path), darkness, Model(), tmp_path / "p.tif", store_crs, SceneOptions(**option_args)
    )


def blank(height, width):
    return np.full((3, height, width), 220, np.uint8)


def test_crack_across_chip_and_band_seams_is_one_line_with_right_length_and_width(tmp_path, darkness):
    pixels = blank(1500, 1300)
    paint_crack(pixels, (100, 60), (1400, 1240), width_px=7)
    # chips seam every 336 px; bands of 300 rows add seams at 300, 600, 900, 1200
    result = run_scene(
        tmp_path, darkness, pixels, store_crs=UTM, vectorize=VectorizeParams(band_rows=300, halo_rows=48)
    )
    assert len(result.cracks) == 1
    crack = result.cracks[0]
    true_length = np.hypot(1300, 1180) * PIXEL_M
    assert crack.length_m == pytest.approx(true_length, abs=8 * PIXEL_M)  # ends shrink by ~half a width
    assert crack.width_mean_mm == pytest.approx(7 * PIXEL_M * 1000, rel=0.2)
    assert crack.orientation_deg == pytest.approx(np.degrees(np.arctan2(1180, -1300)) % 180, abs=0.5)
    assert crack.severity == "medium"
    assert crack.confidence == pytest.approx((255 - 20) / 255, abs=0.02)


def test_horizontal_crack_width_is_exact(tmp_path, darkness):
    pixels = blank(500, 900)
    pixels[:, 248:253, 50:850] = 20  # 5 px wide
    result = run_scene(tmp_path, darkness, pixels)
    assert len(result.cracks) == 1
    assert result.cracks[0].width_mean_mm == pytest.approx(5 * PIXEL_M * 1000, rel=0.02)
    assert result.cracks[0].width_max_mm == pytest.approx(5 * PIXEL_M * 1000, rel=0.02)
    assert result.cracks[0].orientation_deg == pytest.approx(90.0, abs=0.5)


def test_short_spurs_are_pruned_and_specks_dropped(tmp_path, darkness):
    pixels = blank(400, 600)
    pixels[:, 200:203, 50:550] = 20
    pixels[:, 203:208, 300:301] = 20  # a 5 px spur
    pixels[:, 50:53, 50:53] = 20  # a speck
    result = run_scene(tmp_path, darkness, pixels)
    assert len(result.cracks) == 1


def test_lines_are_georeferenced_exactly_in_a_projected_crs(tmp_path, darkness):
    transform = from_origin(431250.0, 5652300.0, PIXEL_M, PIXEL_M)
    pixels = blank(400, 800)
    pixels[:, 199:202, 100:700] = 20  # centre row 200, cols 100..699
    result = run_scene(tmp_path, darkness, pixels, transform=transform, store_crs=UTM)
    (crack,) = result.cracks
    x, y = np.asarray(crack.geometry.coords).T
    assert np.allclose(y, 5652300.0 - 200.5 * PIXEL_M)  # pixel centres, exactly
    assert x.min() >= 431250.0 + 100 * PIXEL_M and x.max() <= 431250.0 + 700 * PIXEL_M
    assert crack.length_m == pytest.approx(600 * PIXEL_M * 0.9996, abs=4 * PIXEL_M)  # UTM scale ~0.9996


def test_lines_are_georeferenced_exactly_in_epsg_4326(tmp_path, darkness):
    deg = 2e-8  # ~2 mm in latitude
    transform = Affine(deg, 0, 13.4, 0, -deg, 52.5)
    pixels = blank(400, 800)
    pixels[:, 199:202, 100:700] = 20
    result = run_scene(tmp_path, darkness, pixels, crs="EPSG:4326", transform=transform)
    (crack,) = result.cracks
    lon, lat = np.asarray(crack.geometry.coords).T
    assert np.allclose(lat, 52.5 - 200.5 * deg, atol=1e-12)
    expected = Geod(ellps="WGS84").line_length(lon, lat)
    assert crack.length_m == pytest.approx(expected, rel=1e-9)  # metres, not degrees
    assert crack.length_m == pytest.approx(600 * deg * 111320 * np.cos(np.radians(52.5)), rel=0.02)


def test_pixel_to_map_uses_pixel_centres():
    x, y = pixel_to_map(from_origin(10, 20, 1, 1), np.array([[0.0, 0.0]]))
    assert (x[0], y[0]) == (10.5, 19.5)


def test_cut_to_rows_ends_meet_on_the_seam():
    path = np.array([[r, 10 + r // 2] for r in range(0, 30)])
    above = cut_to_rows(path, 0, 15)
    below = cut_to_rows(path, 15, 30)
    assert above[0][0][-1].tolist() == below[0][0][0].tolist() == [14.5, 17.0]
    assert above[0][2] == (None, 15) and below[0][2] == (15, None)


def test_seam_joiner_joins_chains_and_leaves_branches():
    def piece(rows, cols, seams):
        return Piece(np.column_stack([rows, cols]).astype(float), seams, len(rows), len(rows), 1, 0)

    joiner = SeamJoiner()
    for p in (
        piece([0, 9.5], [5, 5], (None, 10)),
        piece([9.5, 19.5], [5, 6], (10, 20)),
        piece([29, 19.5], [6, 6], (None, 20)),
    ):  # the last one runs upwards
        assert joiner.add(p) is None
    (line,) = joiner.finish()
    assert line.seams == (None, None)
    assert {tuple(line.rc[0]), tuple(line.rc[-1])} == {(0.0, 5.0), (29.0, 6.0)}
    assert line.n_px == 6


def test_band_vectorizer_refuses_rows_out_of_order():
    vectorizer = BandVectorizer(10, 100, VectorizeParams())
    with pytest.raises(ValueError, match="expected row 0"):
        vectorizer(5, np.zeros((5, 10), np.uint8), np.ones((5, 10), bool))


def test_vectors_re_extracted_from_the_probability_raster_are_the_same(tmp_path, darkness):
    from pipeline.measure import Georeferencer, Severity
    from pipeline.probability import read_rows

    pixels = blank(900, 700)
    paint_crack(pixels, (50, 50), (850, 650), width_px=5)
    result = run_scene(tmp_path, darkness, pixels)
    vectorizer = BandVectorizer(700, 900, VectorizeParams())
    for row, p, valid in read_rows(result.probability_path, strip_rows=128):
        vectorizer(row, p, valid)
    scene = result.scene
    geo = Georeferencer(scene.crs, scene.transform, 700, 900, DEFAULT_CRS, VectorizeParams(), Severity())
    again = [geo.crack_line(p) for p in vectorizer.finish()]
    assert [c.geometry.wkb for c in again] == [c.geometry.wkb for c in result.cracks]
    assert isinstance(again[0].geometry, LineString)


def test_a_crs_the_store_cannot_reach_fails_before_the_network_runs(tmp_path):
    from pipeline.errors import SceneContentError

    class Exploding:
        name, batch_size = "exploding", 4

        def predict(self, chips):
            raise AssertionError("the network must not run")

    # EPSG:2056 (Swiss LV95) has no transformation to a Martian CRS
    path = write_scene(
        tmp_path / "swiss.tif", blank(50, 50), "EPSG:2056", from_origin(2600000, 1200000, 0.002, 0.002)
    )
    with pytest.raises(SceneContentError, match="swiss.tif: its CRS EPSG:2056 cannot be transformed"):
        detect_cracks(
            str(path),
            Exploding(),
            Model(),
            tmp_path / "p.tif",
            CRS.from_wkt(
                'GEOGCRS["Mars 2000",DATUM["D_Mars_2000",ELLIPSOID["Mars_2000_IAU_IAG",3396190,169.894447223612]],'
                'CS[ellipsoidal,2],AXIS["lat",north,ANGLEUNIT["degree",0.0174532925199433]],'
                'AXIS["lon",east,ANGLEUNIT["degree",0.0174532925199433]]]'
            ),
            SceneOptions(),
        )
    assert not (tmp_path / "p.tif").exists()


def pieces_key(pieces):
    return sorted(
        (
            p.rc.round(6).tolist(),
            p.seams,
            p.n_px,
            round(p.half_width_sum, 4),
            p.half_width_max,
            p.probability_sum,
        )
        for p in pieces
    )


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.sampled_from([0.0, 0.002, 0.05]))
def test_packed_crack_columns_give_the_pieces_the_whole_band_gives(seed, strokes, noise):
    """Vectorizing only the columns that hold cracks, packed side by side, changes nothing."""
    rng = np.random.default_rng(seed)
    probability = (rng.random((160, 900)) < noise).astype(np.uint8) * 200
    for _ in range(strokes):  # cracks of any direction and width, some close to each other or the edges
        start, end = rng.integers(0, (160, 900), 2), rng.integers(0, (160, 900), 2)
        p = probability[None].copy()
        paint_crack(
            p, tuple(start), tuple(end), width_px=float(rng.uniform(1, 6)), value=int(rng.integers(100, 256))
        )
        probability = p[0]
    valid = np.ones(probability.shape, bool)
    valid[:, : int(rng.integers(0, 40))] = False
    params = VectorizeParams(band_rows=100, halo_rows=30, min_area_px=10, spur_px=6)
    packed = band_pieces(probability, valid, 500, 530, 630, params)
    whole_band = vectorize.SPARSE_MAX_RUNS
    try:
        vectorize.SPARSE_MAX_RUNS = -1  # every band is one run of the whole width
        unpacked = band_pieces(probability, valid, 500, 530, 630, params)
    finally:
        vectorize.SPARSE_MAX_RUNS = whole_band
    assert pieces_key(packed) == pieces_key(unpacked)


@pytest.mark.parametrize("direction", ["east-west", "north-south"])
def test_widths_on_non_square_pixels_use_the_spacing_across_the_crack(tmp_path, darkness, direction):
    """EPSG:4326 at 60 degrees north: a pixel of 1e-7 degrees is 5.6 mm east-west, 11.1 mm north-south."""
    pixels = blank(500, 900)
    if direction == "east-west":
        pixels[:, 248:253, 50:850] = 20  # 5 rows wide: measured north-south
    else:
        pixels = blank(900, 500)
        pixels[:, 50:850, 248:253] = 20  # 5 columns wide: measured east-west
    transform = from_origin(10.0, 60.0, 1e-7, 1e-7)
    result = run_scene(tmp_path, darkness, pixels, "EPSG:4326", transform)
    geod = Geod(ellps="WGS84")
    lat = 60.0 - 1e-7 * pixels.shape[1] / 2
    row_m = geod.inv(10.0, lat, 10.0, lat - 1e-7)[2]
    col_m = geod.inv(10.0, lat, 10.0 + 1e-7, lat)[2]
    across_m = row_m if direction == "east-west" else col_m
    assert col_m / row_m == pytest.approx(0.5, abs=0.01)
    assert len(result.cracks) == 1
    assert result.cracks[0].width_mean_mm == pytest.approx(5 * across_m * 1000, rel=0.02)
    assert result.cracks[0].width_max_mm == pytest.approx(5 * across_m * 1000, rel=0.02)


# --------------------------------------------------------------------------- texture fragments and gaps


def test_a_crack_with_a_faint_stretch_across_a_chip_seam_is_bridged_into_one_line(tmp_path, darkness):
    pixels = blank(500, 900)
    pixels[:, 248:253, 50:850] = 20  # 5 px wide, 800 px long
    pixels[:, 248:253, 330:338] = 200  # a faint stretch of 8 px across the chip seam at 336
    broken = run_scene(tmp_path, darkness, pixels, vectorize=VectorizeParams(bridge_gap_px=0))
    assert len(broken.cracks) == 2
    bridged = run_scene(tmp_path, darkness, pixels, vectorize=VectorizeParams(bridge_gap_px=16))
    assert len(bridged.cracks) == 1
    # The whole crack, the gap included (800 px less about half a width at each end).
    assert bridged.cracks[0].length_m > sum(c.length_m for c in broken.cracks) + 8 * PIXEL_M
    assert bridged.cracks[0].length_m == pytest.approx(800 * PIXEL_M, abs=6 * PIXEL_M)


def test_lines_that_do_not_face_each_other_are_not_bridged(tmp_path, darkness):
    pixels = blank(500, 900)
    pixels[:, 248:253, 50:400] = 20  # horizontal, ends at column 400
    pixels[:, 262:460, 408:413] = 20  # vertical, starts 10 px away, at right angles
    result = run_scene(tmp_path, darkness, pixels, vectorize=VectorizeParams(bridge_gap_px=16))
    assert len(result.cracks) == 2


def test_bridging_never_closes_a_loop_or_uses_an_end_twice():
    def piece(rc):
        return Piece(np.asarray(rc, float), (None, None), len(rc), float(len(rc)), 1.0, 200.0 * len(rc))

    # Three collinear pieces: the middle one's ends are each bridged once.
    pieces = [piece([[0, 0], [0, 20]]), piece([[0, 24], [0, 40]]), piece([[0, 44], [0, 60]])]
    joined = vectorize.bridge_gaps(pieces, gap_px=6)
    assert len(joined) == 1 and joined[0].rc[0].tolist() == [0, 0] and joined[0].rc[-1].tolist() == [0, 60]
    assert joined[0].n_px == sum(p.n_px for p in pieces)
    # Four pieces around a square, ends facing each other at every corner: one open chain, not a loop.
    square = [
        piece([[0, 2], [0, 18]]),
        piece([[2, 20], [18, 20]]),
        piece([[20, 18], [20, 2]]),
        piece([[18, 0], [2, 0]]),
    ]
    ring = vectorize.bridge_gaps(square, gap_px=4, max_angle_deg=60)
    assert len(ring) == 1 and len(ring[0].rc) == 8


def test_fragments_shorter_than_min_length_are_dropped_and_longer_cracks_kept(tmp_path, darkness):
    pixels = blank(500, 900)
    pixels[:, 248:253, 50:850] = 20  # 1.6 m crack
    for col in range(100, 800, 100):  # texture: 20 px (4 cm) dark flecks
        pixels[:, 100:103, col : col + 20] = 20
    pixels[:, 264:267, 400:420] = 20  # a short branch-like piece right beside the crack
    everything = run_scene(tmp_path, darkness, pixels, vectorize=VectorizeParams(min_area_px=10))
    assert len(everything.cracks) == 9
    cleaned = run_scene(
        tmp_path, darkness, pixels, vectorize=VectorizeParams(min_area_px=10, min_length_m=0.05)
    )
    assert sorted(round(c.length_m, 2) for c in cleaned.cracks)[-1] > 1.5
    assert len(cleaned.cracks) == 2  # the crack and the piece beside it; no texture
