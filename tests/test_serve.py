"""crackmap serve in-process (FastAPI's TestClient): the same tests on a GeoPackage and on PostGIS."""

from __future__ import annotations

import json
import sqlite3

import mapbox_vector_tile
import morecantile
import psycopg
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from serve_fixtures import (
    CRACK_COUNT,
    SOUTH,
    STEP_DEG,
    WEST,
    crack_line,
    drop_role,
    expected,
    login_role,
    publish_map,
)

from pipeline import gpkg
from pipeline.cli import cli
from pipeline.errors import StoreError
from pipeline.serve.app import MAX_ITEMS, create_app
from pipeline.stores import QUERY_FIELDS


@pytest.fixture
def served(store_url, tmp_path):
    """(URL the server reads, the owner's URL, secrets that must never show) for a published map."""
    publish_map(store_url, tmp_path)
    if not store_url.startswith("postgresql://"):
        yield store_url, store_url, []
        return
    reader_url, name, password = login_role(store_url, "crackmap_reader")
    yield reader_url, store_url, [password]
    drop_role(store_url, name)


@pytest.fixture
def client(served):
    with TestClient(create_app(served[0])) as test_client:
        yield test_client


def ids_of(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [f["id"] for f in response.json()["features"]]


def test_collections_are_the_store_layers_and_no_functions(client):
    response = client.get("/ogc/collections")
    assert response.status_code == 200
    ids = [c["id"] for c in response.json()["collections"]]
    assert ids == [
        "current_cracks",
        "cracks",
        "scenes",
        "sections",
        "pattern_areas",
        "section_changes",
        "crack_changes",
        "current_sections",
        "current_pattern_areas",
    ]
    landing = client.get("/ogc/").json()
    assert {"conformance", "data"} <= {link["rel"].rsplit("/", 1)[-1] for link in landing["links"]}
    extent = client.get("/ogc/collections/current_cracks").json()["extent"]["spatial"]["bbox"][0]
    assert extent[0] == pytest.approx(WEST) and extent[1] == pytest.approx(SOUTH)


def test_bbox_returns_the_cracks_inside_and_paging_walks_them(client):
    # cracks 2..5 start inside this box; the others are outside it
    bbox = f"{WEST + 1.5 * STEP_DEG},{SOUTH - 0.0001},{WEST + 5.5 * STEP_DEG},{SOUTH + 0.00001}"
    everything = client.get("/ogc/collections/current_cracks/items", params={"bbox": bbox, "limit": 100})
    lengths = sorted(f["properties"]["length_m"] for f in everything.json()["features"])
    assert lengths == [expected(i)["length_m"] for i in range(2, 6)]
    assert everything.json()["numberMatched"] == 4
    pages, offset = [], 0
    while True:
        page = client.get(
            "/ogc/collections/current_cracks/items", params={"bbox": bbox, "limit": 3, "offset": offset}
        )
        pages += ids_of(page)
        nexts = [link for link in page.json()["links"] if link["rel"] == "next"]
        if not nexts:
            break
        offset += 3
    assert sorted(pages) == sorted(ids_of(everything)) and len(pages) == 4


def test_an_item_has_every_attribute(client):
    found = client.get(
        "/ogc/collections/current_cracks/items",
        params={"bbox": f"{WEST - 1e-6},{SOUTH - 1e-6},{WEST + 1e-6},{SOUTH + 1e-6}"},
    )
    (crack_id,) = ids_of(found)
    item = client.get(f"/ogc/collections/current_cracks/items/{crack_id}")
    assert item.status_code == 200
    feature = item.json()
    assert set(QUERY_FIELDS) <= set(feature["properties"])
    assert feature["properties"]["crack_id"] == crack_id
    assert feature["properties"]["length_m"] == pytest.approx(expected(0)["length_m"])
    assert feature["properties"]["severity"] == expected(0)["severity"]
    assert feature["properties"]["survey_id"] == "survey-a"
    coordinates = [c for point in feature["geometry"]["coordinates"] for c in point]
    assert coordinates == pytest.approx([c for point in crack_line(0).coords for c in point])


def test_property_filters_cql2_and_csv(client):
    high = client.get("/ogc/collections/current_cracks/items", params={"severity": "high", "limit": 100})
    assert len(ids_of(high)) == CRACK_COUNT // 3
    long_high = client.get(
        "/ogc/collections/current_cracks/items",
        params={"filter": "length_m > 15 AND severity = 'high'", "limit": 100},
    )
    wanted = [
        i for i in range(CRACK_COUNT) if expected(i)["length_m"] > 15 and expected(i)["severity"] == "high"
    ]
    assert sorted(f["properties"]["length_m"] for f in long_high.json()["features"]) == [
        expected(i)["length_m"] for i in wanted
    ]
    csv = client.get("/ogc/collections/current_cracks/items", params={"f": "csv", "limit": 100})
    assert csv.status_code == 200 and csv.text.count("\n") == CRACK_COUNT + 1
    assert "length_m" in csv.text.splitlines()[0]


def test_vector_tiles_hold_the_cracks_with_their_attributes(client):
    tile = morecantile.tms.get("WebMercatorQuad").tile(WEST + 6 * STEP_DEG, SOUTH + 0.0001, 16)
    response = client.get(f"/ogc/collections/current_cracks/tiles/WebMercatorQuad/{tile.z}/{tile.x}/{tile.y}")
    assert response.status_code == 200
    layers = mapbox_vector_tile.decode(response.content)
    features = layers["current_cracks"]["features"]
    assert len(features) == CRACK_COUNT
    assert sorted(f["properties"]["length_m"] for f in features) == [
        expected(i)["length_m"] for i in range(CRACK_COUNT)
    ]
    # geometries in tile pixels (4096 across, y up as decoded), where the tile grid puts them
    bounds = morecantile.tms.get("WebMercatorQuad").xy_bounds(tile)
    start = morecantile.tms.get("WebMercatorQuad").xy(*crack_line(0).coords[0])
    expected_px = [
        (start.x - bounds.left) / (bounds.right - bounds.left) * 4096,
        (start.y - bounds.bottom) / (bounds.top - bounds.bottom) * 4096,
    ]
    first = next(f for f in features if f["properties"]["length_m"] == expected(0)["length_m"])
    assert first["geometry"]["type"] == "LineString"
    assert first["geometry"]["coordinates"][0] == pytest.approx(expected_px, abs=1)
    empty = client.get("/ogc/collections/current_cracks/tiles/WebMercatorQuad/16/0/0")
    assert empty.status_code in (200, 204)
    assert not mapbox_vector_tile.decode(empty.content).get("current_cracks", {}).get("features")


def test_raster_tiles_of_a_scene_image_and_probability(client):
    """The map's raster layers: rio-tiler tiles of the rasters the scene row names, nothing else."""
    from io import BytesIO

    import numpy as np
    from PIL import Image
    from pyproj import Transformer

    # the middle of the painted crack (row 150, column 200 of the 0.25 m scene; see publish_map)
    west, north = Transformer.from_crs(4326, 32633, always_xy=True).transform(WEST - STEP_DEG, SOUTH + 0.0004)
    to_lon_lat = Transformer.from_crs(32633, 4326, always_xy=True)
    lon, lat = to_lon_lat.transform(west + 200 * 0.25, north - 150 * 0.25)
    tile = morecantile.tms.get("WebMercatorQuad").tile(lon, lat, 19)
    scene = {"survey": "survey-a", "scene": "road-1"}
    for kind in ("image", "probability"):
        response = client.get(f"/raster/{kind}/{tile.z}/{tile.x}/{tile.y}.png", params=scene)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        pixels = np.asarray(Image.open(BytesIO(response.content)).convert("RGBA"))
        assert pixels.shape == (256, 256, 4) and (pixels[..., 3] > 0).any()
        if kind == "image":  # the dark crack and the light pavement are both there
            grey = pixels[..., :3].mean(axis=2)[pixels[..., 3] > 0]
            assert grey.min() < 60 and grey.max() > 200
        else:  # only the crack is drawn: most of the tile stays transparent
            assert 0 < (pixels[..., 3] > 0).mean() < 0.5
    far = client.get("/raster/probability/19/0/0.png", params=scene)
    assert far.status_code == 200
    assert not np.asarray(Image.open(BytesIO(far.content)).convert("RGBA"))[..., 3].any()
    unknown = client.get(f"/raster/image/{tile.z}/{tile.x}/{tile.y}.png", params={**scene, "scene": "../etc"})
    assert unknown.status_code == 404 and "no current scene" in unknown.json()["detail"]
    assert client.get(f"/raster/mask/{tile.z}/{tile.x}/{tile.y}.png", params=scene).status_code == 400
    assert client.get("/raster/image/3/9/0.png", params=scene).status_code == 400
    assert client.get(f"/raster/image/{tile.z}/{tile.x}/{tile.y}.png").status_code == 400


@pytest.mark.parametrize(
    "params",
    [
        {"bbox": "a,b,c,d"},
        {"bbox": "1,2,3"},
        {"bbox": "15,50,14,51"},
        {"bbox": "15,50,200,51"},
        {"limit": "-1"},
        {"limit": str(MAX_ITEMS + 1)},
        {"limit": "10000000"},
        {"offset": "x"},
        {"filter": "length_m >>> 3"},
        {"filter": "nosuch_column = 1"},
        {"datetime": "yesterday"},
        {"length_m": "abc"},
        {"sortby": "-nosuch"},
        {"ids": "not-a-crack-id"},
    ],
    ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()),
)
def test_a_malformed_request_gets_a_400_with_a_message(client, params):
    response = client.get("/ogc/collections/current_cracks/items", params=params)
    if "ids" in params and response.status_code == 200:  # text ids (GeoPackage): nothing matches
        assert response.json()["numberMatched"] == 0
        return
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "Traceback" not in detail


@pytest.mark.parametrize(
    "path, params",
    [
        ("/ogc/collections/current_cracks/items/%00", None),  # PostGIS: asyncpg failed, a 500
        ("/ogc/collections/current_cracks/items", {"scene_id": "road\x00"}),
        ("/ogc/collections/current_cracks/items", {"filter": "scene_id = 'a\x00'"}),
    ],
    ids=["item-id", "property", "filter"],
)
def test_a_nul_character_is_a_400_not_a_server_error(client, path, params):
    response = client.get(path, params=params)
    assert response.status_code == 400, response.text
    assert "NUL character" in response.json()["detail"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"  # still with the security headers
    assert client.get("/ogc/collections/current_cracks/items/not-a-crack-id").status_code in (400, 404)


def test_an_unknown_collection_is_a_404_naming_the_ones_there_are(client):
    response = client.get("/ogc/collections/surveys/items")
    assert response.status_code == 404 and "current_cracks" in response.json()["detail"]
    scenes = client.get("/ogc/collections/scenes/items", params={"scene_id": "road-1"})
    assert [f["properties"]["survey_id"] for f in scenes.json()["features"]] == ["survey-a"]
    item = client.get(f"/ogc/collections/scenes/items/{scenes.json()['features'][0]['id']}")
    assert item.status_code in (200, 404)  # 404 on PostGIS: scenes have a four-column key
    if item.status_code == 404:
        assert "no single-column key" in item.json()["detail"]


def test_no_credentials_in_any_page(served, client):
    _, _, hidden = served
    pages = [
        "/",
        "/ogc/",
        "/ogc/collections",
        "/ogc/collections/current_cracks",
        "/ogc/collections/current_cracks/items",
        "/ogc/collections/current_cracks/items?f=html",
        "/ogc/api",
        "/healthz",
        "/ogc/collections/current_cracks/items?bbox=x",
    ]
    for page in pages:
        response = client.get(page)
        assert response.status_code in (200, 400), page
        for secret in hidden:
            assert secret not in response.text, page


def test_the_ogc_html_pages_are_styled_from_this_server_only(client):
    """tipg's pages linked Bootstrap, jQuery and Leaflet from CDNs, which the CSP blocks: unstyled."""
    import re

    crack_id = client.get("/ogc/collections/current_cracks/items").json()["features"][0]["id"]
    for page in (
        "/ogc/?f=html",
        "/ogc/conformance?f=html",
        "/ogc/collections?f=html",
        "/ogc/collections/current_cracks?f=html",
        "/ogc/collections/current_cracks/items?f=html",
        f"/ogc/collections/current_cracks/items/{crack_id}?f=html",
        "/ogc/collections/current_cracks/queryables?f=html",
    ):
        response = client.get(page)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html"), page
        assert '<link rel="stylesheet" href="/static/ogc.css"' in response.text, page
        loaded = re.findall(r'<(?:link|script)[^>]+(?:href|src)="([^"]+)"', response.text)
        assert loaded and all(url.startswith("/") for url in loaded), (page, loaded)
    css = client.get("/static/ogc.css")
    assert css.status_code == 200 and "#map" in css.text


def test_the_web_map_page_and_vendored_maplibre_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "static/maplibre/maplibre-gl.js" in page.text
    assert "://" not in page.text.replace("http://www.w3.org", "")  # nothing from another host
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    items_page = client.get("/ogc/collections/current_cracks/items?f=html")
    assert "connect-src 'self'" in items_page.headers["content-security-policy"]  # no CDN loads either
    script = client.get("/static/maplibre/maplibre-gl.js")
    assert script.status_code == 200 and len(script.content) > 500_000
    assert client.get("/static/map.js").status_code == 200


def test_a_writer_role_is_refused_unless_allowed(pg_database, tmp_path):
    publish_map(pg_database, tmp_path)
    with pytest.raises(StoreError, match="can write.*crackmap_reader.*--allow-write-role"):
        create_app(pg_database)  # the superuser
    writer_url, name, password = login_role(pg_database, "crackmap_writer")
    try:
        with pytest.raises(StoreError, match="can write") as refused:
            create_app(writer_url)
        assert password not in str(refused.value)
        with TestClient(create_app(writer_url, allow_write_role=True)) as client:
            assert len(ids_of(client.get("/ogc/collections/cracks/items"))) == 10
            # the connections are read-only even for a role that could write
            with pytest.raises(Exception, match="read-only"):
                client.portal.call(_try_write, client.app)
    finally:
        drop_role(pg_database, name)


async def _try_write(app):
    async with app.state.pool.acquire() as conn:
        await conn.execute("DELETE FROM cracks")


def test_serve_refuses_a_writer_role_in_one_line_without_the_password(pg_database, tmp_path):
    writer_url, name, password = login_role(pg_database, "crackmap_writer")
    try:
        result = CliRunner().invoke(cli, ["serve", writer_url, "--port", "1"])
    finally:
        drop_role(pg_database, name)
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "--allow-write-role" in result.output
    assert password not in result.output and f"postgresql://{name}@" in result.output


SECTION_COLUMNS = (
    "survey_id",
    "sections_run_id",
    "road_id",
    "level",
    "from_m",
    "to_m",
    "section_m",
    "computed_at",
    "condition_class",
    "is_current",
)


def add_section(url: str) -> None:
    """One Poor section in the store's ``sections`` layer (as ``crackmap sections`` writes them)."""
    box = crack_line(0).buffer(0.0001)
    values = ("survey-a", "run-s", "r1", "section", 0.0, 10.0, 10.0, "2026-11-29T00:00:00Z", "Poor", 1)
    names = ", ".join(SECTION_COLUMNS)
    if url.startswith("postgresql://"):
        with psycopg.connect(url, autocommit=True) as con:
            con.execute(
                f"INSERT INTO sections ({names}, geom) VALUES ({', '.join(['%s'] * len(values))}, "
                "ST_GeomFromText(%s, 4326))",
                (*values, box.wkt),
            )
        return
    con = gpkg.connect(url)
    con.execute(
        f"INSERT INTO sections ({names}, geom) VALUES ({', '.join('?' * len(values))}, ?)",
        (*values, gpkg.encode(box, 4326)),
    )
    con.close()


def test_new_layers_are_served_when_the_store_has_them(store_url, tmp_path):
    """A store with a sections layer serves it too (the map styles it by condition_class)."""
    publish_map(store_url, tmp_path)
    add_section(store_url)
    url, name = store_url, None
    if store_url.startswith("postgresql://"):
        url, name, _ = login_role(store_url, "crackmap_reader")
    try:
        with TestClient(create_app(url)) as client:
            ids = [c["id"] for c in client.get("/ogc/collections").json()["collections"]]
            assert {"sections", "current_sections", "pattern_areas"} <= set(ids)
            sections = client.get("/ogc/collections/sections/items").json()["features"]
            assert [f["properties"]["condition_class"] for f in sections] == ["Poor"]
            (view_item,) = client.get("/ogc/collections/current_sections/items").json()["features"]
            item = client.get(f"/ogc/collections/current_sections/items/{view_item['id']}")
            assert item.status_code == 200 and item.json()["properties"]["condition_class"] == "Poor"
            queryables = client.get("/ogc/collections/sections/queryables?f=schemajson").json()
            assert "condition_class" in queryables["properties"]
            tile = morecantile.tms.get("WebMercatorQuad").tile(WEST, SOUTH + 0.0001, 17)
            layers = mapbox_vector_tile.decode(
                client.get(
                    f"/ogc/collections/sections/tiles/WebMercatorQuad/{tile.z}/{tile.x}/{tile.y}"
                ).content
            )
            assert [f["properties"]["condition_class"] for f in layers["sections"]["features"]] == ["Poor"]
    finally:
        if name:
            drop_role(store_url, name)


def test_serve_refuses_a_missing_store_in_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["serve", str(tmp_path / "none.gpkg")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'none.gpkg'}: no such GeoPackage"
    not_gpkg = tmp_path / "x.gpkg"
    not_gpkg.write_text("hello")
    result = CliRunner().invoke(cli, ["serve", str(not_gpkg)])
    assert result.exit_code == 2 and "cannot read as a GeoPackage" in result.output


def test_the_served_geopackage_is_not_written(tmp_path):
    path = tmp_path / "map.gpkg"
    publish_map(str(path), tmp_path)
    before = path.read_bytes()
    with TestClient(create_app(str(path))) as client:
        for page in (
            "/ogc/collections",
            "/ogc/collections/cracks/items?limit=100",
            "/ogc/collections/current_cracks/tiles/WebMercatorQuad/14/8874/5520",
        ):
            assert client.get(page).status_code in (200, 204)
    assert path.read_bytes() == before
    with sqlite3.connect(path) as con:
        assert con.execute("SELECT count(*) FROM cracks").fetchone()[0] == CRACK_COUNT


def test_query_exports_geoparquet_and_flatgeobuf(store_url, tmp_path):
    import pyarrow.parquet as pq
    import pyogrio

    publish_map(store_url, tmp_path)
    runner = CliRunner()
    parquet, fgb = tmp_path / "cracks.parquet", tmp_path / "cracks.fgb"
    assert runner.invoke(cli, ["query", store_url, "--out", str(parquet)]).exit_code == 0
    result = runner.invoke(
        cli, ["query", store_url, "--format", "flatgeobuf", "--out", str(fgb), "--severity", "high"]
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(parquet)
    assert table.num_rows == CRACK_COUNT and set(QUERY_FIELDS) <= set(table.column_names)
    geo = json.loads(table.schema.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["crs"]["id"] == {"authority": "EPSG", "code": 4326}
    assert sorted(table.column("length_m").to_pylist()) == [
        expected(i)["length_m"] for i in range(CRACK_COUNT)
    ]
    info = pyogrio.read_info(fgb)
    assert info["features"] == CRACK_COUNT // 3 and info["crs"] == "EPSG:4326"
    assert info["geometry_type"] == "LineString"
    frame = pyogrio.raw.read(fgb, columns=["severity"])
    assert set(frame[3][0]) == {"high"}
    missing_out = runner.invoke(cli, ["query", store_url, "--format", "geoparquet"])
    assert missing_out.exit_code == 2 and "needs --out" in missing_out.output
    pg = store_url.startswith("postgresql")
    with psycopg.connect(store_url) if pg else sqlite3.connect(store_url) as con:
        assert con.execute("SELECT count(*) FROM cracks").fetchone()[0] == CRACK_COUNT
