"""The epoll loop's stop: one that comes before run() is not lost."""

from __future__ import annotations

import threading
import time

from wgpy.io.loop import Loop


def test_a_stop_before_run_makes_run_return_at_once() -> None:
    """The daemon's stop signals are caught before its loop runs (daemon.StopSignals): a
    SIGTERM during start-up stops the loop before run(), which must then not serve on."""
    loop = Loop(lambda: None, 0.01)
    backstop = threading.Timer(3, loop.stop)  # bounds the test if the stop were lost
    backstop.start()
    try:
        loop.stop()
        started = time.monotonic()
        loop.run()
        assert time.monotonic() - started < 1
    finally:
        backstop.cancel()
        loop.close()


def test_a_stop_from_a_callback_ends_the_round() -> None:
    ticks: list[float] = []
    loop = Loop(lambda: (ticks.append(time.monotonic()), loop.stop()), 0.01)
    try:
        loop.run()
        assert len(ticks) == 1
    finally:
        loop.close()
