"""Frame mode against the GeoTIFF path on the same pixels (a benchmark, not a test).

Writes ``--frames`` synthetic 1920 x 1080 pavement frames (JPEG, dark meandering cracks)
and the same pixels as JPEG-compressed GeoTIFF scenes.  Then, in one process and
interleaved over ``--rounds`` rounds (medians reported; wall clock, and CPU seconds of this
process, which another load on a shared machine disturbs less):

  * GeoTIFF path: ``pipeline.scene.detect_cracks`` on every scene;
  * frame mode: ``pipeline.frames.observe_frame`` on every frame (same chips, network,
    stitching, probability raster and vectorizing; plus the road mask and the ground
    mapping of the crack vertices), then ``frame_results`` (merging the overlapping
    frames' views into one line per crack);
  * the geometry alone: ground mapping and merging, without the network.

The frames are forward-looking (pitch -20 degrees, road up to 20 m) and 1.5 m apart, so
consecutive footprints overlap and merging has work to do.

Usage: nice python benchmarks/frames_throughput.py [--frames 12] [--rounds 5] [--model NAME[:VERSION]]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pymap3d
import rasterio
from PIL import Image
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.registry import resolve  # noqa: E402
from pipeline.backends import load_backend  # noqa: E402
from pipeline.camera import Camera  # noqa: E402
from pipeline.frames import frame_results, ground_lines, observe_frame  # noqa: E402
from pipeline.scene import SceneOptions, detect_cracks  # noqa: E402
from pipeline.stores import DEFAULT_CRS  # noqa: E402
from pipeline.tiling import chip_windows  # noqa: E402
from pipeline.trajectory import Pose  # noqa: E402

WIDTH, HEIGHT = 1920, 1080
ORIGIN = (51.0107, 14.0339, 150.0)
CAMERA = Camera(
    WIDTH,
    HEIGHT,
    1400.0,
    1400.0,
    959.5,
    539.5,
    (-0.12, 0.03, 0.0, 0.0, 0.0),
    (1.5, 0.0, -1.6),
    0.0,
    -20.0,
    0.0,
    1.6,
    max_range_m=20.0,
)


def pavement(seed: int) -> np.ndarray:
    """A grey pavement texture with a few dark meandering cracks, (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    grey = rng.normal(120, 18, (HEIGHT, WIDTH)).clip(0, 255)
    for _ in range(4):
        col, row = rng.uniform(100, WIDTH - 100), rng.uniform(HEIGHT * 0.45, HEIGHT - 50)
        for _ in range(600):
            col = float(np.clip(col + rng.normal(0, 1.5), 2, WIDTH - 3))
            row = float(np.clip(row - abs(rng.normal(0.6, 0.5)), 2, HEIGHT - 3))
            grey[int(row) - 1 : int(row) + 2, int(col) - 1 : int(col) + 2] = 30
    return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)


def write_inputs(folder: Path, count: int) -> tuple[list[Path], list[Path]]:
    frames, scenes = [], []
    for k in range(count):
        pixels = pavement(k)
        frames.append(folder / f"f{k:03d}.jpg")
        Image.fromarray(pixels).save(frames[-1], quality=90)
        scenes.append(folder / f"s{k:03d}.tif")
        with rasterio.open(
            scenes[-1],
            "w",
            driver="GTiff",
            width=WIDTH,
            height=HEIGHT,
            count=3,
            dtype="uint8",
            crs="EPSG:32633",
            transform=from_origin(431250, 5652300 - k * 2.0, 0.0015, 0.0015),
            tiled=True,
            blockxsize=512,
            blockysize=512,
            compress="jpeg",
            photometric="ycbcr",
            jpeg_quality=90,
        ) as ds:
            ds.write(pixels.transpose(2, 0, 1))
    return frames, scenes


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pose(k: int) -> Pose:
    lat, lon, h = pymap3d.enu2geodetic(0.0, 1.5 * k, 0.0, *ORIGIN)
    return Pose(float(k), float(lat), float(lon), float(h), 0.0, 0.0, 0.0, 0.03)


def geotiff_pass(scenes, backend, entry, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all its threads) of the GeoTIFF path on every scene."""
    started, cpu = time.perf_counter(), time.process_time()
    for k, scene in enumerate(scenes):
        detect_cracks(
            str(scene), backend, entry, out / f"g{k}.tif", DEFAULT_CRS, scene_id=f"s{k}", source_sha256="x"
        )
    return time.perf_counter() - started, time.process_time() - cpu


def frame_pass(frames, backend, entry, out: Path) -> tuple[float, float, list]:
    """Wall and CPU seconds of frame mode on every frame (merging included), and the observations."""
    started, cpu = time.perf_counter(), time.process_time()
    observations = [
        observe_frame(
            str(f),
            f"f{k}",
            CAMERA,
            pose(k),
            ORIGIN,
            backend,
            entry,
            str(out / f"p{k}.tif"),
            SceneOptions(),
            "x",
        )
        for k, f in enumerate(frames)
    ]
    frame_results(observations, ORIGIN, DEFAULT_CRS)
    return time.perf_counter() - started, time.process_time() - cpu, observations


def geometry_only(observations, pieces_per_frame) -> float:
    """Ground mapping of every vectorized piece and the merge, without the network."""
    from pipeline.vectorize import VectorizeParams

    params = VectorizeParams()
    started = time.perf_counter()
    for k, pieces in enumerate(pieces_per_frame):
        ground_lines(CAMERA, pose(k), ORIGIN, f"f{k}", pieces, params)
    frame_results(observations, ORIGIN, DEFAULT_CRS)
    return time.perf_counter() - started


def vectorized_pieces(observations) -> list[list]:
    """Pieces (pixel lines) equivalent to each frame's lines: their vertices projected back."""
    from pipeline.camera import project
    from pipeline.trajectory import attitude
    from pipeline.vectorize import Piece

    found = []
    for k, obs in enumerate(observations):
        p = pose(k)
        pieces = []
        for line in obs.lines:
            lat, lon, h = pymap3d.enu2geodetic(*line.enu_m.T, *ORIGIN)
            ned = np.column_stack(pymap3d.geodetic2ned(lat, lon, h, p.lat_deg, p.lon_deg, p.height_m))
            uv = project(CAMERA, attitude([0.0], [0.0], [p.heading_deg]).inv().apply(ned))
            rc = np.repeat(uv[:, ::-1], 10, axis=0)  # a skeleton path has about one vertex per pixel
            pieces.append(Piece(rc, (None, None), len(rc), 2.0 * len(rc), 3.0, 200.0 * len(rc)))
        found.append(pieces)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    entry = resolve(args.model)
    backend = load_backend(entry, "auto")
    chips = len(chip_windows(WIDTH, HEIGHT, SceneOptions().size_px, SceneOptions().overlap_px))
    with tempfile.TemporaryDirectory(prefix="crackmap-bench-") as tmp:
        folder = Path(tmp)
        frames, scenes = write_inputs(folder, args.frames)
        geotiff_pass(scenes[:2], backend, entry, folder)  # warm-up: the network, skan's compilation
        _, _, observations = frame_pass(frames[:2], backend, entry, folder)
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {"geotiff": [], "frames": [], "geometry": []}
        cpu: dict[str, list[float]] = {"geotiff": [], "frames": []}
        for _ in range(args.rounds):
            seconds, cpu_s = geotiff_pass(scenes, backend, entry, folder)
            times["geotiff"].append(seconds)
            cpu["geotiff"].append(cpu_s)
            seconds, cpu_s, observations = frame_pass(frames, backend, entry, folder)
            times["frames"].append(seconds)
            cpu["frames"].append(cpu_s)
            times["geometry"].append(geometry_only(observations, vectorized_pieces(observations)))
    median = {k: statistics.median(v) for k, v in times.items()}
    cpu_median = {k: statistics.median(v) for k, v in cpu.items()}
    n = args.frames
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()}, backend {backend.name}, "
        f"model {entry.name}:{entry.version}; load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    print(f"{n} frames of {WIDTH}x{HEIGHT} ({chips} chips each), {args.rounds} interleaved rounds, medians")
    for key in ("geotiff", "frames"):
        print(
            f"{key:>8}: {n / median[key]:6.2f} frames/s  {n * chips / median[key]:6.1f} chips/s  "
            f"(rounds: {', '.join(f'{t:.2f}' for t in times[key])} s); "
            f"CPU {cpu_median[key] / n * 1000:.0f} ms per frame"
        )
    print(
        f"frame mode / GeoTIFF path: {median['geotiff'] / median['frames']:.2f}x chips/s (wall clock), "
        f"{cpu_median['geotiff'] / cpu_median['frames']:.2f}x chips per CPU-second"
    )
    print(
        f"geometry alone (ground mapping + merging, {sum(len(o.lines) for o in observations)} lines): "
        f"{median['geometry'] / n * 1000:.1f} ms per frame, "
        f"{median['geometry'] / median['frames'] * 100:.1f} % of frame mode's time"
    )


if __name__ == "__main__":
    main()
