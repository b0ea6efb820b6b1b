"""The receive path's one contract, end to end: what open_batch hands back goes to the TUN
as it is (core/output.py `Packets`). The native open's Spans, read in place by the native
coalesce, must make byte for byte the writes the pure open's lists make through the
reference coalescer (io/offload.py), over many reads held at once (as the datapath holds a
turn's reads), with packets the core made itself (ICMP) between the runs."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.io.test_offload import traffic
from tests.native.reference import World, normalize, open_batch_ref
from wgpy.core.device import as_reads
from wgpy.core.output import Output, ToTun
from wgpy.io import offload
from wgpy.io.tun import Tun, TunGone

native = pytest.importorskip(
    "wgpy._native", reason="wgpy._native is not built (python setup.py build_ext --inplace)"
)

ICMP = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 1, 0, bytes(4), bytes(4)) + bytes(8)


def check_spans(spans: Any) -> None:
    """A Spans' table lies inside its buffer, its items are those spans, and every byte
    of the buffer that no span of the call covers is zero (no stale memory, no plaintext
    of a dropped message): checked per Spans, so the bytes of this run's spans are
    blanked in a copy and the rest of the call's buffer may hold only other runs'."""
    buf, table = spans.buf, spans.table
    pairs = list(struct.iter_unpack("<II", table))
    assert len(pairs) == len(spans) and len(table) == 8 * len(spans)
    assert all(off + n <= len(buf) for off, n in pairs)
    assert list(spans) == [buf[off : off + n] for off, n in pairs]
    with pytest.raises(IndexError):
        spans[len(spans)]


def covered(runs: list[Any]) -> bytes:
    """The call's buffer with every span of every run blanked: must be all zeros."""
    if not runs:
        return b""
    buf = bytearray(runs[0][2].buf)
    for _, _, spans in runs:
        assert spans.buf is runs[0][2].buf  # one buffer per call
        for off, n in struct.iter_unpack("<II", spans.table):
            buf[off : off + n] = bytes(n)
    return bytes(buf)


def sealed(world: World, packets: list[bytes], rng: random.Random) -> list[bytes]:
    """The packets as data messages: each stretch on one of the world's sessions, with
    the world's hostile datagrams (replays, bit flips, junk, handshakes) mixed in."""
    grams, kp = [], rng.choice(world.kps)
    for p in packets:
        if rng.random() < 0.1:
            kp = rng.choice(world.kps)
        if rng.random() < 0.1:
            grams.append(world.datagram(len(p)))
        grams.append(world.seal(kp, p, kp.send_counter))
    return grams


def opened(packets: list[bytes], seed: int, nsessions: int) -> tuple[list[ToTun], list[ToTun]]:
    """The packets sealed (with the world's hostile datagrams among them), read as GRO
    reads and opened by both backends: (native items, pure items) for the TUN, checked
    to agree read by read, and some packets the core made itself between the runs."""
    rng = random.Random(seed)
    world = World(rng, nsessions, 1000.0, native)
    for s in [*world.native.values(), *world.ref.values()]:
        s.expires = 1e9  # every session alive: the packets must come through
    got: list[ToTun] = []
    want: list[ToTun] = []
    for read, n, seg, _ in as_reads((g, ("192.0.2.1", 1)) for g in sealed(world, packets, rng)):
        a = native.open_batch(read, n, seg, world.native, world.now)
        b = open_batch_ref(read, n, seg, world.ref, world.now)
        assert normalize(a, world.names) == normalize(b, world.names)
        for spans in (packets for _, _, packets in a[0]):
            check_spans(spans)
        assert not any(covered(a[0]))
        got += [spans for _, _, spans in a[0]]
        want += [run for _, _, run in b[0]]
        if rng.random() < 0.2:  # a packet the core made itself, between the runs
            got.append(ICMP)
            want.append(ICMP)
    assert got and offload.packets_of(got) == offload.packets_of(want)
    return got, want


@settings(max_examples=80, deadline=None)
@given(traffic(), st.integers(0, 2**32), st.integers(1, 3), st.booleans())
def test_spans_to_tun_writes_match_reference(
    packets: list[bytes], seed: int, nsessions: int, use_udp: bool
) -> None:
    got, want = opened(packets, seed, nsessions)
    assert native.coalesce(got, use_udp) == offload.coalesce(want, use_udp)
    assert offload.coalesce(got, use_udp) == offload.coalesce(want, use_udp)


def written(items: list[ToTun], udp: bool) -> tuple[list[bytes], list[tuple[int, bytes]]]:
    """What write_tun writes to a SEQPACKET socket (one message per write, as a TUN takes
    them), read on another thread while the writes go on without the GIL."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    messages: list[bytes] = []
    reader = threading.Thread(
        target=lambda: messages.extend(iter(lambda: theirs.recv(1 << 17), b""))
    )
    reader.start()
    try:
        failed = native.write_tun(ours.fileno(), items, udp)
    finally:
        ours.shutdown(socket.SHUT_WR)
        reader.join(10)
        ours.close()
        theirs.close()
    return messages, failed


@settings(max_examples=60, deadline=None)
@given(traffic(), st.integers(0, 2**32), st.integers(1, 3), st.booleans())
def test_write_tun_writes_what_coalesce_makes(
    packets: list[bytes], seed: int, nsessions: int, use_udp: bool
) -> None:
    """Each write gathered from the Spans' buffer (writev), byte for byte the reference's
    super-packets; long runs of tiny segments (more than one writev takes) among them."""
    got, want = opened(packets, seed, nsessions)
    assert written(got, use_udp) == (offload.coalesce(want, use_udp), [])


def test_write_tun_long_runs_and_failures() -> None:
    """A run of more segments than one writev takes is copied and written whole; a
    descriptor that refuses writes gets every write back with its errno, as
    Tun.write_batch needs them (a vanished interface: TunGone)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 41, 0, 0x4000, 64, 6, 0, bytes(4), bytes(4))
    seg = [ip[:4] + struct.pack("!H", i) + ip[6:] for i in range(400)]
    tcp = [h + struct.pack("!HHIIBBHHH", 1, 2, i, 0, 0x50, 0x10, 9, 0, 0) + b"x"
           for i, h in enumerate(seg)]  # fmt: skip
    want = offload.coalesce(tcp)
    assert len(want) == 1 and written(tcp, True) == (want, [])
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert native.write_tun(fd, [*tcp, ICMP]) == [
            (errno.EBADF, w) for w in offload.coalesce([*tcp, ICMP])
        ]
        tun = Tun.__new__(Tun)  # a TUN whose descriptor refuses every write
        tun._fd, tun.name, tun.vnet_hdr, tun.coalesce_udp = fd, "t", True, True
        tun.write_coalesced = native.write_tun
        with pytest.raises(TunGone):
            tun.write_batch([*tcp], 1420)
    finally:
        os.close(fd)


def test_spans_outlive_their_call_and_are_not_made_from_python() -> None:
    """A Spans keeps its call's buffer: later calls (and the sessions' wipes) leave it
    as it was; Python cannot make one (no forged offsets into a buffer)."""
    rng = random.Random(7)
    world = World(rng, 1, 5.0, native)
    (index,) = world.native
    world.native[index].expires = 1e9
    kp = world.kps[0]
    first = ICMP[:9] + b"\x11" + ICMP[10:]  # any well-formed IPv4 packet
    read = b"".join(world.seal(kp, first, c) for c in range(8))
    (run,) = native.open_batch(read, len(read), len(read) // 8, world.native, 5.0)[0]
    spans = run[2]
    again = b"".join(world.seal(kp, ICMP, c) for c in range(8, 16))
    native.open_batch(again, len(again), len(again) // 8, world.native, 5.0)
    world.native[index].wipe()
    assert list(spans) == [first] * 8
    with pytest.raises(TypeError):
        native.Spans()


def test_output_tun_packets_flattens_runs_and_packets() -> None:
    out = Output()
    out.tun += [[b"a", b"b"], ICMP, [], [b"c"]]
    assert out.tun_packets() == [b"a", b"b", ICMP, b"c"]
