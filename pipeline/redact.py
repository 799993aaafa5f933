"""Keeping passwords out of what crackmap prints, logs and hands to Prefect.

A store URL may carry a password (``postgresql://user:SECRET@host/db``).  Every
place that shows a URL shows ``mask_url(url)``; free text that may hold URLs
(an error message, a log line) goes through ``redact``.  Runs hand their store
to Prefect without the password (``without_password``): flow-run parameters
are stored in Prefect's database, so the password travels in the process
environment (``PGPASSWORD``) instead, where libpq looks for it.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# scheme://user:password@ : the password is everything between the first ':' after '//' and the last '@'
_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):(?P<password>[^\s/]*?)@(?=[^@\s/]*(?:[/\s?#]|$))"
)
_QUERY_PASSWORD = re.compile(r"(?i)(?P<head>[?&](?:password|passwd|pwd|secret|token)=)(?P<password>[^&\s#]*)")


_KNOWN: set[str] = set()  # passwords this process was given (remember()); masked wherever they appear


def remember(password: str | None) -> None:
    """Mask this password wherever ``redact`` sees it, in a URL or not (for this process)."""
    if password and len(password) >= 3:  # shorter ones would mask ordinary words
        _KNOWN.add(password)


def redact(text: str) -> str:
    """``text`` with the password of every URL in it, and every ``remember``-ed one, replaced by ``***``.

    >>> redact("cannot open postgresql://mapper:s3cr@t@db:5433/cracks (refused)")
    'cannot open postgresql://mapper:***@db:5433/cracks (refused)'
    >>> redact("postgresql://db/cracks?user=m&password=s3cret&sslmode=require")
    'postgresql://db/cracks?user=m&password=***&sslmode=require'
    >>> redact("out/map.gpkg")
    'out/map.gpkg'
    """
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", str(text))
    text = _QUERY_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)
    for password in sorted(_KNOWN, key=len, reverse=True):
        text = text.replace(password, MASK)
    return text


def mask_url(url: str) -> str:
    """A URL (or a path) as it may be shown: its password, if any, replaced by ``***``.

    >>> mask_url("postgresql://mapper:s3cret@db:5433/cracks")
    'postgresql://mapper:***@db:5433/cracks'
    """
    return redact(str(url))


def password_of(url: str) -> str | None:
    """The password a URL carries, in its user part or as a ``password=`` query parameter.

    >>> password_of("postgresql://mapper:s3cret@db/cracks"), password_of("out/map.gpkg")
    ('s3cret', None)
    """
    if "://" not in str(url):
        return None
    parts = urlsplit(str(url))
    if parts.password:
        return parts.password
    return dict(parse_qsl(parts.query)).get("password") or None


def without_password(url: str) -> str:
    """The URL without its password (user, host, port, database and options kept).

    >>> without_password("postgresql://mapper:s3cret@db:5433/cracks?sslmode=require")
    'postgresql://mapper@db:5433/cracks?sslmode=require'
    >>> without_password("postgresql://db/cracks?password=x&sslmode=require")
    'postgresql://db/cracks?sslmode=require'
    >>> without_password("out/map.gpkg")
    'out/map.gpkg'
    """
    if password_of(url) is None:
        return str(url)
    parts = urlsplit(str(url))
    netloc = parts.netloc.rpartition("@")
    userinfo, host = (netloc[0], netloc[2]) if netloc[1] else ("", parts.netloc)
    user = userinfo.split(":", 1)[0]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"])
    return urlunsplit((parts.scheme, f"{user}@{host}" if user else host, parts.path, query, parts.fragment))


class RedactingFilter(logging.Filter):
    """A logging filter that masks passwords in a record's message (``redact``), on any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:  # a traceback: format it now, masked
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def mask_log_handlers() -> None:
    """Add a ``RedactingFilter`` to every handler configured so far (root, Prefect's console and API)."""
    loggers = [
        logging.getLogger(),
        *(
            logger
            for logger in logging.Logger.manager.loggerDict.values()
            if isinstance(logger, logging.Logger)
        ),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
