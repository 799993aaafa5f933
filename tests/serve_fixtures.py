"""A small crack map with known cracks, published to a GeoPackage or PostGIS, and a reader role.

Used by the API tests (tests/test_serve.py) and the browser test (tests/test_web_map.py).
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import numpy as np
import psycopg
import shapely
from conftest import DarknessBackend, paint_crack, write_scene
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pyproj import Transformer
from rasterio.transform import from_origin

from pipeline.scene import SceneOptions, detect_cracks
from pipeline.stores import DEFAULT_CRS, RunInfo, open_store

RUN = RunInfo("survey-a", "run-1", "test-b16", "1.0.0", "abc")
CRACK_COUNT = 12
SEVERITIES = ("low", "medium", "high")
WEST, SOUTH = 15.0, 50.5
STEP_DEG = 0.0001  # about 7 m between cracks


class Model:
    spec, threshold, line_settings = "test:1", 0.5, {}  # no line settings chosen for it


def crack_line(i: int) -> shapely.LineString:
    """Crack i: a 33 m line going north-north-east from (WEST + i * STEP_DEG, SOUTH)."""
    x = WEST + i * STEP_DEG
    return shapely.LineString([(x, SOUTH), (x + 0.00005, SOUTH + 0.0003)])


def expected(i: int) -> dict:
    return {"length_m": 10.0 + i, "severity": SEVERITIES[i % 3]}


def publish_map(url: str, workdir: Path) -> None:
    """Publish scene ``road-1`` with CRACK_COUNT known cracks (and its footprint) to a store."""
    pixels = np.full((3, 300, 400), 220, np.uint8)
    paint_crack(pixels, (40, 40), (260, 360), 5)
    # 0.25 m pixels from just north-west of the cracks: the scene image and its probability
    # raster lie under them (the web map's raster layers)
    west, north = Transformer.from_crs(4326, 32633, always_xy=True).transform(WEST - STEP_DEG, SOUTH + 0.0004)
    scene = write_scene(workdir / "road-1.tif", pixels, transform=from_origin(west, north, 0.25, 0.25))
    result = detect_cracks(
        str(scene),
        DarknessBackend(),
        Model(),
        workdir / "road-1-probability.tif",
        DEFAULT_CRS,
        SceneOptions(),
    )
    base = result.cracks[0]
    cracks = tuple(
        dataclasses.replace(base, geometry=crack_line(i), **expected(i)) for i in range(CRACK_COUNT)
    )
    footprint = shapely.box(
        WEST - STEP_DEG, SOUTH - STEP_DEG, WEST + (CRACK_COUNT + 1) * STEP_DEG, SOUTH + 0.0004
    )
    result = dataclasses.replace(
        result, scene=dataclasses.replace(result.scene, scene_id="road-1"), cracks=cracks, footprint=footprint
    )
    store = open_store(url)
    try:
        store.publish(result, RUN)
    finally:
        store.close()


def login_role(url: str, group: str) -> tuple[str, str, str]:
    """A new login role in ``group`` (crackmap_reader or crackmap_writer): (its URL, name, password)."""
    name = f"serve_{group.split('_')[-1]}_{secrets.token_hex(4)}"
    password = secrets.token_hex(12)
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE {group}")
    parts = conninfo_to_dict(url)
    parts.update(user=name, password=password)
    return (
        f"postgresql://{name}:{password}@{parts['host']}:{parts.get('port', 5432)}/{parts['dbname']}",
        name,
        password,
    )


def drop_role(url: str, name: str) -> None:
    with psycopg.connect(make_conninfo(url), autocommit=True) as con:
        con.execute(f"DROP OWNED BY {name}")
        con.execute(f"DROP ROLE IF EXISTS {name}")
