"""Progress reports from long work, to whoever listens (a CLI bar, a Prefect artifact).

The pipeline reports; it does not know who listens.  Listeners live in this
process only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

# listener(scene_id, chips_done, chips_total)
Listener = Callable[[str, int, int], None]
_listeners: list[Listener] = []


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Call ``listener`` with every progress report made inside this block."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def report(scene_id: str, done: int, total: int) -> None:
    """Report that ``done`` of ``total`` chips of a scene are through the network."""
    for listener in list(_listeners):
        listener(scene_id, done, total)
