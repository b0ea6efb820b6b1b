"""The UDP reader thread (src/native/reader.c `UdpReader`, issue 17 item 4): while a
backlog lasts a thread of its own reads the socket into a ring of slots while the loop
thread classifies and opens the reads before; `Classifier.drain` given the reader takes a
filled slot (or, none filled, reads the socket itself into the next) and classifies it
exactly as it classifies its own recvmmsg. Real sockets on loopback throughout."""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from tests.io.fakes import ChannelTun
from tests.namespaces import run_in_new_namespace
from tests.native.test_classify import build, pair
from wgpy.core import intake
from wgpy.core.backend import Backend
from wgpy.core.device import Device
from wgpy.core.native import load
from wgpy.core.output import Output
from wgpy.io.datapath import Datapath
from wgpy.io.udp import IP_PKTINFO, SOL_UDP, UDP_GRO, UDP_SEGMENT, UdpSocket

pytestmark = pytest.mark.skipif(not intake.available(), reason="wgpy._classify is not built")

SLOT = 4096  # bytes a read in these tests (a GRO read of up to 4 KiB)
COUNT = 16  # reads a slot
SEQ = struct.Struct("!I")


def reader_type() -> type:
    from wgpy._classify import UdpReader

    return UdpReader


def receiver() -> socket.socket:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    rx.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    rx.setsockopt(SOL_UDP, UDP_GRO, 1)
    rx.bind(("127.0.0.1", 0))
    return rx

def two_slot_reader() -> tuple[Device, Any, socket.socket, socket.socket, Any]:
    """A device, its C intake, a receiving socket, a sending one, and a reader of 2 slots
    on the receiving one (the caller closes the three)."""
    _, device = pair()
    classifier = device.intake.classifier
    assert classifier is not None
    rx = receiver()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reader = reader_type()(rx.fileno(), slots=2, count=COUNT, size=SLOT)
    return device, classifier, rx, tx, reader



def wait_filled(reader: object, timeout: float = 2.0) -> bool:
    """Whether the thread filled a slot (its eventfd is readable) within `timeout`."""
    fd = reader.fileno()
    return bool(select.select([fd], [], [], timeout)[0])


def readable(reader: object, sock: socket.socket, timeout: float) -> bool:
    """As the loop: the socket or the reader's eventfd readable within `timeout`."""
    return bool(select.select([sock, reader.fileno()], [], [], timeout)[0])


def wait_until(check: object, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.005)
    return bool(check())


Kept = list[tuple[bytes, int, tuple[str, int], bytes | None, object, int]]


def drain_all(device: Device, fd: object, buf: object, want: int,
              sock: socket.socket | None = None) -> tuple[Kept, Output, int]:  # fmt: skip
    """Drains (of the socket, or of a reader's slots) until `want` reads are in: what each
    kept read holds (its bytes, GRO size, source, packet info, verdicts, data messages),
    what the device made of them, the cookie replies sent in C."""
    classifier = device.intake.classifier
    assert classifier is not None
    kept: Kept = []
    out = Output()
    reads = sent = 0
    deadline = time.monotonic() + 5
    while reads < want and time.monotonic() < deadline:
        if sock is not None:
            readable(fd, sock, 0.5)
        until, queued, forced, state = device.intake.state(10.0)
        got_kept, got, until, drops, made, counter = classifier.drain(
            fd, buf, SLOT, COUNT, 10.0, until, queued, forced, state
        )
        device.intake.done(until, drops, state is not None, counter, out)
        view = memoryview(buf)
        for offset, n, seg, src, info, passed, ndata in got_kept:
            kept.append((bytes(view[offset : offset + n]), seg, src, info, passed, ndata))
            out.extend(device.receive_classified(view[offset : offset + n], n, seg, src, 10.0,
                                                 passed, ndata, info))  # fmt: skip
        reads += got
        sent += made
        if sock is not None and got == COUNT:  # full: the thread reads on; give it the time
            wait_filled(fd, 0.5)
    assert reads == want
    return kept, out, sent


def test_the_reader_threads_reads_are_the_drains_own() -> None:
    """The same datagrams (handshakes that pass, fail or earn a cookie reply; data; GSO
    runs the receiver gets as one GRO read; from three sources) sent to two sockets: one
    drained by its own recvmmsg, one through a reader (a ring of 3 slots), whose thread
    reads ahead once a drain's read came back full. Every kept read is the same, in the
    same order: bytes, GRO size, source, packet info, verdicts, data messages; and so
    are the drops, the queue, the load and the replies sent in C."""
    devices = [pair()[1], pair()[1]]
    for d in devices:  # a first reply draws the nonce prefix: every later one is made in C
        d.intake.send_cookie(build("init", d, ("192.0.2.9", 1), random.Random(1)),
                             ("192.0.2.9", 1), 10.0, Output())  # fmt: skip
    receivers = [receiver(), receiver()]
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    reader = reader_type()(receivers[1].fileno(), slots=3, count=COUNT, size=SLOT)
    try:
        for s in senders:
            s.bind(("127.0.0.1", 0))
        rng = random.Random(11)
        shapes = ["init", "init", "resp", "bad_mac1", "short", "unknown", "data", "init_mac2"]
        reads = 0
        for i in range(400):
            s = senders[i // 30 % 3]
            if i % 7 == 0:  # a GSO run: one GRO read of 3 data messages of 100 bytes
                run = b"".join(b"\x04\0\0\0" + SEQ.pack(i) + os.urandom(92) for _ in range(3))
                cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", 100))]
                for rx in receivers:
                    s.sendmsg([run], cmsg, 0, rx.getsockname())
            else:
                datagram = build(rng.choice(shapes), devices[0], s.getsockname(), rng) or b"\1"
                for rx in receivers:
                    s.sendto(datagram, rx.getsockname())
            reads += 1
        buf = bytearray(SLOT * COUNT)
        own = drain_all(devices[0], receivers[0].fileno(), buf, reads)
        threaded = drain_all(devices[1], reader, reader, reads, receivers[1])
        assert any(seg == 100 for _, seg, *_ in own[0]), "no GRO read to compare"
        assert any(passed for *_, passed, _ in own[0]), "no handshake passed"
        assert own[2] > 0, "no cookie reply sent in C"
        assert threaded[0] == own[0]
        assert threaded[1].drops == own[1].drops and threaded[2] == own[2]
        assert list(devices[1].intake.queue) == list(devices[0].intake.queue)
        assert devices[1].intake.load.until == devices[0].intake.load.until
        filled, by_thread, _ = reader.counts()
        assert 0 < by_thread < filled, "the thread and the drain did not both read"
        assert not wait_filled(reader, 0.05), "the eventfd is readable with nothing filled"
    finally:
        reader.close()
        for s in [*receivers, *senders]:
            s.close()


def sequence_of(kept: Kept) -> list[int]:
    return [SEQ.unpack_from(data, 4)[0] for data, *_ in kept]


def test_a_flood_fills_the_ring_then_waits_and_loses_no_read_it_made() -> None:
    """A flood larger than the ring and the socket's buffer: nothing is read until the
    first drain (the loop's own read, full, arms the thread); then the thread fills the
    ring (2 slots, the drain's one held) and waits for one (counted); the kernel drops the
    rest. Drained until nothing is readable, every read is there, intact, in the order
    sent, none twice, and the eventfd goes quiet (level-triggered: no spin)."""
    _, device = pair()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # ~100 datagrams: overflows
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    reader = reader_type()(rx.fileno(), slots=2, count=COUNT, size=SLOT)
    try:
        for i in range(2000):
            tx.sendto(b"\x04\0\0\0" + SEQ.pack(i) + bytes(40), rx.getsockname())
        time.sleep(0.05)
        assert reader.counts() == (0, 0, 0)  # no backlog seen yet: the thread sleeps
        kept: Kept = []
        assert reader_drain_count(device, reader, kept) == COUNT  # full: the thread reads on
        assert wait_until(lambda: reader.counts()[2] >= 1)  # ring full, waiting for a slot
        assert reader.counts()[:2] == (2, 1)
        drains = 1
        while readable(reader, rx, 0.2):  # the ring's reads, and what the socket still held
            reader_drain_count(device, reader, kept)
            drains += 1
        seqs = sequence_of(kept)
        assert drains >= 3  # (the thread, or the drain where it was first, read the rest)
        assert seqs == sorted(set(seqs)) and len(seqs) < 2000  # in order, none twice; drops
        assert all(data[8:] == bytes(40) for data, *_ in kept)
        assert not wait_filled(reader, 0.05)
    finally:
        reader.close()
        rx.close()
        tx.close()


def reader_drain_count(device: Device, reader: object, kept: Kept) -> int:
    """One drain of the reader: appends what it kept to `kept`; the reads drained."""
    classifier = device.intake.classifier
    assert classifier is not None
    got_kept, got, *_ = classifier.drain(reader, reader, SLOT, COUNT, 10.0, 0.0, 0, False,
                                         None)  # fmt: skip
    view = memoryview(reader)
    kept += [(bytes(view[o : o + n]), seg, src, info, p, d)
             for o, n, seg, src, info, p, d in got_kept]  # fmt: skip
    return got


def test_close_while_the_thread_reads_a_flood() -> None:
    """close() while a flood keeps the thread reading: it returns (the thread joined), the
    eventfd is gone, a view of the buffer taken before still reads (the buffer lives with
    the object), a drain after it reads nothing (not even what the thread had read), and
    a second close is harmless; a reader dropped while a view of it lives
    frees nothing under the view."""
    _, device = pair()
    classifier = device.intake.classifier
    assert classifier is not None
    rx = receiver()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            try:
                tx.sendto(b"\x04\0\0\0" + bytes(60), rx.getsockname())
            except OSError:
                return

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        for _ in range(20):
            reader = reader_type()(rx.fileno(), slots=2, count=COUNT, size=SLOT)
            view = memoryview(reader)
            deadline = time.monotonic() + 5
            while reader.counts()[1] == 0:  # a full read arms the thread: it reads on
                assert time.monotonic() < deadline, "the thread never read"
                readable(reader, rx, 1)
                classifier.drain(reader, reader, SLOT, COUNT, 10.0, 0.0, 0, False, None)
            started = time.monotonic()
            reader.close()
            assert time.monotonic() - started < 1
            assert reader.fileno() == -1 and not reader.running
            assert classifier.drain(reader, reader, SLOT, COUNT, 10.0, 0.0, 0, False, None)[1] == 0
            reader.close()
            del reader
            assert len(view) == 2 * SLOT * COUNT and view[0] in (0, 4)
            view.release()
    finally:
        stop.set()
        flooder.join()
        rx.close()
        tx.close()


def test_a_second_drainer_is_refused_and_a_second_closer_is_harmless() -> None:
    """One caller at a time (the loop's thread): a drain from another thread while one is
    under way (its GIL released to read) raises RuntimeError instead of freeing a slot
    the first still reads; close() from two threads meanwhile (Interface.close after a
    join that timed out) stops the thread, the eventfd closed once, under the lock."""
    device, classifier, rx, tx, reader = two_slot_reader()
    stop = threading.Event()
    refused: list[int] = []

    def drain() -> None:
        while not stop.is_set():
            try:
                classifier.drain(reader, reader, SLOT, COUNT, 10.0, 0.0, 0, False, None)
            except RuntimeError:
                refused.append(1)

    drainers = [threading.Thread(target=drain, daemon=True) for _ in range(2)]
    for t in drainers:
        t.start()
    try:
        deadline = time.monotonic() + 3
        while not refused and time.monotonic() < deadline:
            for _ in range(100):
                tx.sendto(b"\x04" + bytes(40), rx.getsockname())
        closers = [threading.Thread(target=reader.close, daemon=True) for _ in range(2)]
        for t in closers:
            t.start()
        for t in closers:
            t.join(5)
        assert not any(t.is_alive() for t in closers), "a closer hangs (two joins)"
        assert reader.fileno() == -1 and not reader.running
        assert refused, "two drains at once"
    finally:
        stop.set()
        for t in drainers:
            t.join(5)
        reader.close()
        rx.close()
        tx.close()


def test_a_drain_wants_the_readers_own_buffer_and_shape() -> None:
    """The reader's slots only through its own buffer, its read size and count."""
    _, device = pair()
    classifier = device.intake.classifier
    assert classifier is not None
    rx = receiver()
    reader = reader_type()(rx.fileno(), slots=2, count=COUNT, size=SLOT)
    try:
        for buf, slot, count in [(bytearray(SLOT * COUNT * 2), SLOT, COUNT), (reader, SLOT, 8),
                                 (reader, 2048, COUNT)]:  # fmt: skip
            with pytest.raises(ValueError):
                classifier.drain(reader, buf, slot, count, 1.0, 0.0, 0, False, None)
        with pytest.raises(ValueError):
            reader_type()(rx.fileno(), slots=1)
    finally:
        reader.close()
        rx.close()


def test_a_descriptors_drain_refuses_a_readers_buffer() -> None:
    """The pair is a reader and its own buffer, or a descriptor and a buffer of the
    caller's: a descriptor with a reader's buffer (or a view of it) is refused, not read
    into the ring its thread writes; a reader with another reader's buffer too."""
    device, classifier, rx, tx, reader = two_slot_reader()
    other = reader_type()(rx.fileno(), slots=2, count=COUNT, size=SLOT)
    try:
        tx.sendto(b"\x04" + bytes(40), rx.getsockname())
        pairs = [(rx.fileno(), reader), (rx.fileno(), memoryview(reader)), (reader, other),
                 (reader, memoryview(reader))]  # fmt: skip
        for fd, buf in pairs:
            with pytest.raises(ValueError):
                classifier.drain(fd, buf, SLOT, COUNT, 1.0, 0.0, 0, False, None)
        assert select.select([rx], [], [], 0)[0], "a refused drain read the socket"
    finally:
        for r in (reader, other):
            r.close()
        rx.close()
        tx.close()


def test_a_drain_after_close_reads_nothing_and_sends_nothing() -> None:
    """close() ends the reader's reads: a drain after it takes no slot the thread had
    filled (stale: the socket may be closed by then, its number another file's) and sends
    no cookie reply for one; it reads nothing (0 reads) and the socket keeps its queue."""
    device, classifier, rx, tx, reader = two_slot_reader()
    device.intake.load.forced = True  # every initiation is owed a cookie reply
    device.intake.send_cookie(build("init", device, ("192.0.2.9", 1), random.Random(1)),
                              ("192.0.2.9", 1), 10.0, Output())  # the nonce prefix drawn
    try:
        tx.bind(("127.0.0.1", 0))
        initiation = build("init", device, tx.getsockname(), random.Random(2))

        def drain() -> tuple[int, int]:
            until, queued, forced, state = device.intake.state(10.0)
            _, got, until, drops, sent, counter = classifier.drain(
                reader, reader, SLOT, COUNT, 10.0, until, queued, forced, state
            )
            device.intake.done(until, drops, state is not None, counter, Output())
            return got, sent

        for _ in range(2 * COUNT):
            tx.sendto(initiation, rx.getsockname())
        got, sent = drain()
        assert got == COUNT and sent > 0  # full: the thread reads the rest into a slot
        tx.setblocking(False)
        assert len(iter_replies(tx)) == sent
        assert wait_filled(reader), "the thread filled no slot"
        reader.close()
        assert drain() == (0, 0)
        assert not select.select([tx], [], [], 0.2)[0], "a reply sent after close"
        tx.sendto(initiation, rx.getsockname())
        assert drain() == (0, 0)
        assert select.select([rx], [], [], 0)[0]  # left for whoever reads the socket next
    finally:
        reader.close()
        rx.close()
        tx.close()


def test_a_new_socket_gets_a_new_reader_and_the_old_thread_is_joined(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon's port change (`Datapath.use_udp`): the old socket's reader is stopped
    before the socket is closed, the new socket gets its own, whose eventfd the loop
    watches beside the socket; close() joins it. With WGPY_UDP_READER=0, or 2 crypto threads by
    default, the loop watches the socket."""
    module = load()
    if module is None:
        pytest.skip("wgpy._native is not built")
    for env, threads, threaded in [("", 3, True), ("", 2, False), ("1", 2, True),
                                   ("0", 4, False), ("1", 1, False)]:  # fmt: skip
        monkeypatch.setenv("WGPY_UDP_READER", env)
        backend = Backend(module, threading.Lock, threads)
        device = Device(random.Random(1).randbytes, backend=backend, classify=True)
        first, second = UdpSocket(), UdpSocket()
        path = Datapath(device, ChannelTun(), first)
        try:
            assert path.udp_fds()[0] == first.fileno() and len(path.udp_fds()) == 1 + threaded
            assert readers(int(threaded)) == threaded
            old = path._reader
            path.use_udp(second)
            if threaded:  # joined: `running` drops only once pthread_join returned
                assert not old.running and old.fileno() == -1 and old is not path._reader
            assert readers(int(threaded)) == threaded  # one stopped, one started
            assert path.udp_fds()[0] == second.fileno() and len(path.udp_fds()) == 1 + threaded
            path.close()
            assert readers(0) == 0
        finally:
            path.close()
            first.close()
            second.close()


PORT_CHANGE_FAILS = """
import os, socket, sys, tempfile
sys.path.insert(0, "{src}")
os.environ["WGPY_UDP_READER"] = "1"
from wgpy.daemon.daemon import Daemon, Options
from wgpy.io.datapath import Datapath
daemon = Daemon("wgport0", tempfile.mkdtemp(), options=Options(threads=3))
try:
    assert len(daemon.datapath.udp_fds()) == 2, "no reader"
    old = daemon.udp
    def no_sender(self):  # a failure use_udp does not catch (not an OSError)
        raise RuntimeError("no sender")
    Datapath._sender = no_sender
    try:
        daemon.set_listen_port(0)
    except RuntimeError:
        pass
    watched = set(daemon.loop._readers)
    assert set(daemon.datapath.udp_fds()) <= watched, (daemon.datapath.udp_fds(), watched)
    assert old.fileno() == -1 and daemon.udp is not old  # the old socket: closed
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.sendto(b"\\x04" + bytes(40), ("127.0.0.1", daemon.udp.port))
    ready = [fd for fd, _ in daemon.loop._epoll.poll(2)]
    assert daemon.udp.fileno() in ready, ready  # the loop hears the new socket
finally:
    daemon.close()
print("ok")
"""


def test_a_port_change_that_fails_in_use_udp_leaves_the_daemon_listening() -> None:
    """`Daemon.set_listen_port`: use_udp raising after the loop stopped watching the old
    socket and its reader (here the sender, an error it does not catch) leaves the loop
    watching the new socket (and its reader where it has one) and the old one closed,
    not deaf. A real daemon (its TUN in a namespace of its own, its reader forced on)."""
    if load() is None:
        pytest.skip("wgpy._native is not built")
    run_in_new_namespace("wgpyport", [["link", "set", "lo", "up"]], PORT_CHANGE_FAILS)


DAEMON_FAILS = """
import os, sys, tempfile
sys.path.insert(0, "{src}")
os.environ["WGPY_UDP_READER"] = "1"
from wgpy.daemon.daemon import Daemon, Options
from wgpy.daemon.uapi_server import UapiListener
def names():
    return [open(f"/proc/self/task/{{t}}/comm").read().strip()
            for t in os.listdir("/proc/self/task")]
where = tempfile.mkdtemp()
Daemon("wgstart0", where, options=Options(threads=3)).close()  # (the crypto workers made)
fds = len(os.listdir("/proc/self/fd"))
for _ in range(3):
    listener = UapiListener("wgstart0", where)
    listener.close()  # closed: the UAPI server, made after the datapath, cannot watch it
    try:
        Daemon("wgstart0", where, listener=listener, options=Options(threads=3))
    except (OSError, ValueError):
        pass
    else:
        raise AssertionError("started")
    assert names().count("wgpy-udpread") == 0, names()
    assert len(os.listdir("/proc/self/fd")) == fds, "descriptors left"
print("ok")
"""


def test_a_daemon_that_fails_to_start_leaves_no_reader_thread() -> None:
    """`Daemon.__init__` failing after its datapath was made (the UAPI server, given a
    listener already closed) stops the reader thread and closes its eventfd, the
    loop's epoll, the socket and the TUN. A real daemon, its TUN in a namespace."""
    if load() is None:
        pytest.skip("wgpy._native is not built")
    run_in_new_namespace("wgpystart", [["link", "set", "lo", "up"]], DAEMON_FAILS)


def test_a_datapath_that_fails_to_be_made_leaves_no_reader_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`Datapath(...)` raising after its reader thread started (here the socket's sends,
    asked after the reader was made, raise MemoryError) stops that thread at once: whoever
    made the datapath has nothing to close it by, and the half-made one lives on in the
    exception's traceback (a log keeps it) with its thread reading."""
    module = load()
    if module is None:
        pytest.skip("wgpy._native is not built")
    monkeypatch.setenv("WGPY_UDP_READER", "1")
    device = Device(random.Random(1).randbytes, backend=Backend(module, threading.Lock, 2),
                    classify=True)  # fmt: skip

    class NoMemory(UdpSocket):
        def sends_are_its_own(self) -> bool:
            raise MemoryError

    udp = NoMemory(0)
    try:
        with pytest.raises(MemoryError) as raised:
            Datapath(device, ChannelTun(), udp)
        assert readers(0) == 0, raised  # (not by the half-made datapath's garbage: held)
    finally:
        udp.close()


def readers(expected: int) -> int:
    """The reader threads of this process (by their name), once they are `expected` or
    after a second (a thread names itself once it runs)."""
    deadline = time.monotonic() + 1
    while True:
        count = 0
        for task in os.listdir("/proc/self/task"):
            path = f"/proc/self/task/{task}/comm"
            with contextlib.suppress(OSError), open(path) as f:  # (a thread that ended: OSError)
                count += f.read().strip() == "wgpy-udpread"
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.01)


def test_in_a_child_of_fork_a_drain_reads_the_socket_itself() -> None:
    """The thread is the parent's: in a child the reader says it is not running, and a
    drain reads the socket itself (the slot the parent's thread filled is the parent's to
    drain). The parent, its thread waiting for room meanwhile, reads on."""
    device, classifier, rx, tx, reader = two_slot_reader()
    try:
        for i in range(200):
            tx.sendto(b"\x04\0\0\0" + SEQ.pack(i) + bytes(40), rx.getsockname())
        first: Kept = []
        assert reader_drain_count(device, reader, first) == COUNT  # full: the thread reads on
        assert wait_until(lambda: reader.counts()[2] >= 1)  # the ring full: it reads no more
        parents = reader.fileno()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1  # any raise on the way: failed
            try:
                os.close(parents)  # (a child that closes what it inherited, as daemons do)
                other = os.open(os.devnull, os.O_RDONLY)  # the number, another file's now
                alone = not reader.running and reader.fileno() == -1  # not the parent's eventfd
                kept: Kept = []
                got = reader_drain_count(device, reader, kept)  # read here, not the parent's
                reader.close()
                os.fstat(other)  # still open: the reader closed no number it had inherited
                read = got == len(kept) == COUNT and sequence_of(kept)[0] == 2 * COUNT
                code = 0 if alone and other == parents and read else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        assert reader.running
        kept: Kept = []
        while readable(reader, rx, 0.2):
            reader_drain_count(device, reader, kept)
        seqs = sequence_of(first + kept)
        assert seqs[: 2 * COUNT] == list(range(2 * COUNT))  # the parent's slot: still there
        assert seqs == sorted(set(seqs)) and len(seqs) > 2 * COUNT  # and the parent reads on
    finally:
        reader.close()
        rx.close()
        tx.close()


def test_a_socket_closed_under_the_thread_parks_it_rather_than_spinning() -> None:
    """The socket is to be closed only after close(); closed before (a bug), its recvmmsg
    fails with EBADF: the thread waits for close() instead of spinning on the error."""
    _, device = pair()
    classifier = device.intake.classifier
    assert classifier is not None
    rx = receiver()
    reader = reader_type()(rx.fileno(), slots=2, count=COUNT, size=SLOT)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for _ in range(100):
                tx.sendto(b"\x04" + bytes(40), rx.getsockname())
        classifier.drain(reader, reader, SLOT, COUNT, 1.0, 0.0, 0, False, None)  # full: armed
        assert wait_until(lambda: reader.counts()[2] >= 1)  # the ring full: waiting for a slot
        rx.close()  # (the descriptor may be reused: nothing else opens one meanwhile)
        for _ in range(2):  # a slot taken, then given back: the thread reads the closed one
            classifier.drain(reader, reader, SLOT, COUNT, 1.0, 0.0, 0, False, None)
        time.sleep(0.05)
        before = reader_cpu_ticks()
        time.sleep(0.5)
        assert reader_cpu_ticks() - before < 10  # 0.1 s of the 0.5
    finally:
        reader.close()
        rx.close()


def reader_cpu_ticks() -> int:
    """The CPU time of this process's reader thread, in clock ticks."""
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if f.read().strip() != "wgpy-udpread":
                    continue
        except OSError:  # a thread that ended meanwhile
            continue
        with open(f"/proc/self/task/{task}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    raise AssertionError("no reader thread")


@pytest.mark.parametrize("limit", ["nofile", "as"])
def test_a_reader_that_cannot_start_leaves_the_loop_reading(limit: str) -> None:
    """Where no reader can be had (its eventfd: no descriptor left, RLIMIT_NOFILE; its
    ring: no room, RLIMIT_AS), the real UdpReader fails (OSError, MemoryError) and the
    loop watches and drains the socket itself, as without a reader. In a process of its
    own, the limit lifted once the Datapath is made."""
    if load() is None:
        pytest.skip("wgpy._native is not built")
    if limit == "as" and "asan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("ASan's shadow memory does not fit under RLIMIT_AS")
    code = f"from tests.native.test_reader import cannot_start; cannot_start({limit!r})"
    env = {**os.environ, "WGPY_UDP_READER": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no reader thread" in done.stderr  # the Datapath's own UdpReader failed


def cannot_start(limit: str) -> None:
    """(The child of the test above.) The limit's failure, first from UdpReader itself,
    then inside Datapath; then a datagram is read by the loop off the socket alone."""
    import resource

    from wgpy._classify import UdpReader

    module = load()
    device = Device(random.Random(1).randbytes, backend=Backend(module, threading.Lock, 2),
                    classify=True)  # fmt: skip
    udp = UdpSocket()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    kind = resource.RLIMIT_NOFILE if limit == "nofile" else resource.RLIMIT_AS
    soft, hard = resource.getrlimit(kind)
    held: list[int] = []
    if limit == "nofile":  # every descriptor taken: the reader's eventfd fails (EMFILE)
        resource.setrlimit(kind, (256, hard))
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        error: type[BaseException] = OSError
    else:  # 8 MiB more address space: not the ring's 17.8 MB (its mmap fails)
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
        resource.setrlimit(kind, (kb * 1024 + (8 << 20), hard))
        error = MemoryError
    try:
        with pytest.raises(error):
            UdpReader(udp.fileno())
        path = Datapath(device, ChannelTun(), udp)
    finally:
        resource.setrlimit(kind, (soft, hard))
        for fd in held:
            os.close(fd)
    assert path._reader is None and path.udp_fds() == (udp.fileno(),)
    tx.sendto(b"\x04" + bytes(40), ("127.0.0.1", udp.port))
    assert select.select(path.udp_fds(), [], [], 2)[0] == [udp.fileno()]  # as the loop
    path.on_udp()
    assert path.udp_batches.events == 1  # the loop's own read took it
    assert not select.select([udp], [], [], 0)[0]
    path.close()
    udp.close()
    tx.close()


def test_shedding_through_the_reader_as_through_the_drains_own_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tests/io/test_shedding.py's flood through a reader (3 crypto threads): while the
    socket overflows (a full read finds its queue over half full, SO_MEMINFO) the
    strangers' cookie replies are shed, and the peer's endpoint still gets its reply; the
    thread read part of it."""
    from tests.io.test_shedding import flood_target
    from wgpy.core.output import Drop

    module = load()
    if module is None:
        pytest.skip("wgpy._native is not built")
    monkeypatch.setenv("WGPY_UDP_READER", "")
    ours = UdpSocket()
    known, stranger = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    for s in (known, stranger):
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    victim, initiation = flood_target(ours, known, Backend(module, threading.Lock, 3),
                                      monkeypatch)  # fmt: skip
    datapath = Datapath(victim, ChannelTun(), ours)
    try:
        assert len(datapath.udp_fds()) == 2  # a reader, by default on 3 threads
        to = ("127.0.0.1", ours.port)
        known.sendto(initiation, to)
        for _ in range(1000):
            stranger.sendto(initiation, to)
        while select.select(list(datapath.udp_fds()), [], [], 0.2)[0]:  # as the loop
            datapath.on_udp()
            wait_filled(datapath._reader, 0.05)  # (armed: the thread's turn to read)
        assert datapath.drops[Drop.REPLY_SHED] > 0
        assert sum(1 for _ in iter_replies(known)) == 1
        assert sum(1 for _ in iter_replies(stranger)) == 5
        assert datapath._reader.counts()[1] > 0, "the thread read none of it"
    finally:
        datapath.close()
        for s in (ours, known, stranger):
            s.close()


def iter_replies(sock: socket.socket) -> list[bytes]:
    """The cookie replies waiting at `sock`."""
    got = []
    with contextlib.suppress(BlockingIOError):
        while True:
            data = sock.recv(2048)
            if data[0] == 3:
                got.append(data)
    return got
