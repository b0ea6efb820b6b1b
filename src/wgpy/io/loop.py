"""A small epoll loop: readable and writable callbacks, deferred calls and one periodic
tick. One thread, no asyncio.

Nothing raised by a callback or by the tick stops the loop: it is logged, and the loop
goes on (a bug, or a transient error such as running out of file descriptors, costs that
event, never the running tunnel).
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable

log = logging.getLogger("wgpy.loop")

_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
# events per poll: the loop watches a handful of descriptors (TUN, UDP, the UAPI listener
# and its clients), and poll() allocates room for this many on every call (its default,
# 1023, is 12 KiB malloc'd and freed per wake-up)
MAX_EVENTS = 64


class Loop:
    def __init__(self, tick: Callable[[], None], tick_interval: float = 0.1) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._soon: list[Callable[[], None]] = []
        self._tick = tick
        self._interval = tick_interval
        self._stopping = False

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._watch(fd, self._readers, callback)

    def remove_reader(self, fd: int) -> None:
        self._unwatch(fd, self._readers)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Call `callback` whenever `fd` can take more output (level-triggered)."""
        self._watch(fd, self._writers, callback)

    def remove_writer(self, fd: int) -> None:
        self._unwatch(fd, self._writers)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, after this round of events; the next poll does not wait.
        For work done a slice at a time, with the datapath served in between."""
        self._soon.append(callback)

    def _mask(self, fd: int) -> int:
        return (select.EPOLLIN if fd in self._readers else 0) | (
            select.EPOLLOUT if fd in self._writers else 0
        )

    def _watch(
        self, fd: int, table: dict[int, Callable[[], None]], callback: Callable[[], None]
    ) -> None:
        known = self._mask(fd)
        table[fd] = callback
        if known:
            self._epoll.modify(fd, self._mask(fd))
        else:
            self._epoll.register(fd, self._mask(fd))

    def _unwatch(self, fd: int, table: dict[int, Callable[[], None]]) -> None:
        if table.pop(fd, None) is None:
            return
        mask = self._mask(fd)
        try:
            if mask:
                self._epoll.modify(fd, mask)
            else:
                self._epoll.unregister(fd)
        except OSError:  # already closed
            pass

    def stop(self) -> None:
        """End `run` after this round of events. A stop that comes before `run` (a signal
        while the daemon is still being made) makes `run` return at once: not lost."""
        self._stopping = True

    def run(self) -> None:
        readers = self._readers
        writers = self._writers
        poll = self._epoll.poll
        next_tick = time.monotonic() + self._interval
        while not self._stopping:
            timeout = 0.0 if self._soon else max(0.0, next_tick - time.monotonic())
            try:
                events = poll(timeout, MAX_EVENTS)
            except InterruptedError:
                continue
            for fd, mask in events:
                if mask & _READ:
                    callback = readers.get(fd)
                    if callback is not None:
                        try:
                            callback()
                        except Exception:  # a bug costs that event, never the tunnel
                            log.exception("error handling fd %d", fd)
                if mask & _WRITE:
                    callback = writers.get(fd)
                    if callback is not None:
                        _call(callback, fd)
            if self._soon:
                soon, self._soon = self._soon, []
                for callback in soon:
                    _call(callback, -1)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self._interval
                _call(self._tick, -1)

    def close(self) -> None:
        self._epoll.close()


def _call(callback: Callable[[], None], fd: int) -> None:
    try:
        callback()
    except Exception:  # a bug costs that event, never the running tunnel
        log.exception("error handling %s", f"fd {fd}" if fd >= 0 else "a deferred call")
