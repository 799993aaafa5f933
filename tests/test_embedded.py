"""``flows.embedded.prefect_api``: the block starts once the API answers, not after the warm-up."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("prefect")
from prefect import flow  # noqa: E402
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings  # noqa: E402

from flows.embedded import prefect_api  # noqa: E402

WAIT_S = 120  # what the warm-up waits for the block at most: the server's start on a loaded machine


@flow(name="crackmap-embedded-test")
def plain_flow(x: int) -> int:
    return x + 1


def test_a_runs_own_api_starts_the_block_while_the_warm_up_runs_and_sends_no_heartbeats(
    tmp_path, monkeypatch
):
    """The warm-up waits until the block has begun: it finishes in time only if the block does
    not wait for it.  A flow run in the block completes; its heartbeats are off (the server
    dies with the run, so nothing could use them)."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # the server's own database
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    block_began = threading.Event()
    warm_up_saw_the_block = []

    def warm_up() -> None:
        warm_up_saw_the_block.append(block_began.wait(timeout=WAIT_S))

    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # other tests' API is not this one's
        with prefect_api(warm_up) as url:
            block_began.set()
            assert url is not None and url.startswith("http://127.0.0.1:")
            assert get_current_settings().flows.heartbeat_frequency is None
            state = plain_flow(1, return_state=True)
            assert state.is_completed() and state.result() == 2
        assert get_current_settings().flows.heartbeat_frequency is not None  # only inside the block
    assert warm_up_saw_the_block == [True]  # and the block waited for it at its end


CONFIGURED = {PREFECT_API_URL: "http://127.0.0.1:9/api"}  # used as it is (not contacted here): no server


def test_a_failing_warm_up_is_left_to_the_block(monkeypatch):
    """A warm-up's failure does not end the block, nor reach the thread's excepthook: the scene
    that needs that work meets the same failure and reports it as its own."""
    unhandled = []
    monkeypatch.setattr(threading, "excepthook", unhandled.append)

    def warm_up() -> None:
        raise RuntimeError("numba could not compile")

    with temporary_settings(CONFIGURED), prefect_api(warm_up) as url:
        assert url is None
    assert unhandled == []


@pytest.mark.parametrize("ending", [RuntimeError, KeyboardInterrupt])
def test_a_block_that_fails_waits_for_the_warm_up_but_ctrl_c_does_not(ending):
    """An error in the block waits for the warm-up (so that it never runs into the interpreter's
    exit); Ctrl-C ends the command at once.  The warm-up here waits 2 s for nothing."""
    finished = []

    def warm_up() -> None:
        threading.Event().wait(timeout=2)
        finished.append(True)

    with pytest.raises(ending), temporary_settings(CONFIGURED), prefect_api(warm_up):
        raise ending("the block failed")
    assert finished == ([True] if ending is RuntimeError else [])
