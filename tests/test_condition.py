"""Road condition: crack types, pattern areas, sections, change; every store test on GeoPackage and PostGIS.

The road is a quarter circle (radius 100 m) in UTM 33N; cracks are drawn at known
chainages and offsets (``at(s, o)``: offset positive to the left of the road's
direction, which here is towards the centre).
"""

import dataclasses

import numpy as np
import pyogrio
import pytest
import shapely
from affine import Affine
from click.testing import CliRunner
from conftest import paint_crack, write_scene
from pyproj import Geod
from rasterio.crs import CRS

from pipeline import projection
from pipeline.cli import cli
from pipeline.condition import SectionOptions, run_change, run_sections
from pipeline.errors import ConditionError, NetworkError
from pipeline.records import CrackLine, Scene, SceneResult
from pipeline.scene import SceneOptions, detect_cracks, type_cracks
from pipeline.stores import DEFAULT_CRS, CrackQuery, RunInfo, open_store

UTM = "EPSG:32633"
R = 100.0
CENTRE = np.array([500000.0, 5600000.0])
RUN = RunInfo("survey-a", "run-1", "test-b16", "1.0.0", "abc")
RUN_B = dataclasses.replace(RUN, survey_id="survey-b", run_id="run-2")
GEOD = Geod(ellps="WGS84")


def at(s: float, o: float) -> np.ndarray:
    """The point at chainage ``s`` and offset ``o`` of the curved road."""
    phi = -np.pi / 2 + s / R
    return CENTRE + (R - o) * np.array([np.cos(phi), np.sin(phi)])


ROAD = shapely.LineString([at(s, 0.0) for s in np.linspace(0, R * np.pi / 2, 181)])


def along(s0, s1, o, n=25):
    return [at(s, o) for s in np.linspace(s0, s1, n)]


def across(s, o0, o1):
    return [at(s, o0), at(s, o1)]


def grid(s0=72.0, o0=-1.0):
    """An alligator grid: 0.25 m pieces, 2 m along by 1.5 m across."""
    lines = [across(s0 + 0.25 * k, o0, o0 + 1.5) for k in range(9)]
    return lines + [along(s0, s0 + 2.0, o0 + 0.25 * j, 9) for j in range(7)]


CRACKS_A = {
    "long": along(15, 27, 1.0),
    "trans": across(35, -2.5, 2.5),
    "diag": [at(54, -1), at(56, 1)],
    "outside": along(45, 47, 8.0, 3),
    **{f"grid{i}": g for i, g in enumerate(grid())},
}


def write_network(path, roads=(("R1", ROAD),), crs=UTM, id_field="road_id", direction=None):
    ids = np.array([r for r, _ in roads], dtype=object)
    extra = {} if direction is None else {"direction": np.array(direction, dtype=object)}
    pyogrio.raw.write(
        str(path),
        shapely.to_wkb(np.array([g for _, g in roads], dtype=object)),
        field_data=[ids, *extra.values()],
        fields=[id_field, *extra],
        crs=crs,
        geometry_type="LineString",
        driver="GPKG" if str(path).endswith(".gpkg") else "GeoJSON",
    )
    return str(path)


def scene_result(scene_id: str, cracks: dict, shift_m=(0.0, 0.0)) -> SceneResult:
    """A mapped scene covering the road, with cracks drawn in UTM, typed as the pipeline types them."""
    lines = [shapely.LineString(np.array(c) + shift_m) for c in cracks.values()]
    lonlat = projection.transform(lines, UTM, "EPSG:4326")
    records = tuple(
        CrackLine(
            geometry=g,
            length_m=float(GEOD.geometry_length(g)),
            width_mean_mm=3.0,
            width_max_mm=4.0,
            orientation_deg=0.0,
            confidence=0.9,
            severity="low",
        )
        for g in lonlat
    )
    footprint = projection.transform([ROAD.buffer(4.5)], UTM, "EPSG:4326")[0]
    typed, areas = type_cracks(records, footprint, DEFAULT_CRS)
    scene = Scene(
        f"/surveys/{scene_id}.tif", scene_id, 1000, 1000, 3, "uint8", CRS.from_string(UTM), Affine.identity()
    )
    return SceneResult(scene, typed, footprint, 9, "p.tif", 0.1, "sha", pattern_areas=areas)


def cracks_by_name(store, survey_id, names):
    found = {row["crack_id"]: row for batch in store.query(CrackQuery(survey_id=survey_id)) for row in batch}
    rows = sorted(found.values(), key=lambda r: r["crack_id"])  # ids are in publication order
    return dict(zip(names, rows))


@pytest.fixture
def mapped(store_url, tmp_path):
    """Survey A published and its sections computed on the curved road."""
    network = write_network(tmp_path / "roads.gpkg")
    store = open_store(store_url)
    store.publish(scene_result("s1", CRACKS_A), RUN)
    report = run_sections(store, network, "survey-a")
    yield store, report, network
    store.close()


def test_crack_types_follow_the_road_network(mapped):
    store, report, _ = mapped
    cracks = cracks_by_name(store, "survey-a", list(CRACKS_A))
    assert cracks["long"]["crack_type"] == "longitudinal" and cracks["long"]["theta_deg"] < 5
    assert cracks["trans"]["crack_type"] == "transverse" and cracks["trans"]["theta_deg"] > 85
    assert cracks["trans"]["span_ratio"] == pytest.approx(5.0 / 7.0, abs=0.01)  # of the 7 m road
    assert cracks["diag"]["crack_type"] == "diagonal" and 40 < cracks["diag"]["theta_deg"] < 50
    assert all(cracks[f"grid{i}"]["crack_type"] == "pattern" for i in range(16))
    assert cracks["long"]["tortuosity"] == pytest.approx(1.0, abs=0.01)
    assert cracks["trans"]["chord_m"] == pytest.approx(5.0, abs=0.01)
    assert cracks["long"]["span_ratio"] is None


def test_section_lengths_add_up_to_the_total_inside_the_corridor(mapped):
    store, report, _ = mapped
    cracks = cracks_by_name(store, "survey-a", list(CRACKS_A))
    inside = sum(c["length_m"] for c in cracks.values() if c["road_id"] is not None)
    sections = [r for r in report.rows if r["level"] == "section"]
    total = sum(r[f"{t}_m"] for r in sections for t in ("longitudinal", "transverse", "diagonal", "pattern"))
    assert total == pytest.approx(inside, rel=1e-9)
    assert (
        cracks["outside"]["road_id"] is None and report.outside == 1 and report.located == len(CRACKS_A) - 1
    )
    by_from = {r["from_m"]: r for r in sections}
    long_m = cracks["long"]["length_m"]  # 15-27 m: 5 m in [10, 20), 7 m in [20, 30)
    assert by_from[10.0]["longitudinal_m"] == pytest.approx(long_m * 5 / 12, rel=1e-3)
    assert by_from[20.0]["longitudinal_m"] == pytest.approx(long_m * 7 / 12, rel=1e-3)
    assert by_from[30.0]["transverse_count"] == 1
    for level in ("rollup", "road"):  # rollups add the same sums up
        rows = [r for r in report.rows if r["level"] == level]
        assert sum(r["longitudinal_m"] + r["pattern_m"] for r in rows) == pytest.approx(
            sum(r["longitudinal_m"] + r["pattern_m"] for r in sections), rel=1e-9
        )
    stored = store.read_layer("current_sections", {"survey_id": "survey-a", "level": "section"})
    assert len(stored) == 16 and stored[0]["coverage"] == pytest.approx(1.0, abs=1e-6)
    assert {r["condition_class"] for r in stored} <= {"Good", "Fair", "Poor"}


def test_chainages_and_offsets_are_right_within_a_centimetre(mapped):
    store, _, _ = mapped
    cracks = cracks_by_name(store, "survey-a", list(CRACKS_A))
    long, trans, diag = cracks["long"], cracks["trans"], cracks["diag"]
    assert (long["road_id"], long["chainage_from_m"], long["chainage_to_m"], long["offset_m"]) == (
        "R1",
        pytest.approx(15.0, abs=0.01),
        pytest.approx(27.0, abs=0.01),
        pytest.approx(1.0, abs=0.01),
    )
    assert trans["chainage_from_m"] == pytest.approx(35.0, abs=0.01)
    assert trans["chainage_to_m"] == pytest.approx(35.0, abs=0.01) and trans["offset_m"] == pytest.approx(
        0, abs=0.01
    )
    assert diag["chainage_from_m"] == pytest.approx(54.0, abs=0.01)
    assert diag["chainage_to_m"] == pytest.approx(56.0, abs=0.01)
    right = cracks_by_name(store, "survey-a", list(CRACKS_A))["grid0"]  # offsets -1.0 .. 0.5: middle -0.25
    assert right["offset_m"] == pytest.approx(-0.25, abs=0.01)


def test_an_alligator_grid_is_one_pattern_area_and_leaves_the_linear_totals(mapped):
    store, report, _ = mapped
    areas = store.read_layer("current_pattern_areas", {"survey_id": "survey-a"})
    assert len(areas) == 1
    area = areas[0]
    assert area["class"] == "alligator" and area["piece_m"] == pytest.approx(0.25, abs=0.02)
    assert area["area_m2"] == pytest.approx(3.0075, rel=0.02)  # 2 m x 1.5 m on the curve
    assert area["crack_density_m_per_m2"] == pytest.approx(27.5 / 3.0, rel=0.05)
    section = next(r for r in report.rows if r["level"] == "section" and r["from_m"] == 70.0)
    assert section["longitudinal_m"] == section["transverse_m"] == section["diagonal_m"] == 0.0
    assert section["pattern_m"] == pytest.approx(27.5, rel=0.01)
    assert section["alligator_m2"] == pytest.approx(3.0075, rel=0.02) and section["transverse_count"] == 0
    assert section["cracked_area_pct"] == pytest.approx(100 * section["alligator_m2"] / 70.0, rel=1e-6)


def test_survey_b_reports_the_extended_and_the_added_crack(mapped, tmp_path):
    store, _, network = mapped
    later = dict(CRACKS_A, long=along(15, 30, 1.0), added=[at(95, -2), at(96.5, 0)])
    store.publish(scene_result("s1", later, shift_m=(0.02, -0.01)), RUN_B)  # 2 cm positioning error
    report = run_change(store, "survey-a", "survey-b", network)
    assert report.counts == {"new": 1, "grown": 1, "unchanged": len(CRACKS_A) - 1, "gone": 0}
    assert report.warning is None
    changes = store.read_layer("crack_changes", {"from_survey": "survey-a", "to_survey": "survey-b"})
    b = cracks_by_name(store, "survey-b", list(later))
    status = {r["crack_id"]: r["status"] for r in changes}
    assert status[b["long"]["crack_id"]] == "grown" and status[b["added"]["crack_id"]] == "new"
    assert {status[b[n]["crack_id"]] for n in CRACKS_A if n != "long"} == {"unchanged"}
    deltas = {
        (r["level"], r["from_m"]): r for r in store.read_layer("section_changes", {"from_survey": "survey-a"})
    }
    assert deltas[("section", 20.0)]["longitudinal_m_delta"] == pytest.approx(3.0, rel=0.01)
    assert deltas[("section", 90.0)]["diagonal_m_delta"] == pytest.approx(2.5, rel=0.01)
    assert deltas[("section", 30.0)]["transverse_m_delta"] == pytest.approx(0.0, abs=0.01)
    # a later survey mapped with another model: compared, with a warning
    store.publish(
        scene_result("s1", later), dataclasses.replace(RUN, survey_id="survey-c", model_version="2.0.0")
    )
    assert "different models" in run_change(store, "survey-a", "survey-c", network).warning


def test_a_slab_joint_grid_is_typed_joint_and_left_out_of_totals_beside_a_kept_crack(
    store_url, tmp_path, darkness
):
    pixels = np.full((3, 600, 1000), 215, np.uint8)  # 10 m x 6 m at 1 cm: the road runs along x
    for col in (150, 450, 750):  # transverse joints every 3 m, across the whole width
        paint_crack(pixels, (0, col), (599, col), 3)
    paint_crack(pixels, (300, 0), (300, 999), 3)  # the longitudinal joint
    paint_crack(pixels, (60, 200), (230, 400), 4)  # a diagonal crack in a slab
    path = write_scene(
        tmp_path / "slabs.tif", pixels, transform=Affine(0.01, 0, 500000.0, 0, -0.01, 5600000.0)
    )

    class Model:
        spec, threshold, line_settings = "test:1", 0.5, {}

    result = detect_cracks(str(path), darkness, Model(), tmp_path / "p.tif", DEFAULT_CRS, SceneOptions())
    types = [c.crack_type for c in result.cracks]
    assert types.count("diagonal") == 1 and set(types) == {"joint", "diagonal"}, types
    joints = [c for c in result.cracks if c.crack_type == "joint"]
    assert sum(c.length_m for c in joints) == pytest.approx(3 * 6.0 + 10.0, rel=0.05)
    crack = next(c for c in result.cracks if c.crack_type == "diagonal")
    assert result.total_length_m == pytest.approx(crack.length_m) and len(result.counted) == 1
    store = open_store(store_url)
    store.publish(result, RUN)
    summary = store.scene_summaries("survey-a", RUN.model_name, RUN.model_version)["slabs"]
    assert summary["crack_count"] == 1 and summary["total_length_m"] == pytest.approx(crack.length_m)
    kept = [r["crack_type"] for batch in store.query() for r in batch]
    assert kept.count("joint") == len(joints)  # joints are kept, typed
    road = shapely.LineString([(500000.0, 5599997.0), (500010.0, 5599997.0)])
    report = run_sections(
        store,
        write_network(tmp_path / "slab-road.geojson", (("S", road),)),
        "survey-a",
        SectionOptions(section_m=5.0, rollup_m=10.0),
    )
    sections = [r for r in report.rows if r["level"] == "section"]
    assert report.joints == len(joints)
    assert sum(r["diagonal_m"] + r["longitudinal_m"] + r["transverse_m"] for r in sections) == pytest.approx(
        crack.length_m, rel=1e-9
    )
    assert [r["crack_type"] for batch in store.query() for r in batch].count("joint") == len(joints)
    store.close()


def test_bad_networks_and_requests_are_refused_and_nothing_is_written(store_url, tmp_path):
    store = open_store(store_url)
    store.publish(scene_result("s1", CRACKS_A), RUN)
    cases = {
        "no id field": (
            write_network(tmp_path / "a.gpkg", id_field="name"),
            "has no road id field 'road_id'",
        ),
        "zero length": (
            write_network(tmp_path / "b.gpkg", (("Z", shapely.LineString([at(5, 0), at(5, 0)])),)),
            "zero-length lines: Z",
        ),
        "multi-part": (_multi(tmp_path / "c.gpkg"), "multi-part lines that do not join into one: M"),
        "elsewhere": (
            write_network(tmp_path / "d.gpkg", (("F", shapely.LineString([(0, 0), (100, 0)])),)),
            "no road comes within 5.0 m",
        ),
        "alien CRS": (write_network(tmp_path / "e.gpkg", crs="IAU_2015:49900"), "cannot be transformed"),
        "not a file": (str(tmp_path / "missing.gpkg"), "cannot be read as a vector file"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(NetworkError, match=message) as caught:
            run_sections(store, path, "survey-a")
        assert path.split("/")[-1] in str(caught.value) and "nothing was written" in str(caught.value), name
    assert store.read_layer("sections", {}) == []
    assert {r["road_id"] for b in store.query() for r in b} == {None}
    for bad in (0.0, -10.0, 0.2):
        with pytest.raises(ConditionError, match="too small"):
            SectionOptions(section_m=bad)
    with pytest.raises(ConditionError, match="unknown survey 'nope'; the store has survey-a"):
        run_sections(store, write_network(tmp_path / "ok.gpkg"), "nope")
    with pytest.raises(ConditionError, match="both 'survey-a'.*the store has survey-a"):
        run_change(store, "survey-a", "survey-a")
    with pytest.raises(ConditionError, match="unknown survey 'nope'"):
        run_change(store, "survey-a", "nope")
    store.close()


def test_publishing_a_scene_again_drops_its_cracks_road_columns(mapped):
    """The same run publishes the scene again (same crack ids): the new rows have no road columns until
    sections run again, in PostGIS (crack_positions, a trigger) as in GeoPackage (the rows themselves)."""
    store, _, network = mapped
    assert cracks_by_name(store, "survey-a", list(CRACKS_A))["long"]["road_id"] == "R1"
    store.publish(scene_result("s1", CRACKS_A), RUN)
    cracks = cracks_by_name(store, "survey-a", list(CRACKS_A))
    assert {c["road_id"] for c in cracks.values()} == {None}
    assert {c["chainage_from_m"] for c in cracks.values()} == {None}
    run_sections(store, network, "survey-a")
    assert cracks_by_name(store, "survey-a", list(CRACKS_A))["long"]["road_id"] == "R1"
    versions = [
        r
        for b in store.query(CrackQuery(model_name=RUN.model_name, model_version=RUN.model_version))
        for r in b
    ]  # every version of the cracks (all_cracks in PostGIS) shows them too
    assert sum(r["road_id"] == "R1" for r in versions) == len(CRACKS_A) - 1


def test_chainage_runs_with_the_traffic_on_one_way_roads(store_url, tmp_path):
    """The road digitized backwards: two-way, chainage and offsets follow the line; one-way against
    the line (TF, -1, backward), they follow the traffic; a value that is no direction is refused."""
    store = open_store(store_url)
    store.publish(scene_result("s1", CRACKS_A), RUN)
    backwards = (("R1", ROAD.reverse()),)
    length = ROAD.length
    for direction, along_traffic in (
        ("B", False),
        (None, False),
        ("TF", True),
        ("-1", True),
        ("backward", True),
        ("FT", False),
    ):
        network = write_network(
            tmp_path / f"roads-{direction}.gpkg",
            backwards,
            direction=None if direction is None else [direction],
        )
        run_sections(store, network, "survey-a")
        long = cracks_by_name(store, "survey-a", list(CRACKS_A))["long"]  # chainage 15-27, offset +1 on ROAD
        expected = (15.0, 27.0, 1.0) if along_traffic else (length - 27.0, length - 15.0, -1.0)
        assert (long["chainage_from_m"], long["chainage_to_m"], long["offset_m"]) == tuple(
            pytest.approx(v, abs=0.01) for v in expected
        ), direction
        sections = store.read_layer("current_sections", {"survey_id": "survey-a", "level": "section"})
        first = min(sections, key=lambda r: r["from_m"])  # section 0-10 m: where traffic enters
        entry = projection.transform(
            [shapely.Point(at(0, 0) if along_traffic else at(length, 0))], UTM, "EPSG:4326"
        )[0]
        assert first["geometry"].distance(entry) < 1e-7, direction  # touches the road's entry end
    network = write_network(tmp_path / "north.gpkg", backwards, direction=["north"])
    with pytest.raises(
        NetworkError,
        match="north.gpkg: its direction field holds 'north', which is not a direction .*nothing was written",
    ):
        run_sections(store, network, "survey-a")
    store.close()


def _multi(path):
    parts = shapely.MultiLineString([[at(0, 0), at(10, 0)], [at(20, 0), at(30, 0)]])
    pyogrio.raw.write(
        str(path),
        shapely.to_wkb(np.array([parts], dtype=object)),
        field_data=[np.array(["M"], dtype=object)],
        fields=["road_id"],
        crs=UTM,
        geometry_type="MultiLineString",
        driver="GPKG",
    )
    return str(path)


def test_the_sections_and_change_commands_print_their_tables(store_url, tmp_path):
    network = write_network(tmp_path / "roads.geojson")
    store = open_store(store_url)
    store.publish(scene_result("s1", CRACKS_A), RUN)
    store.publish(scene_result("s1", dict(CRACKS_A, added=[at(95, -2), at(96.5, 0)])), RUN_B)
    store.close()
    runner = CliRunner()
    out = runner.invoke(cli, ["sections", store_url, "--network", network, "--survey", "survey-a"])
    assert out.exit_code == 0, out.output
    assert "road" in out.output and "cracked %" in out.output and "R1" in out.output
    assert "1 outside every corridor" in out.output
    assert len([line for line in out.output.splitlines() if line.startswith("R1")]) == 16
    out = runner.invoke(cli, ["sections", store_url, "--network", network])
    assert out.exit_code == 2 and "pick one with --survey" in out.output
    out = runner.invoke(
        cli, ["sections", store_url, "--network", network, "--survey", "survey-a", "--section-m", "0"]
    )
    assert out.exit_code == 2 and "too small" in out.output and "Traceback" not in out.output
    out = runner.invoke(
        cli, ["change", store_url, "--from", "survey-a", "--to", "survey-b", "--network", network]
    )
    assert out.exit_code == 0, out.output
    assert "1 new, 0 grown" in out.output and "Good -> " in out.output
    out = runner.invoke(cli, ["change", store_url, "--from", "survey-a", "--to", "survey-x"])
    assert out.exit_code == 2 and "unknown survey 'survey-x'; the store has survey-a, survey-b" in out.output


def test_the_geopackage_layers_open_with_gdal(tmp_path):
    store = open_store(tmp_path / "map.gpkg")
    store.publish(scene_result("s1", CRACKS_A), RUN)
    run_sections(store, write_network(tmp_path / "roads.gpkg"), "survey-a")
    store.close()
    for layer, kind in (
        ("sections", "Polygon"),
        ("current_sections", "Polygon"),
        ("pattern_areas", "MultiPolygon"),
        ("current_pattern_areas", "MultiPolygon"),
    ):
        info = pyogrio.read_info(tmp_path / "map.gpkg", layer=layer)
        assert info["crs"] == "EPSG:4326" and info["geometry_type"] == kind and info["features"] > 0, layer
    fields = pyogrio.read_info(tmp_path / "map.gpkg", layer="cracks")["fields"]
    assert {
        "crack_type",
        "theta_deg",
        "chord_m",
        "tortuosity",
        "span_ratio",
        "road_id",
        "chainage_from_m",
        "chainage_to_m",
        "offset_m",
        "pattern_no",
    } <= set(fields)


def test_type_profiles_move_the_angle_limits():
    from pipeline.crack_types import linear_types, type_profile

    theta = np.array([15.0, 45.0, 72.0])
    assert linear_types(theta, type_profile("aashto-r85")).tolist() == [
        "longitudinal",
        "diagonal",
        "transverse",
    ]
    assert linear_types(theta, type_profile("strict-10")).tolist() == ["diagonal", "diagonal", "diagonal"]
    with pytest.raises(ValueError, match="choose one of aashto-r85"):
        type_profile("pci")


def test_section_shares_add_up_for_any_crack_on_any_section_length():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pipeline.sections import cut_sections, locate_cracks, split_by_sections

    road = np.array([ROAD])

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(st.tuples(st.floats(0, 150), st.floats(-3, 3)), min_size=2, max_size=6).map(
            lambda p: [(p[0][0] + (s - p[0][0]) / 10, o) for s, o in p]
        ),  # within ~15 m of the first
        st.sampled_from([1.0, 2.5, 10.0, 33.0]),
    )
    def check(points, section_m):
        line = shapely.LineString([at(s, o) for s, o in points])
        if line.length == 0:
            return
        located = locate_cracks(np.array([line]), road, 5.0)
        if located.road[0] < 0:  # a long chord of the curve leaves the corridor: not referenced
            assert located.segment_length_m.size == 0
            return
        sections = cut_sections(road, np.array([7.0]), section_m)
        pieces = split_by_sections(located, sections, section_m)
        length = located.segment_length_m[pieces.segment] * pieces.share
        assert length.sum() == pytest.approx(line.length, rel=1e-9)
        assert np.bincount(pieces.segment, pieces.share) == pytest.approx(1.0, rel=1e-12)
        assert pieces.section.min() >= 0 and pieces.section.max() < len(sections.road)

    check()
