"""Surveys in object storage, against a real S3 API server (moto's server mode) on loopback.

s3fs, boto3 and GDAL talk HTTP to the server exactly as they would to AWS;
nothing is mocked.  The server checks credentials (IAM), so wrong keys fail
as they would in production.
"""

from __future__ import annotations

import http.client
import http.server
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import boto3
import numpy as np
import pytest
import rasterio
import rasterio.shutil
from click.testing import CliRunner
from conftest import paint_crack, write_scene

from pipeline.errors import SceneReadError, StorageError
from pipeline.probability import read_rows
from pipeline.scene import detect_cracks
from pipeline.stores import DEFAULT_CRS
from pipeline.survey import discover

pytest.importorskip("prefect")
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A moto S3 server on loopback with IAM auth on, and an access key allowed everything.

    moto lets the first INITIAL_NO_AUTH_ACTION_COUNT requests through unsigned:
    exactly the three that create the user, its key and its policy.
    """
    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")  # noqa: SIM115  (the server writes it until teardown)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"moto server did not start; see {log.name}") from None
            time.sleep(0.1)
    iam = boto3.client(
        "iam", endpoint_url=url, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup"
    )
    iam.create_user(UserName="crackmap")
    key = iam.create_access_key(UserName="crackmap")["AccessKey"]
    iam.put_user_policy(
        UserName="crackmap",
        PolicyName="all",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        ),
    )
    yield {"url": url, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    server.terminate()
    server.wait(10)
    log.close()


@pytest.fixture(scope="module", autouse=True)
def prefect_ephemeral():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def use_endpoint(monkeypatch, url: str, key: str, secret: str) -> None:
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture
def bucket(s3_server, monkeypatch):
    """A fresh bucket; the environment points botocore and GDAL at the server."""
    use_endpoint(monkeypatch, s3_server["url"], s3_server["key"], s3_server["secret"])
    name = f"survey-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return name


def cog_scene(path, seed: int = 0, crack=((40, 30), (660, 850))):
    """A 700x900 RGB COG (512 px blocks) with one painted crack."""
    pixels = np.random.default_rng(seed).integers(150, 200, (3, 700, 900), dtype=np.uint8)
    paint_crack(pixels, *crack, width_px=5)
    plain = write_scene(path.with_name(path.stem + ".plain.tif"), pixels)
    rasterio.shutil.copy(plain, path, driver="COG", compress="deflate", blocksize=512)
    plain.unlink()
    return path


def upload(bucket: str, key: str, path) -> str:
    boto3.client("s3").upload_file(str(path), bucket, key)
    return f"s3://{bucket}/{key}"


def scenes_table(store):
    with sqlite3.connect(store) as con:
        return {
            r[0]: r[1:]
            for r in con.execute(
                "SELECT scene_id, status, error, source_uri, sha256 FROM scenes ORDER BY scene_id"
            )
        }


@pytest.fixture
def storage_log():
    """Messages of the pipeline.buckets logger (however Prefect has configured logging)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("pipeline.buckets")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def crackmap(*args):
    from flows.cli import cli

    return CliRunner().invoke(cli, ["run", *args])


def test_survey_prefix_maps_its_scenes_and_reports_other_objects(
    bucket, tmp_path, test_models, storage_log, s3_server
):
    for name, seed in (("a", 1), ("b", 2)):
        upload(bucket, f"road-7/{name}.tif", cog_scene(tmp_path / f"{name}.tif", seed))
    boto3.client("s3").put_object(Bucket=bucket, Key="road-7/notes.txt", Body=b"driver's notes")
    store = tmp_path / "map.gpkg"
    result = crackmap(f"s3://{bucket}/road-7/", "--store", str(store), "--output", f"s3://{bucket}/maps/")
    assert result.exit_code == 0, result.output
    assert "2/2 scenes" in result.output
    logged = "\n".join(r.getMessage() for r in storage_log)
    assert f"skipping s3://{bucket}/road-7/notes.txt: not imagery" in logged
    table = scenes_table(store)
    assert sorted(table) == ["a", "b"] and {t[0] for t in table.values()} == {"done"}
    assert table["a"][2] == f"s3://{bucket}/road-7/a.tif"
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="maps/")["Contents"]}
    assert keys == {"maps/road-7/a.test-b16-1.0.0.tif", "maps/road-7/b.test-b16-1.0.0.tif"}
    with rasterio.Env(), rasterio.open(tmp_path / "a.tif") as scene:
        rows = list(read_rows(f"s3://{bucket}/maps/road-7/a.test-b16-1.0.0.tif"))
        assert sum(r[1].shape[0] for r in rows) == scene.height
    assert s3_server["secret"] not in store.read_bytes().decode("latin-1") + logged + result.output


@pytest.mark.parametrize("method", ["fsspec", "gdal"])  # the default first, then GDAL's /vsis3/
def test_s3_results_equal_results_from_disk(bucket, tmp_path, darkness, test_models, method, monkeypatch):
    from models.registry import resolve

    monkeypatch.setattr("pipeline.raster.READ_METHOD", method)

    local = cog_scene(tmp_path / "a.tif")
    uri = upload(bucket, "road-7/a.tif", local)
    model = resolve(None)
    on_disk = detect_cracks(str(local), darkness, model, tmp_path / "p.tif", DEFAULT_CRS)
    remote = detect_cracks(uri, darkness, model, f"s3://{bucket}/maps/a.tif", DEFAULT_CRS)
    assert len(on_disk.cracks) >= 1
    assert [c.geometry.wkb for c in remote.cracks] == [c.geometry.wkb for c in on_disk.cracks]
    assert remote.chip_count == on_disk.chip_count and remote.footprint.equals(on_disk.footprint)
    for (_, p_disk, v_disk), (_, p_s3, v_s3) in zip(
        list(read_rows(tmp_path / "p.tif")), list(read_rows(remote.probability_path)), strict=True
    ):
        assert (p_disk == p_s3).all() and (v_disk == v_s3).all()
    assert remote.sha256 == boto3.client("s3").head_object(Bucket=bucket, Key="road-7/a.tif")["ETag"].strip(
        '"'
    )


def test_jpeg_scene_in_s3_decodes_as_on_disk(bucket, tmp_path):
    """JPEG blocks are read through fsspec and decoded by libjpeg-turbo, as from disk."""
    from pipeline.raster import SceneReader

    pixels = np.random.default_rng(4).integers(150, 200, (3, 700, 900), dtype=np.uint8)
    paint_crack(pixels, (40, 30), (660, 850), width_px=5)
    plain = write_scene(tmp_path / "plain.tif", pixels)
    local = tmp_path / "j.tif"
    rasterio.shutil.copy(plain, local, driver="COG", compress="jpeg", blocksize=256)
    uri = upload(bucket, "road-7/j.tif", local)
    with SceneReader(str(local)) as on_disk, SceneReader(uri) as remote:
        assert on_disk.decoder == remote.decoder == "libjpeg-turbo"
        for row in (0, 336, 300):
            for a, b in zip(on_disk.read_strip(row, 400), remote.read_strip(row, 400)):
                assert (a == b).all()


def test_rerun_skips_unchanged_scenes_and_maps_reuploaded_ones(bucket, tmp_path, test_models):
    for name, seed in (("a", 1), ("b", 2)):
        upload(bucket, f"road-7/{name}.tif", cog_scene(tmp_path / f"{name}.tif", seed))
    store = str(tmp_path / "map.gpkg")
    args = (f"s3://{bucket}/road-7/", "--store", store)
    assert crackmap(*args).exit_code == 0
    first = scenes_table(store)

    again = crackmap(*args)
    assert again.exit_code == 0, again.output
    assert "0/2 scenes" in again.output and "2 unchanged and skipped" in again.output
    assert again.output.count("skipped") >= 3  # two table rows and the summary line
    assert scenes_table(store) == first

    upload(bucket, "road-7/b.tif", cog_scene(tmp_path / "b2.tif", seed=3, crack=((600, 20), (30, 880))))
    changed = crackmap(*args)
    assert changed.exit_code == 0, changed.output
    assert "1/2 scenes" in changed.output
    table = scenes_table(store)
    assert table["a"] == first["a"] and table["b"][3] != first["b"][3]

    forced = crackmap(*args, "--force")
    assert forced.exit_code == 0 and "2/2 scenes" in forced.output


class FlakyProxy(http.server.ThreadingHTTPServer):
    """A loopback HTTP proxy in front of the S3 server that answers 503 to chosen requests."""

    def __init__(self, upstream: str, fail) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.fail, self.count, self.failed = fail, 0, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.server.lock:
            self.server.count += 1
            fail = self.server.fail(self.server.count)
            self.server.failed += fail
        if fail:
            message = b"<Error><Code>ServiceUnavailable</Code><Message>try again</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            self.wfile.write(message)
            return
        upstream = http.client.HTTPConnection(self.server.upstream, timeout=30)
        upstream.request(self.command, self.path, body, dict(self.headers))
        reply = upstream.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        # a HEAD reply has no body but tells the object's size
        length = reply.getheader("Content-Length") if self.command == "HEAD" else len(data)
        self.send_header("Content-Length", str(length or 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@pytest.mark.parametrize("method", ["fsspec", "gdal"])
def test_a_server_that_fails_some_requests_still_gives_the_full_result(
    bucket, tmp_path, darkness, test_models, monkeypatch, s3_server, method
):
    from models.registry import resolve

    monkeypatch.setattr("pipeline.raster.READ_METHOD", method)

    local = cog_scene(tmp_path / "a.tif")
    upload(bucket, "road-7/a.tif", local)
    model = resolve(None)
    expected = detect_cracks(str(local), darkness, model, tmp_path / "p.tif", DEFAULT_CRS)
    proxy = FlakyProxy(s3_server["url"], fail=lambda n: n <= 2 or n % 4 == 0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        (source,) = discover([f"s3://{bucket}/road-7/"])
        result = detect_cracks(
            source.uri,
            darkness,
            model,
            f"s3://{bucket}/maps/a.tif",
            DEFAULT_CRS,
            scene_id=source.scene_id,
            source_sha256=source.identity,
        )
    finally:
        proxy.shutdown()
    assert proxy.failed >= 5, proxy.failed
    assert [c.geometry.wkb for c in result.cracks] == [c.geometry.wkb for c in expected.cracks]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["url"])
    assert [r[1].sum() for r in read_rows(result.probability_path)] == [
        r[1].sum() for r in read_rows(tmp_path / "p.tif")
    ]


def test_missing_bucket_and_missing_object_are_clear_errors(bucket, tmp_path, test_models):
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/road-7/: no such bucket"):
        discover(["s3://no-such-bucket/road-7/"])
    result = crackmap("s3://no-such-bucket/road-7/", "--store", str(tmp_path / "map.gpkg"))
    assert result.exit_code == 2 and "no such bucket" in result.output
    with pytest.raises(StorageError, match="no raster objects"):
        discover([f"s3://{bucket}/empty/"])
    with pytest.raises(SceneReadError, match=rf"^s3://{bucket}/road-7/gone.tif: no such object"):
        detect_cracks(f"s3://{bucket}/road-7/gone.tif", None, None, tmp_path / "p.tif", DEFAULT_CRS)


def test_bad_objects_fail_alone(bucket, tmp_path, test_models):
    upload(bucket, "road-7/a.tif", cog_scene(tmp_path / "a.tif"))
    boto3.client("s3").put_object(Bucket=bucket, Key="road-7/c-notes.tif", Body=b"not an image")
    store = str(tmp_path / "map.gpkg")
    result = crackmap(f"s3://{bucket}/road-7/", "--store", store)
    assert result.exit_code == 1 and "1/2 scenes" in result.output
    table = scenes_table(store)
    assert table["a"][0] == "done"
    assert table["c-notes"][:2] == (
        "failed",
        f"s3://{bucket}/road-7/c-notes.tif: not a readable "
        "raster" + table["c-notes"][1].split("raster", 1)[1],
    )


def test_wrong_credentials_are_clear_errors(bucket, tmp_path, monkeypatch, s3_server):
    uri = upload(bucket, "road-7/a.tif", cog_scene(tmp_path / "a.tif"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-never-shown")
    with pytest.raises(StorageError, match=rf"^s3://{bucket}/road-7/: credentials refused") as listing:
        discover([f"s3://{bucket}/road-7/"])
    with pytest.raises(SceneReadError, match=rf"^{uri}: credentials refused") as reading:
        detect_cracks(uri, None, None, tmp_path / "p.tif", DEFAULT_CRS)
    for error in (listing.value, reading.value):
        assert "wrong-secret-never-shown" not in str(error) and "\n" not in str(error)
