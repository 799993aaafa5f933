"""A real PostGIS for the store tests: started once per session, a fresh database per test.

``make test`` starts it with ``infra/postgis.sh`` and exports ``CRACKMAP_PG_URL`` (plus PG*);
without that, the session fixture runs the script itself.  If PostGIS cannot be
started the PostGIS tests fail under CI (``CI=true``) and are skipped elsewhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "infra" / "postgis.sh"


class PostGIS:
    """A server we may create databases on, as its superuser."""

    def __init__(self, url: str) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        self.url = url
        parts = conninfo_to_dict(url)
        self.host, self.port = parts.get("host", os.environ.get("PGHOST")), parts.get("port", "5432")
        self.user = parts.get("user", os.environ.get("PGUSER", "postgres"))
        self.template = f"crackmap_tpl_{uuid.uuid4().hex[:8]}"
        self._psycopg = psycopg
        with self.admin() as con:
            con.execute(f"CREATE DATABASE {self.template}")
        with psycopg.connect(self.url_of(self.template), autocommit=True) as con:
            from pipeline.stores.postgis import migrate

            migrate(con)

    def url_of(self, dbname: str, user: str | None = None, password: str | None = None) -> str:
        auth = (user or self.user) + (f":{password}" if password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def admin(self):
        return self._psycopg.connect(self.url_of("postgres"), autocommit=True)

    def new_database(self, empty: bool = False) -> str:
        """A new database: a copy of the migrated template, or (``empty``) one without anything."""
        name = f"crackmap_t_{uuid.uuid4().hex[:12]}"
        template = "template0" if empty else self.template
        with self.admin() as con:
            con.execute(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
        return name

    def drop(self, name: str) -> None:
        with self.admin() as con:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        self.drop(self.template)


def _start_with_script(folder: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(
        [str(SCRIPT), "start", str(folder)], env=env, capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"infra/postgis.sh start failed: {done.stderr.strip()[-2000:]}")
    return dict(re.findall(r"^export (\w+)=(.*)$", done.stdout, re.M))


@pytest.fixture(scope="session")
def postgis(tmp_path_factory):
    """The session's PostGIS server; fails under CI, skips elsewhere, if there is none."""
    started_here, saved = None, dict(os.environ)
    try:
        if not os.environ.get("CRACKMAP_PG_URL"):
            if reason := os.environ.get("CRACKMAP_PG_UNAVAILABLE"):
                raise RuntimeError(reason)
            started_here = tmp_path_factory.mktemp("postgis", numbered=True)
            os.environ.update(_start_with_script(started_here))
        server = PostGIS(os.environ["CRACKMAP_PG_URL"])
    except Exception as exc:  # no server: the reason goes into the fail/skip message
        if started_here:
            subprocess.run([str(SCRIPT), "stop", str(started_here)], check=False)
        os.environ.clear()
        os.environ.update(saved)
        message = f"PostGIS is not available ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI must run the PostGIS tests", pytrace=False)
        pytest.skip(message)
    yield server
    server.close()
    if started_here:
        subprocess.run([str(SCRIPT), "stop", str(started_here)], check=False)
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def pg_database(postgis):
    """A fresh, migrated database for one test; its URL (the password comes from PGPASSWORD)."""
    name = postgis.new_database()
    yield postgis.url_of(name)
    postgis.drop(name)


@pytest.fixture(params=["gpkg", "postgis"])
def store_url(request, tmp_path):
    """Each shared store test runs on a GeoPackage file and on a fresh PostGIS database."""
    if request.param == "gpkg":
        return str(tmp_path / "map.gpkg")
    return request.getfixturevalue("pg_database")
