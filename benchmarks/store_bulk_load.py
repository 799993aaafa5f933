"""Bulk-load throughput of the GIS stores: crack lines per second, PostGIS (COPY) and GeoPackage.

    python benchmarks/store_bulk_load.py [--scenes 20] [--cracks 10000] [--vertices 8]

Publishes synthetic scenes (each one transaction: delete + load) into a fresh
database on the PostGIS named by CRACKMAP_PG_URL (PG* variables for the rest;
``eval "$(infra/postgis.sh start)"`` gives one) and into a new GeoPackage, then
republishes them (the replace path).  Prints one JSON line per store.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import shapely
from rasterio.crs import CRS
from rasterio.transform import from_origin

from pipeline.records import CrackLine, Scene, SceneResult
from pipeline.stores import RunInfo, open_store


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def scenes(count: int, cracks: int, vertices: int, seed: int = 0) -> list[SceneResult]:
    """Synthetic scenes of ``cracks`` random walks with ``vertices`` vertices each, near 15°E 50°N."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(count):
        start = rng.uniform([15.0, 50.0], [15.01, 50.01], (cracks, 1, 2))
        walks = start + np.cumsum(rng.normal(0, 2e-6, (cracks, vertices, 2)), axis=1)
        lines = shapely.linestrings(walks)
        severity = rng.choice(["low", "medium", "high"], cracks)
        scene = Scene(
            f"/bench/s{s}.tif",
            f"s{s}",
            9000,
            9000,
            3,
            "uint8",
            CRS.from_epsg(32633),
            from_origin(500000.0, 5600000.0, 0.002, 0.002),
        )
        out.append(
            SceneResult(
                scene,
                tuple(CrackLine(g, 0.5, 4.0, 7.0, 33.0, 0.8, str(v)) for g, v in zip(lines, severity)),
                shapely.box(15.0, 50.0, 15.01, 50.01),
                500,
                "/bench/p.tif",
                0.0,
                "0" * 64,
            )
        )
    return out


def load(url: str, results: list[SceneResult], label: str) -> dict:
    run = RunInfo("bench", "run-1", "bench-model", "1.0.0", "0" * 64)
    store = open_store(url)
    lines = sum(len(r.cracks) for r in results)
    timings = []
    for _ in range(2):  # first a new store, then replacing every scene
        started = time.perf_counter()
        for r in results:
            store.publish(r, run)
        timings.append(time.perf_counter() - started)
    store.close()
    return {
        "store": label,
        "scenes": len(results),
        "crack_lines": lines,
        "insert_lines_per_s": round(lines / timings[0]),
        "replace_lines_per_s": round(lines / timings[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--cracks", type=int, default=10_000, help="crack lines per scene")
    parser.add_argument("--vertices", type=int, default=8, help="vertices per crack line")
    args = parser.parse_args()
    results = scenes(args.scenes, args.cracks, args.vertices)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "vertices_per_line": args.vertices}
    print(json.dumps({**machine, **load_gpkg(results)}))
    if admin := os.environ.get("CRACKMAP_PG_URL"):
        print(json.dumps({**machine, **load_postgis(admin, results)}))
    else:
        print('CRACKMAP_PG_URL is not set: PostGIS skipped (eval "$(infra/postgis.sh start)")')


def load_gpkg(results: list[SceneResult]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        return load(str(Path(folder) / "bench.gpkg"), results, "geopackage")


def load_postgis(admin: str, results: list[SceneResult]) -> dict:
    name = f"crackmap_bench_{uuid.uuid4().hex[:8]}"
    base, _, _ = admin.rpartition("/")
    with psycopg.connect(admin, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    try:
        return load(f"{base}/{name}", results, "postgis")
    finally:
        with psycopg.connect(admin, autocommit=True) as con:
            con.execute(f"DROP DATABASE {name} WITH (FORCE)")


if __name__ == "__main__":
    main()
