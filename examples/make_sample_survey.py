"""Build the bundled sample survey from PaveSeg preview images (Apache-2.0).

Two scenes, each two road photos stacked into one strip, written as JPEG-
compressed tiled GeoTIFFs in UTM zone 33N with a nominal 1.5 mm ground pixel.
The photos are perspective views from a vehicle camera, so the georeferencing
is nominal: it places the strips one after the other along a made-up road, so
that the whole pipeline (CRS, metres, severity) has something real to work on.

Run from the repository root (needs the datasets beside the project):
    python examples/make_sample_survey.py ../shared/data/cracks/paveseg_preview
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import from_origin

SCENES = {"road-0001": ["000005", "000070"], "road-0002": ["000018", "000035"]}  # val split: unseen in training
ROWS = slice(0, 960)  # above the vehicle's hood
PIXEL_M = 0.0015
ORIGIN = (431250.0, 5652300.0)  # UTM 33N easting, northing of the first strip's top-left corner
OUT = Path(__file__).parent / "sample-survey"


def strip(source: Path, stems: list[str]) -> np.ndarray:
    photos = [np.asarray(Image.open(source / "val" / "images" / f"{s}.jpg").convert("RGB"))[ROWS]
              for s in stems]
    return np.concatenate(photos, axis=0).transpose(2, 0, 1)


def main(source: Path) -> None:
    OUT.mkdir(exist_ok=True)
    north = ORIGIN[1]
    for name, stems in SCENES.items():
        pixels = strip(source, stems)
        _, height, width = pixels.shape
        profile = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(ORIGIN[0], north, PIXEL_M, PIXEL_M),
                       tiled=True, blockxsize=256, blockysize=256, compress="jpeg",
                       photometric="ycbcr", jpeg_quality=90)
        with rasterio.open(OUT / f"{name}.tif", "w", **profile) as ds:
            ds.write(pixels)
        north -= height * PIXEL_M
        print(f"{OUT / name}.tif: {width}x{height}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
