"""``crackmap serve``: one ASGI app with OGC API Features, vector tiles and the web map.

- ``/``                       the web map (MapLibre GL JS, vendored: no CDN)
- ``/ogc/...``                OGC API Features and Tiles (tipg's routes): landing page,
                              conformance, collections, items, item, queryables, tiles
- ``/healthz``                liveness

The collections are the store's crack layers that exist, listed explicitly
(``COLLECTIONS`` and their ``current_*`` views); no database function is exposed.
Malformed parameters get a 400 with a message; other failures a 500 without
details (they are logged).  Request sizes are capped (``MAX_ITEMS``, ``MAX_TILE_FEATURES``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal, cast

# tipg reads its settings from the environment when first imported: the caps below are
# this app's, whatever the environment says, and tile layers are named after their table.
MAX_ITEMS = 10_000
DEFAULT_ITEMS = 10
MAX_TILE_FEATURES = 10_000
os.environ.update(
    TIPG_MAX_FEATURES_PER_QUERY=str(MAX_ITEMS),
    TIPG_DEFAULT_FEATURES_LIMIT=str(DEFAULT_ITEMS),
    TIPG_MAX_FEATURES_PER_TILE=str(MAX_TILE_FEATURES),
    TIPG_SET_MVT_LAYERNAME="true",
)

import anyio  # noqa: E402
import asyncpg  # noqa: E402
import jinja2  # noqa: E402
from ciso8601 import parse_rfc3339  # noqa: E402
from cql2 import Expr  # noqa: E402
from fastapi import FastAPI, HTTPException, Query, Request  # noqa: E402
from fastapi import Path as PathParam  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, Response  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402
from starlette.templating import Jinja2Templates  # noqa: E402
from tipg import dependencies as tipg_dependencies  # noqa: E402
from tipg import errors as tipg_errors  # noqa: E402
from tipg.collections import Collection  # noqa: E402
from tipg.factory import Endpoints  # noqa: E402

from pipeline import gpkg  # noqa: E402
from pipeline.errors import StoreError  # noqa: E402
from pipeline.serve.geopackage import CqlNotSupported, GeoPackagePool  # noqa: E402
from pipeline.serve.geopackage import catalog as gpkg_catalog  # noqa: E402
from pipeline.serve.rasters import KINDS, render_tile  # noqa: E402

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# tipg's HTML pages with crackmap's page head (``templates/header.html``: no CDN, which the CSP blocks)
TEMPLATES = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.ChoiceLoader(
            [
                jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                jinja2.PackageLoader("tipg", "templates"),
            ]
        ),
        autoescape=jinja2.select_autoescape(["html"]),
    )
)
OGC_PREFIX = "/ogc"
# The layers served, in this order, where the store has them; each one's current_* view too.
COLLECTIONS = (
    "current_cracks",
    "cracks",
    "scenes",
    "sections",
    "pattern_areas",
    "section_changes",
    "crack_changes",
)
# Keys of the views (tables have their primary key): OGC API items need one id column.
VIEW_KEYS = {"current_cracks": "crack_id"}
# GeoPackage layers: the same ids as on PostGIS where the layer has the column.
GPKG_KEYS = {"cracks": "crack_id", "current_cracks": "crack_id"}

# Everything the pages load comes from this server: the web map's MapLibre is vendored, and
# tipg's HTML pages (which link CDNs and OpenStreetMap tiles) render without them rather than
# make browsers on an intranet reach out.  MapLibre needs blob: workers and data:/blob: images.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; worker-src 'self' blob:; child-src blob:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

BAD_REQUEST = (
    tipg_errors.InvalidBBox,
    tipg_errors.InvalidDatetime,
    tipg_errors.InvalidLimit,
    tipg_errors.InvalidPropertyName,
    tipg_errors.InvalidGeometryColumnName,
    tipg_errors.InvalidDatetimeColumnName,
    tipg_errors.MissingDatetimeColumn,
    CqlNotSupported,
    # a filter value PostgreSQL cannot read (a bad uuid, text for a number, ...)
    asyncpg.DataError,
    asyncpg.UndefinedFunctionError,
    asyncpg.UndefinedColumnError,
)


def served(present: list[str]) -> list[str]:
    """The collections to serve among the layers a store has, in COLLECTIONS order.

    >>> served(["scenes", "cracks", "current_cracks", "surveys", "current_sections", "sections"])
    ['current_cracks', 'cracks', 'scenes', 'sections', 'current_sections']
    >>> served(["cracks", "scenes", "spatial_ref_sys", "runs"])
    ['cracks', 'scenes']
    """
    have = set(present)
    views = [f"current_{name}" for name in COLLECTIONS if not name.startswith("current_")]
    return [n for n in COLLECTIONS if n in have] + [v for v in views if v in have and v not in COLLECTIONS]


def keys_of(tables: list[str], table_keys: dict[str, str]) -> dict[str, str]:
    """Item keys: tables' primary keys, VIEW_KEYS, and for a ``current_X`` view table X's key.

    >>> keys_of(["current_cracks", "cracks", "sections", "current_sections"],
    ...         {"cracks": "crack_id", "sections": "section_id"})["current_sections"]
    'section_id'
    """
    keys = {**table_keys, **VIEW_KEYS}
    for name in tables:
        base = name.removeprefix("current_")
        if name not in keys and base != name and base in table_keys:
            keys[name] = table_keys[base]
    return keys


def collection_param(
    request: Request,
    collectionId: Annotated[str, PathParam(description="Collection identifier")],
) -> Collection:
    """The collection a path names, or a 404 listing those there are.

    A collection without a single-column key (PostGIS ``scenes``: survey, scene, model
    version) has no single items: a 404 says to filter its items instead.
    """
    collections = request.app.state.collection_catalog["collections"]
    if collectionId not in collections:
        raise HTTPException(
            status_code=404,
            detail=f"no collection {collectionId!r}; this store serves {', '.join(collections) or 'none'}",
        )
    found = collections[collectionId]
    if found.id_column is None and ("itemId" in request.path_params or "ids" in request.query_params):
        raise HTTPException(
            status_code=404,
            detail=f"{collectionId} has no single-column key, so no "
            "item ids; filter its items by property instead",
        )
    return found


def bbox_param(
    bbox: Annotated[str | None, Query(description="minx,miny,maxx,maxy in CRS84")] = None,
) -> list[float] | None:
    """tipg's bbox parameter, with a 400 for text that is not four or six numbers."""
    if bbox is None or bbox == "":
        return None
    try:
        values = [float(v) for v in bbox.split(",")]
    except ValueError:
        raise HTTPException(
            status_code=400, detail=f"bbox {bbox!r} is not comma-separated numbers minx,miny,maxx,maxy"
        ) from None
    checked = tipg_dependencies.bbox_query(",".join(map(repr, values)))
    if checked is None:  # tipg returns None only for no bbox, handled above
        return None
    west, south, east, north = (
        checked[0],
        checked[1],
        checked[-3 if len(checked) == 6 else 2],
        checked[-2 if len(checked) == 6 else 3],
    )
    if west > east or south > north:
        raise HTTPException(status_code=400, detail=f"bbox {bbox!r}: minx > maxx or miny > maxy")
    return checked


def datetime_param(
    datetime: Annotated[str | None, Query(description="instant or interval, RFC 3339")] = None,
) -> list[str] | None:
    """tipg's datetime parameter, with a 400 for anything but an RFC 3339 instant or interval."""
    if not datetime:
        return None
    parts = datetime.split("/")
    try:
        if len(parts) > 2:
            raise ValueError("more than one '/'")
        for part in parts:
            if part not in ("..", ""):
                parse_rfc3339(part)
    except ValueError as exc:
        raise HTTPException(
            status_code=400,
            detail=f"datetime {datetime!r} is not an RFC 3339 instant or START/END interval ({exc})",
        ) from None
    return parts


FilterLang = Literal["cql2-text", "cql2-json"] | None


def filter_param(
    query: Annotated[str | None, Query(description="CQL2 filter", alias="filter")] = None,
    filter_lang: Annotated[str | None, Query(alias="filter-lang")] = None,
) -> Expr | None:
    """tipg's CQL2 filter parameter, with a 400 for a filter that does not parse."""
    if filter_lang not in (None, "cql2-text", "cql2-json"):
        raise HTTPException(status_code=400, detail="filter-lang is cql2-text or cql2-json")
    try:
        return tipg_dependencies.filter_query(query, cast(FilterLang, filter_lang))  # checked above
    except Exception as exc:  # noqa: BLE001  (cql2 raises a bare Exception with the parser's report)
        first = " ".join(str(exc).split())[:300]
        raise HTTPException(status_code=400, detail=f"filter {query!r} is not valid CQL2: {first}") from None


def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": " ".join(str(exc).split())[:500]}, status_code=400)


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = 400 if exc.status_code == 422 else exc.status_code
    return JSONResponse({"detail": exc.detail}, status_code=status, headers=exc.headers)


def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())[1:])}: {e.get('msg')}" for e in exc.errors()
    )
    return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=400)


def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
    return JSONResponse({"detail": "internal error (logged by the server)"}, status_code=500)


def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


def has_nul(request: Request) -> bool:
    """Whether the request's path or query holds a NUL character (decoded ``%00``)."""
    if "\x00" in request.url.path:
        return True
    return any("\x00" in key or "\x00" in value for key, value in request.query_params.multi_items())


def create_app(store: str, *, allow_write_role: bool = False, title: str = "crackmap") -> FastAPI:
    """The app for a store: a ``.gpkg`` path or a ``postgresql://`` URL (as a reader role).

    Raises:
        StoreError: the store cannot be opened, or (PostGIS) the role can write and
            ``allow_write_role`` is False.
    """
    text = str(store)
    if text.startswith(("postgresql://", "postgres://")):
        from pipeline.serve import postgis

        present, keys = postgis.inspect_store(text, allow_write_role)
        tables = served(present)
        keys = keys_of(tables, keys)

        async def raster_uri(survey_id: str, scene_id: str, column: str) -> str | None:
            async with app.state.pool.acquire() as conn:
                return await conn.fetchval(
                    f"SELECT {column} FROM scenes WHERE survey_id = $1 AND scene_id = $2 AND is_current",
                    survey_id,
                    scene_id,
                )

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            app.state.pool = await postgis.open_pool(text)
            try:
                app.state.collection_catalog = await postgis.catalog(app.state.pool, tables, keys)
                yield
            finally:
                await app.state.pool.close()
    else:
        path = Path(text)
        if not path.is_file():
            raise StoreError(f"{text}: no such GeoPackage")
        try:
            con = gpkg.connect(text, read_only=True)
            try:
                from pipeline.serve.geopackage import layers

                present = [row[0] for row in layers(con)]
            finally:
                con.close()
        except sqlite3.Error as exc:  # not a GeoPackage
            raise StoreError(f"{text}: cannot read as a GeoPackage ({exc})") from None
        tables = served(present)

        def gpkg_raster_uri(survey_id: str, scene_id: str, column: str) -> str | None:
            con = gpkg.connect(text, read_only=True)
            try:
                row = con.execute(
                    f"SELECT {column} FROM scenes WHERE survey_id = ? AND scene_id = ? AND is_current",
                    (survey_id, scene_id),
                ).fetchone()
            finally:
                con.close()
            return row[0] if row else None

        async def raster_uri(survey_id: str, scene_id: str, column: str) -> str | None:
            return await anyio.to_thread.run_sync(gpkg_raster_uri, survey_id, scene_id, column)

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            app.state.pool = GeoPackagePool(path)
            app.state.collection_catalog = gpkg_catalog(path, tables, GPKG_KEYS)
            yield

    app = FastAPI(
        title=title, openapi_url=f"{OGC_PREFIX}/api", docs_url=f"{OGC_PREFIX}/api.html", lifespan=lifespan
    )
    endpoints = Endpoints(
        title=title,
        router_prefix=OGC_PREFIX,
        collection_dependency=collection_param,
        with_tiles_viewer=False,
        templates=TEMPLATES,
    )
    app.include_router(endpoints.router, prefix=OGC_PREFIX)
    app.dependency_overrides[tipg_dependencies.bbox_query] = bbox_param
    app.dependency_overrides[tipg_dependencies.filter_query] = filter_param
    app.dependency_overrides[tipg_dependencies.datetime_query] = datetime_param
    for error in BAD_REQUEST:
        app.add_exception_handler(error, _bad_request)
    app.add_exception_handler(tipg_errors.NotFound, _not_found)
    # Starlette calls a handler with the class it is registered for; its annotation admits only
    # handlers of any Exception
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _server_error)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        if has_nul(request):  # PostgreSQL text cannot hold one: asyncpg failed with a 500
            response: Response = JSONResponse(
                {"detail": "a NUL character (%00) is not allowed in a request"}, status_code=400
            )
        else:
            response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.get("/", include_in_schema=False)
    def web_map() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get(
        "/raster/{kind}/{z}/{x}/{y}.png",
        tags=["Rasters"],
        summary="A scene's survey image or crack probability as a Web Mercator PNG tile",
    )
    async def raster_tile(
        kind: Literal["image", "probability"],
        z: Annotated[int, PathParam(ge=0, le=26)],
        x: Annotated[int, PathParam(ge=0)],
        y: Annotated[int, PathParam(ge=0)],
        survey: Annotated[str, Query(min_length=1, max_length=500)],
        scene: Annotated[str, Query(min_length=1, max_length=500)],
    ) -> Response:
        if x >= 2**z or y >= 2**z:
            raise HTTPException(
                status_code=400, detail=f"tile {z}/{x}/{y} is not on the WebMercatorQuad grid"
            )
        uri = await raster_uri(survey, scene, KINDS[kind])
        if not uri:
            raise HTTPException(
                status_code=404,
                detail=f"survey {survey!r} has no current scene {scene!r} with a {kind} raster",
            )
        try:
            png = await anyio.to_thread.run_sync(render_tile, uri, kind, x, y, z)
        except OSError as exc:
            log.warning("the %s raster of %s/%s cannot be read: %s", kind, survey, scene, exc)
            raise HTTPException(
                status_code=404,
                detail=f"the {kind} raster of {survey}/{scene} cannot be read by the server (see its log)",
            ) from None
        return Response(png, media_type="image/png")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "ok", "collections": list(app.state.collection_catalog["collections"])}

    return app


def run_app(app: FastAPI, store: str, host: str = "127.0.0.1", port: int = 8080, root_path: str = "") -> None:
    """Serve an app with uvicorn until interrupted; what is logged names the store without its password."""
    import uvicorn

    from pipeline.stores.postgis import display_url

    shown = display_url(store) if str(store).startswith(("postgresql://", "postgres://")) else store
    print(
        f"crackmap serve: {shown} at http://{host}:{port}{root_path}/ (OGC API at {OGC_PREFIX}/)", flush=True
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"crackmap serve: listening on {host}, beyond this machine, without TLS or authentication: "
            "put a reverse proxy in front (infra/README.md)",
            file=sys.stderr,
            flush=True,
        )
    # X-Forwarded-* headers are trusted from a proxy on this machine only
    uvicorn.run(
        app,
        host=host,
        port=port,
        root_path=root_path,
        log_level="info",
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
    )
