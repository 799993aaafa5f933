"""Object storage (buckets) and local folders: listing survey prefixes, identifying objects, writing outputs.

Any fsspec URL works (``s3://``, ``gs://``, ``az://``, ``memory://`` ...); a
path without a scheme is a local file and never goes through fsspec.  S3
credentials and endpoint come from the standard AWS environment variables and
profiles (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` ...),
read by botocore; crackmap never copies them anywhere.  Rasters are opened in
``pipeline.raster``, which sets GDAL's equivalents.

Every storage error goes through one table, ``ERROR_POLICY``: it says whether
an error is transient (worth retrying) and what to tell the user.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from pipeline.errors import StorageError

log = logging.getLogger(__name__)
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
S3_MAX_ATTEMPTS = 8  # botocore "standard" retries: 5xx, throttling, timeouts, with backoff
S3_BLOCK_BYTES = 8 << 20  # s3fs reads ahead this much (its default, 50 MB, is a whole scene)


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object under a prefix: its URL, its path relative to the prefix, its ETag."""

    uri: str
    relative: str
    etag: str | None


@dataclass(frozen=True, slots=True)
class ErrorRule:
    """A row of ``ERROR_POLICY``: errors it matches, whether to retry, what to tell the user."""

    types: tuple[type[BaseException], ...]
    words: tuple[str, ...]  # matched in the message, for errors that come back as text (GDAL)
    transient: bool
    problem: str


# First matching row wins.  Transient errors are retried by s3fs/botocore and by
# GDAL (GDAL_HTTP_MAX_RETRY) first; a flow may retry them once more.
ERROR_POLICY = (
    ErrorRule((), ("NoSuchBucket", "bucket does not exist"), False, "no such bucket"),
    ErrorRule(
        (),
        (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "Access Key Id",
            "AWS_SECRET_ACCESS_KEY",
            "security token",
            "ExpiredToken",
        ),
        False,
        "credentials refused or missing; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
    ),
    ErrorRule(
        (PermissionError,),
        ("AccessDenied", "Access Denied", "HTTP response code: 403"),
        False,
        "access denied; check the credentials' permissions on it",
    ),
    ErrorRule(
        (TimeoutError, ConnectionError),
        (
            "SlowDown",
            "Throttl",
            "RequestTimeout",
            "ServiceUnavailable",
            "InternalError",
            "HTTP response code: 5",
            "Timeout was reached",
            "Could not connect",
            "Connection refused",
        ),
        True,
        "storage temporarily unavailable (retried with backoff); run again later",
    ),
    ErrorRule(
        (FileNotFoundError,),
        (
            "NoSuchKey",
            "specified key does not exist",
            "does not exist in the file system",
            "HTTP response code: 404",
        ),
        False,
        "no such object",
    ),
)


def policy(exc: BaseException) -> ErrorRule | None:
    """The ``ERROR_POLICY`` row for an error (or its cause), or None if it is not a storage error.

    >>> policy(TimeoutError("read timed out")).transient
    True
    >>> policy(FileNotFoundError("survey/a.tif")).problem
    'no such object'
    """
    for error in (exc, exc.__cause__):
        if error is None:
            continue
        text = str(error)
        for rule in ERROR_POLICY:
            if isinstance(error, rule.types) or any(w in text for w in rule.words):
                return rule
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may help: timeouts, 5xx, throttling."""
    rule = policy(exc)
    return rule is not None and rule.transient


def storage_error(uri: str, exc: BaseException) -> StorageError:
    """A one-line ``StorageError`` naming ``uri`` and what went wrong, per ``ERROR_POLICY``."""
    rule = policy(exc)
    problem = rule.problem if rule else "storage request failed"
    return StorageError(
        uri, f"{problem} ({type(exc).__name__}: {first_line(exc)})", transient=bool(rule and rule.transient)
    )


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def is_url(uri: str | Path) -> bool:
    """Whether ``uri`` names remote storage (has a scheme other than ``file``).

    >>> is_url("s3://survey/road-12/"), is_url("data/road-12"), is_url("C:/data")
    (True, False, False)
    """
    scheme = urlsplit(str(uri)).scheme
    return len(scheme) > 1 and scheme != "file"


def join(prefix: str | Path, relative: str) -> str:
    """``relative`` (a POSIX path) under a local folder or a URL prefix.

    >>> join("s3://out/probability/", "road-12/a.tif"), join("out", "road-12/a.tif")
    ('s3://out/probability/road-12/a.tif', 'out/road-12/a.tif')
    """
    if is_url(prefix):
        return str(prefix).rstrip("/") + "/" + relative
    return str(Path(prefix) / relative)


# What an S3 filesystem is built from, besides the protocol: a change in any of these gets a
# new instance (rotated keys, another profile or endpoint), the same values reuse one.
_S3_ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def filesystem(uri: str):
    """The fsspec filesystem for a URL; for S3, with retries and the AWS endpoint from the environment.

    Listings are never cached (a rerun must see re-uploaded objects).  Instances are reused
    while the AWS variables stay the same: building one costs ~0.1 s (botocore's models).
    """
    protocol = urlsplit(uri).scheme
    environment = tuple(os.environ.get(k) for k in _S3_ENVIRONMENT) if protocol in ("s3", "s3a") else ()
    try:
        return _filesystem(protocol, environment)
    except (ImportError, ValueError) as exc:
        raise StorageError(
            uri, f"no filesystem for {protocol}:// ({exc}); pip install the fsspec implementation for it"
        ) from exc


@functools.lru_cache(maxsize=16)
def _filesystem(protocol: str, environment: tuple):
    import fsspec

    options: dict = {"use_listings_cache": False, "skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options["config_kwargs"] = {"retries": {"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}}
        options["default_block_size"] = S3_BLOCK_BYTES
        if endpoint:
            options["endpoint_url"] = endpoint
    return fsspec.filesystem(protocol, **options)


def _strip_protocol(uri: str) -> str:
    return uri.split("://", 1)[1] if "://" in uri else uri


def list_scenes(
    prefix: str, pattern: str | None = None, suffixes: tuple[str, ...] = RASTER_SUFFIXES
) -> list[StoredObject]:
    """The raster objects under a URL prefix (recursive), sorted; other objects are logged and skipped.

    Args:
        prefix: ``s3://bucket/survey/`` or another fsspec URL; a URL naming one
            object lists just that object.
        pattern: Optional glob on the path relative to the prefix (``*`` does
            not cross ``/``; use ``**/*.tif`` for all levels).
        suffixes: The extensions that count (frame surveys: ``.jpg``, ``.png``).

    Raises:
        StorageError: no such bucket, credentials refused, or nothing found.
    """
    fs = filesystem(prefix)
    protocol = urlsplit(prefix).scheme
    root = _strip_protocol(prefix).rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except Exception as exc:  # botocore, aiohttp and fsspec errors: classified by ERROR_POLICY
        raise storage_error(prefix, exc) from exc
    objects = []
    for path, info in sorted(found.items()):
        if info.get("type") == "directory" or path.endswith("/"):
            continue
        relative = PurePosixPath(path).name if path == root else path[len(root) :].lstrip("/")
        if pattern and not matches_glob(relative, pattern):
            continue
        uri = f"{protocol}://{path}"
        if PurePosixPath(path).suffix.lower() not in suffixes:
            log.warning("skipping %s: not imagery (extension not one of %s)", uri, ", ".join(suffixes))
            continue
        objects.append(StoredObject(uri, relative, _etag(info)))
    if not objects:
        raise StorageError(
            prefix,
            f"no raster objects ({', '.join(suffixes)}) found"
            + (f" matching {pattern!r}" if pattern else ""),
        )
    return objects


def matches_glob(relative: str, pattern: str) -> bool:
    """Glob on a relative path: ``*`` stays within one level, ``**/`` spans any number.

    >>> matches_glob("a.tif", "*.tif"), matches_glob("x/a.tif", "*.tif"), matches_glob("x/a.tif", "**/*.tif")
    (True, False, True)
    """
    if "**" in pattern:
        return fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(relative, pattern.replace("**/", ""))
    return relative.count("/") == pattern.count("/") and fnmatch.fnmatch(relative, pattern)


def _etag(info: dict) -> str | None:
    etag = info.get("ETag") or info.get("etag")
    return str(etag).strip('"') if etag else None


def identity(uri: str) -> str:
    """What a scene's content is known by: the object's ETag, or a local file's sha256.

    Raises:
        StorageError: the object is missing or cannot be read.
    """
    if not is_url(uri):
        try:
            with open(uri, "rb") as f:
                return _sha256(f)
        except OSError as exc:
            raise StorageError(uri, f"cannot read ({exc.strerror or exc})") from exc
    try:
        info = filesystem(uri).info(_strip_protocol(uri))
    except Exception as exc:  # classified by ERROR_POLICY
        raise storage_error(uri, exc) from exc
    etag = _etag(info)
    if etag is None:  # a store without ETags: hash the object (streamed)
        with filesystem(uri).open(_strip_protocol(uri), "rb") as f:
            return _sha256(f)
    return etag


def _sha256(f) -> str:
    """sha256 of a binary file object, read in 1 MB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def upload(local: Path, uri: str) -> None:
    """Copy a finished local file to ``uri`` in one request sequence.

    S3, GCS and Azure make an object visible only when its upload completes,
    so readers see the old object or the whole new one, never a part.

    Raises:
        StorageError: the upload failed (after retries).
    """
    fs = filesystem(uri)
    try:
        fs.put_file(str(local), _strip_protocol(uri))
    except Exception as exc:  # classified by ERROR_POLICY
        raise storage_error(uri, exc) from exc
