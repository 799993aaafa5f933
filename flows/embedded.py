"""The Prefect API of a ``crackmap run`` without a server: a child process the run owns.

With ``PREFECT_API_URL`` unset, Prefect would start its "ephemeral" API as a child
process (uvicorn) in the terminal's process group, and only once the flow is called.
``ApiServer`` starts the same server (Prefect's API application, SQLite under
``PREFECT_HOME``, no UI) with these changes:

- as early as the command knows it needs one, before this process imports Prefect,
  loads the model and compiles numba code: the server's start (a new interpreter
  importing Prefect's server, ~5 s) runs on another core alongside that work instead
  of after it, and this process never imports Prefect's server;
- in a session of its own, so the terminal's Ctrl-C reaches only the run, which
  can still tell the API that it was interrupted;
- with a parent-death signal (Linux ``PR_SET_PDEATHSIG``): when the CLI dies, even
  by SIGKILL, the kernel sends the server SIGTERM.  ``stop()`` ends it otherwise;
- without automations (nothing there to act on; ~0.6 CPU-s of its start), with rarer
  garbage collections (``GC_THRESHOLD``), and its routes built before
  the run's first call (``ApiServer.prime``).

The run's flow starts once the API answers, beside the run's warm-up (``prefect_api``).
docs/benchmarks.md ("crackmap run's fixed cost") has the measurements.
The run itself stays an ordinary Prefect flow, as scheduled runs and deployments are.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

# A run's start builds a few hundred thousand objects that live as long as the process (modules,
# Prefect's pydantic models and routes, numba's compiler); with CPython's default threshold (700)
# the cycle collector walks them ~900 times while a run starts: ~0.4 s in the run's process and as
# much in its API server.  Both keep this threshold for their life: collections stay on, 70 times
# rarer (after 50,000 new container objects; a scene's pixels are arrays, which do not count).
GC_THRESHOLD = (50_000, 10, 10)
# The API server's interpreter: uvicorn, as ``python -m uvicorn`` runs it, with that threshold.
SERVE = f"import gc, sys; gc.set_threshold{GC_THRESHOLD}; from uvicorn.main import main; sys.exit(main())"

PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 180  # a first start migrates its database; a loaded machine needed over 20 s
STOP_TIMEOUT_S = 5
PORT_IN_USE = 3  # uvicorn's exit status when it cannot bind


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: stop() is then the only way it ends
        pass


def quiet_prefect_environment(verbose: bool) -> None:
    """Prefect's own log lines (this process and the API server's) only with ``crackmap -v``;
    no telemetry (nothing outside may be reachable).  Variables already set win."""
    level = "INFO" if verbose else "CRITICAL"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", level)
    # its background services (events, logs) report under prefect._internal, with their own level
    os.environ.setdefault("PREFECT_INTERNAL_LOGGING_LEVEL", level)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api_url_configured() -> bool:
    """Whether Prefect is pointed at an API (environment or profile), so none is started."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


class ApiServer:
    """Prefect's API application served by uvicorn on loopback, in a child process of this one.

    Start it from the thread that lives as long as the run (the main thread): the
    parent-death signal fires when the thread that started the child ends.
    """

    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen | None = self._spawn()
        atexit.register(self.stop)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen:
        spec = importlib.util.find_spec("prefect")  # finds the package without importing it
        assert spec is not None and spec.origin is not None, "Prefect is not installed"
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            # no automations: their two services cost ~0.6 CPU-s of the start, and a run's own
            # server has none to act on (a Prefect server the user runs is used instead, if set)
            "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
        }
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVE,
                "--app-dir",
                str(Path(spec.origin).parents[1]),
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
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Return once the API answers its health check; RuntimeError if it exits or times out."""
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5) as client:
            while True:
                assert self.process is not None, "the server was stopped"
                status = self.process.poll()
                if status == PORT_IN_USE:  # taken between our choice and its bind: another port
                    self.port = _free_port()
                    self.process = self._spawn()
                    continue
                if status is not None:
                    raise RuntimeError(f"Prefect's API server exited with status {status} before it answered")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Timed out after {timeout_s:.0f} s while attempting to connect to the "
                        "ephemeral Prefect API server"
                    )
                time.sleep(0.05)  # a readiness probe: the child gives no other sign that it listens

    def prime(self) -> None:
        """Have the server build its routing now, not on the run's first API calls.

        FastAPI (0.150) builds each router's route table on the first request that reaches
        that router, about half a CPU-second for Prefect's API in all.  A request that no
        route serves reaches every router; sent while the run's warm-up still runs, it takes
        that cost off the run's critical path.  Best effort: a failure here only loses the gain.
        """
        import httpx

        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{self.api_url}/crackmap-no-such-route", timeout=30)  # answered 404

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; waits until the child is gone.  Safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# What a flow run's start imports, here while the warm-up runs: Prefect's engines, and FastAPI's
# JSON encoder (Prefect's flow parameters go through it), ~0.3 s otherwise on the critical path.
FLOW_RUN_IMPORTS = ("prefect.flow_engine", "prefect.task_engine", "fastapi.encoders")

_started: list[ApiServer] = []  # the one ``flows.launch`` started before the command was parsed


def start_api_server() -> ApiServer | None:
    """A server for this run, started now (or the one already started for this process), unless
    ``PREFECT_API_URL`` is in the environment.

    Call it before the slow imports: a Prefect profile's API URL is found only once
    Prefect is imported, and ``prefect_api`` then stops the server unused.
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    if not _started or _started[0].process is None:
        _started[:] = [ApiServer()]
    return _started[0]


@contextlib.contextmanager
def prefect_api(
    warm_up: Callable[[], object] | None = None,
    server: ApiServer | None = None,
    imports: Sequence[str] = (),
) -> Iterator[str | None]:
    """The API for this block: ``PREFECT_API_URL`` if configured (None), else a server this process owns (its URL).

    ``server`` is one ``start_api_server`` started earlier; without it one starts here.

    ``warm_up`` is work the block's scenes need first (compiling numba code), run in a thread
    from the start, while Prefect is imported here and the server starts.  The block does not
    wait for it: it starts once the API answers, and its flow run's first API calls overlap
    the warm-up.  A scene that needs the work first waits for it on that work's own lock
    (numba's compiler lock).  If the warm-up fails, the scene meets the same failure and
    reports it, so the warm-up's own exceptions are dropped.  The block's end waits for the
    warm-up (unless Ctrl-C ended it), so that the thread never runs into the interpreter's exit.

    Once the server answers, the server builds its routing (``ApiServer.prime``) and this
    thread imports what a flow run's start needs and ``imports`` (the block's flow modules).

    In the block, flow runs send no heartbeats to a server this process owns: they exist so
    that a server can mark a run whose process died as crashed, and this server dies with
    the run.  Stopping a flow run's heartbeat thread otherwise waits up to a second.
    """

    def warm() -> None:
        with contextlib.suppress(Exception):  # met again, and reported, where the block needs it
            warm_up()

    helper = threading.Thread(target=warm, name="crackmap-warm-up", daemon=True) if warm_up else None
    if helper is not None:
        helper.start()
    try:
        if api_url_configured():  # imports Prefect
            if server is not None:
                server.stop()
            yield None
        else:
            from prefect.settings import (
                PREFECT_API_URL,
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
                temporary_settings,
            )

            server = server or ApiServer()
            server.wait_ready()
            server.prime()
            for module in (*FLOW_RUN_IMPORTS, *imports):
                importlib.import_module(module)
            with temporary_settings(
                {PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
            ):
                try:
                    yield server.api_url
                finally:
                    _drain_to(server.api_url)
    except KeyboardInterrupt:  # Ctrl-C: the command ends at once (os._exit), not after the warm-up
        raise
    except BaseException:
        if helper is not None:
            helper.join()
        raise
    else:
        if helper is not None:
            helper.join()
    finally:
        if server is not None:
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
