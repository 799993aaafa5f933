"""``crackmap run`` under Ctrl-C, SIGTERM and SIGKILL: ends promptly, says what finished, leaves no process.

Each run maps a good scene, then blocks reading a FIFO (a scene that never arrives), so the
signal always finds it mid-survey.  The tests wait on real events: a scene row in the store
(which appears whole: the GeoPackage is built aside and linked into place) and the exit.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CRACKMAP, paint_crack, write_scene

pytest.importorskip("prefect")
START_TIMEOUT_S = 420  # a loaded 2-core machine: the API, the model and a scene
END_TIMEOUT_S = 15  # the target is 5 s (docs/benchmarks.md); generous for a loaded machine


def children_of(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def scenes_done(store: Path) -> list[str]:
    if not store.exists():
        return []
    with sqlite3.connect(store, timeout=30) as con:
        return [r[0] for r in con.execute("SELECT scene_id FROM scenes WHERE status = 'done'")]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc (Linux)")
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_a_signal_ends_a_run_promptly_and_leaves_no_process(tmp_path, test_models, how):
    survey = tmp_path / "road-3"
    survey.mkdir()
    pixels = np.random.default_rng(1).integers(150, 220, (3, 500, 700), dtype=np.uint8)
    paint_crack(pixels, (40, 30), (460, 650), 6)
    write_scene(survey / "a.tif", pixels)
    os.mkfifo(survey / "b.tif")  # reading it blocks until the signal comes
    store = tmp_path / "map.gpkg"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # its own embedded API database
    run = subprocess.Popen(
        [
            *CRACKMAP,
            "run",
            str(survey),
            "--store",
            str(store),
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while scenes_done(store) != ["a"]:
            assert run.poll() is None, run.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "scene a was not mapped in time"
            time.sleep(0.5)
        helpers = children_of(run.pid)
        assert helpers, "the run's Prefect API server should be a child process"
        sent = time.monotonic()
        if how == "SIGINT":
            os.killpg(run.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the whole process group
        else:
            os.kill(run.pid, getattr(signal, how))
        out, err = run.communicate(timeout=120)
        ended_s = time.monotonic() - sent
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    if how != "SIGKILL":
        assert run.returncode == 130, err[-3000:]
        assert ended_s < END_TIMEOUT_S
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("interrupted")]
        assert lines == [
            "interrupted: 1 scenes finished in this run (a); nothing half-written was kept. "
            "Run the same command again to resume (finished scenes are skipped)."
        ]
        assert "Traceback" not in err + out
    deadline = time.monotonic() + 10  # SIGKILL: the kernel tells the server its parent died
    while any(alive(pid) for pid in helpers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in helpers if alive(pid)], "a process of the run outlived it"
    assert scenes_done(store) == ["a"]
    with sqlite3.connect(store) as con:
        assert con.execute("SELECT count(*) FROM scenes WHERE scene_id = 'b'").fetchone() == (0,)
    leftovers = [p.name for p in (tmp_path / "map-probability" / "road-3").iterdir()]
    assert leftovers == ["a.test-b16-1.0.0.tif"]  # no staged or partial files
