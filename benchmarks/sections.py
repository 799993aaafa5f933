"""Sections for a large network and survey in PostGIS: target 100 km and 1,000,000 cracks in under 60 s.

Builds a synthetic survey: ``--roads`` gently curved roads (``--km`` in all) in
UTM 33N, one scene per ``--scene-m`` of road (a 4 m wide footprint), and
``--cracks`` random cracks (0.3-2 m, 2-4 vertices, any direction) inside the
scenes, published through the store as the pipeline publishes them (typed
against the scene axis).  Then times ``pipeline.condition.run_sections`` on
it over ``--rounds`` rounds (median reported), with the CPU time of this process and of the
store's PostgreSQL backend (from /proc, a server on this machine) beside the wall time: on a
shared machine the wall time follows the load, the CPU time much less.  ``--profile`` splits the
last round into its steps (cProfile).

Run (a throwaway PostGIS from infra/postgis.sh, then):
    eval "$(infra/postgis.sh start /tmp/pg-bench)"
    nice -n 5 .venv/bin/python benchmarks/sections.py --url "$CRACKMAP_PG_URL" [--km 100 --cracks 1000000]
    infra/postgis.sh stop /tmp/pg-bench
The database named by --url gets a fresh schema (its crackmap tables are dropped first).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
import pyogrio
import shapely
from affine import Affine
from rasterio.crs import CRS
from shapely.ops import substring

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import condition, projection  # noqa: E402
from pipeline.records import CrackLine, Scene, SceneResult  # noqa: E402
from pipeline.stores import RunInfo, open_store  # noqa: E402

UTM = "EPSG:32633"
RUN = RunInfo("bench", "run-1", "bench-model", "1.0.0", "0" * 64)


def roads(km: float, count: int) -> list[shapely.LineString]:
    """``count`` roads of ``km / count`` each, gently curved (a 200 m sine), 1 km apart."""
    length = km * 1000 / count
    x = np.linspace(0, length, max(int(length / 5), 2))
    return [
        shapely.LineString(np.column_stack([500000 + x, 5500000 + 1000 * i + 20 * np.sin(x / 200)]))
        for i in range(count)
    ]


def scenes(lines: list[shapely.LineString], scene_m: float) -> list[shapely.Polygon]:
    return [
        shapely.buffer(substring(line, a, min(a + scene_m, line.length)), 2.0, cap_style="flat")
        for line in lines
        for a in np.arange(0, line.length, scene_m)
    ]


def crack_lines(footprints: list[shapely.Polygon], total: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per scene, an array of random crack lines inside it (UTM)."""
    per_scene = np.full(len(footprints), total // len(footprints))
    per_scene[: total % len(footprints)] += 1
    out = []
    for footprint, n in zip(footprints, per_scene):
        minx, miny, maxx, maxy = footprint.bounds
        start = rng.uniform((minx, miny), (maxx, maxy), (n * 3, 2))
        start = start[shapely.contains_xy(footprint, start[:, 0], start[:, 1])][:n]
        while len(start) < n:  # a thin footprint: sample again
            more = rng.uniform((minx, miny), (maxx, maxy), (n * 3, 2))
            start = np.vstack([start, more[shapely.contains_xy(footprint, more[:, 0], more[:, 1])]])[:n]
        vertices = rng.integers(2, 5, n)
        angle = rng.uniform(0, np.pi, n)
        step = rng.uniform(0.3, 2.0, n) / (vertices - 1)
        coords, parts = [], []
        for k in range(2, 5):  # one array operation per vertex count, not per crack
            pick = vertices == k
            t = np.arange(k)[None, :, None] * step[pick, None, None]
            wiggle = rng.normal(0, 0.02, (pick.sum(), k, 2))
            xy = (
                start[pick, None, :]
                + t * np.stack([np.cos(angle[pick]), np.sin(angle[pick])], -1)[:, None, :]
            )
            coords.append(xy + wiggle)
            parts.append(k)
        out.append(np.concatenate([shapely.linestrings(c) for c in coords]))
    return out


def write_network(lines: list[shapely.LineString], folder: Path) -> str:
    network = folder / "roads.gpkg"
    pyogrio.raw.write(
        str(network),
        shapely.to_wkb(np.array(lines, dtype=object)),
        field_data=[np.array([f"R{i:03d}" for i in range(len(lines))], dtype=object)],
        fields=["road_id"],
        crs=UTM,
        geometry_type="LineString",
        driver="GPKG",
    )
    return str(network)


def build(url: str, km: float, road_count: int, total: int, scene_m: float, folder: Path) -> str:
    with psycopg.connect(url, autocommit=True) as con:
        con.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    rng = np.random.default_rng(7)
    lines = roads(km, road_count)
    network = write_network(lines, folder)
    footprints = scenes(lines, scene_m)
    store = open_store(url)
    started = time.perf_counter()
    published = 0
    for i, (footprint, cracks) in enumerate(zip(footprints, crack_lines(footprints, total, rng))):
        lonlat = projection.transform(cracks, UTM, "EPSG:4326")
        length = shapely.length(cracks)
        records = tuple(
            CrackLine(
                g,
                float(m),
                3.0,
                5.0,
                0.0,
                0.8,
                "low",
                crack_type="diagonal",
                theta_deg=45.0,
                chord_m=float(m),
                tortuosity=1.0,
            )
            for g, m in zip(lonlat, length)
        )
        scene = Scene(
            f"bench/{i}.tif", f"s{i:05d}", 1000, 1000, 3, "uint8", CRS.from_string(UTM), Affine.identity()
        )
        store.publish(
            SceneResult(
                scene, records, projection.transform([footprint], UTM, "EPSG:4326")[0], 1, "p.tif", 0.0, "x"
            ),
            RUN,
        )
        published += len(records)
    store.close()
    print(
        f"built: {km:g} km in {road_count} roads, {len(footprints)} scenes, {published} cracks "
        f"({time.perf_counter() - started:.0f} s to publish)"
    )
    return network


def server_cpu_s(store) -> float | None:
    """CPU seconds of the store connection's PostgreSQL backend so far (a server on this machine), else None."""
    pid = store._con.info.backend_pid  # the store's one connection (private: a benchmark may look)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="postgresql:// URL of a database to use (it is reset)")
    parser.add_argument("--km", type=float, default=100.0)
    parser.add_argument("--roads", type=int, default=20)
    parser.add_argument("--cracks", type=int, default=1_000_000)
    parser.add_argument("--scene-m", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--profile", action="store_true", help="print the slowest functions of the last round"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="use the survey an earlier run with the same --km/--roads/--cracks left in --url",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.reuse:
            network = write_network(roads(args.km, args.roads), Path(tmp))
        else:
            network = build(args.url, args.km, args.roads, args.cracks, args.scene_m, Path(tmp))
        times = []
        for k in range(args.rounds):
            store = open_store(args.url)
            profile = cProfile.Profile() if args.profile and k == args.rounds - 1 else None
            load, server = os.getloadavg()[0], server_cpu_s(store)
            started, cpu = time.perf_counter(), time.process_time()
            if profile:
                profile.enable()
            report = condition.run_sections(store, network, RUN.survey_id)
            if profile:
                profile.disable()
            times.append(time.perf_counter() - started)
            cpu = time.process_time() - cpu
            server = None if server is None else server_cpu_s(store) - server
            store.close()
            print(
                f"round {k + 1}: {times[-1]:.1f} s wall, {cpu:.1f} s CPU in this process, "
                + ("PostGIS backend CPU not readable" if server is None else f"{server:.1f} s CPU in PostGIS")
                + f", load average {load:.1f}, {sum(r['level'] == 'section' for r in report.rows)} "
                f"sections, {report.located} of {report.cracks} cracks located"
            )
            if profile:
                pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    print(
        f"sections, {args.km:g} km, {args.cracks} cracks, PostGIS: median {statistics.median(times):.1f} s "
        f"over {len(times)} rounds (target 60 s)"
    )


if __name__ == "__main__":
    main()
