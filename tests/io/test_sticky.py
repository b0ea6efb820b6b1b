"""Sticky source addresses on loopback: a reply leaves from the local address its
endpoint's packets arrived at (127.0.0.2 here, where the kernel would pick 127.0.0.1),
plain and GSO sends alike; a source that can't be sent from is dropped and the send goes
out anyway; a handshake retry makes the datapath forget the peer's source. And the
datapath's handshake work-off under load, which the flood tests (tests/integration/
test_flood.py) found wanting."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from tests.io.fakes import ChannelTun
from tests.io.test_datapath import B_EP, NATIVE, Site, carry, pair
from tests.io.test_offload import V4, flow
from wgpy.core.backend import Backend
from wgpy.core.cookie import CookieGenerator
from wgpy.core.crypto import clamp
from wgpy.core.device import Device
from wgpy.core.events import CookieSent, InitiationReceived, InitiationSent, ProtocolEvent
from wgpy.core.output import Drop
from wgpy.io import datapath as datapath_module
from wgpy.io import udp as udp_module
from wgpy.io.datapath import HANDSHAKES_PER_TURN, Datapath
from wgpy.io.udp import UdpSocket


def recv_all(sock: socket.socket, count: int, timeout: float = 3.0) -> list[tuple[bytes, str]]:
    """(datagram, source host) of `count` datagrams."""
    sock.settimeout(timeout)
    got = []
    for _ in range(count):
        data, addr = sock.recvfrom(65536)
        got.append((data, addr[0]))
    return got


def wait_read(sock: UdpSocket, timeout: float = 3.0) -> tuple[str, int]:
    buf = memoryview(bytearray(70000))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = sock.recv_into(buf)
        if r is not None:
            if sock.last_info is not None:  # as the datapath does once a read authenticated
                sock.learn_source(r[2], sock.last_info)
            return r[2]
        time.sleep(0.002)
    raise AssertionError("nothing arrived")


V4Pair = tuple[UdpSocket, socket.socket]


@pytest.fixture
def pair_v4() -> Iterator[V4Pair]:
    ours = UdpSocket()
    theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    theirs.bind(("127.0.0.1", 0))
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def test_replies_leave_from_the_address_the_peer_sent_to(pair_v4: V4Pair) -> None:
    ours, theirs = pair_v4
    assert ours.sticky
    theirs.sendto(b"hello", ("127.0.0.2", ours.port))
    endpoint = wait_read(ours)
    assert endpoint == theirs.getsockname()
    assert ours.source(endpoint) == "127.0.0.2"
    ours.send(b"one", endpoint)
    ours.send_segments(b"a" * 300 + b"b" * 300 + b"c" * 10, 300, endpoint)  # one GSO send
    ours.send_batch([(b"x" * 100, endpoint), (b"y" * 100, endpoint), (b"z", endpoint)])
    got = recv_all(theirs, 7)
    assert [d for d, _ in got] == [b"one", b"a" * 300, b"b" * 300, b"c" * 10,
                                   b"x" * 100, b"y" * 100, b"z"]  # fmt: skip
    assert {host for _, host in got} == {"127.0.0.2"}
    # without the sticky source the kernel picks 127.0.0.1 (the destination's own address)
    ours.forget_source(endpoint)
    assert ours.source(endpoint) is None
    ours.send(b"two", endpoint)
    assert recv_all(theirs, 1) == [(b"two", "127.0.0.1")]
    # the next packet from the peer, to the other address, moves the source along
    theirs.sendto(b"again", ("127.0.0.3", ours.port))
    wait_read(ours)
    assert ours.source(endpoint) == "127.0.0.3"
    ours.send(b"three", endpoint)
    assert recv_all(theirs, 1) == [(b"three", "127.0.0.3")]


def test_ipv6_on_the_dual_stack_socket() -> None:
    ours = UdpSocket()
    theirs = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    theirs.bind(("::1", 0))
    try:
        theirs.sendto(b"hello", ("::1", ours.port))
        endpoint = wait_read(ours)
        assert ours.source(endpoint) == "::1"
        ours.send_segments(b"a" * 200 + b"b" * 200, 200, endpoint)
        assert recv_all(theirs, 2) == [(b"a" * 200, "::1"), (b"b" * 200, "::1")]
    finally:
        ours.close()
        theirs.close()


def test_an_ipv4_only_socket_uses_ip_pktinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no IPv6, the socket is AF_INET and the packet info IP_PKTINFO."""

    def bind_v4(port: int) -> tuple[socket.socket, bool]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        sock.bind(("0.0.0.0", port))
        return sock, False

    monkeypatch.setattr(udp_module, "_bind", bind_v4)
    ours = UdpSocket()
    theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    theirs.bind(("127.0.0.1", 0))
    try:
        assert ours.sticky and not ours._v6
        theirs.sendto(b"hello", ("127.0.0.4", ours.port))
        endpoint = wait_read(ours)
        assert ours.source(endpoint) == "127.0.0.4"
        ours.send(b"one", endpoint)
        ours.send_segments(b"a" * 100 + b"b" * 50, 100, endpoint)
        assert recv_all(theirs, 3) == [(b"one", "127.0.0.4"), (b"a" * 100, "127.0.0.4"),
                                       (b"b" * 50, "127.0.0.4")]  # fmt: skip
    finally:
        ours.close()
        theirs.close()


def mapped_pktinfo(addr: str, ifindex: int = 1) -> bytes:
    return socket.inet_pton(socket.AF_INET6, "::ffff:" + addr) + struct.pack("=I", ifindex)


def test_a_source_that_is_gone_is_forgotten_and_the_send_still_goes(pair_v4: V4Pair) -> None:
    """198.51.100.7 is no address of this host (as after `ip addr del`): the kernel
    refuses the send from it (ENETUNREACH); the socket forgets it and sends again."""
    ours, theirs = pair_v4
    endpoint = theirs.getsockname()
    for send in (
        lambda: ours.send(b"plain", endpoint),
        lambda: ours.send_segments(b"g" * 100 + b"h" * 100, 100, endpoint),
    ):
        ours.learn_source(endpoint, mapped_pktinfo("198.51.100.7"))
        assert ours.source(endpoint) == "198.51.100.7"
        send()
        assert ours.source(endpoint) is None
    got = recv_all(theirs, 3)
    assert got == [(b"plain", "127.0.0.1"), (b"g" * 100, "127.0.0.1"), (b"h" * 100, "127.0.0.1")]
    assert ours.gso  # a source gone is no reason to give GSO up


def test_the_sources_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp_module, "MAX_SOURCES", 8)
    ours = UdpSocket()
    try:
        for i in range(20):
            ours.learn_source(("192.0.2.9", 1000 + i), mapped_pktinfo("127.0.0.2"))
        assert len(ours._sources) == 8
        assert ours.source(("192.0.2.9", 1019)) == "127.0.0.2"  # the newest stay
        assert ours.source(("192.0.2.9", 1000)) is None
    finally:
        ours.close()


@pytest.fixture(params=["python", "native"])
def both_datapaths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The datapath tests here run on both datapaths, as tests/io/test_datapath.py's."""
    if request.param == "native" and NATIVE is None:
        pytest.skip("wgpy._native is not built")
    monkeypatch.setattr(Site, "native", NATIVE if request.param == "native" else None)
    return str(request.param)


def test_a_handshake_retry_forgets_the_peers_source(both_datapaths: str) -> None:
    """B never answers: A's retransmitted initiation (attempt 1) goes out after A's
    datapath told the socket to forget B's sticky source, as wireguard-go does."""
    a, b = pair()
    b.udp.close()  # B is gone from the network
    a.tun.inbound.extend(flow(1, 10))
    a.datapath.on_tun()
    assert a.udp.forgotten == []  # the first initiation keeps the source
    now = time.monotonic()
    for step in range(1, 80):  # REKEY_TIMEOUT is 5 s, plus jitter
        a.datapath.tick(now + step * 0.1)
    retries = [e for e in a.events if isinstance(e, InitiationSent) and e.attempt]
    assert retries and a.udp.forgotten and set(a.udp.forgotten) == {B_EP}


def test_established_traffic_does_not_forget(both_datapaths: str) -> None:
    a, b = pair()
    carry(a, b, flow(1, 10))
    carry(a, b, flow(10, 500, seq=100))
    assert a.udp.forgotten == [] and b.udp.forgotten == []


# ---- the handshake work-off under load (datapath) -------------------------------------


def flood_initiations(target: bytes, count: int) -> list[tuple[bytes, int, tuple[str, int]]]:
    """Reads of `count` initiations with a valid mac1 for `target`, each from its own
    source (so the rate limit lets them all into the queue)."""
    gen = CookieGenerator(target)
    reads = []
    for i in range(count):
        msg = bytearray(random.Random(i).randbytes(148))
        msg[0:4] = bytes([1, 0, 0, 0])
        gen.add_macs(msg, 0.0)
        reads.append((bytes(msg), 0, (f"198.18.{i // 250}.{i % 250 + 1}", 4000)))
    return reads


@pytest.mark.parametrize(("seconds", "batches"), [(0.0, 1), (5.0, 4)])
def test_a_turn_works_off_batches_of_handshakes_while_its_time_lasts(
    monkeypatch: pytest.MonkeyPatch, seconds: float, batches: int, both_datapaths: str
) -> None:
    """One turn works off batches of 16 queued handshakes while its time (0.5 ms; here
    none, or plenty) lasts, so that a flood from many sources does not keep the queue
    full (where a legitimate handshake is dropped like any other); the rest wait for the
    next turn. The first batch always goes. (Each of these costs a Diffie-Hellman before
    it turns out to be nobody's.)"""
    monkeypatch.setattr(datapath_module, "HANDSHAKE_SECONDS", seconds)
    a, b = pair()
    assert b.device.public_key is not None
    b.udp.reads.extend(flood_initiations(b.device.public_key, 60))
    b.datapath.on_udp()
    worked = b.datapath.drops[Drop.BAD_HANDSHAKE]
    assert worked == min(60, batches * HANDSHAKES_PER_TURN)
    assert worked + b.device.queued_handshakes == 60
    assert not b.udp.sent


def test_an_unauthenticated_datagram_moves_no_source(pair_v4: V4Pair) -> None:
    """Anyone can spoof a peer's address and port: only a read that authenticated may
    teach the socket where to send from (as only it may move the peer's endpoint)."""
    ours, theirs = pair_v4
    device = Device(random.Random(5).randbytes)
    device.set_private_key(clamp(bytes(range(32))))
    datapath = Datapath(device, ChannelTun(), ours)
    theirs.sendto(bytes([4, 0, 0, 0]) + bytes(60), ("127.0.0.2", ours.port))  # junk "data"
    theirs.sendto(bytes([1, 0, 0, 0]) + bytes(144), ("127.0.0.2", ours.port))  # bad mac1
    deadline = time.monotonic() + 3
    while sum(datapath.drops.values()) < 2 and time.monotonic() < deadline:
        datapath.on_udp()
        time.sleep(0.005)
    assert sum(datapath.drops.values()) == 2
    assert ours.source(theirs.getsockname()) is None


def test_the_source_is_that_of_the_handshake_that_authenticated(
    pair_v4: V4Pair, both_datapaths: str
) -> None:
    """The peer's initiation comes to 127.0.0.2; right behind it, in the same drain, a
    spoofed one-byte datagram from the peer's address and port comes to 127.0.0.3. Only
    the initiation authenticated: the response leaves from 127.0.0.2, and so does what
    follows (Linux and wireguard-go take the source from the authenticated datagram)."""
    ours, theirs = pair_v4
    rng = random.Random(11)
    responder = Device(rng.randbytes, backend=Backend(Site.native, threading.Lock))
    responder.set_private_key(clamp(rng.randbytes(32)))
    initiator = Device(rng.randbytes)
    initiator.set_private_key(clamp(rng.randbytes(32)))
    assert responder.public_key is not None and initiator.public_key is not None
    assert responder.add_peer(initiator.public_key) is not None
    peer = initiator.add_peer(responder.public_key)
    assert peer is not None
    peer.endpoint = ("127.0.0.2", ours.port)
    initiator.allowed_ips.insert(V4[1], 32, peer)
    events: list[ProtocolEvent] = []
    datapath = Datapath(responder, ChannelTun(), ours, events.extend)
    [(initiation, _)] = initiator.send(flow(1, 10), time.monotonic()).udp
    theirs.sendto(initiation, ("127.0.0.2", ours.port))
    theirs.sendto(b"\x01", ("127.0.0.3", ours.port))  # same source: as a spoofer would
    time.sleep(0.2)  # both wait in the socket: one drain reads them
    datapath.on_udp()
    [(response, host)] = recv_all(theirs, 1)
    assert response[0] == 2 and host == "127.0.0.2"
    assert ours.source(theirs.getsockname()) == "127.0.0.2"
    # the packet info was the datapath's: listeners see the event as before, no detail
    assert [e.tag for e in events if isinstance(e, InitiationReceived)] == [None]


@pytest.mark.skipif(not datapath_module.native_intake(), reason="the C intake was not built")
def test_a_drains_cookie_replies_are_one_event(pair_v4: V4Pair) -> None:
    """Under load, an initiation with a valid mac1 and no mac2 gets a cookie reply. The
    first reply draws the cookie's nonce prefix in Python; then 40 in one drain get
    theirs made and sent in C, and the listeners hear of them in one event (a flood's
    replies used to be one Python object each)."""
    ours, theirs = pair_v4
    rng = random.Random(3)
    responder = Device(rng.randbytes, backend=Backend(Site.native, threading.Lock),
                       classify=True)  # fmt: skip
    responder.set_private_key(clamp(rng.randbytes(32)))
    responder.intake.load.forced = True
    initiator = Device(rng.randbytes)
    initiator.set_private_key(clamp(rng.randbytes(32)))
    assert responder.public_key is not None
    peer = initiator.add_peer(responder.public_key)
    assert peer is not None
    peer.endpoint = ("127.0.0.1", ours.port)
    initiator.allowed_ips.insert(V4[1], 32, peer)
    [(initiation, _)] = initiator.send(flow(1, 10), time.monotonic()).udp
    events: list[ProtocolEvent] = []
    datapath = Datapath(responder, ChannelTun(), ours, events.extend)
    for count in (1, 40):
        events.clear()
        for _ in range(count):
            theirs.sendto(initiation, ("127.0.0.1", ours.port))
        time.sleep(0.2)  # all wait in the socket: one drain reads them
        datapath.on_udp()
    cookies = [(e.source, e.count) for e in events if isinstance(e, CookieSent)]
    assert cookies == [(None, 40)]
    assert len(recv_all(theirs, 41)) == 41
