"""The UDP sends in C (src/native/send.c): `send_runs` and the sender thread `UdpSender`
against io/udp.py's Python sends, the reference, on real sockets on loopback. Each
sends the same batches; a receiver with UDP_GRO sees every GSO send as one read (with its
segment size: loopback hands the GSO packet up whole) and every plain send as a read of
its own, so equal reads mean equal system calls, datagram for datagram. Sticky sources
(and one gone), a kernel that refuses GSO, segments above the path MTU (in a namespace
of the test's own), the thread's order, buffers held while queued, its findings coming
back late, close and fork."""

from __future__ import annotations

import gc
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.io.test_sticky import mapped_pktinfo, recv_all
from tests.namespaces import run_in_new_namespace
from wgpy.core.endpoint import Endpoint
from wgpy.core.output import Run
from wgpy.io.udp import UdpSocket

native = pytest.importorskip(
    "wgpy._native", reason="wgpy._native is not built (python setup.py build_ext --inplace)"
)

KINDS = ["python", "native", "sender"]
SO_NO_CHECK = 11
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def socket_of(kind: str, **sender: int) -> UdpSocket:
    """A UdpSocket sending through the Python reference, `send_runs` or a `UdpSender`."""
    sock = UdpSocket()
    if kind != "python":
        sock.use_native(native.send_runs, native.UdpSender(**sender) if kind == "sender" else None)
    return sock


def settle(sock: UdpSocket) -> None:
    """Wait until the sender thread has sent what it queued, and learn what it found."""
    if sock.sender is not None:
        sock._learn(sock.sender.flush())


def reads(sock: UdpSocket, quiet: float = 0.2) -> list[tuple[bytes, int]]:
    """(read, GRO segment size) of everything that arrives until `quiet` s pass without."""
    buf = memoryview(bytearray(70000))
    got: list[tuple[bytes, int]] = []
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        r = sock.recv_into(buf)
        if r is None:
            time.sleep(0.002)
            continue
        got.append((bytes(buf[: r[0]]), r[1]))
        last = time.monotonic()
    return got


def random_runs(rng: random.Random, endpoints: list[Endpoint]) -> list[Run]:
    """A batch as the core seals it: lone datagrams, GSO runs (a shorter last or not, past
    64 segments or 65,000 bytes), to a few endpoints."""
    runs: list[Run] = []
    for _ in range(rng.randrange(1, 6)):
        size = rng.choice([1, 60, 148, 1000, 1420, 1452])
        count = rng.choice([1, 1, 2, 7, 44, 64, 65, 100])
        if size == 1:
            count = rng.choice([1, 3, 64, 130])
        last = rng.randrange(1, size + 1)
        tag = bytes([rng.randrange(256)])
        buf = tag * (size * (count - 1) + last)
        runs.append((buf, len(buf) if count == 1 else size, rng.choice(endpoints)))
    return runs


@pytest.fixture
def receiver() -> Iterator[UdpSocket]:
    sock = UdpSocket()
    try:
        assert sock.gro
        yield sock
    finally:
        sock.close()


def send_all(kind: str, batches: list[list[Run]], receiver: UdpSocket) -> list[tuple[bytes, int]]:
    sender = socket_of(kind)
    try:
        for runs in batches:
            sender.send_runs(runs)
            settle(sender)  # the receiver must not overflow: a batch at a time
            assert sender.gso
        return reads(receiver)
    finally:
        sender.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batches_arrive_as_the_reference_sends_them(seed: int, receiver: UdpSocket) -> None:
    """Random batches to IPv4 and IPv6 loopback: the same reads, GSO sends included, from
    the Python sends, send_runs and the sender thread."""
    rng = random.Random(seed)
    endpoints = [("127.0.0.1", receiver.port), ("::1", receiver.port)]
    batches = [random_runs(rng, endpoints) for _ in range(12)]
    want = send_all("python", batches, receiver)
    assert any(seg for _, seg in want) and any(not seg for _, seg in want)
    for kind in KINDS[1:]:
        assert send_all(kind, batches, receiver) == want, kind


def test_a_lone_datagram_is_one_sendmsg_and_a_run_is_gso(receiver: UdpSocket) -> None:
    ep = ("127.0.0.1", receiver.port)
    for kind in KINDS:
        sock = socket_of(kind)
        try:
            sock.send_runs([(b"ping", 4, ep), (b"a" * 300 + b"b" * 300 + b"c", 300, ep)])
            settle(sock)
            assert reads(receiver) == [(b"ping", 0), (b"a" * 300 + b"b" * 300 + b"c", 300)]
        finally:
            sock.close()


def test_sticky_sources_and_one_gone(receiver: UdpSocket) -> None:
    """A remembered source goes on every send (127.0.0.2, where the kernel would pick
    127.0.0.1), plain and GSO; one that is no address here (198.51.100.7, as after `ip
    addr del`) is refused, forgotten, and the datagrams go from the kernel's choice, the
    batch's later ones too; GSO stays on. The same for all three."""
    theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    theirs.bind(("127.0.0.1", 0))
    ep = theirs.getsockname()
    batch = [(b"one", 3, ep), (b"g" * 100 + b"h" * 100 + b"i", 100, ep), (b"two", 3, ep)]
    want = [(b"one", ""), (b"g" * 100, ""), (b"h" * 100, ""), (b"i", ""), (b"two", "")]
    try:
        for kind in KINDS:
            sock = socket_of(kind)
            try:
                for source, host in (("127.0.0.2", "127.0.0.2"), ("198.51.100.7", "127.0.0.1")):
                    sock.learn_source(ep, mapped_pktinfo(source))
                    sock.send_runs(batch)
                    settle(sock)
                    assert recv_all(theirs, 5) == [(d, host) for d, _ in want], (kind, source)
                    assert sock.source(ep) == (source if host == source else None)
                    assert sock.gso
                # forgotten: the next batch goes from the kernel's choice without trying
                sock.send_runs(batch[:1])
                settle(sock)
                assert recv_all(theirs, 1) == [(b"one", "127.0.0.1")]
            finally:
                sock.close()
    finally:
        theirs.close()


def test_a_source_gone_is_forgotten_for_its_endpoint_alone() -> None:
    """Two endpoints that are one address ("127.0.0.1" and "::ffff:127.0.0.1", the same
    sockaddr on a v6 socket), each with a source: the first's is gone. It is forgotten for
    that endpoint, as UdpSocket forgets it; the other's sends still go from its own
    (127.0.0.2), in C as in the reference (C forgot it by address: review F4)."""
    theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    theirs.bind(("127.0.0.1", 0))
    port = theirs.getsockname()[1]
    gone, kept = ("127.0.0.1", port), ("::ffff:127.0.0.1", port)
    batch = [(b"one", 3, gone), (b"two", 3, kept), (b"g" * 10 + b"h" * 10, 10, kept)]
    want = [(b"one", "127.0.0.1"), (b"two", "127.0.0.2"), (b"g" * 10, "127.0.0.2"),
            (b"h" * 10, "127.0.0.2")]  # fmt: skip
    try:
        for kind in KINDS:
            sock = socket_of(kind)
            try:
                sock.learn_source(gone, mapped_pktinfo("198.51.100.7"))
                sock.learn_source(kept, mapped_pktinfo("127.0.0.2"))
                sock.send_runs(batch)
                settle(sock)
                assert sorted(recv_all(theirs, 4)) == sorted(want), kind
                assert (sock.source(gone), sock.source(kept)) == (None, "127.0.0.2"), kind
            finally:
                sock.close()
    finally:
        theirs.close()


class Counted(tuple[str, int]):
    """An endpoint that counts the comparisons made of it."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        Counted.compared += 1
        return tuple.__eq__(self, other)  # type: ignore[arg-type]

    __hash__ = tuple.__hash__


def test_making_a_batch_compares_no_endpoints() -> None:
    """Every run with a source, to one endpoint spelled as many equal objects: the batch
    compares each only where `dests` looks it up, never with the batch's earlier runs
    (that was quadratic with the GIL held: review F4; a gone source is forgotten for the
    runs that share its destination object, which `dests` gives equal endpoints)."""
    info = mapped_pktinfo("127.0.0.2")
    sockaddr = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")
    addr = socket.AF_INET6.to_bytes(2, "little") + (9).to_bytes(2, "big") + bytes(4) + sockaddr
    addr += bytes(4)
    dests = {Counted(("127.0.0.1", 9)): (addr, info)}
    runs = [(b"x", 1, Counted(("127.0.0.1", 9))) for _ in range(64)]
    Counted.compared = 0
    assert native.send_runs(-1, runs, dests, dest, True) == []  # EBADF: dropped
    assert Counted.compared <= len(runs)


def test_an_empty_run_is_an_empty_datagram(receiver: UdpSocket) -> None:
    """A run with nothing in it (size 0 or not) goes as one empty datagram, as the
    reference sends it (C refused a size of 0: review F5)."""
    ep = ("127.0.0.1", receiver.port)
    for kind in KINDS:
        sock = socket_of(kind)
        try:
            sock.send_runs([(b"", 0, ep), (b"", 5, ep), (b"x", 1, ep)])
            settle(sock)
            assert reads(receiver) == [(b"", 0), (b"", 0), (b"x", 0)], kind
        finally:
            sock.close()


def test_a_source_learnt_again_is_used_again(receiver: UdpSocket) -> None:
    """The destination C gets is made anew when the source changes (learn_source) or is
    forgotten (forget_source), not kept from before."""
    theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    theirs.bind(("127.0.0.1", 0))
    ep = theirs.getsockname()
    sock = socket_of("native")
    try:
        for source in ("127.0.0.2", "127.0.0.3", None, "127.0.0.4"):
            if source is None:
                sock.forget_source(ep)
            else:
                sock.learn_source(ep, mapped_pktinfo(source))
            sock.send_runs([(b"x", 1, ep)])
            assert recv_all(theirs, 1) == [(b"x", source or "127.0.0.1")]
    finally:
        sock.close()
        theirs.close()


def test_gso_refused_falls_back_for_good(receiver: UdpSocket) -> None:
    """A socket without UDP checksums can't use GSO (EINVAL): each of the three turns GSO
    off and sends the datagrams one by one, the same reads."""
    ep = ("127.0.0.1", receiver.port)
    data = b"".join(bytes([i]) * 1000 for i in range(10))
    batch = [(data, 1000, ep), (b"lone", 4, ep), (data[:3000], 1000, ep)]
    want = [(data[i : i + 1000], 0) for i in range(0, len(data), 1000)]
    want += [(b"lone", 0), *want[:3]]
    for kind in KINDS:
        sock = socket_of(kind)
        try:
            sock._sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            sock.send_runs(batch)
            settle(sock)
            assert not sock.gso
            assert reads(receiver) == want, kind
        finally:
            sock.close()


MTU_SCRIPT = """
import sys
sys.path.insert(0, {src!r})
sys.path.insert(0, {root!r})
from tests.native.test_udp_send import KINDS, reads, send_all
from wgpy.io.udp import UdpSocket
b = UdpSocket()
ep = ("127.0.0.1", b.port)
batch = [[(b"".join(bytes([i]) * 1400 for i in range(10)), 1400, ep), (b"ok", 2, ep),
          (bytes(1100) * 3, 1100, ep)]]
got = [send_all(kind, batch, b) for kind in KINDS]
assert got[0] == got[1] == got[2], got
assert [len(d) for d, _ in got[0]] == [1400] * 10 + [2, 3300], got[0]
print("ok")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace")
def test_segments_above_the_path_mtu_go_one_by_one() -> None:
    """In a namespace whose loopback MTU (1280) is below the segment size, the kernel
    refuses that GSO send (EMSGSIZE): its datagrams go one by one (IP fragments them),
    GSO stays on for the next run; the same for all three."""
    run_in_new_namespace("wgpy-send", [["link", "set", "lo", "mtu", "1280", "up"]], MTU_SCRIPT)


def test_an_endpoint_that_is_no_address_is_dropped(receiver: UdpSocket) -> None:
    """A host that is no address of the socket's family (a name that does not resolve):
    the reference's send fails and drops it; C gets no destination and drops it too; the
    rest of the batch goes."""
    ep = ("127.0.0.1", receiver.port)
    for kind in KINDS:
        sock = socket_of(kind)
        try:
            sock.send_runs([(b"x" * 20, 10, ("no-such-host.invalid", 9)), (b"y", 1, ep)])
            settle(sock)
            assert reads(receiver) == [(b"y", 0)]
        finally:
            sock.close()


# ---- the sender thread ---------------------------------------------------------------


class Stream:
    """A TCP connection on loopback as the sender's descriptor: sendmsg takes (and
    ignores) the address and the control messages, and blocks while the reader, paused at
    first, reads nothing: the thread blocks, its queue fills. What arrives is every
    datagram's bytes, in order."""

    def __init__(self) -> None:
        server = socket.create_server(("127.0.0.1", 0))
        self.ours = socket.create_connection(server.getsockname())
        self.theirs, _ = server.accept()
        server.close()
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.ours.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no 40 ms waits
        self.data = bytearray()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        self.started.wait(30)
        while chunk := self.theirs.recv(1 << 16):
            self.data += chunk

    def fileno(self) -> int:
        return self.ours.fileno()

    def finish(self) -> bytes:
        self.started.set()
        self.ours.shutdown(socket.SHUT_WR)
        self.thread.join(30)
        self.ours.close()
        self.theirs.close()
        return bytes(self.data)


def dest(endpoint: Endpoint) -> Any:
    return UdpSocket._packed(SOCKET, endpoint), None


SOCKET = UdpSocket.__new__(UdpSocket)  # only what _packed needs: the family, the cache
SOCKET._v6, SOCKET._peer_addrs = True, {}


def stream_batches(seed: int, count: int) -> Iterator[list[Run]]:
    rng = random.Random(seed)
    for _ in range(count):
        yield random_runs(rng, [("127.0.0.1", 9)])


def test_batches_go_in_order_with_the_queue_full() -> None:
    """Batches queued faster than the descriptor takes them (the thread blocks, the
    queue fills, the caller waits for room without the GIL: the reader, a Python thread,
    gets to run): every byte arrives in order; small ones on an idle queue are sent on the
    caller."""
    stream = Stream()
    sender = native.UdpSender(depth=2, inline=0)
    want = bytearray()
    waiter = threading.Thread(target=go_once_waited, args=(stream, sender))
    waiter.start()
    try:
        for runs in stream_batches(1, 60):
            assert sender.send(stream.fileno(), runs, {}, dest, True) == []
            want += b"".join(buf for buf, _, _ in runs)
        assert sender.flush() == []
        queued, _, waits = sender.counts()
        assert queued == 60 and waits > 0
        small = native.UdpSender()
        assert small.send(stream.fileno(), [(b"p", 1, ("127.0.0.1", 9))], {}, dest, True) == []
        assert small.counts()[:2] == (0, 1)  # idle and small: sent on the caller
        small.close()
        want += b"p"
    finally:
        sender.close()
        waiter.join(30)
        assert stream.finish() == want


def go_once_waited(stream: Stream, sender: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while sender.counts()[2] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    stream.started.set()


def test_the_buffers_live_until_they_are_sent() -> None:
    """Once queued, the caller drops every reference to the runs and their buffers; the
    thread, blocked, still sends what they held (under tests/native/sanitize.sh a freed
    buffer would be a use-after-free)."""
    stream = Stream()
    sender = native.UdpSender(depth=8, inline=0)
    want = bytearray()
    try:
        for runs in stream_batches(2, 8):
            copies = [(bytearray(buf), size, ep) for buf, size, ep in runs]
            want += b"".join(buf for buf, _, _ in runs)
            sender.send(stream.fileno(), copies, {}, dest, True)
            del copies, runs
        junk = [bytes([i]) * n for i in range(200) for n in (1500, 9000, 65000)]
        del junk
        gc.collect()
        stream.started.set()
        assert sender.flush() == []
    finally:
        sender.close()
        assert stream.finish() == want


def until(check: Callable[[], object]) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, "the sender did not get there"
        time.sleep(0.005)


@pytest.fixture
def queued() -> Iterator[tuple[UdpSocket, socket.socket, Endpoint]]:
    """A socket whose sends all go through the thread's queue (inline=0), with a sticky
    source that is no address here (its sends fail, the source gone), and a receiver."""
    theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    theirs.bind(("127.0.0.1", 0))
    ep = theirs.getsockname()
    sock = socket_of("sender", inline=0)
    try:
        sock.learn_source(ep, mapped_pktinfo("198.51.100.7"))
        yield sock, theirs, ep
    finally:
        sock.close()
        theirs.close()


def test_what_the_thread_finds_comes_back_late(
    queued: tuple[UdpSocket, socket.socket, Endpoint],
) -> None:
    """Through the thread (inline=0: every batch queued), a source gone and GSO refused
    come back on a later call, or on the tick's `collect`, and are learnt as the
    reference learns them at once."""
    sock, theirs, ep = queued
    sock.send_runs([(b"late", 4, ep)])
    until(lambda: sock.collect() or sock.source(ep) is None)
    assert recv_all(theirs, 1) == [(b"late", "127.0.0.1")]
    sock._sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    sock.send_runs([(b"a" * 10 + b"b" * 10, 10, ep)])
    until(lambda: sock.collect() or not sock.gso)
    assert recv_all(theirs, 2) == [(b"a" * 10, "127.0.0.1"), (b"b" * 10, "127.0.0.1")]


def test_a_source_learnt_after_a_late_finding_is_kept(
    queued: tuple[UdpSocket, socket.socket, Endpoint],
) -> None:
    """The thread finds a source gone, but by the time that comes back the endpoint's
    next authentic packet taught the socket another: that one stays (the finding was
    about the old one)."""
    sock, theirs, ep = queued
    sock.send_runs([(b"old", 3, ep)])
    assert sock.sender is not None
    learnt = sock.sender.flush()
    gone = mapped_pktinfo("198.51.100.7")[:16] + bytes(4)  # in6_pktinfo, no interface
    assert [(e, info) for e, _, info in learnt] == [(ep, gone)]
    sock.learn_source(ep, mapped_pktinfo("127.0.0.2"))  # meanwhile
    sock._learn(learnt)
    assert sock.source(ep) == "127.0.0.2"
    sock.send_runs([(b"new", 3, ep)])
    settle(sock)
    assert recv_all(theirs, 2) == [(b"old", "127.0.0.1"), (b"new", "127.0.0.2")]


def refuse(endpoint: Endpoint) -> Any:
    raise LookupError(endpoint)


def test_a_batch_that_raises_keeps_what_the_earlier_ones_found(
    queued: tuple[UdpSocket, socket.socket, Endpoint],
) -> None:
    """A batch whose making raises (a `dest` that raises; a MemoryError alike) raises,
    after the earlier batches' findings were collected: they come back with the next
    call, once, not lost (review F3)."""
    sock, theirs, ep = queued
    assert sock.sender is not None
    sock.send_runs([(b"late", 4, ep)])
    assert recv_all(theirs, 1) == [(b"late", "127.0.0.1")]  # the thread is (nearly) done
    deadline = time.monotonic() + 0.3  # raises well after it counted the batch done
    while time.monotonic() < deadline:
        with pytest.raises(LookupError):
            sock.sender.send(sock.fileno(), [(b"x", 1, ("127.0.0.1", 9))], {}, refuse, True)
        time.sleep(0.01)
    learnt = sock.sender.flush()
    gone = mapped_pktinfo("198.51.100.7")[:16] + bytes(4)
    assert [(e, info) for e, _, info in learnt] == [(ep, gone)]
    assert sock.sender.flush() == []


def test_a_call_that_raises_after_another_did_keeps_both_findings() -> None:
    """A call raises after a call in between (here: from its `dest`) raised too and kept
    its findings: both lists are kept, the older first (review F5: the older was
    dropped)."""
    sock = socket_of("sender", inline=0)
    theirs = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        for t in theirs:
            t.bind(("127.0.0.1", 0))
        first, second = (t.getsockname() for t in theirs)
        for ep in (first, second):
            sock.learn_source(ep, mapped_pktinfo("198.51.100.7"))
        assert sock.sender is not None
        sender = sock.sender

        def meanwhile(endpoint: Endpoint) -> Any:
            sock.send_runs([(b"second", 6, second)])  # queued: found gone by the thread
            assert recv_all(theirs[1], 1) == [(b"second", "127.0.0.1")]
            deadline = time.monotonic() + 0.3  # one raises well after it counted it done
            while time.monotonic() < deadline:
                with pytest.raises(LookupError):
                    sender.send(sock.fileno(), [(b"x", 1, ("127.0.0.1", 9))], {}, refuse, True)
                time.sleep(0.01)
            raise LookupError(endpoint)

        sock.send_runs([(b"first", 5, first)])
        assert recv_all(theirs[0], 1) == [(b"first", "127.0.0.1")]
        time.sleep(0.1)  # the thread counts it done
        with pytest.raises(LookupError):  # collects the first's finding, then raises
            sender.send(sock.fileno(), [(b"y", 1, ("127.0.0.1", 9))], {}, meanwhile, True)
        assert [e for e, _, _ in sender.flush()] == [first, second]
        assert sender.flush() == []
    finally:
        sock.close()
        for t in theirs:
            t.close()


def test_close_sends_the_queue_first_and_later_sends_are_made_on_the_caller() -> None:
    """UdpSocket.close closes the sender before the socket: what was queued is sent
    first (never to a descriptor number closed and reused); a send after close is made at
    once, on the caller."""
    stream = Stream()
    sender = native.UdpSender(inline=0)
    want = bytearray()
    for runs in stream_batches(3, 6):
        sender.send(stream.fileno(), runs, {}, dest, True)
        want += b"".join(buf for buf, _, _ in runs)
    closer = threading.Thread(target=sender.close)
    closer.start()
    time.sleep(0.1)
    stream.started.set()
    closer.join(30)
    assert not closer.is_alive()
    _, inline, _ = sender.counts()
    assert sender.send(stream.fileno(), [(b"after", 5, ("127.0.0.1", 9))], {}, dest, True) == []
    assert sender.counts()[1] == inline + 1
    sender.close()  # twice: nothing more
    assert stream.finish() == want + b"after"


def test_a_udp_socket_closes_its_sender() -> None:
    sock = socket_of("sender", inline=0)
    assert sock.sender is not None
    sender = sock.sender
    sock.close()
    assert sender.counts()[0] == 0 and sender.flush() == []


def test_a_child_of_fork_sends_on_its_own_thread() -> None:
    """After fork the child has no sender thread: its sends are made on the caller (a
    queued one would wait forever); what the parent had queued is the parent's."""
    stream = Stream()
    sender = native.UdpSender(depth=2, inline=0)
    for runs in stream_batches(4, 4):
        sender.send(stream.fileno(), runs, {}, dest, True)  # the parent's queue, blocked
    pid = os.fork()
    if pid == 0:  # the child: a send must come back, and be made here
        signal.alarm(10)
        got = sender.send(stream.fileno(), [(b"child", 5, ("127.0.0.1", 9))], {}, dest, True)
        ok = got == [] and sender.counts()[1] == 1
        sender.close()
        os._exit(0 if ok else 1)
    stream.started.set()
    _, status = os.waitpid(pid, 0)
    assert sender.flush() == []
    sender.close()
    assert status == 0
    assert b"child" in stream.finish()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        native.UdpSender(depth=0)
    good = (b"x", 1, ("127.0.0.1", 9))
    for runs, dests, error in (
        ([object()], {}, TypeError),
        ([(b"x", 0, ("127.0.0.1", 9))], {}, ValueError),
        ([good], {good[2]: (b"short", None)}, ValueError),
        ([good], {good[2]: (bytes(16), bytes(13))}, ValueError),
        ([good], {good[2]: "nonsense"}, TypeError),
        ([(object(), 1, good[2])], {}, TypeError),
    ):
        with pytest.raises(error):
            native.send_runs(-1, runs, dests, dest, True)
    assert native.send_runs(-1, [], {}, dest, True) == []
    assert native.send_runs(-1, [good], {}, dest, True) == []  # EBADF: dropped, as UDP may
