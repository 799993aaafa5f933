"""PostGIS-only store tests, on a real server (see postgis_fixtures): faults, migrations, roles."""

import dataclasses
import os
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import shapely
from rasterio.crs import CRS
from rasterio.transform import from_origin

from pipeline.errors import StoreError
from pipeline.records import CrackLine, Scene, SceneResult
from pipeline.stores import RunInfo, open_store
from pipeline.stores.base import CRACK_FIELDS, QUERY_FIELDS, REQUIRED_CRACK_FIELDS
from pipeline.stores.postgis import CRACK_COPY_COLUMNS, migrate, migrations

RUN = RunInfo("survey-a", "run-1", "test-b16", "1.0.0", "abc")


def synthetic(n: int, scene_id: str = "s1") -> SceneResult:
    """A scene with ``n`` short crack lines near 15°E 50°N."""
    scene = Scene(
        f"/data/{scene_id}.tif",
        scene_id,
        1000,
        1000,
        3,
        "uint8",
        CRS.from_epsg(32633),
        from_origin(500000.0, 5600000.0, 0.002, 0.002),
    )
    cracks = tuple(
        CrackLine(
            shapely.LineString(
                [(15 + i * 1e-6, 50.0), (15 + i * 1e-6, 50.00001), (15 + i * 1e-6 + 1e-6, 50.00002)]
            ),
            0.4,
            3.0,
            5.0,
            10.0,
            0.8,
            ("low", "medium", "high")[i % 3],
        )
        for i in range(n)
    )
    return SceneResult(scene, cracks, shapely.box(14.9, 49.9, 15.1, 50.1), 25, "/tmp/p.tif", 1.0, "f" * 64)


def count(url: str, sql: str = "SELECT count(*) FROM cracks") -> int:
    with psycopg.connect(url) as con:
        return con.execute(sql).fetchone()[0]


def test_a_rerun_leaves_the_same_row_count(pg_database):
    store = open_store(pg_database)
    for run_id in ("run-1", "run-2", "run-3"):
        store.publish(synthetic(5000), dataclasses.replace(RUN, run_id=run_id))
        assert count(pg_database) == 5000
    store.publish(synthetic(10), RUN)  # fewer cracks this time: the old ones go
    store.close()
    assert count(pg_database) == 10
    assert count(pg_database, "SELECT count(*) FROM scenes") == 1
    assert count(pg_database, "SELECT crack_count FROM scenes") == 10


def test_a_killed_connection_rolls_the_scene_back_and_a_rerun_completes(pg_database, postgis):
    store = open_store(pg_database)
    store.publish(synthetic(3), RUN)
    before = count(pg_database, "SELECT sum(length_m * 1000)::bigint + count(*) FROM cracks")
    pid = store._con.info.backend_pid
    killed = threading.Event()

    def kill_during_copy():  # a second connection ends the store's backend while its COPY runs
        with postgis.admin() as admin:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not killed.is_set():
                hit = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s "
                    "AND state = 'active' AND query LIKE 'COPY cracks%%'",
                    (pid,),
                ).fetchone()
                if hit and hit[0]:
                    killed.set()
                time.sleep(0.002)

    killer = threading.Thread(target=kill_during_copy)
    killer.start()
    big = synthetic(150_000)
    try:
        with pytest.raises(
            StoreError,
            match="lost the connection while publishing /data/s1.tif.*"
            "rolled the scene back, nothing was written",
        ) as error:
            store.publish(big, RUN)
    finally:
        killed.set()
        killer.join()
    assert "server closed the connection" in str(error.value)  # what libpq saw
    assert count(pg_database, "SELECT sum(length_m * 1000)::bigint + count(*) FROM cracks") == before
    assert count(pg_database, "SELECT crack_count FROM scenes") == 3
    store.publish(big, RUN)  # the same store reconnects; the rerun writes exactly this scene
    store.close()
    assert count(pg_database) == 150_000
    assert count(pg_database, "SELECT count(DISTINCT crack_id) FROM cracks") == 150_000
    assert count(pg_database, "SELECT crack_count FROM scenes") == 150_000


def test_migrations_apply_to_an_empty_database_and_twice_are_a_no_op(postgis):
    name = postgis.new_database(empty=True)
    try:
        with psycopg.connect(postgis.url_of(name), autocommit=True) as con:
            versions = [version for version, _ in migrations()]
            assert versions[:5] == ["0001", "0002", "0003", "0004", "0005"]
            assert migrate(con) == versions
            assert migrate(con) == []
            tables = {
                r[0]
                for r in con.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
                )
            }
            assert {
                "surveys",
                "scenes",
                "runs",
                "models",
                "cracks",
                "current_cracks",
                "schema_migrations",
                "pattern_areas",
                "current_pattern_areas",
                "sections",
                "current_sections",
                "section_changes",
                "crack_changes",
            } <= tables
            assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [
                (v,) for v in versions
            ]
            assert con.execute(
                "SELECT type, srid FROM geometry_columns WHERE f_table_name = 'cracks'"
            ).fetchone() == ("LINESTRING", 4326)
            indexes = {
                r[0] for r in con.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'cracks'")
            }
            assert {"cracks_geom", "cracks_scene", "cracks_model", "cracks_severity"} <= indexes
            # the crack columns are declared once (stores.base.CRACK_FIELDS); the migrations agree
            # ... the road columns in crack_positions (migration 0005), the views show all of them, in order
            road = {"road_id", "chainage_from_m", "chainage_to_m", "offset_m"}
            columns = {
                r[0]: r[1]
                for r in con.execute(
                    "SELECT column_name, is_nullable FROM information_schema.columns WHERE table_name = 'cracks'"
                )
            }
            assert set(columns) == {"geom", *QUERY_FIELDS} - road
            required = {name for name, _ in CRACK_FIELDS[:REQUIRED_CRACK_FIELDS]}
            assert {c for c, nullable in columns.items() if nullable == "NO"} - {"geom"} == required
            for view in ("all_cracks", "current_cracks"):
                shown = [
                    r[0]
                    for r in con.execute(
                        "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                        "ORDER BY ordinal_position",
                        (view,),
                    )
                ]
                assert [c for c in shown if c != "geom"] == list(QUERY_FIELDS), view
            assert road <= {
                r[0]
                for r in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'crack_positions'"
                )
            }
            # the binary COPY writes every column of cracks
            assert set(CRACK_COPY_COLUMNS) == {"geom", *QUERY_FIELDS} - road
    finally:
        postgis.drop(name)


def test_cracks_need_their_scene_row_and_go_with_it(pg_database):
    """The cracks -> scenes key, checked per statement (migration 0002) as a foreign key would."""
    store = open_store(pg_database)
    store.publish(synthetic(6), RUN)
    store.publish(synthetic(4, "s2"), RUN)
    store.close()
    with psycopg.connect(pg_database) as con:
        copy_one = (
            "INSERT INTO cracks SELECT gen_random_uuid(), survey_id, %s, model_name, model_version, "
            "model_sha256, run_id, length_m, width_mean_mm, width_max_mm, orientation_deg, "
            "confidence, severity, created_at, geom FROM cracks LIMIT 1"
        )
        with (
            pytest.raises(psycopg.errors.ForeignKeyViolation, match="scene survey-a/nowhere"),
            con.transaction(),
        ):
            con.execute(copy_one, ("nowhere",))
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="no row in scenes"), con.transaction():
            con.execute("UPDATE cracks SET model_version = '9.9.9' WHERE scene_id = 's1'")
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="key cannot change"), con.transaction():
            con.execute("UPDATE scenes SET scene_id = 's3' WHERE scene_id = 's1'")
        with con.transaction():
            con.execute(copy_one, ("s2",))  # a crack of an existing scene is fine
            con.execute("UPDATE scenes SET is_current = false")  # keys unchanged: fine
            con.execute("DELETE FROM scenes WHERE scene_id = 's1'")
        assert con.execute("SELECT scene_id, count(*) FROM cracks GROUP BY 1").fetchall() == [("s2", 5)]


def test_a_store_opened_on_an_empty_database_migrates_it_in_its_crs(postgis):
    name = postgis.new_database(empty=True)
    try:
        store = open_store(postgis.url_of(name), crs=CRS.from_epsg(3857))
        assert store.crs == CRS.from_epsg(3857)
        store.close()
        with pytest.raises(StoreError, match="stores EPSG:3857, not EPSG:4326"):
            open_store(postgis.url_of(name))
    finally:
        postgis.drop(name)


def test_the_reader_role_cannot_write_and_the_writer_can(pg_database, postgis):
    suffix = uuid.uuid4().hex[:8]
    reader, writer = f"test_reader_{suffix}", f"test_writer_{suffix}"
    with postgis.admin() as admin:
        admin.execute(f"CREATE ROLE {reader} LOGIN PASSWORD 'reader-pw' IN ROLE crackmap_reader")
        admin.execute(f"CREATE ROLE {writer} LOGIN PASSWORD 'writer-pw' IN ROLE crackmap_writer")
    try:
        dbname = pg_database.rsplit("/", 1)[1]
        store = open_store(postgis.url_of(dbname, writer, "writer-pw"))
        store.publish(synthetic(4), RUN)
        store.close()
        reader_url = postgis.url_of(dbname, reader, "reader-pw")
        store = open_store(reader_url)  # reading works
        assert sum(len(b) for b in store.query()) == 4
        with pytest.raises(StoreError, match="permission denied"):
            store.publish(synthetic(2), RUN)
        store.close()
        with psycopg.connect(reader_url) as con:
            for sql in (
                "DELETE FROM cracks",
                "INSERT INTO surveys (survey_id) VALUES ('x')",
                "UPDATE scenes SET is_current = false",
                "CREATE TABLE mine (x int)",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege), con.transaction():
                    con.execute(sql)
        assert count(pg_database) == 4
    finally:
        with postgis.admin() as admin:
            admin.execute(f"DROP ROLE {reader}")
            admin.execute(f"DROP ROLE {writer}")


def test_a_wrong_password_is_refused_without_showing_it(pg_database, postgis):
    dbname = pg_database.rsplit("/", 1)[1]
    secret = "Not-The-Password-5150"
    with pytest.raises(StoreError) as error:
        open_store(postgis.url_of(dbname, postgis.user, secret))
    message = str(error.value)
    assert "password authentication failed" in message and "cannot connect" in message
    assert secret not in message and secret not in repr(error.value.__cause__)
    assert f"postgresql://{postgis.user}@{postgis.host}:{postgis.port}/{dbname}" in message
    assert error.value.transient is False  # SQLSTATE 28P01: a retry would be refused again


def test_an_installed_wheel_opens_postgis_with_its_own_migrations(postgis, tmp_path):
    """``pip install .`` (not editable, as the Dockerfiles do) ships the migrations as package data."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a clean copy: no build/ or egg-info left by an earlier build
    shutil.copytree(
        root,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "out", "tests", ".hypothesis", "__pycache__", "runs"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(tmp_path / "wheel"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "wheel").glob("crackmap-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    name = postgis.new_database(empty=True)
    code = (
        "import sys, pipeline; from pipeline.stores import open_store; "
        "import pipeline.stores.postgis as p; assert p.__file__.startswith(sys.argv[2]), p.__file__; "
        "s = open_store(sys.argv[1]); print(s.crs); s.close()"
    )
    try:
        # run from elsewhere, the installed copy first on the path: no source tree to fall back on
        done = subprocess.run(
            [sys.executable, "-c", code, postgis.url_of(name), str(site)],
            cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(site)),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == "EPSG:4326"
        with psycopg.connect(postgis.url_of(name)) as con:
            assert con.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall() == [
                (version,) for version, _ in migrations()
            ]
    finally:
        postgis.drop(name)


@pytest.mark.parametrize("fast", [False, True], ids=["default", "fast"])
def test_postgis_sh_is_durable_unless_asked_for_a_fast_throwaway_cluster(fast):
    import subprocess
    import sys
    import tempfile

    script = Path(__file__).resolve().parents[1] / "infra" / "postgis.sh"
    if not Path("/usr/lib/postgresql/15/bin/initdb").exists():
        pytest.skip("PostgreSQL 15 is not installed (infra/postgis.sh start installs it as root)")
    folder = Path(tempfile.mkdtemp(prefix="crackmap-durable-"))  # the postgres user must reach it
    started = subprocess.run(
        [str(script), "start", *(["--fast"] if fast else []), str(folder)],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        env = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        with psycopg.connect(env["CRACKMAP_PG_URL"], password=env["PGPASSWORD"]) as con:
            settings = {
                name: con.execute(f"SHOW {name}").fetchone()[0]
                for name in ("fsync", "synchronous_commit", "full_page_writes")
            }
        expected = "off" if fast else "on"
        assert settings == dict.fromkeys(settings, expected)
    finally:
        subprocess.run([str(script), "stop", str(folder)], capture_output=True, timeout=120)
