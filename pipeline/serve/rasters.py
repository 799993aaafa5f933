"""Survey imagery and crack-probability COGs as map tiles, for the web map's raster layers.

Only rasters that a scene row names are read: a request gives a survey and a scene id,
the store gives the scene's current ``source_uri`` (the survey image) or
``probability_uri`` (the COG crackmap wrote), and rio-tiler renders the Web Mercator tile
from it (local paths or storage URLs, in the same GDAL environment as the pipeline).
No path ever comes from the request.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image
from rasterio.errors import RasterioError
from rio_tiler.errors import RioTilerError, TileOutsideBounds
from rio_tiler.io import Reader

from pipeline.raster import gdal_env

KINDS = {"image": "source_uri", "probability": "probability_uri"}
TILE_PX = 256
# probability 0..255 -> magenta whose opacity grows with it; below about 0.2 nothing is drawn
PROBABILITY_COLOURS = {v: (230, 0, 200, 0 if v < 50 else min(255, v + 40)) for v in range(256)}


@lru_cache(maxsize=1)
def empty_tile() -> bytes:
    """A transparent PNG tile, for tiles a raster does not reach."""
    out = io.BytesIO()
    Image.new("RGBA", (TILE_PX, TILE_PX), (0, 0, 0, 0)).save(out, format="PNG")
    return out.getvalue()


def render_tile(uri: str, kind: str, x: int, y: int, z: int) -> bytes:
    """The PNG of one Web Mercator tile of a raster: RGB imagery, or coloured probability.

    Raises:
        OSError: the raster cannot be read (missing, not a raster, refused).
    """
    try:
        with gdal_env(), Reader(uri) as source:
            if kind == "probability":
                image = source.tile(x, y, z, tilesize=TILE_PX, indexes=(1,))
                return image.render(img_format="PNG", colormap=PROBABILITY_COLOURS)
            bands = (1, 2, 3) if source.dataset.count >= 3 else (1,)
            image = source.tile(x, y, z, tilesize=TILE_PX, indexes=bands)
            if image.data.dtype != np.uint8:  # anything wider, stretched to 8 bits for a picture
                span = (float(image.data.min()), float(image.data.max()))
                image = image.rescale(in_range=(span,) * len(bands))
            return image.render(img_format="PNG")
    except TileOutsideBounds:
        return empty_tile()
    except (RioTilerError, RasterioError, OSError) as exc:
        raise OSError(" ".join(str(exc).split())[:300]) from None
