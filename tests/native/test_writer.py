"""The receive direction's writer stage (src/native/writer.c `TunWriter`): write_tun's
writes made on a thread of their own from a bounded queue. They must come out in order and
byte for byte as write_tun makes them, however far the queue runs ahead of the descriptor
(a SEQPACKET socket here: one message per write, as a TUN takes them, and a reader that
lags, so that the writer blocks and the queue fills); the packets' buffers must live until
they are written; the failed writes come back, later, as write_tun returns them, for
Tun.write_batch's outcomes (the USO fallback, TunGone); close, flush and fork behave."""

from __future__ import annotations

import errno
import gc
import os
import random
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.io.test_offload import flow, udp
from tests.native.test_spans import ICMP, opened
from wgpy.core.output import ToTun
from wgpy.io import offload
from wgpy.io.tun import Tun, TunGone

native = pytest.importorskip(
    "wgpy._native", reason="wgpy._native is not built (python setup.py build_ext --inplace)"
)


class Reader:
    """The far end of a SEQPACKET pair, read on a thread: what the writes delivered. It
    starts paused (`go` starts it), so that the writer blocks and its queue fills."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # room for two of the longest writes (64 KiB), no more: the queue fills quickly
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 70000)
        self.messages: list[bytes] = []
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        self.started.wait(30)
        self.messages.extend(iter(lambda: self.theirs.recv(1 << 17), b""))

    def go(self) -> None:
        self.started.set()

    def fileno(self) -> int:
        return self.ours.fileno()

    def finish(self) -> list[bytes]:
        self.go()
        self.ours.shutdown(socket.SHUT_WR)
        self.thread.join(30)
        self.ours.close()
        self.theirs.close()
        return self.messages


def go_once_waited(reader: Reader, writer: Any, seconds: float = 10) -> None:
    """Start the reader once the writer's caller has waited for room (or after `seconds`:
    a small batch on an idle queue blocks in its own write instead)."""
    deadline = time.monotonic() + seconds
    while writer.counts()[2] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    reader.go()


def batches(seed: int, count: int) -> Iterator[tuple[list[ToTun], list[ToTun]]]:
    """(native items: Spans and packets, the same as bytes) for `count` turns of traffic:
    TCP flows that coalesce, UDP runs (USO writes), lone packets."""
    rng = random.Random(seed)
    for i in range(count):
        packets = flow(rng.choice([1, 3, 20, 44]), rng.choice([100, 1000, 1400]), seq=9**6 * i)
        packets += [udp(bytes([i % 256]) * 300, ip_id=k) for k in range(rng.choice([0, 5]))]
        yield opened(packets, rng.randrange(2**32), rng.randrange(1, 3))


def test_many_batches_come_out_in_order_as_write_tun_makes_them() -> None:
    """Batches queued faster than the descriptor takes them (the writer blocks, the queue
    fills), mixed with small ones that find the queue empty and are written on the
    caller: every write, in order, is the reference coalescer's (counts: queued, inline,
    waits)."""
    reader = Reader()
    writer = native.TunWriter(depth=3)
    want: list[bytes] = []
    threading.Thread(target=go_once_waited, args=(reader, writer, 0.5)).start()
    try:
        for got, ref in batches(1, 150):
            assert writer.write(reader.fileno(), got, True) == []
            want += offload.coalesce(ref, True)
        assert writer.flush() == []
        assert writer.write(reader.fileno(), [ICMP]) == []  # idle and small: on the caller
        want += offload.coalesce([ICMP])
        queued, inline, _ = writer.counts()
        assert queued > 50 and inline >= 1
    finally:
        writer.close()
        assert reader.finish() == want


def test_a_full_queue_makes_the_caller_wait_without_the_gil() -> None:
    """The writer blocked on a descriptor that takes nothing, its queue full: the caller
    waits for room, and the GIL is free meanwhile (the reader, a Python thread, runs
    because of it and frees the writer); everything comes out, in order."""
    reader = Reader()
    writer = native.TunWriter(depth=2, inline=0)
    want: list[bytes] = []
    threading.Thread(target=go_once_waited, args=(reader, writer)).start()
    try:
        for got, ref in batches(5, 30):
            assert writer.write(reader.fileno(), got, True) == []
            want += offload.coalesce(ref, True)
        assert writer.flush() == []
        assert writer.counts()[2] > 0
    finally:
        writer.close()
        assert reader.finish() == want


def churn() -> None:
    """Allocate and fill what a freed buffer would be reused for."""
    junk = [bytes([i]) * n for i in range(200) for n in (1500, 9000, 65000)]
    del junk
    gc.collect()


def test_the_packets_buffers_live_until_they_are_written() -> None:
    """Once queued, the caller drops every reference to the Spans and their call's
    buffers; the writer, blocked on the descriptor, still writes what they held (a freed
    buffer would come out as whatever reused it; under tests/native/sanitize.sh, a
    use-after-free)."""
    reader = Reader()
    writer = native.TunWriter(depth=8, inline=0)
    want: list[bytes] = []
    try:
        for got, ref in batches(2, 8):
            writer.write(reader.fileno(), got, True)
            want += offload.coalesce(ref, True)
            del got, ref
        churn()
        reader.go()
        assert writer.flush() == []
    finally:
        writer.close()
        assert reader.finish() == want


def refusing(fd: int, items: list[ToTun]) -> list[tuple[int, bytes]]:
    """What a writer hands back for items written to fd: nothing at once when queued, all
    of it by flush."""
    writer = native.TunWriter(inline=0)
    try:
        assert writer.write(fd, items, True) == []
        return list(writer.flush())
    finally:
        writer.close()


def test_failed_writes_come_back_as_write_tun_returns_them() -> None:
    """A descriptor that refuses every write (EBADF: open for reading; EINVAL: an epoll
    descriptor, which has no write): each failed write comes back with its errno and its
    bytes, in order, as write_tun hands them back, from the queue and on the caller."""
    tcp = flow(30, 100)
    items = [*tcp, ICMP, *[udp(b"u" * 200, ip_id=k) for k in range(4)]]
    fd = os.open("/dev/null", os.O_RDONLY)
    ep = select.epoll()
    try:
        for bad, code in ((fd, errno.EBADF), (ep.fileno(), errno.EINVAL)):
            want = native.write_tun(bad, items, True)
            assert want == [(code, w) for w in offload.coalesce(items, True)]
            assert refusing(bad, items) == want
            here = native.TunWriter()  # idle and small: written and answered at once
            assert here.write(bad, [ICMP]) == [(code, offload.coalesce([ICMP])[0])]
            here.close()
    finally:
        os.close(fd)
        ep.close()


def test_a_batch_that_raises_keeps_what_the_earlier_ones_found() -> None:
    """A write whose batch cannot be made (a packet that is no buffer) raises, after the
    earlier batches' failed writes were collected: they come back with the next call,
    once, not lost (review F3: a USO refusal or TunGone missed)."""
    fd = os.open("/dev/null", os.O_RDONLY)
    writer = native.TunWriter(inline=0)
    try:
        assert writer.write(fd, [ICMP]) == []  # queued: EBADF, found by the thread
        deadline = time.monotonic() + 0.3  # raises well after it counted the batch done
        while time.monotonic() < deadline:
            with pytest.raises(TypeError):
                writer.write(fd, [object()])
            time.sleep(0.01)
        assert writer.write(fd, []) == [(errno.EBADF, offload.coalesce([ICMP])[0])]
        assert writer.flush() == []
    finally:
        writer.close()
        os.close(fd)


def test_a_report_that_raises_loses_none_of_the_later_batches() -> None:
    """Collecting the batches the thread wrote, one's report raises (no memory: any one
    allocation of the call made to fail, in turn): the batches after it stay for the next
    call, which returns their failed writes; only the failing one's may be lost."""
    testcapi = pytest.importorskip("_testcapi")
    batches = 3
    fd = os.open("/dev/null", os.O_RDONLY)
    raised = 0
    try:
        for nth in range(20):
            writer = native.TunWriter(inline=0)
            for _ in range(batches):  # each write refused (EBADF), found by the thread
                assert writer.write(fd, [ICMP]) == []
            time.sleep(0.1)  # written by then: the thread's writev is refused at once
            found: list[object] = []
            testcapi.set_nomemory(nth, nth + 1)  # the nth allocation from here fails
            try:
                found = writer.write(fd, [])  # (nothing else allocates till the hooks go)
            except MemoryError:
                raised += 1
            finally:
                testcapi.remove_mem_hooks()
            found += writer.write(fd, []) + writer.flush()
            writer.close()
            assert len(found) >= batches - 1, (nth, found)
    finally:
        os.close(fd)
    assert raised > 0, "no allocation of the collect failed"


def tun_on(fd: int, writer: Any) -> Tun:
    tun = Tun.__new__(Tun)  # a TUN whose descriptor refuses every write
    tun._fd, tun.name, tun.vnet_hdr, tun.coalesce_udp = fd, "t", True, True
    tun._ctl = None
    tun.use_writer(writer)
    return tun


def test_the_tuns_outcomes_through_the_writer() -> None:
    """Tun.write_batch with a writer: the failures of queued writes are handled when they
    come back (the next write, or `collect` on the loop's tick): a USO write refused with
    EINVAL turns USO off for good; a refused TCP write means the interface is gone."""
    ep = select.epoll()
    tun = tun_on(ep.fileno(), native.TunWriter(inline=0))
    try:
        tun.write_batch([udp(b"u" * 200, ip_id=k) for k in range(4)], 1420)
        assert tun.coalesce_udp  # queued: its refusal is not back yet
        until(lambda: tun.collect(1420) or not tun.coalesce_udp)
        tun.write_batch(flow(20, 100), 1420)  # USO off: the datagrams one by one from now
        with pytest.raises(TunGone):
            until(lambda: tun.collect(1420))
    finally:
        assert tun.writer is not None
        tun.writer.close()
        ep.close()


def until(check: Callable[[], object]) -> None:
    """Run check until it is true, for at most 5 s (the writer thread's pace)."""
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, "the writer did not get there"
        time.sleep(0.005)


def test_close_writes_the_queue_out_and_later_writes_are_made_on_the_caller() -> None:
    """Tun.close closes the writer before the descriptor: what was queued is written
    first (never to a descriptor number that was closed and reused); a write after
    close is made at once, on the caller, and fails like any write to a closed TUN."""
    reader = Reader()
    writer = native.TunWriter(inline=0)
    tun = tun_on(os.dup(reader.fileno()), writer)
    want: list[bytes] = []
    for got, ref in batches(3, 6):
        tun.write_batch(got, 1420)
        want += offload.coalesce(ref, True)
    closer = threading.Thread(target=tun.close)
    closer.start()
    time.sleep(0.1)
    reader.go()
    closer.join(30)
    assert not closer.is_alive() and tun.fileno() == -1
    _, inline, _ = writer.counts()
    assert writer.write(-1, [ICMP]) == [(errno.EBADF, offload.coalesce([ICMP])[0])]
    assert writer.counts()[1] == inline + 1
    writer.close()  # twice: nothing more
    assert reader.finish() == want


def test_a_child_of_fork_writes_on_its_own_thread() -> None:
    """After fork the child has no writer thread: its writes are made on the caller (a
    queued write would wait forever), and what the parent had queued is the parent's."""
    reader = Reader()
    writer = native.TunWriter(depth=2, inline=0)
    for got, _ in batches(4, 4):
        writer.write(reader.fileno(), got, True)  # the parent's queue, blocked
    pid = os.fork()
    if pid == 0:  # the child: a write must come back, and be made here
        signal.alarm(10)
        ok = writer.write(reader.fileno(), [ICMP]) == [] and writer.counts()[1] == 1
        writer.close()
        os._exit(0 if ok else 1)
    reader.go()
    _, status = os.waitpid(pid, 0)
    assert writer.flush() == []
    writer.close()
    messages = reader.finish()
    assert status == 0
    assert offload.coalesce([ICMP])[0] in messages


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        native.TunWriter(depth=0)
    with pytest.raises(ValueError):
        native.TunWriter(depth=65)
    writer = native.TunWriter()
    with pytest.raises(TypeError):
        writer.write(0, [object()])
    assert writer.write(0, []) == []
    writer.close()
    del writer


def test_tcp_run_through_a_real_pair_matches_write_tun() -> None:
    """One batch, two ways: TunWriter and write_tun write the same messages."""
    items = [*flow(40, 200), ICMP]
    a, b = Reader(), Reader()
    a.go()
    b.go()
    writer = native.TunWriter(inline=0)
    assert writer.write(a.fileno(), items) == [] and writer.flush() == []
    writer.close()
    assert native.write_tun(b.fileno(), items) == []
    assert a.finish() == b.finish() == offload.coalesce(items)
