"""Latency of `crackmap serve` on PostGIS with many cracks: items with a small bbox, and MVT tiles.

    eval "$(infra/postgis.sh start /tmp/pg-bench)"
    nice .venv/bin/python benchmarks/serve_latency.py [--cracks 1000000] [--requests 300]

Builds a database (CRACKMAP_PG_URL's server, as its superuser) with --cracks cracks on 100
straight roads of 10 km (one crack per metre of road for a million), ANALYZEd, then starts
`crackmap serve` in its own process as a crackmap_reader login role and times requests from
one client, one at a time, over HTTP on loopback:

- items: /ogc/collections/current_cracks/items?bbox=<50 m box on a road>&limit=100
- tiles: /ogc/collections/current_cracks/tiles/WebMercatorQuad/Z/x/y on a road, Z = 17 (street
  zoom) and the wider --zooms given (14 by default: a district, up to the 10,000-feature cap)

Prints p50/p95/max per kind (targets: items p95 < 200 ms, tiles p95 < 300 ms) and drops the database.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import morecantile
import psycopg
from psycopg.conninfo import conninfo_to_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.stores.postgis import migrate  # noqa: E402

ROADS, ROAD_DEG, WEST, SOUTH, GAP_DEG = 100, 0.14, 15.0, 50.0, 0.01  # 0.14° ≈ 10 km at 50° N


def load(url: str, cracks: int) -> float:
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as con:
        migrate(con)
        con.execute("INSERT INTO surveys VALUES ('bench') ON CONFLICT DO NOTHING")
        con.execute("INSERT INTO models VALUES ('bench-model', '1.0.0', 'x') ON CONFLICT DO NOTHING")
        con.execute(
            "INSERT INTO runs (run_id, survey_id, model_name, model_version) "
            "VALUES ('run-1', 'bench', 'bench-model', '1.0.0') ON CONFLICT DO NOTHING"
        )
        con.execute(f"""INSERT INTO scenes (survey_id, scene_id, model_name, model_version, model_sha256,
                run_id,
                source_uri, status, processed_at, is_current, footprint)
            SELECT 'bench', 'road-' || r, 'bench-model', '1.0.0', 'x', 'run-1', 's3://bench/road-' || r,
                   'done', now(), true,
                   ST_MakeEnvelope({WEST}, {SOUTH} + r * {GAP_DEG} - 0.0001, {WEST + ROAD_DEG},
                                   {SOUTH} + r * {GAP_DEG} + 0.0002, 4326)
            FROM generate_series(0, {ROADS - 1}) r""")
        con.execute(f"""INSERT INTO cracks (crack_id, survey_id, scene_id, model_name, model_version,
                model_sha256,
                run_id, length_m, width_mean_mm, width_max_mm, orientation_deg, confidence, severity,
                created_at, geom)
            SELECT gen_random_uuid(), 'bench', 'road-' || (g % {ROADS}), 'bench-model', '1.0.0', 'x', 'run-1',
                   0.3 + random() * 2, w, w * 1.3, random() * 180, 0.5 + random() / 2,
                   CASE WHEN w < 6 THEN 'low' WHEN w < 19 THEN 'medium' ELSE 'high' END, now(),
                   ST_MakeLine(ST_MakePoint(x, y), ST_MakePoint(x + (random() - 0.5) * 0.00002,
                                                                y + (random() - 0.5) * 0.00002))
            FROM (SELECT g, {WEST} + random() * {ROAD_DEG} AS x,
                         {SOUTH} + (g % {ROADS}) * {GAP_DEG} + random() * 0.0001 AS y,
                         random() * 25 AS w
                  FROM generate_series(1, {cracks}) g) c""")
        con.execute("VACUUM ANALYZE cracks")
        con.execute("VACUUM ANALYZE scenes")
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(url: str) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
    return (time.perf_counter() - started) * 1000, len(body)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cracks", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--zooms", default="17,14", help="tile zoom levels, comma-separated")
    args = parser.parse_args()
    admin = os.environ.get("CRACKMAP_PG_URL")
    if not admin:
        sys.exit('start PostGIS first: eval "$(infra/postgis.sh start /tmp/pg-bench)"')
    parts = conninfo_to_dict(admin)
    name = f"crackmap_bench_{secrets.token_hex(4)}"
    role, password = f"bench_viewer_{secrets.token_hex(4)}", secrets.token_hex(12)
    base = f"postgresql://{parts.get('user', 'postgres')}@{parts['host']}:{parts.get('port', 5432)}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    server = None
    try:
        seconds = load(f"{base}/{name}", args.cracks)
        print(f"loaded {args.cracks} cracks on {ROADS} roads in {seconds:.1f} s")
        with psycopg.connect(f"{base}/{name}", autocommit=True) as con:
            con.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}' IN ROLE crackmap_reader")
        port = free_port()
        store = f"postgresql://{role}:{password}@{parts['host']}:{parts.get('port', 5432)}/{name}"
        started = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-c", "from flows.cli import main; main()", "serve", store, "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        root = f"http://127.0.0.1:{port}"
        while True:
            try:
                timed(f"{root}/healthz")
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("crackmap serve did not start")
                time.sleep(0.2)
        print(f"server ready in {time.perf_counter() - started:.1f} s")
        rng = random.Random(0)
        tms = morecantile.tms.get("WebMercatorQuad")
        box_deg = 0.0007  # ≈ 50 m east-west at 50° N

        def road_point():
            return WEST + rng.random() * ROAD_DEG, SOUTH + rng.randrange(ROADS) * GAP_DEG + 0.00005

        for _ in range(10):  # warm the pool and the caches a little
            x, y = road_point()
            bbox = f"{x},{y - 0.0002},{x + box_deg},{y + 0.0002}"
            timed(f"{root}/ogc/collections/current_cracks/items?bbox={bbox}")
        zooms = [int(z) for z in args.zooms.split(",")]
        kinds = ["items", *(f"tiles z{z}" for z in zooms)]
        results: dict[str, list[float]] = {kind: [] for kind in kinds}
        sizes: dict[str, list[int]] = {kind: [] for kind in kinds}
        for i in range(args.requests):  # the kinds interleaved, so that a slow spell hits them all
            x, y = road_point()
            kind = kinds[i % len(kinds)]
            if kind == "items":
                url = (
                    f"{root}/ogc/collections/current_cracks/items?limit=100"
                    f"&bbox={x},{y - 0.0002},{x + box_deg},{y + 0.0002}"
                )
            else:
                tile = tms.tile(x, y, int(kind[len("tiles z") :]))
                url = (
                    f"{root}/ogc/collections/current_cracks/tiles/WebMercatorQuad/{tile.z}/{tile.x}/{tile.y}"
                )
            ms, size = timed(url)
            results[kind].append(ms)
            sizes[kind].append(size)
        for kind, values in results.items():
            print(
                f"{kind:<9} n={len(values)}  p50 {statistics.median(values):6.1f} ms  "
                f"p95 {percentile(values, 0.95):6.1f} ms  max {max(values):6.1f} ms  "
                f"median size {statistics.median(sizes[kind]) / 1024:.1f} KiB"
            )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        with psycopg.connect(f"{base}/postgres", autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            con.execute(f"DROP ROLE IF EXISTS {role}")


if __name__ == "__main__":
    main()
