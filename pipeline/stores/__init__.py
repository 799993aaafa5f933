"""GIS stores for crack maps: a GeoPackage file (the embedded default) or PostGIS.

Every store publishes a scene atomically: the scene's previous rows for the
same survey, model name and model version are replaced by the new ones in one
transaction, so a rerun never duplicates and a failure never leaves half a
scene.  Rows of other model versions are never touched.

Each scene has at most one *current* model version (``scenes.is_current``):
publishing makes the version current unless ``promote=False``; ``promote()``
makes an already published version current later.  The view
``current_cracks`` shows, per scene, the cracks of its current version, and
``query()`` reads it unless a model version is asked for.

The contract is ``base.CrackStore``; ``open_store`` picks the implementation.
Stores are context managers: ``with open_store(url) as store: ...``.
"""

from __future__ import annotations

from pathlib import Path

from rasterio.crs import CRS

from pipeline.errors import StoreError
from pipeline.redact import mask_url
from pipeline.stores.base import (
    DEFAULT_CRS,
    QUERY_FIELDS,
    SCENE_FIELDS,
    SEVERITIES,
    CrackQuery,
    CrackStore,
    RunInfo,
    SceneSelection,
)
from pipeline.stores.geopackage import GeoPackageStore

__all__ = [
    "DEFAULT_CRS",
    "QUERY_FIELDS",
    "SCENE_FIELDS",
    "SEVERITIES",
    "CrackQuery",
    "CrackStore",
    "GeoPackageStore",
    "RunInfo",
    "SceneSelection",
    "check_store",
    "open_store",
]


def open_store(url: str | Path, crs: CRS = DEFAULT_CRS) -> CrackStore:
    """Open the store a URL names: a ``.gpkg`` path (created if absent) or a PostGIS URL.

    A PostGIS URL is ``postgresql://user[:password]@host:port/dbname``; libpq's
    ``PG*`` variables and ``~/.pgpass`` fill in what it leaves out.

    >>> open_store("cracks.shp")
    Traceback (most recent call last):
    ...
    pipeline.errors.StoreError: cracks.shp: a store is a GeoPackage path ending in .gpkg or a postgresql:// URL
    """
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        from pipeline.stores.postgis import PostGISStore  # psycopg only when PostGIS is used

        return PostGISStore(text, crs)
    if not text.endswith(".gpkg"):
        raise StoreError(
            f"{mask_url(text)}: a store is a GeoPackage path ending in .gpkg or a postgresql:// URL"
        )
    return GeoPackageStore(text, crs)


def check_store(url: str | Path) -> None:
    """Refuse, before any work, a store URL of no known kind or a PostGIS database that does not answer.

    Nothing is created or changed.  An interactive run fails here in one line where a
    scheduled run's tasks would retry a refused connection for minutes
    (``flows.policy``).

    >>> check_store("cracks.gpkg")
    >>> check_store("cracks.shp")
    Traceback (most recent call last):
    ...
    pipeline.errors.StoreError: cracks.shp: a store is a GeoPackage path ending in .gpkg or a postgresql:// URL
    """
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        from pipeline.stores.postgis import connect

        connect(text, timeout_s=10).close()
    elif not text.endswith(".gpkg"):
        raise StoreError(
            f"{mask_url(text)}: a store is a GeoPackage path ending in .gpkg or a postgresql:// URL"
        )
