"""Build the bundled sample survey: four PaveSeg preview photos (Apache-2.0) as a frame survey.

The photos come from a forward/down-looking camera on a vehicle (its hood shows at
the bottom).  They are kept as what they are, camera frames, with:

* ``camera.yaml``: a **nominal** camera model (the dataset publishes no calibration):
  1280 x 1080 px, fx = fy = 1000 px, no distortion, 1.5 m above the road, pitched
  50 degrees down, road up to 12 m away; ``hood-mask.png`` hides the hood (rows 960 on);
* ``trajectory.csv``: a **nominal** straight drive north at 10 m/s (10 Hz, level), on a
  made-up road in UTM zone 33N; the photos, unrelated to each other in reality, are
  placed 25 m apart so that their footprints do not overlap;
* frame times in EXIF ``DateTimeOriginal`` + ``SubSecTimeOriginal`` (UTC).

Lengths and widths in metres therefore follow from the stated camera model: they are as
right as that model is for the real camera, which is not known.

Run from the repository root (needs the datasets beside the project):
    python examples/make_sample_survey.py ../shared/data/cracks/paveseg_preview
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pymap3d
import yaml
from PIL import ExifTags, Image

FRAMES = ["000005", "000070", "000018", "000035"]  # val split: unseen in training
OUT = Path(__file__).parent / "sample-survey"
START = (51.0107, 14.0339, 150.0)  # lat, lon, ellipsoidal height of the first epoch (made up)
T0 = datetime(2026, 5, 4, 9, 0, 0, tzinfo=UTC).timestamp()
SPEED_M_S, RATE_HZ, SPACING_M, HOOD_ROW = 10.0, 10, 25.0, 960
CAMERA = {
    "image": {"width": 1280, "height": 1080},
    "intrinsics": {"fx": 1000.0, "fy": 1000.0, "cx": 639.5, "cy": 539.5},
    "distortion": [0.0, 0.0, 0.0, 0.0, 0.0],
    "mounting": {
        "lever_arm_m": [0.0, 0.0, -1.5],
        "roll_deg": 0.0,
        "pitch_deg": -50.0,
        "yaw_deg": 0.0,
        "height_m": 1.5,
    },
    "max_range_m": 12.0,
    "mask": "hood-mask.png",
}


def exif_time(seconds: float) -> Image.Exif:
    exif = Image.Exif()
    ifd = exif.get_ifd(ExifTags.IFD.Exif)
    ifd[ExifTags.Base.DateTimeOriginal] = datetime.fromtimestamp(int(seconds), UTC).strftime(
        "%Y:%m:%d %H:%M:%S"
    )
    ifd[ExifTags.Base.SubsecTimeOriginal] = f"{round((seconds % 1) * 1000):03d}"
    return exif


def main(source: Path) -> None:
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.tif"):
        old.unlink()
    (OUT / "camera.yaml").write_text(
        "# NOMINAL camera model: see README.md in this folder.\n" + yaml.safe_dump(CAMERA, sort_keys=False)
    )
    mask = np.zeros((1080, 1280), np.uint8)
    mask[:HOOD_ROW] = 255
    Image.fromarray(mask).save(OUT / "hood-mask.png", optimize=True)
    duration_s = SPACING_M * (len(FRAMES) - 1) / SPEED_M_S + 2.0
    rows = ["time,lat,lon,height,roll,pitch,heading,pos_accuracy_m"]
    for k in range(int(duration_s * RATE_HZ) + 1):
        t = k / RATE_HZ
        lat, lon, height = pymap3d.enu2geodetic(0.0, SPEED_M_S * t, 0.0, *START)
        rows.append(f"{T0 + t:.3f},{lat:.9f},{lon:.9f},{height:.3f},0.0,0.0,0.0,0.05")
    (OUT / "trajectory.csv").write_text("\n".join(rows) + "\n")
    for k, stem in enumerate(FRAMES):
        t = T0 + 1.0 + k * SPACING_M / SPEED_M_S
        image = Image.open(source / "val" / "images" / f"{stem}.jpg").convert("RGB")
        image.save(OUT / f"frame-{stem}.jpg", quality=92, exif=exif_time(t))
        print(f"{OUT / f'frame-{stem}.jpg'}: time {t:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
