"""The Prefect API of a ``crackmap run`` without a server: a child process the run owns.

With ``PREFECT_API_URL`` unset, Prefect starts its "ephemeral" API as a child
process (uvicorn) in the terminal's process group.  Ctrl-C killed that child
too while the run went on calling it (70-80 s of connection errors, two
tracebacks), and after SIGTERM or SIGKILL of the CLI it lived on as an orphan.
``prefect_api()`` starts the same server (Prefect's ``SubprocessASGIServer``:
its API application, SQLite under ``PREFECT_HOME``, no UI) with two changes:

- in a session of its own, so the terminal's Ctrl-C reaches only the run, which
  can still tell the API that it was interrupted;
- with a parent-death signal (Linux ``PR_SET_PDEATHSIG``): when the CLI dies, even
  by SIGKILL, the kernel sends the server SIGTERM.  ``stop()`` ends it otherwise.

The run itself stays an ordinary Prefect flow, as scheduled runs and deployments are.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 180  # a first start migrates its database; a loaded machine needed over 20 s


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: stop() is then the only way it ends
        pass


def _server_class():
    from prefect.server.api.server import SubprocessASGIServer

    class OwnedServer(SubprocessASGIServer):
        """Prefect's subprocess API server, in its own session and tied to this process's life."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            import prefect
            from prefect.settings import get_current_settings

            env = {
                **os.environ,
                **get_current_settings().to_environment_variables(exclude_unset=True),
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
            }
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    str(prefect.__module_path__.parent),
                    "--factory",
                    "prefect.server.api.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "error",
                    "--lifespan",
                    "on",
                ],
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    return OwnedServer


@contextlib.contextmanager
def prefect_api(meanwhile: Callable[[], object] | None = None) -> Iterator[str | None]:
    """The API for this block: ``PREFECT_API_URL`` if set (None), else a server this process owns (its URL).

    ``meanwhile`` runs in a thread while the server starts in its own process (loading
    the model, compiling numba code): the run's fixed cost is then the longer of the
    two, not their sum.  Its exceptions stop the server and propagate.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        if meanwhile is not None:
            meanwhile()
        yield None
        return
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = _server_class()(port=None)
    timeout = max(STARTUP_TIMEOUT_S, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    failed: list[BaseException] = []

    def prepare() -> None:
        try:
            meanwhile()
        except BaseException as exc:  # re-raised in the caller's thread
            failed.append(exc)

    # The server starts from this thread: its parent-death signal fires when the thread that
    # started it ends, so that must be the thread that lives as long as the run.
    helper = threading.Thread(target=prepare, name="crackmap-warm-up", daemon=True) if meanwhile else None
    if helper is not None:
        helper.start()
    try:
        server.start(timeout=timeout)
        if helper is not None:
            helper.join()
        if failed:
            raise failed[0]
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                _drain_to(server.api_url)
    finally:
        server.stop()


DRAIN_TIMEOUT_S = 5


def _drain_to(api_url: str) -> None:
    """Send the events and log lines still queued (a flow run's last heartbeat) while the API answers.

    Stopping the server first made Prefect's events worker fail on them, and log so.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        # best effort: what is left is Prefect's own bookkeeping, never a result
        with contextlib.suppress(Exception):
            service.drain_all(timeout=DRAIN_TIMEOUT_S)
