"""A lone packet's TUN -> UDP hop in one C call (src/native/send.c `seal_send`, through
io/udp.py `UdpSocket.seal_send`) against its reference, core/device.py `Device.seal_one`
then `UdpSocket.send_runs`: twin worlds from one seed (the same keys), a real socket on
loopback. The same datagram on the wire, the same peer state once settled, the same ways
declined with nothing changed, the same sticky source (and one gone), and nothing passing
what the sender thread still has queued."""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator

import pytest

from tests.core.test_device import DECLINES, declined
from tests.io.test_sticky import mapped_pktinfo, recv_all
from wgpy.core import native
from wgpy.core.backend import Backend
from wgpy.core.ip import super_packet
from wgpy.core.peer import Peer
from wgpy.io.udp import UdpSocket
from wgpy.sim import SimNet, SimNode, ipv4_packet

module = native.load()
pytestmark = pytest.mark.skipif(module is None, reason="wgpy._native is not built")

PACKET = ipv4_packet("10.0.0.1", "10.0.0.2", b"ping")


@pytest.fixture
def theirs() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock
    finally:
        sock.close()


def linked(seed: int, endpoint: tuple[str, int]) -> tuple[SimNet, SimNode, Peer]:
    """A with a session to B on the native backend, B's endpoint at A moved to `endpoint`."""
    n = SimNet(seed=seed)
    a, b = n.add("a", ("192.0.2.1", 51820)), n.add("b", ("192.0.2.2", 51821))
    n.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    for node in (a, b):
        node.device.backend = Backend(module)
    n.send(a, ipv4_packet("10.0.0.1", "10.0.0.2", b"hello"))  # the handshake
    n.advance(1)
    peer = n.peer(a, b)
    peer.endpoint = endpoint
    return n, a, peer


def ours(sender: bool = False, **kwargs: int) -> UdpSocket:
    sock = UdpSocket()
    assert module is not None
    sock.use_native(module.send_runs, module.UdpSender(**kwargs) if sender else None,
                    module.seal_send)  # fmt: skip
    return sock


def state(peer: Peer) -> tuple[object, ...]:
    counter = peer.current.send_counter if peer.current else None
    return len(peer.staged), peer.tx_bytes, dict(peer.timers.deadlines), counter


@pytest.mark.parametrize("sender", [False, True])
def test_the_same_datagram_and_the_same_state_as_seal_one(
    sender: bool, theirs: socket.socket
) -> None:
    ep = theirs.getsockname()
    (n0, a0, p0), (n1, a1, p1) = linked(5, ep), linked(5, ep)
    sock = ours(sender)
    try:
        device = a0.device
        assert sock.seal_send(PACKET, device.allowed_ips.mirror, n0.now, device.mtu,
                              device.unsettled)  # fmt: skip
        sealed = a1.device.seal_one(PACKET, n1.now)
        assert sealed is not None and sealed[1] == ep
        assert recv_all(theirs, 1) == [(sealed[0][0][0], "127.0.0.1")]
        assert device.unsettled == [(p0, p0.current, 64, True)]
        assert a1.device.unsettled == [(p1, p1.current, 64, True)]
        assert a0.device.settle(n0.now).udp.runs() == a1.device.settle(n1.now).udp.runs() == []
        assert state(p0) == state(p1)
    finally:
        sock.close()


@pytest.mark.parametrize("case", [*DECLINES, "no_mirror", "super_packet"])
def test_every_other_way_is_declined_and_changes_nothing(case: str, theirs: socket.socket) -> None:
    """seal_one's declines (tests/core/test_device.py) and C's own: no mirror of the allowed
    IPs yet, a super-packet."""
    n, a, peer = linked(6, theirs.getsockname())
    packet: object = declined(case, n, peer)
    routes = a.device.allowed_ips.mirror
    if case == "no_mirror":
        routes = None
    elif case == "super_packet":
        packet = super_packet(ipv4_packet("10.0.0.1", "10.0.0.2", b"x" * 1000, proto=17),
                              400, 0, True)  # fmt: skip
        assert packet is not None
    before = state(peer)
    sock = ours()
    try:
        assert sock.seal_send(packet, routes, n.now, a.device.mtu, a.device.unsettled) is False
        assert a.device.unsettled == []
        assert state(peer) == before
        theirs.settimeout(0.05)
        with pytest.raises(TimeoutError):
            theirs.recv(100)
    finally:
        sock.close()


def test_an_endpoint_with_no_address_is_sealed_and_dropped_as_send_runs_drops_it() -> None:
    """What UdpSocket._dest gives an endpoint it cannot parse (None): the message is sealed
    and counted, not sent, as seal_one then send_runs make it; `dest` asked once (it may
    resolve a name, on the loop's thread)."""
    assert module is not None
    (n0, a0, p0), (n1, a1, p1) = linked(6, ("no.such.name", 1)), linked(6, ("no.such.name", 1))
    asked: list[object] = []
    args = (PACKET, a0.device.allowed_ips.mirror, n0.now, a0.device.mtu, a0.device.unsettled)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert module.seal_send(sock.fileno(), {}, asked.append, None, *args) == []
    assert asked == [("no.such.name", 1)]
    assert a1.device.seal_one(PACKET, n1.now) is not None
    assert a0.device.unsettled == [(p0, p0.current, 64, True)]
    assert a0.device.settle(n0.now).udp.runs() == a1.device.settle(n1.now).udp.runs() == []
    assert state(p0) == state(p1)


@pytest.mark.parametrize("gone", [False, True])
def test_seal_send_keeps_no_reference(gone: bool, theirs: socket.socket) -> None:
    """A hundred sends (and a hundred from a source gone) leave every object they touched
    with the references it had (a leak per packet would be a daemon's memory)."""
    ep = theirs.getsockname()
    n, a, peer = linked(9, ep)
    device, sock = a.device, ours()
    theirs.setblocking(False)
    kp = peer.current
    assert kp is not None

    def refs() -> list[int]:
        objects = [peer, kp, kp.sealer, peer.endpoint, PACKET]
        if not gone:  # (a source gone: the socket forgets the endpoint's destination)
            objects.append(sock._dests[ep])
        return [sys.getrefcount(o) for o in objects]

    def once() -> None:
        if gone:
            sock.learn_source(ep, mapped_pktinfo("198.51.100.7"))
        assert sock.seal_send(PACKET, device.allowed_ips.mirror, n.now, device.mtu,
                              device.unsettled)  # fmt: skip
        device.unsettled.clear()
        with contextlib.suppress(BlockingIOError):
            while True:
                theirs.recv(2000)

    try:
        once()
        before = refs()
        for _ in range(100):
            once()
        assert refs() == before
    finally:
        sock.close()


def test_a_closed_socket_sends_no_lone_datagram(theirs: socket.socket) -> None:
    """After close, the descriptor's number may be another socket's: never sent on."""
    n, a, _ = linked(8, theirs.getsockname())
    sock = ours()
    fd = sock.fileno()
    sock.close()
    other = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)  # takes the closed number
    try:
        assert other.fileno() == fd
        assert not sock.seal_send(PACKET, a.device.allowed_ips.mirror, n.now, a.device.mtu,
                                  a.device.unsettled)  # fmt: skip
        theirs.settimeout(0.05)
        with pytest.raises(TimeoutError):
            theirs.recv(100)
    finally:
        other.close()


def test_a_sticky_source_and_one_gone(theirs: socket.socket) -> None:
    """From the remembered source (127.0.0.2); from one that is no address here (as after
    `ip addr del`) the send is refused, the datagram goes from the kernel's choice and the
    socket forgets the source, as send_runs's would."""
    ep = theirs.getsockname()
    n, a, _ = linked(7, ep)
    sock = ours()
    device = a.device
    try:
        for source, host in (("127.0.0.2", "127.0.0.2"), ("198.51.100.7", "127.0.0.1")):
            sock.learn_source(ep, mapped_pktinfo(source))
            assert sock.seal_send(PACKET, device.allowed_ips.mirror, n.now, device.mtu,
                                  device.unsettled)  # fmt: skip
            assert [h for _, h in recv_all(theirs, 1)] == [host]
            assert sock.source(ep) == (source if host == source else None)
    finally:
        sock.close()


def test_nothing_passes_what_the_sender_thread_has_queued(theirs: socket.socket) -> None:
    """Every batch queued (inline=0), a lone packet right behind it: it goes after the
    batch (or is declined, for send's way, while the queue is busy)."""
    ep = theirs.getsockname()
    n, a, _ = linked(8, ep)
    sock = ours(sender=True, inline=0)
    device = a.device
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        for i in range(40):
            sock.send_runs([(b"q" * 1000, 100, ep)])  # 10 datagrams, queued
            lone = sock.seal_send(PACKET, device.allowed_ips.mirror, n.now, device.mtu,
                                  device.unsettled)  # fmt: skip
            assert sock.sender is not None
            sock._learn(sock.sender.flush())
            got = [d for d, _ in recv_all(theirs, 11 if lone else 10)]
            assert got[:10] == [b"q" * 100] * 10, i
            assert len(got[10:]) == lone and all(d[:1] == b"\x04" for d in got[10:])
    finally:
        sock.close()


def test_bad_arguments() -> None:
    assert module is not None
    with pytest.raises(TypeError):
        module.seal_send(0, {}, None, None, PACKET, None, 0.0, 1420)  # 8 arguments
    with pytest.raises(TypeError):
        module.seal_send(0, [], None, None, PACKET, None, 0.0, 1420, [])  # dests not a dict
    with pytest.raises(TypeError):
        module.seal_send(0, {}, None, object(), PACKET, None, 0.0, 1420, [])  # no sender
    with pytest.raises(TypeError):
        module.seal_send(-1, {}, None, None, PACKET, None, 0.0, 1420, [])

    class Real:
        def __float__(self) -> float:
            return 1.0

    with pytest.raises(TypeError):  # its own error, no Python run with one set
        module.seal_send("0", {}, None, None, PACKET, None, Real(), 1420, [])
