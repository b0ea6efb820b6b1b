"""Both backends' Sealer.seal against each other and reference.forge; coalesce, checksum
and split against io.offload."""

from __future__ import annotations

import errno
import os
import random
import socket
import subprocess
import sys
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.io.test_offload import V4, V6, VNET, flow, tcp, traffic, udp, udp_flow
from tests.native.reference import forge
from wgpy.core.backend import Sealer
from wgpy.core.constants import REJECT_AFTER_MESSAGES
from wgpy.core.messages import DATA_HEADER
from wgpy.io import offload, tun

native = pytest.importorskip(
    "wgpy._native", reason="wgpy._native is not built (python setup.py build_ext --inplace)"
)

# ---------------------------------------------------------------- seal


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 3000), max_size=50),
    st.integers(0, 2**32 - 1),
    st.one_of(st.integers(0, 2**64 - 9000), st.integers(2**64 - 8250, 2**64 - 8193)),
    st.sampled_from([0, 1, 15, 16, 17, 576, 1280, 1420, 1500, 9000]) | st.integers(0, 4000),
    st.binary(min_size=32, max_size=32),
)
def test_seal_matches_pure_sealer_and_forge(
    sizes: list[int], index: int, counter: int, mtu: int, key: bytes
) -> None:
    """Both backends' sealers, byte for byte, and an independent sealer (reference.forge)."""
    rng = random.Random(counter ^ index)
    packets = [rng.randbytes(n) for n in sizes]
    c_sealer, py_sealer = native.Sealer(key, index, counter), Sealer(key, index, counter)
    sealed = c_sealer.seal(packets, mtu)
    assert sealed == py_sealer.seal(packets, mtu)
    if counter + len(packets) > REJECT_AFTER_MESSAGES:  # spent: nothing sealed, no counter used
        assert sealed == [] and c_sealer.counter == py_sealer.counter == counter
        return
    assert sealed == [forge(key, index, counter + i, p, mtu) for i, p in enumerate(packets)]
    assert c_sealer.counter == py_sealer.counter == counter + len(packets)
    # any buffer will do
    views = [memoryview(bytearray(p)) for p in packets]
    for make in (native.Sealer, Sealer):
        assert make(key, index, counter).seal(views, mtu) == sealed


@pytest.mark.parametrize("make", [native.Sealer, Sealer])
def test_seal_edges(make: Any) -> None:
    s = make(bytes(32), 1)
    assert s.seal([], 1420) == [] and s.counter == 0
    last = make(bytes(32), 1, REJECT_AFTER_MESSAGES - 1)
    assert len(last.seal([b""], 1420)) == 1 and last.counter == REJECT_AFTER_MESSAGES
    assert last.seal([b""], 1420) == []
    s.expire()
    assert s.counter == REJECT_AFTER_MESSAGES and s.seal([b"x"], 1420) == []
    for bad in ((bytes(32), 2**32), (bytes(32), -1), (bytes(32), 1, REJECT_AFTER_MESSAGES + 1)):
        with pytest.raises((ValueError, OverflowError)):
            make(*bad)
    with pytest.raises(ValueError):
        make(b"short", 1)
    s = make(bytes(32), 1)
    with pytest.raises(ValueError):
        s.seal([b""], -1)
    s.wipe()
    with pytest.raises(ValueError):
        s.seal([b"x"], 1420)


@pytest.mark.parametrize("make", [native.Sealer, Sealer])
def test_threads_sealing_for_one_session_never_share_a_counter(make: Any) -> None:
    """Counters are reserved inside seal, under the sealer's lock (they used to be read
    before and added after, so two threads could seal with the same nonce)."""
    lock = threading.Lock() if make is Sealer else None
    sealer = make(bytes(32), 7, **({"lock": lock} if lock else {}))
    batches: list[list[bytes]] = []
    packets = [bytes(1400)] * 16

    def work() -> None:
        got = [sealer.seal(packets, 1420) for _ in range(200)]
        batches.extend(got)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters = [DATA_HEADER.unpack_from(d)[2] for batch in batches for d in batch]
    assert len(counters) == 4 * 200 * 16 and len(set(counters)) == len(counters)
    assert sealer.counter == len(counters)
    for batch in batches:  # a batch's counters are consecutive: reserved at once
        first = DATA_HEADER.unpack_from(batch[0])[2]
        assert [DATA_HEADER.unpack_from(d)[2] for d in batch] == list(range(first, first + 16))


class _Shrinker:
    """A packet whose buffer export (3.12's `__buffer__`) empties the list it is in."""

    def __init__(self, victim: list[object]) -> None:
        self.victim = victim

    def __buffer__(self, flags: int) -> memoryview:
        self.victim.clear()
        return memoryview(b"x" * 64)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="__buffer__ is Python 3.12+")
def test_a_list_emptied_while_its_buffers_are_taken_is_read_as_it_was() -> None:
    """Seal and coalesce read the list once: items emptied from it by an item's own
    `__buffer__` stay alive until the call ends (it used to be a use-after-free)."""
    rest = [bytes([0x45]) + bytes(99) for _ in range(50)]
    for call in (
        lambda packets: native.Sealer(bytes(32), 1).seal(packets, 1420),
        native.coalesce,
    ):
        victim: list[object] = []
        victim += [_Shrinker(victim), *(bytearray(p) for p in rest)]
        assert call(victim) == call([b"x" * 64, *rest])
        assert victim == []


# ---------------------------------------------------------------- checksum


@given(st.binary(max_size=300), st.integers(0, 2**64 - 1) | st.integers(0, 2**200))
def test_checksum(data: bytes, initial: int) -> None:
    assert native.checksum(data, initial) == offload.checksum(data, initial)
    assert native.checksum(memoryview(data)) == offload.checksum(data)


def test_checksum_edges() -> None:
    for data, initial in [
        (b"", 0),
        (b"", 0xFFFF),
        (b"\0\0\0", 0),
        (b"\xff\xff", 0),
        (b"", 2**100 * 0xFFFF),
        (b"\xff" * 65535, 0xFFFF),  # the sums at their largest (C adds 16 bytes at a time,
        (b"\xff" * (3 << 20) + b"\x01\x02\x03", 7),  # folded every MiB)
        (bytes(range(256)) * 4099, 1),
    ]:
        assert native.checksum(data, initial) == offload.checksum(data, initial)
    with pytest.raises(ValueError):
        native.checksum(b"", -1)


# ---------------------------------------------------------------- coalesce


def mutate(packets: list[bytes], rng: random.Random, n: int) -> list[bytes]:
    """Flip header bytes here and there: the odd paths of _classify and take."""
    out = list(packets)
    for _ in range(n):
        if not out:
            break
        i = rng.randrange(len(out))
        p = bytearray(out[i])
        if rng.random() < 0.2:
            del p[rng.randrange(len(p) + 1) :]
        elif p:
            at = rng.randrange(min(len(p), 80))
            p[at] = rng.choice([p[at] ^ (1 << rng.randrange(8)), 0, 0xFF, 6, 17, 0x45, 0x60])
        out[i] = bytes(p)
    return out


@settings(max_examples=150, deadline=None)
@given(traffic(), st.integers(0, 2**32), st.integers(0, 6), st.booleans())
def test_coalesce_matches(packets: list[bytes], seed: int, flips: int, use_udp: bool) -> None:
    rng = random.Random(seed)
    packets = mutate(packets, rng, flips)
    packets += [
        udp(bytes(rng.randrange(1, 300)), rng.choice([V4, V6])) for _ in range(rng.randrange(3))
    ]
    want = offload.coalesce(packets, use_udp)
    assert native.coalesce(packets, use_udp) == want
    assert native.coalesce([memoryview(p) for p in packets], udp=use_udp) == want


@given(st.lists(st.tuples(st.sampled_from([0, 1]), st.integers(1, 600)), min_size=1, max_size=80))
@settings(max_examples=60, deadline=None)
def test_coalesce_udp_matches(script: list[tuple[int, int]]) -> None:
    counts = [0, 0]
    mixed = []
    for which, size in script:
        mixed.append(
            udp(bytes([counts[which] & 0xFF]) * size, (V4, V6)[which], ip_id=counts[which])
        )
        counts[which] += 1
    assert native.coalesce(mixed) == offload.coalesce(mixed)


@given(st.lists(st.binary(max_size=80), max_size=8))
def test_coalesce_garbage_matches(packets: list[bytes]) -> None:
    assert native.coalesce(packets) == offload.coalesce(packets)


def test_coalesce_cases_from_offload_tests() -> None:
    cases = [
        flow(10, 1000, last=300),
        flow(100, 1400),
        flow(7, 1200, V6, options=b"\x01\x01\x08\x0a" + bytes(range(8)), seq=0xFFFFF000),
        flow(4, 500, ip_options=b"\x01\x01\x01\x00"),
        [*flow(3, 800, last=100), tcp(1000 + 1700, b"b" * 800, ip_id=103)],
        udp_flow([300] * 5 + [120]) + udp_flow([300, 300, 400, 300], V6) + udp_flow([200] * 70),
    ]
    for packets in cases:
        assert native.coalesce(packets) == offload.coalesce(packets)
        assert native.coalesce(packets, False) == offload.coalesce(packets, False)


# ---------------------------------------------------------------- split


def python_split(buf: bytes, mtu: int) -> list[bytes]:
    """offload.split, where a garbage buffer that makes it raise counts as dropped."""
    try:
        return offload.split(buf, mtu)
    except (ValueError, BufferError):  # struct.error is a ValueError
        return []


@settings(max_examples=100, deadline=None)
@given(traffic(), st.sampled_from([1500, 1000, 0, -1, 100000]))
def test_split_of_coalesced_matches(packets: list[bytes], mtu: int) -> None:
    for buf in offload.coalesce(packets):
        assert native.split(buf, mtu) == offload.split(buf, mtu)


@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 80),
    st.integers(0, 80),
    st.binary(max_size=200),
)
def test_split_garbage_matches(
    flags: int, gso: int, size: int, start: int, offset: int, data: bytes
) -> None:
    for pkt in (data, tcp(1, data), tcp(1, data, addrs=V6), udp(data)):
        for b in (VNET.pack(flags, gso, 0, size, start, offset) + pkt, pkt):
            assert native.split(b, 1500) == python_split(b, 1500)


@st.composite
def super_packets(draw: st.DrawFn) -> bytes:
    """TSO/USO buffers at the edges that matter: any IPv4 header length (IHL 0-15, so
    also below 20 bytes), and IPv6 segments around the 64 KiB payload-length limit."""
    gso = draw(st.sampled_from([offload.GSO_TCPV4, offload.GSO_TCPV6, offload.GSO_UDP_L4]))
    v6 = gso == offload.GSO_TCPV6 or (gso == offload.GSO_UDP_L4 and draw(st.booleans()))
    is_udp = gso == offload.GSO_UDP_L4
    size = draw(st.integers(0, 300) | st.integers(65535 - 80, 65535 + 40))
    addrs = V6 if v6 else V4
    # the headers of an empty packet, then the payload: a super-packet's own length
    # fields are not read (split writes each segment's), so they may stay wrong
    pkt = bytearray(udp(b"", addrs) if is_udp else tcp(1, b"", addrs=addrs))
    pkt += bytes(range(256)) * (size // 256) + bytes(size % 256)
    if not v6:
        pkt[0] = 0x40 | draw(st.integers(0, 15))
    gso_size = draw(st.sampled_from([0, 1, 1000, 1400]) | st.integers(size - 8, size + 8))
    flags = draw(st.sampled_from([0, offload.NEEDS_CSUM]))
    start = draw(st.sampled_from([0, 20, 24, 40, 48]))
    return VNET.pack(flags, gso, 0, max(0, min(gso_size, 0xFFFF)), start, 16) + bytes(pkt)


@settings(max_examples=300, deadline=None)
@given(super_packets())
def test_split_of_edge_super_packets_matches(buf: bytes) -> None:
    assert native.split(buf, 1500) == python_split(buf, 1500)


def test_split_edges_agree() -> None:
    """An IPv4 header under 20 bytes: both drop the buffer. An IPv6 segment whose payload
    length is 65,535 (the field's limit, so the packet is just over 64 KiB): both cut it."""
    for ihl in (0, 2, 4):
        pkt = bytearray(tcp(1, bytes(3000)))
        pkt[0] = 0x40 | ihl
        buf = VNET.pack(0, offload.GSO_TCPV4, 0, 1000, 0, 0) + bytes(pkt)
        assert python_split(buf, 1500) == [] and native.split(buf, 1500) == []
    payload = bytes(65535 - 20)  # one segment: 40 + 20 + 65515 bytes, payload length 65535
    header = tcp(1, b"", addrs=V6)
    buf = VNET.pack(0, offload.GSO_TCPV6, 0, len(payload), 0, 0) + header + payload
    (segment,) = offload.split(buf, 1500)
    assert len(segment) == 40 + 65535 and segment[4:6] == b"\xff\xff"
    assert native.split(buf, 1500) == [segment]
    over = VNET.pack(0, offload.GSO_TCPV6, 0, 65535, 0, 0) + header + payload + b"x"
    assert offload.split(over, 1500) == native.split(over, 1500) == []


# ---------------------------------------------------------------- read_nowait


@pytest.mark.parametrize("read_nowait", [native.read_nowait, tun.read_nowait], ids=["c", "py"])
def test_read_nowait(read_nowait: Any) -> None:
    """One read of a non-blocking descriptor: its length, -1 (not BlockingIOError) when
    nothing waits, OSError for anything else; the C one and the Python one alike."""
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        buf = memoryview(bytearray(8))
        assert read_nowait(r, buf) == -1
        os.write(w, b"ping")
        assert read_nowait(r, buf) == 4 and bytes(buf[:4]) == b"ping"
        assert read_nowait(r, buf) == -1
        os.close(w)
        w = -1
        assert read_nowait(r, buf) == 0  # end of file: 0, as read(2) says
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    with pytest.raises(OSError) as error:
        read_nowait(r, buf)  # closed
    assert error.value.errno == errno.EBADF


# ---------------------------------------------------------------- read_packet


def test_read_packet() -> None:
    """One readv: the virtio header into its buffer, the packet into bytes of its own (cut
    to what came), None when nothing waits, zeros past a header cut short, OSError for
    anything else."""
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        r.setblocking(False)
        header = bytearray(b"\xee" * offload.VNET_HDR_LEN)
        assert native.read_packet(r.fileno(), header, 100) is None
        w.send(bytes(range(10)) + b"packet")
        assert native.read_packet(r.fileno(), header, 100) == b"packet"
        assert header == bytes(range(10))
        w.send(bytes(range(10)) + b"x" * 300)
        assert native.read_packet(r.fileno(), header, 100) == b"x" * 100  # a datagram cut
        w.send(b"\x07\x07\x07")
        assert native.read_packet(r.fileno(), header, 100) == b""
        assert header == b"\x07\x07\x07" + bytes(7)
        partial = VNET.pack(offload.NEEDS_CSUM, 0, 0, 0, 20, 16) + flow(1, 30)[0]
        w.send(partial)  # a checksum left to finish: finished as split does, flags cleared
        assert [native.read_packet(r.fileno(), header, 100)] == native.split(partial, 1420)
        assert header == bytes(10)
        past_end = VNET.pack(offload.NEEDS_CSUM, 0, 0, 0, 20, 200) + flow(1, 30)[0]
        w.send(past_end)  # the field past the end: as it came (split drops it)
        assert native.read_packet(r.fileno(), header, 100) == past_end[10:]
        assert header == past_end[:10] and native.split(past_end, 1420) == []
        with pytest.raises(ValueError):
            native.read_packet(r.fileno(), bytearray(9), 100)
    finally:
        r.close()
        w.close()
    with pytest.raises(OSError) as error:
        native.read_packet(r.fileno(), header, 100)  # closed: fileno() is -1
    assert error.value.errno == errno.EBADF


REENTERED = """
import signal, socket, sys
from wgpy import _native as native
outer_r, outer_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
inner_r, inner_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
inner_r.setblocking(False)
inner_w.send(bytes(10) + b"first")
inner_w.send(bytes(10) + b"B" * 5000)  # above SMALL_READ: the read takes the spare whole
got = []

def handler(signum, frame):  # runs inside the outer read_packet, its readv interrupted
    got.append(native.read_packet(inner_r.fileno(), bytearray(10), 8192))
    outer_w.send(bytes(10) + b"A" * 4500)

signal.signal(signal.SIGALRM, handler)
assert native.read_packet(inner_r.fileno(), bytearray(10), 8192) == b"first"  # the spare made
signal.setitimer(signal.ITIMER_REAL, 0.2)
outer = native.read_packet(outer_r.fileno(), bytearray(10), 8192)  # blocks: nothing yet
print(outer == b"A" * 4500, got == [b"B" * 5000])
"""


def test_a_signal_handler_reading_inside_read_packet_takes_its_own_buffer() -> None:
    """A signal that interrupts read_packet's readv runs its Python handler there
    (PyErr_CheckSignals); one that reads a packet too gets a buffer of its own, not the
    one the interrupted read goes on reading into (it took that one first): both come
    out whole. (A blocking descriptor here, so that the readv waits for the signal; the
    TUN's is non-blocking, where EINTR is rare but possible.) Before, the handler took
    the spare buffer out from under the outer read: a NULL dereference."""
    src = os.path.dirname(os.path.dirname(native.__file__))  # the module tested, its tree's
    done = subprocess.run([sys.executable, "-c", REENTERED], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": src})  # fmt: skip
    assert (done.returncode, done.stdout.split()) == (0, ["True", "True"]), done.stderr


def test_read_batch_with_read_packet_makes_the_same_items() -> None:
    """The native Tun reads (`read_packet`: each read kept where it was read) make the
    items and the count that reads into one reused buffer do: plain packets, a TSO read
    whole, one too short to cut, a packet whose checksum the kernel left to us."""
    (tso,) = offload.coalesce(flow(10, 1000))
    (tso6,) = offload.coalesce(flow(7, 900, addrs=V6))
    plain = VNET.pack(0, 0, 0, 0, 0, 0) + flow(1, 10)[0]
    partial = bytearray(VNET.pack(offload.NEEDS_CSUM, 0, 0, 0, 20, 16) + flow(1, 30)[0])
    reads = [plain, tso, tso[:20], bytes(partial), tso6, plain]
    got = []
    for native_reads in (False, True):
        r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            r.setblocking(False)
            for read in reads:
                w.send(read)
            t = tun.Tun.__new__(tun.Tun)  # a TUN's reads on a socket: no interface needed
            t._fd, t.name, t.vnet_hdr = r.fileno(), "test", True
            t._header = bytearray(offload.VNET_HDR_LEN)
            t.read_nowait, t.split = native.read_nowait, native.split  # type: ignore[method-assign]
            t.read_packet = native.read_packet if native_reads else None
            got.append(t.read_batch(memoryview(bytearray(70000)), 64, 1420))
        finally:
            r.close()
            w.close()
    assert got[0] == got[1]
    items, count = got[1]
    assert count == 1 + 10 + 1 + 7 + 1 and len(items) == 5
