"""Reading a COG scene's chips from object storage vs from local disk.

Starts a moto S3 server on loopback (``python -m moto.server``), uploads a
synthetic COG scene, and times ``SceneReader.chip_batches`` over every chip:
from the local file, from s3:// through GDAL's /vsis3/ (``gdal``), and through
fsspec file objects (``fsspec``).  Each case: one warm-up, then the best of
``--repeat`` runs.  Not a test; run on purpose:

    python benchmarks/s3_read.py [--width 4000 --height 3000 --repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
import rasterio
import rasterio.shutil
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.raster import SceneReader  # noqa: E402


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def make_scene(folder: Path, width: int, height: int) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(90, 200, (3, height, width), dtype=np.uint8)
    plain, cog = folder / "plain.tif", folder / "scene.tif"
    with rasterio.open(
        plain,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(5e5, 5.6e6, 0.002, 0.002),
    ) as ds:
        ds.write(pixels)
    rasterio.shutil.copy(plain, cog, driver="COG", compress="deflate", blocksize=512)
    return cog


def read_all(uri: str, method: str | None) -> int:
    chips = 0
    with SceneReader(uri, method=method) as reader:
        for batch in reader.chip_batches(400, 64, 8):
            chips += len(batch.windows)
    return chips


def best_of(repeat: int, uri: str, method: str | None) -> tuple[float, int]:
    chips = read_all(uri, method)  # warm-up (and page cache for the local file)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        read_all(uri, method)
        times.append(time.perf_counter() - started)
    return min(times), chips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    server, url = start_server()
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scene = make_scene(Path(tmp), args.width, args.height)
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket="bench")
            s3.upload_file(str(scene), "bench", "survey/scene.tif")
            size_mb = scene.stat().st_size / 1e6
            local_s, chips = best_of(args.repeat, str(scene), None)
            rows = [("local disk", local_s)]
            for method in ("gdal", "fsspec"):
                rows.append(
                    (f"s3:// via {method}", best_of(args.repeat, "s3://bench/survey/scene.tif", method)[0])
                )
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"{args.width}x{args.height} RGB COG (deflate, 512 px blocks, {size_mb:.1f} MB), {chips} chips "
        f"of 400 px; {cpu_model()}, {os.cpu_count()} cores; best of {args.repeat}"
    )
    print("| source | seconds | vs local |")
    print("|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / local_s:.2f}x |")


if __name__ == "__main__":
    main()
