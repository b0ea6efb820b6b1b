"""Shedding on a real socket: while the kernel drops datagrams at the UDP socket (it
cannot be read as fast as a flood comes: a full drain finds the queue over half full),
the C intake sends no cookie replies to strangers, and a peer's endpoint still gets its
reply (src/native/classify.c `shedding`, core/ratelimit.py)."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.io.fakes import ChannelTun
from tests.io.test_datapath import Site
from tests.io.test_offload import V4, flow
from wgpy.core import intake
from wgpy.core.backend import Backend
from wgpy.core.cookie import CookieGenerator
from wgpy.core.crypto import clamp
from wgpy.core.device import Device
from wgpy.core.intake import SEND_COOKIE
from wgpy.core.messages import INITIATION_LEN
from wgpy.core.output import Drop
from wgpy.io import datapath as datapath_module
from wgpy.io.datapath import Datapath
from wgpy.io.udp import UdpSocket

pytestmark = pytest.mark.skipif(
    not datapath_module.native_intake(), reason="the C intake was not built"
)


def udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture
def sockets() -> Iterator[tuple[UdpSocket, socket.socket, socket.socket]]:
    ours, known, stranger = UdpSocket(), udp(), udp()
    try:
        yield ours, known, stranger
    finally:
        for sock in (ours, known, stranger):
            sock.close()


def replies(sock: socket.socket) -> int:
    """The cookie replies waiting at `sock`."""
    sock.setblocking(False)
    count = 0
    while True:
        try:
            data = sock.recv(2048)
        except BlockingIOError:
            return count
        count += data[0] == 3


def flood_target(ours: UdpSocket, known: socket.socket, backend: Backend,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[Device, bytes]:  # fmt: skip
    """What a flood at `ours` is set up with (here and in tests/native/test_reader.py):
    its receive queue shrunk (~100-170 datagrams fit, not 1,000); a victim with the C
    intake on `backend`, every message owed a cookie, 5 replies to strangers while it
    sheds; its one peer at `known` (bound); an initiation from that peer."""
    monkeypatch.setattr(intake, "SHED_BURST", 5)  # strangers' replies while shedding: 5
    monkeypatch.setattr(intake, "SHED_REPLIES", 0.001)
    shrunk = socket.socket(fileno=os.dup(ours.fileno()))
    shrunk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    shrunk.close()
    rng = random.Random(7)
    victim = Device(rng.randbytes, backend=backend, classify=True)
    victim.set_private_key(clamp(rng.randbytes(32)))
    victim.intake.load.forced = True  # every message needs a cookie
    initiator = Device(rng.randbytes)
    initiator.set_private_key(clamp(rng.randbytes(32)))
    assert victim.public_key is not None and initiator.public_key is not None
    victim_peer = victim.add_peer(initiator.public_key)
    assert victim_peer is not None
    victim_peer.endpoint = known.getsockname()
    peer = initiator.add_peer(victim.public_key)
    assert peer is not None
    peer.endpoint = ("127.0.0.1", ours.port)
    initiator.allowed_ips.insert(V4[1], 32, peer)
    [(initiation, _)] = initiator.send(flow(1, 10), time.monotonic()).udp
    return victim, initiation


def test_a_peer_gets_its_reply_while_strangers_are_shed(
    sockets: tuple[UdpSocket, socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, known, stranger = sockets
    backend = Backend(Site.native, threading.Lock)
    victim, initiation = flood_target(ours, known, backend, monkeypatch)
    datapath = Datapath(victim, ChannelTun(), ours)
    to = ("127.0.0.1", ours.port)

    def send_and_drain(first: socket.socket | None, count: int) -> None:
        if first is not None:
            first.sendto(initiation, to)
        for _ in range(count):
            stranger.sendto(initiation, to)
        for _ in range(40):  # each readable event drains 64 reads
            datapath.on_udp()

    send_and_drain(None, 20)  # the socket keeps up: every message its reply
    assert datapath.drops[Drop.REPLY_SHED] == 0 and replies(stranger) == 20
    send_and_drain(known, 1000)  # it overflows: shed from the first full drain on
    assert datapath.drops[Drop.REPLY_SHED] > 0
    assert replies(known) == 1
    assert replies(stranger) == 5


def _drops(sock: socket.socket) -> int:
    """The datagrams the kernel dropped at `sock` (SO_MEMINFO's last field)."""
    return struct.unpack("9I", sock.getsockopt(socket.SOL_SOCKET, 55, 64)[:36])[8]


def test_drops_from_before_with_the_queue_read_shed_nothing(
    sockets: tuple[UdpSocket, socket.socket, socket.socket],
) -> None:
    """A drop count that grew is no overflow of now: one datagram with a bad UDP checksum
    (any sender, off path) counts as a drop when it is read, so shedding on it alone let
    one such datagram a second keep every stranger (a peer that roamed, one with no
    endpoint yet) from its cookie. Here the count grows by a real overflow, then the
    queue is read empty: the next full drain (one read of one) answers the stranger."""
    ours, _, stranger = sockets
    sock = socket.socket(fileno=os.dup(ours.fileno()))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        rng = random.Random(9)
        victim = Device(rng.randbytes, classify=True)
        victim.set_private_key(clamp(rng.randbytes(32)))
        victim.intake.load.forced = True  # every message needs a cookie
        assert victim.public_key is not None
        gen = CookieGenerator(victim.public_key)
        initiation = bytearray(b"\x01\0\0\0" + rng.randbytes(INITIATION_LEN - 36) + bytes(32))
        gen.add_macs(initiation, 1000.0)
        classifier = victim.intake.classifier
        assert classifier is not None
        buf, to, now = bytearray(4096 * 256), ("127.0.0.1", ours.port), 1000.0

        def drain(count: int) -> tuple[int, dict[str, int], int]:
            """(reads, refusals, cookie replies: sent in C, or left for Python to make)"""
            until, queued, forced, state = victim.intake.state(now)
            kept, got, _, drops, sent, _ = classifier.drain(
                sock.fileno(), buf, 4096, count, now, until, queued, forced, state
            )
            owed = [v for *_, passed, _ in kept for _, v in passed or () if v == SEND_COOKIE]
            return got, drops, sent + len(owed)

        assert drain(1)[0] == 0  # the first look: the drops so far are history
        for _ in range(1000):
            stranger.sendto(b"\x05" * 100, to)
        assert _drops(sock) > 0
        while drain(256)[0] == 256:  # read empty, never a full drain
            pass
        now += 10.0
        stranger.sendto(bytes(initiation), to)
        got, drops, replied = drain(1)  # full: it looks, and finds the queue empty
        assert (got, drops.get("reply_shed", 0), replied) == (1, 0, 1)
    finally:
        sock.close()
