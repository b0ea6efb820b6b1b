"""A small epoll loop: readable callbacks plus one periodic tick. One thread, no asyncio."""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import Callable

log = logging.getLogger("wgpy.loop")


class Loop:
    def __init__(self, tick: Callable[[], None], tick_interval: float = 0.1) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._tick = tick
        self._interval = tick_interval
        self.running = False

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        if fd in self._readers:
            self._epoll.modify(fd, select.EPOLLIN)
        else:
            self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            with contextlib.suppress(OSError):  # already closed
                self._epoll.unregister(fd)

    def stop(self) -> None:
        self.running = False

    def run(self) -> None:
        self.running = True
        readers = self._readers
        poll = self._epoll.poll
        next_tick = time.monotonic() + self._interval
        while self.running:
            timeout = max(0.0, next_tick - time.monotonic())
            try:
                events = poll(timeout)
            except InterruptedError:
                continue
            for fd, _ in events:
                callback = readers.get(fd)
                if callback is not None:
                    try:
                        callback()
                    except Exception:  # a bug costs that event, never the running tunnel
                        log.exception("error handling fd %d", fd)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self._interval
                self._tick()

    def close(self) -> None:
        self._epoll.close()
