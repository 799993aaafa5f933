"""The PostGIS side of ``crackmap serve``: the reader-role check and tipg's catalog and pool.

``serve`` connects as a role that can only read (``crackmap_reader``, granted to a
login role); ``write_privileges`` says what a role could change, and the app refuses
one that could change anything unless told otherwise.  Connections are also put in
read-only mode, so even an allowed writer role cannot write through the server.
"""

from __future__ import annotations

import datetime

import asyncpg
import psycopg
from tipg.collections import Catalog, Collection, pg_get_collection_index
from tipg.database import connection_factory
from tipg.settings import DatabaseSettings

from pipeline.errors import StoreError
from pipeline.stores.postgis import connect, display_url, scalar, why

SCHEMA = "public"


def write_privileges(con: psycopg.Connection) -> list[str]:
    """What the connected role could change in the store; empty for a read-only role."""
    found = []
    if scalar(con, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        found.append("it is a superuser")
    tables = [
        r[0]
        for r in con.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
            "AND (has_table_privilege(c.oid, 'INSERT') OR has_table_privilege(c.oid, 'UPDATE') "
            "OR has_table_privilege(c.oid, 'DELETE') OR has_table_privilege(c.oid, 'TRUNCATE')) "
            "ORDER BY 1",
            (SCHEMA,),
        )
    ]
    if tables:
        found.append(f"it may change {', '.join(tables[:5])}" + (" and more" if len(tables) > 5 else ""))
    if scalar(con, "SELECT has_schema_privilege(%s, 'CREATE')", (SCHEMA,)):
        found.append(f"it may create tables in schema {SCHEMA}")
    return found


def inspect_store(url: str, allow_write_role: bool) -> tuple[list[str], dict[str, str]]:
    """The spatial tables and views the role may read, and the single-column keys of tables.

    Raises:
        StoreError: the role can write and ``allow_write_role`` is False, or the store
            cannot be read; the message names the role and the fix, never the password.
    """
    with connect(url) as con:
        try:
            user = scalar(con, "SELECT current_user")
            if (problems := write_privileges(con)) and not allow_write_role:
                raise StoreError(
                    f"{display_url(url)}: role {user} can write ({'; '.join(problems)}). crackmap serve "
                    "reads as a role in crackmap_reader, e.g. CREATE ROLE map_viewer LOGIN PASSWORD '…' "
                    "IN ROLE crackmap_reader; or pass --allow-write-role (connections stay read-only)"
                )
            names = [
                r[0]
                for r in con.execute(
                    "SELECT DISTINCT f_table_name FROM geometry_columns WHERE f_table_schema = %s "
                    "AND has_table_privilege(format('%%I.%%I', f_table_schema, f_table_name), 'SELECT')",
                    (SCHEMA,),
                )
            ]
            keys: dict[str, str] = dict(
                con.execute(
                    "SELECT c.relname, a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_attribute a "
                    "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
                    "WHERE n.nspname = %s AND i.indisprimary AND i.indnatts = 1",
                    (SCHEMA,),
                ).fetchall()
            )
        except psycopg.Error as exc:
            raise StoreError(f"{display_url(url)}: cannot read the store's tables ({why(exc)})") from exc
    return names, keys


class ReadOnlyInit(connection_factory):
    """tipg's connection set-up (search path, its catalog functions in pg_temp) on a read-only session."""

    async def __call__(self, conn: asyncpg.Connection) -> None:
        # Sessions default to read-only; creating tipg's catalog functions in pg_temp needs
        # one explicit read-write transaction (temporary objects only).
        await conn.execute("BEGIN READ WRITE")
        try:
            await super().__call__(conn)
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        await conn.execute("COMMIT")


async def open_pool(url: str) -> asyncpg.Pool:
    """An asyncpg pool for tipg, each connection read-only; a StoreError without the password."""
    try:
        return await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=4,
            init=ReadOnlyInit([SCHEMA], "pg_temp"),
            server_settings={"application_name": "crackmap-serve", "default_transaction_read_only": "on"},
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreError(f"{display_url(url)}: cannot connect for serving ({type(exc).__name__})") from None


async def catalog(pool: asyncpg.Pool, tables: list[str], keys: dict[str, str]) -> Catalog:
    """tipg's catalog of exactly ``tables`` (no functions), ids without the schema, view keys set."""
    settings = DatabaseSettings(
        schemas=[SCHEMA],
        tables=[f"{SCHEMA}.{t}" for t in tables],
        functions=[],
        exclude_functions=None,
        only_spatial_tables=True,
    )
    async with pool.acquire() as conn:
        # a pooled connection's proxy is a Connection to asyncpg; tipg annotates only the class itself
        index = await pg_get_collection_index(conn, settings=settings)  # type: ignore[arg-type]
        found = {c.table: c for c in index}
    collections: dict[str, Collection] = {}
    for name in tables:
        if (table := found.get(name)) is None:
            continue
        update: dict = {"id": name}
        if (key := keys.get(name)) and (table.id_column is None or table.id_column.name != key):
            update["id_column"] = next(c for c in table.table_columns if c.name == key)
        collections[name] = table.model_copy(update=update)
    return Catalog(collections=collections, last_updated=datetime.datetime.now())
