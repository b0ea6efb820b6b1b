"""Shedding on a real socket: while the kernel drops datagrams at the UDP socket (it
cannot be read as fast as a flood comes: a full drain finds the queue over half full),
the C intake sends no cookie replies to strangers, and a peer's endpoint still gets its
reply (src/native/classify.c `shedding`, core/ratelimit.py)."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.io.fakes import ChannelTun
from tests.io.test_datapath import Site
from tests.io.test_offload import V4, flow
from wgpy.core.backend import Backend
from wgpy.core.crypto import clamp
from wgpy.core.device import Device
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


def test_a_peer_gets_its_reply_while_strangers_are_shed(
    sockets: tuple[UdpSocket, socket.socket, socket.socket],
) -> None:
    ours, known, stranger = sockets
    shrunk = socket.socket(fileno=os.dup(ours.fileno()))  # ~100-170 datagrams fit, not 1,000
    shrunk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    shrunk.close()
    rng = random.Random(7)
    victim = Device(rng.randbytes, backend=Backend(Site.native, threading.Lock),
                    classify=True)  # fmt: skip
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
    assert replies(stranger) == 0
