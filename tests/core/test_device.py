"""Two devices in memory with a fake clock: the protocol end to end, and every drop rule."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgpy.core.backend import padded_length
from wgpy.core.constants import MAX_STAGED_PACKETS, REKEY_TIMEOUT
from wgpy.core.cookie import CookieGenerator
from wgpy.core.crypto import clamp
from wgpy.core.device import Device, Output
from wgpy.core.events import EndpointChanged, EventKind, InitiationReceived, ResponseReceived
from wgpy.core.intake import HANDSHAKE_QUEUE
from wgpy.core.ip import SuperPacket, segments, super_packet
from wgpy.core.messages import (
    COOKIE_REPLY_LEN,
    INITIATION_LEN,
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_LEN,
    parse_cookie_reply,
)
from wgpy.core.output import Drop
from wgpy.core.peer import Peer
from wgpy.core.ratelimit import MAX_SOURCES, RateLimiter
from wgpy.core.timers import Timer
from wgpy.sim import SimNet, SimNode, ipv4_packet, ipv6_packet, seal

A_EP = ("192.0.2.1", 51820)
B_EP = ("192.0.2.2", 51821)


def kinds(wire: list[tuple[bytes, tuple[str, int], tuple[str, int]]]) -> list[int]:
    return [d[0] for d, _, _ in wire]


@pytest.fixture
def net() -> SimNet:
    n = SimNet()
    a = n.add("a", A_EP)
    b = n.add("b", B_EP)
    n.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    return n


def nodes(net: SimNet):  # type: ignore[no-untyped-def]
    return net.nodes[A_EP], net.nodes[B_EP]


def handshake(net: SimNet) -> None:
    a, b = nodes(net)
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2", b"first"))


# ---- the protocol working ----------------------------------------------------------


def test_handshake_then_data_both_ways(net: SimNet) -> None:
    a, b = nodes(net)
    p1 = ipv4_packet("10.0.0.1", "10.0.0.2", b"hello b")
    net.send(a, p1)
    # initiation, response, then the staged packet; b answered with nothing else yet
    assert kinds(net.wire) == [MSG_INITIATION, MSG_RESPONSE, MSG_DATA]
    assert b.delivered == [p1]
    p2 = ipv4_packet("10.0.0.2", "10.0.0.1", b"hello a")
    net.send(b, p2)
    assert a.delivered == [p2]
    pa, pb = net.peer(a, b), net.peer(b, a)
    assert pa.last_handshake is not None and pb.last_handshake is not None
    assert pa.tx_bytes == pb.rx_bytes and pb.tx_bytes == pa.rx_bytes
    assert pb.next is None and pb.current is not None  # confirmed by the first data packet


def test_ipv6_inside(net: SimNet) -> None:
    a, b = nodes(net)
    peer = net.peer(b, a)
    b.device.allowed_ips.insert(bytes.fromhex("fd000000000000000000000000000001"), 128, peer)
    peer_b = net.peer(a, b)
    a.device.allowed_ips.insert(bytes.fromhex("fd000000000000000000000000000002"), 128, peer_b)
    p = ipv6_packet("fd00::1", "fd00::2")
    net.send(a, p)
    assert b.delivered == [p]


def test_initiator_confirms_with_keepalive_when_nothing_is_staged(net: SimNet) -> None:
    a, b = nodes(net)
    peer = net.peer(a, b)
    net.pump(a, a.device.set_persistent_keepalive(peer, 25, net.now))
    assert kinds(net.wire) == [MSG_INITIATION, MSG_RESPONSE, MSG_DATA]
    assert len(net.wire[-1][0]) == 32  # an empty (keepalive) data message
    assert net.peer(b, a).current is not None


def test_padding_and_sizes(net: SimNet) -> None:
    a, _ = nodes(net)
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2", b"x" * 13))  # 33 bytes -> 48
    sizes = [len(d) for d, _, _ in net.wire]
    assert sizes == [INITIATION_LEN, RESPONSE_LEN, 16 + 48 + 16]
    assert padded_length(1420, 1420) == 1420
    assert padded_length(1419, 1420) == 1420
    assert padded_length(1500, 1420) == 1500  # 1500 % 1420 = 80 is a multiple of 16
    assert padded_length(1501, 1420) == 1516


def test_passive_keepalive_after_receiving_data(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    net.wire.clear()
    net.advance(9.9)
    assert net.wire == []
    net.advance(0.5)  # b owes a an answer after KEEPALIVE_TIMEOUT
    assert [(len(d), s) for d, s, _ in net.wire] == [(32, B_EP)]


def test_persistent_keepalive(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    net.pump(a, a.device.set_persistent_keepalive(net.peer(a, b), 25, net.now))
    net.wire.clear()
    net.advance(100)
    from_a = [d for d, s, _ in net.wire if s == A_EP and len(d) == 32]
    # b's passive keepalive at 10 s is an authenticated packet: it rearms a's timer,
    # so a's keepalives go out at 35, 60 and 85 s
    assert len(from_a) == 3


def test_rekey_after_120s_of_sending(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    first = net.peer(a, b).current
    for _ in range(125):
        net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
        net.send(b, ipv4_packet("10.0.0.2", "10.0.0.1"))
        net.advance(1)
    assert net.peer(a, b).current is not first
    assert net.peer(a, b).previous is not None
    assert kinds(net.wire).count(MSG_INITIATION) == 2
    assert len(b.delivered) == 126


def test_send_unsettled_changes_no_peer_state_until_settled(net: SimNet) -> None:
    """The datapath sends first and settles after (io/datapath.py on_tun): the sealed
    message is the same, and only `settle` moves the byte count, the timers and, for a
    session past its age, starts the rekey."""
    a, b = nodes(net)
    handshake(net)
    peer = net.peer(a, b)
    net.advance(130)  # the initiator's session is past REKEY_AFTER_TIME, still usable
    net.pump(b, b.device.tick(net.now))
    tx, timers = peer.tx_bytes, dict(peer.timers.deadlines)
    assert Timer.NEW_HANDSHAKE not in timers
    out = a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2", b"x")], net.now, settle=False)
    assert kinds([(d, e, e) for d, e in out.udp]) == [MSG_DATA]
    assert peer.tx_bytes == tx and peer.timers.deadlines == timers
    later = a.device.settle(net.now)
    assert peer.tx_bytes > tx and Timer.NEW_HANDSHAKE in peer.timers.deadlines
    assert kinds([(d, e, e) for d, e in later.udp]) == [MSG_INITIATION]
    assert a.device.settle(net.now).udp.runs() == []  # settled once


def _linked(seed: int, shake: bool = True) -> tuple[SimNet, SimNode, SimNode]:
    n = SimNet(seed=seed)
    a, b = n.add("a", A_EP), n.add("b", B_EP)
    n.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    if shake:
        handshake(n)
        n.advance(1)
    return n, a, b


def test_a_raise_while_settling_settles_nothing_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """`settle` takes what is unsettled before it works: a raise in one peer's part
    (a bug, say) leaves no other peer's part to be done again by the next `settle`."""
    n, a, b = _linked(3)
    c = n.add("c", ("192.0.2.3", 51822))
    n.link(a, c, "10.0.0.1/32", "10.0.1.2/32")
    n.send(a, ipv4_packet("10.0.0.1", "10.0.1.2", b"first"))  # a session with c too
    n.advance(1)
    pb, pc = n.peer(a, b), n.peer(a, c)
    packets = [ipv4_packet("10.0.0.1", "10.0.0.2", b"x"), ipv4_packet("10.0.0.1", "10.0.1.2")]
    a.device.send(packets, n.now, settle=False)
    real = a.device._sent

    def failing_for_c(peer: object, *args: object) -> None:
        if peer is pc:
            raise RuntimeError("c's bookkeeping failed")
        real(peer, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(a.device, "_sent", failing_for_c)
    with pytest.raises(RuntimeError):
        a.device.settle(n.now)
    once = pb.tx_bytes
    a.device.settle(n.now)
    assert pb.tx_bytes == once


def test_seal_one_is_send_for_a_lone_packet() -> None:
    """The lone packet's way (io/datapath.py on_tun) against `send`, on twin devices:
    the same datagram to the same endpoint, and once settled the same peer state."""
    (n0, a0, b0), (n1, a1, b1) = _linked(5), _linked(5)
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", b"ping")
    sealed = a0.device.seal_one(packet, n0.now)
    assert sealed is not None
    runs, endpoint = sealed
    out = a1.device.send([packet], n1.now)
    assert [(buf, endpoint) for buf, _ in runs] == list(out.udp)
    assert a0.device.settle(n0.now).udp.runs() == []
    p0, p1 = n0.peer(a0, b0), n1.peer(a1, b1)
    assert (p0.tx_bytes, p0.timers.deadlines) == (p1.tx_bytes, p1.timers.deadlines)
    assert Timer.NEW_HANDSHAKE in p0.timers.deadlines


DECLINES = ["no_route", "not_ip", "no_endpoint", "staged", "no_session", "expired", "spent"]


def declined(case: str, n: SimNet, peer: Peer) -> bytes:
    """One of the DECLINES made: the packet a lone packet's way must refuse, the peer set
    up for it (tests/native/test_seal_send.py's C way too)."""
    packet = ipv4_packet("10.0.0.1", "10.9.9.9" if case == "no_route" else "10.0.0.2")
    if case == "not_ip":
        packet = bytes(40)
    elif case == "no_endpoint":
        peer.endpoint = None
    elif case == "staged":
        peer.staged.append(ipv4_packet("10.0.0.1", "10.0.0.2", b"first"))
    elif case == "no_session":
        peer.current = None
    elif case == "expired":
        n.now += 181
    elif case == "spent":
        assert peer.current is not None
        peer.current.sealer.expire()
    return packet


@pytest.mark.parametrize("case", DECLINES)
def test_seal_one_declines_any_other_way_and_changes_nothing(case: str) -> None:
    n, a, b = _linked(6, shake=case != "no_session")
    peer = n.peer(a, b)
    packet = declined(case, n, peer)
    counter = peer.current.send_counter if peer.current else None
    before = (len(peer.staged), peer.tx_bytes, dict(peer.timers.deadlines), counter)
    assert a.device.seal_one(packet, n.now) is None
    assert a.device.settle(n.now).udp.runs() == []
    counter = peer.current.send_counter if peer.current else None
    assert (len(peer.staged), peer.tx_bytes, dict(peer.timers.deadlines), counter) == before


def test_rekey_when_receiving_an_old_session(net: SimNet) -> None:
    """The initiator re-handshakes at 165 s even if only the responder sends."""
    a, b = nodes(net)
    handshake(net)
    for _ in range(170):
        net.send(b, ipv4_packet("10.0.0.2", "10.0.0.1"))
        net.advance(1)
    assert kinds(net.wire).count(MSG_INITIATION) >= 2
    assert len(a.delivered) == 170


def test_session_expires_after_180s(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    old = net.peer(a, b).current
    assert old is not None
    net.advance(181)
    # a stale datagram sealed on the old session is refused
    stale = seal(old, ipv4_packet("10.0.0.1", "10.0.0.2"))
    assert b.device.receive([(stale, A_EP)], net.now).tun == []
    # sending now needs a new handshake first
    net.wire.clear()
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    assert kinds(net.wire)[:2] == [MSG_INITIATION, MSG_RESPONSE]
    assert net.peer(a, b).current is not old


def test_keys_zeroed_after_540s(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    net.advance(530)
    assert net.peer(a, b).current is not None
    net.advance(15)
    for node, other in ((a, b), (b, a)):
        peer = net.peer(node, other)
        assert peer.keypairs() == []
        assert node.device.index.keypairs == {}


def test_retransmits_then_gives_up(net: SimNet) -> None:
    a, b = nodes(net)
    net.drop = lambda data, src, dst: dst == A_EP  # b's answers are lost
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    net.advance(80)
    sent = [d for d, s, _ in net.wire if s == A_EP and d[0] == MSG_INITIATION]
    assert 14 <= len(sent) <= 16  # one every 5-5.33 s
    net.advance(40)
    total = len([d for d, s, _ in net.wire if s == A_EP and d[0] == MSG_INITIATION])
    assert total == 20  # the first, then 19 retries, then it gives up
    assert not net.peer(a, b).staged
    net.advance(60)
    assert len([d for d, s, _ in net.wire if s == A_EP and d[0] == MSG_INITIATION]) == 20


def test_new_handshake_when_data_gets_no_answer(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    net.advance(1)
    net.drop = lambda data, src, dst: dst == A_EP
    net.wire.clear()
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    net.advance(15.5)  # KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (+ jitter)
    assert MSG_INITIATION in kinds([w for w in net.wire if w[1] == A_EP])


def test_roaming_follows_authenticated_packets_only(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    new_ep = ("198.51.100.7", 40000)
    net.nodes[new_ep] = net.nodes.pop(A_EP)
    a.endpoint = new_ep
    peer_a_at_b = net.peer(b, a)
    # a forged data packet from a third address moves nothing
    kp = net.peer(a, b).current
    assert kp is not None
    forged = struct.pack("<IIQ", MSG_DATA, kp.remote_index, 999) + bytes(32)
    b.device.receive([(forged, ("203.0.113.9", 1))], net.now)
    assert peer_a_at_b.endpoint == A_EP
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    assert peer_a_at_b.endpoint == new_ep
    net.send(b, ipv4_packet("10.0.0.2", "10.0.0.1"))
    assert a.delivered and net.wire[-1][2] == new_ep


def test_cookie_path_under_load(net: SimNet) -> None:
    a, b = nodes(net)
    b.device.intake.load.forced = True
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    assert kinds(net.wire) == [MSG_INITIATION, MSG_COOKIE_REPLY]
    assert len(net.wire[1][0]) == COOKIE_REPLY_LEN
    assert net.peer(b, a).endpoint == A_EP  # configured, not learned: nothing changed
    assert b.device.index.keypairs == {}
    net.advance(5.5)  # the retransmit carries mac2 now
    assert kinds(net.wire)[2:5] == [MSG_INITIATION, MSG_RESPONSE, MSG_DATA]
    assert net.wire[2][0][-16:] != bytes(16)
    assert len(b.delivered) == 1


def valid_mac1_junk(net: SimNet, target: SimNode, seed: int) -> bytes:
    """An initiation with random keys but a valid mac1 for `target`: it costs the target a
    Diffie-Hellman before it turns out to be nobody's (the flood of issue 12)."""
    rng = random.Random(seed)
    msg = bytearray([MSG_INITIATION, 0, 0, 0]) + rng.randbytes(INITIATION_LEN - 4)
    assert target.device.public_key is not None
    CookieGenerator(target.device.public_key).add_macs(msg, net.now)
    return bytes(msg)


def test_junk_with_a_bad_mac1_never_counts_toward_load(net: SimNet) -> None:
    _, b = nodes(net)
    junk = bytes([MSG_INITIATION, 0, 0, 0]) + bytes(INITIATION_LEN - 4)
    out = b.device.receive([(junk, ("192.0.2.9", i)) for i in range(5000)], net.now, 0)
    assert out.drops == {Drop.BAD_MAC1: 5000}
    assert b.device.queued_handshakes == 0 and not b.device.is_under_load(net.now)


def test_a_deep_handshake_queue_puts_the_device_under_load(net: SimNet) -> None:
    """Under load while more than 1/8 of the queue waits, and for a second after; the
    queue is worked off after the data of the same batch. Under load, what comes without
    a valid mac2 gets a cookie reply at once and takes no place in the queue; what waited
    in it from before gets one when worked off."""
    a, b = nodes(net)
    handshake(net)
    dev = b.device
    flood = [(valid_mac1_junk(net, b, i), (f"10.9.{i // 250}.{i % 250}", 9)) for i in range(1100)]
    data = a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2", b"still here")], net.now).udp
    out = dev.receive([*flood[: HANDSHAKE_QUEUE // 8], *data], net.now, 0)
    assert len(out.tun_packets()) == 1 and not dev.is_under_load(net.now)
    out = dev.receive(flood[HANDSHAKE_QUEUE // 8 :], net.now, 0)
    assert dev.is_under_load(net.now)
    queued = HANDSHAKE_QUEUE // 8 + 1
    assert dev.queued_handshakes == queued and not out.drops
    assert len(out.udp) == 1100 - queued and {d[0] for d, _ in out.udp} == {MSG_COOKIE_REPLY}
    # worked off: under load, each costs a cookie reply, not a Diffie-Hellman
    out = dev.process_handshakes(net.now, budget=HANDSHAKE_QUEUE)
    assert len(out.udp) == queued and {d[0] for d, _ in out.udp} == {MSG_COOKIE_REPLY}
    assert dev.queued_handshakes == 0
    assert dev.is_under_load(net.now + 0.9) and not dev.is_under_load(net.now + 1.1)


def test_the_queue_is_bounded(net: SimNet) -> None:
    """Messages with a valid mac2 from many sources, under load: the queue stops at its
    bound (each source within its cookie bucket)."""
    _, b = nodes(net)
    dev = b.device
    assert dev.public_key is not None
    dev.intake.load.forced = True
    flood = []
    for i in range(HANDSHAKE_QUEUE + 50):
        src = (f"10.9.{i // 250}.{i % 250}", 9)
        gen = CookieGenerator(dev.public_key)
        msg = bytearray(valid_mac1_junk(net, b, i))
        gen.add_macs(msg, net.now)
        reply = dev.receive([(bytes(msg), src)], net.now, 0).udp[0][0]
        assert gen.consume_reply(parse_cookie_reply(reply), net.now)
        gen.add_macs(msg, net.now)
        flood.append((bytes(msg), src))
    out = dev.receive(flood, net.now, 0)
    assert out.drops == {Drop.QUEUE_FULL: 50} and dev.queued_handshakes == HANDSHAKE_QUEUE


def test_handshakes_from_one_source_over_its_rate_get_cookies(net: SimNet) -> None:
    """50 a second with a burst of 50 per source address (an IPv6 source by its /64);
    past that, a cookie reply for each message instead of the queue, and no drop."""
    _, b = nodes(net)
    dev = b.device
    for src in ("192.0.2.77", "2001:db8:1:2::5"):
        msgs = [(valid_mac1_junk(net, b, i), (src, 1000 + i)) for i in range(60)]
        out = dev.receive(msgs, net.now, 0)
        assert not out.drops and dev.queued_handshakes % 50 == 0
        assert [dst for _, dst in out.udp] == [m[1] for m in msgs[50:]]
        assert {d[0] for d, _ in out.udp} == {MSG_COOKIE_REPLY}
    other = dev.receive([(valid_mac1_junk(net, b, 99), ("2001:db8:1:3::5", 1))], net.now, 0)
    assert not other.udp and dev.queued_handshakes == 101  # another /64
    later = [(valid_mac1_junk(net, b, 70 + i), ("192.0.2.77", 1)) for i in range(8)]
    assert len(dev.receive(later, net.now + 0.1, 0).udp) == 3  # 5 new tokens
    out = dev.process_handshakes(net.now + 0.1, budget=200)
    assert out.drops == {Drop.BAD_HANDSHAKE: 106}


def test_rate_limiter_table_is_bounded() -> None:
    limiter = RateLimiter()
    for i in range(70_000):
        assert limiter.allow((f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", 1), i * 1e-5)
    assert len(limiter) <= MAX_SOURCES


def test_simultaneous_initiations_converge(net: SimNet) -> None:
    a, b = nodes(net)
    out_a = a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], net.now)
    out_b = b.device.send([ipv4_packet("10.0.0.2", "10.0.0.1")], net.now)
    net.pump(a, out_a)
    net.pump(b, out_b)
    net.advance(12)
    assert b.delivered and a.delivered
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2", b"after"))
    net.send(b, ipv4_packet("10.0.0.2", "10.0.0.1", b"after"))
    assert b.delivered[-1].endswith(b"after") and a.delivered[-1].endswith(b"after")


def test_preshared_key_must_match() -> None:
    n = SimNet(seed=3)
    a, b = n.add("a", A_EP), n.add("b", B_EP)
    n.link(a, b, "10.0.0.1/32", "10.0.0.2/32", psk=b"k" * 32)
    n.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    assert len(b.delivered) == 1
    m = SimNet(seed=4)
    a, b = m.add("a", A_EP), m.add("b", B_EP)
    m.link(a, b, "10.0.0.1/32", "10.0.0.2/32", psk=b"k" * 32)
    m.peer(b, a).preshared_key = b"j" * 32
    m.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    assert b.delivered == []
    assert m.peer(a, b).current is None  # the response did not authenticate


def test_set_private_key_drops_own_key_peer_and_expires_sessions(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    dev = a.device
    assert dev.add_peer(dev.public_key or b"") is None
    old = net.peer(a, b).current
    assert old is not None
    b_priv = b.device.private_key
    dev.set_private_key(b_priv)  # now our key equals peer b's: b is removed
    assert b.device.public_key not in dev.peers


def test_remove_peer_forgets_everything(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    pub = b.device.public_key
    assert pub is not None
    a.device.remove_peer(pub)
    assert a.device.index.keypairs == {} and a.device.index.handshakes == {}
    assert a.device.allowed_ips.lookup(bytes([10, 0, 0, 2])) is None


# ---- every drop rule ---------------------------------------------------------------


def _initiation(net: SimNet) -> bytes:
    a, _ = nodes(net)
    out = a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], net.now)
    assert len(out.udp) == 1
    return out.udp[0][0]


def _remac(net: SimNet, msg: bytes) -> bytes:
    a, b = nodes(net)
    buf = bytearray(msg)
    net.peer(a, b).cookies.add_macs(buf, net.now)
    return bytes(buf)


def _quiet(b_dev: Device, data: bytes, src: tuple[str, int], now: float, *reasons: Drop) -> Output:
    """Nothing delivered, nothing answered, and dropped for one of `reasons`."""
    out = b_dev.receive([(data, src)], now)
    assert out.udp == [] and out.tun == []
    assert sum(out.drops.values()) == 1 and set(out.drops) <= set(reasons), out.drops
    return out


def test_valid_initiation_is_answered(net: SimNet) -> None:
    """The control for the drop tests below: the unaltered message gets a response."""
    _, b = nodes(net)
    out = b.device.receive([(_initiation(net), A_EP)], net.now)
    assert len(out.udp) == 1 and out.udp[0][0][0] == MSG_RESPONSE


def test_a_handshake_event_brings_back_the_tag_of_its_datagram(net: SimNet) -> None:
    """The caller tags each read (the datapath: the local address it came to); the event
    of the handshake message that authenticated carries that read's tag, also when the
    queue is worked off later, after other reads from the same source."""
    a, b = nodes(net)
    out = b.device.receive([(_initiation(net), A_EP)], net.now, 0, "its read")
    out.extend(b.device.receive([(b"\x01", A_EP)], net.now, 0, "a spoofed read"))
    assert not out.events and b.device.queued_handshakes == 1
    out = b.device.process_handshakes(net.now)
    assert [e.tag for e in out.events if isinstance(e, InitiationReceived)] == ["its read"]
    got = a.device.receive([(out.udp[0][0], B_EP)], net.now, 1, "the response's read")
    tags = [e.tag for e in got.events if isinstance(e, ResponseReceived)]
    assert tags == ["the response's read"]


@pytest.mark.parametrize("size", [0, 3, 4, 147, 149, 31, 91, 93, 63, 65])
def test_drop_wrong_sizes(net: SimNet, size: int) -> None:
    _, b = nodes(net)
    msg = _initiation(net)
    for t in (MSG_INITIATION, MSG_RESPONSE, MSG_COOKIE_REPLY, MSG_DATA):
        data = (bytes([t, 0, 0, 0]) + msg[4:] + bytes(200))[:size]
        _quiet(b.device, data, A_EP, net.now, Drop.BAD_SIZE, Drop.UNKNOWN_INDEX)


def test_drop_unknown_type_and_reserved_bytes(net: SimNet) -> None:
    _, b = nodes(net)
    msg = _initiation(net)
    _quiet(b.device, b"\x05" + msg[1:], A_EP, net.now, Drop.UNKNOWN_TYPE)
    _quiet(b.device, _remac(net, b"\x01\x00\x01\x00" + msg[4:]), A_EP, net.now, Drop.UNKNOWN_TYPE)
    # and the same message with clean reserved bytes and fresh macs is accepted
    out = b.device.receive([(_remac(net, msg), A_EP)], net.now)
    assert len(out.udp) == 1


def test_drop_bad_mac1_without_any_state_change(net: SimNet) -> None:
    a, b = nodes(net)
    msg = bytearray(_initiation(net))
    msg[120] ^= 1
    peer = net.peer(b, a)
    before = (peer.handshake.latest_timestamp, peer.rx_bytes, peer.endpoint)
    _quiet(b.device, bytes(msg), ("203.0.113.1", 9), net.now, Drop.BAD_MAC1)
    assert (peer.handshake.latest_timestamp, peer.rx_bytes, peer.endpoint) == before


def test_drop_forged_static_even_with_valid_mac1(net: SimNet) -> None:
    _, b = nodes(net)
    msg = bytearray(_initiation(net))
    msg[40] ^= 1  # inside the encrypted static
    _quiet(b.device, _remac(net, bytes(msg)), A_EP, net.now, Drop.BAD_HANDSHAKE)


def test_drop_low_order_ephemeral(net: SimNet) -> None:
    _, b = nodes(net)
    msg = _initiation(net)
    _quiet(b.device, _remac(net, msg[:8] + bytes(32) + msg[40:]), A_EP, net.now, Drop.BAD_HANDSHAKE)


def test_drop_replayed_initiation(net: SimNet) -> None:
    _, b = nodes(net)
    msg = _initiation(net)
    assert len(b.device.receive([(msg, A_EP)], net.now).udp) == 1
    _quiet(b.device, msg, A_EP, net.now + 1, Drop.STALE_TIMESTAMP)


def test_drop_initiation_flood(net: SimNet) -> None:
    """Two initiations 10 ms apart with increasing timestamps: the second is a flood."""
    a, b = nodes(net)
    peer = net.peer(a, b)
    step = 2**24 / 1e9  # timestamp resolution
    t1 = (int((net.now + a.device.wall_offset) / step) + 1) * step - a.device.wall_offset - 0.005

    def initiation_at(t: float) -> bytes:
        peer.handshake.last_sent_handshake = float("-inf")
        out = a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], t)
        return out.udp[0][0]

    first, second = initiation_at(t1), initiation_at(t1 + 0.010)
    assert len(b.device.receive([(first, A_EP)], t1).udp) == 1
    _quiet(b.device, second, A_EP, t1 + 0.010, Drop.FLOOD)
    third = initiation_at(t1 + 0.030)
    assert len(b.device.receive([(third, A_EP)], t1 + 0.030).udp) == 1


def test_drop_response_to_unknown_index_and_forged_response(net: SimNet) -> None:
    a, b = nodes(net)
    init = _initiation(net)
    response = b.device.receive([(init, A_EP)], net.now).udp[0][0]
    assert len(response) == RESPONSE_LEN
    bad_index = bytearray(response[:8] + bytes(4) + response[12:])
    _quiet(a.device, bytes(bad_index), B_EP, net.now, Drop.BAD_MAC1)
    net.peer(b, a).cookies.add_macs(bad_index, net.now)
    _quiet(a.device, bytes(bad_index), B_EP, net.now, Drop.UNKNOWN_INDEX)
    forged = bytearray(response)
    forged[50] ^= 1  # the encrypted empty payload
    buf = bytearray(forged)
    net.peer(b, a).cookies.add_macs(buf, net.now)
    _quiet(a.device, bytes(buf), B_EP, net.now, Drop.BAD_HANDSHAKE)
    assert net.peer(a, b).current is None
    out = a.device.receive([(response, B_EP)], net.now)  # the genuine one still works
    assert net.peer(a, b).current is not None and len(out.udp) == 1  # the staged packet


def test_drop_data_unknown_index_bad_tag_and_replay(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    peer = net.peer(b, a)
    out = a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2", b"once")], net.now)
    data = out.udp[0][0]
    rx = peer.rx_bytes
    _quiet(b.device, data[:4] + b"\xff\xff\xff\xff" + data[8:], A_EP, net.now, Drop.UNKNOWN_INDEX)
    tampered = bytearray(data)
    tampered[-1] ^= 1
    _quiet(b.device, bytes(tampered), ("203.0.113.5", 7), net.now, Drop.BAD_TAG)
    assert peer.rx_bytes == rx and peer.endpoint == A_EP
    assert len(b.device.receive([(data, A_EP)], net.now).tun_packets()) == 1
    _quiet(b.device, data, A_EP, net.now, Drop.REPLAYED)


def test_bad_tag_does_not_move_replay_window(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    kp = net.peer(a, b).current
    assert kp is not None
    good = seal(kp, ipv4_packet("10.0.0.1", "10.0.0.2"))
    forged_far = struct.pack("<IIQ", MSG_DATA, kp.remote_index, 100_000) + bytes(48)
    _quiet(b.device, forged_far, A_EP, net.now, Drop.BAD_TAG)
    assert len(b.device.receive([(good, A_EP)], net.now).tun_packets()) == 1


def test_drop_packet_from_unowned_source(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    net.send(a, ipv4_packet("10.9.9.9", "10.0.0.2", b"spoofed"))
    assert len(b.delivered) == 1  # only the first packet
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2", b"legit"))
    assert len(b.delivered) == 2


def test_drop_malformed_inner_packet(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    bad_len = bytearray(ipv4_packet("10.0.0.1", "10.0.0.2"))
    bad_len[2:4] = (2000).to_bytes(2, "big")
    net.send(a, bytes(bad_len))
    assert len(b.delivered) == 1


def test_drop_cookie_reply_for_unknown_index_or_forged(net: SimNet) -> None:
    a, b = nodes(net)
    init = _initiation(net)
    b.device.intake.load.forced = True
    reply = b.device.receive([(init, A_EP)], net.now).udp[0][0]
    forged = reply[:40] + bytes([reply[40] ^ 1]) + reply[41:]
    a.device.receive([(forged, B_EP)], net.now)
    assert net.peer(a, b).cookies._cookie == b""
    a.device.receive([(reply[:4] + b"\0\0\0\0" + reply[8:], B_EP)], net.now)
    assert net.peer(a, b).cookies._cookie == b""
    a.device.receive([(reply, B_EP)], net.now)
    assert net.peer(a, b).cookies._cookie != b""


def test_garbage_never_raises(net: SimNet) -> None:
    import random

    _, b = nodes(net)
    rng = random.Random(7)
    for _ in range(3000):
        size = rng.choice([0, 1, 4, 16, 31, 32, 33, 64, 92, 148, 200, 1500])
        data = bytes([rng.choice([1, 2, 3, 4, 0, 255])]) + rng.randbytes(max(size - 1, 0))
        data = data[:size]
        b.device.receive([(data, A_EP)], net.now)


def test_no_traffic_without_endpoint_or_key() -> None:
    n = SimNet(seed=9)
    a, b = n.add("a", A_EP), n.add("b", B_EP)
    n.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    n.peer(a, b).endpoint = None
    assert a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], n.now).udp == []
    a.device.set_private_key(None)
    n.peer(a, b).endpoint = B_EP
    n.peer(a, b).handshake.last_sent_handshake = -1e9
    assert a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], n.now + REKEY_TIMEOUT).udp == []


@given(
    st.lists(
        st.one_of(
            st.binary(max_size=200),
            # well-typed headers with garbage after them reach deeper code
            st.tuples(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=160)).map(
                lambda t: bytes([t[0], 0, 0, 0]) + t[1]
            ),
        ),
        max_size=20,
    )
)
@settings(max_examples=300, deadline=None)
def test_garbage_is_dropped_silently_and_changes_nothing(datagrams: list[bytes]) -> None:
    net = SimNet()
    a = net.add("a", A_EP)
    b = net.add("b", B_EP)
    net.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    handshake(net)
    peer = net.peer(b, a)
    before = (peer.endpoint, peer.rx_bytes, peer.current, dict(peer.timers.deadlines))
    out = b.device.receive([(d, ("203.0.113.9", 9)) for d in datagrams], net.now)
    assert out.tun == [] and out.udp == []
    assert (peer.endpoint, peer.rx_bytes, peer.current, dict(peer.timers.deadlines)) == before


# ---- what the core reports: events and drop reasons ------------------------------


def test_events_of_a_handshake_and_roaming(net: SimNet) -> None:
    a, b = nodes(net)
    out_a = a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], net.now)
    assert [e.kind for e in out_a.events] == [EventKind.INITIATION_SENT]
    out_b = b.device.receive(out_a.udp and [(out_a.udp[0][0], ("198.51.100.1", 7))], net.now)
    kinds_b = [e.kind for e in out_b.events]
    assert kinds_b == [EventKind.INITIATION_RECEIVED, EventKind.ENDPOINT_CHANGED,
                       EventKind.KEYPAIR_CREATED, EventKind.RESPONSE_SENT]  # fmt: skip
    changed = out_b.events[1]
    assert isinstance(changed, EndpointChanged) and changed.endpoint == ("198.51.100.1", 7)
    out_a2 = a.device.receive([(out_b.udp[0][0], B_EP)], net.now)
    assert [e.kind for e in out_a2.events] == [
        EventKind.RESPONSE_RECEIVED,
        EventKind.KEYPAIR_CREATED,
        EventKind.HANDSHAKE_COMPLETED,
    ]
    assert all(e.peer is net.peer(a, b) for e in out_a2.events)


def test_events_of_retries_giving_up_and_zeroing(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    events: list[EventKind] = []
    net.drop = lambda data, src, dst: True
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    for _ in range(int(700 / 0.5)):
        net.now += 0.5
        events += [e.kind for e in a.device.tick(net.now).events]
    assert events.count(EventKind.HANDSHAKE_RETRY) == 20  # 1 "no data back" + 19 retries
    assert events.count(EventKind.HANDSHAKE_GAVE_UP) == 1
    assert events[-1] is EventKind.KEYS_ZEROED


def test_drop_reasons_of_the_inner_packet(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    kp = net.peer(a, b).current
    assert kp is not None
    spoofed = seal(kp, ipv4_packet("10.9.9.9", "10.0.0.2"))
    _quiet(b.device, spoofed, A_EP, net.now, Drop.SOURCE_NOT_ALLOWED)
    short = bytearray(ipv4_packet("10.0.0.1", "10.0.0.2"))
    short[2:4] = (2000).to_bytes(2, "big")
    _quiet(b.device, seal(kp, bytes(short)), A_EP, net.now, Drop.BAD_INNER)
    _quiet(b.device, seal(kp, b"\x50" + bytes(40)), A_EP, net.now, Drop.BAD_INNER)
    out = a.device.send([ipv4_packet("10.0.0.1", "10.7.7.7"), b"\x10garbage"], net.now)
    assert out.drops == {Drop.NO_ROUTE: 1, Drop.BAD_INNER: 1} and not out.udp


# ---- timer details where wgpy once differed from wireguard-go and Linux -----------


def test_a_response_holds_off_a_crossing_initiation(net: SimNet) -> None:
    """The responder has traffic of its own at once: it waits for the initiator's
    confirmation instead of starting a second handshake (one handshake, not two)."""
    a, b = nodes(net)
    init = a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], net.now).udp[0][0]
    out_b = b.device.receive([(init, A_EP)], net.now)
    assert [d[0] for d, _ in out_b.udp] == [MSG_RESPONSE]
    out_b2 = b.device.send([ipv4_packet("10.0.0.2", "10.0.0.1", b"eager")], net.now + 0.001)
    assert out_b2.udp == []  # staged, not a crossing initiation
    net.pump(b, out_b)  # the response reaches a, whose confirmation releases b's packet
    assert a.delivered and a.delivered[-1].endswith(b"eager")
    assert kinds(net.wire).count(MSG_INITIATION) == 0  # the first one went around net


def test_a_new_private_key_lifts_the_initiation_hold_off(net: SimNet) -> None:
    a, b = nodes(net)
    assert len(a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], net.now).udp) == 1
    assert a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], net.now + 1).udp == []
    a.device.set_private_key(clamp(bytes(range(32))))
    assert len(a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], net.now + 1).udp) == 1


def test_zeroing_the_keys_drops_the_staged_packets(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    peer = net.peer(a, b)
    net.advance(541)
    peer.handshake.last_sent_handshake = net.now  # hold the next initiation back
    a.device.send([ipv4_packet("10.0.0.1", "10.0.0.2")], net.now)
    assert peer.staged and not peer.keypairs()
    peer.timers.session_derived(net.now - 540)  # zero-keys due now
    a.device.tick(net.now)
    assert not peer.staged


def test_sending_an_initiation_cancels_the_passive_keepalive(net: SimNet) -> None:
    a, b = nodes(net)
    handshake(net)
    peer = net.peer(b, a)
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    assert peer.timers.pending(Timer.SEND_KEEPALIVE)  # b owes a an answer
    peer.current.expire()  # type: ignore[union-attr]
    peer.handshake.last_sent_handshake = float("-inf")
    b.device.send([ipv4_packet("10.0.0.2", "10.0.0.1")], net.now)  # b must re-handshake
    assert not peer.timers.pending(Timer.SEND_KEEPALIVE)


def test_junk_spends_no_tokens(net: SimNet) -> None:
    """Only a valid mac1 takes a source's token: junk can't spend a legitimate one's."""
    _, b = nodes(net)
    dev = b.device
    junk = bytes([MSG_INITIATION, 0, 0, 0]) + bytes(INITIATION_LEN - 4)
    src = ("192.0.2.77", 1)
    out = dev.receive([(junk, src)] * 500, net.now, 0)
    assert out.drops == {Drop.BAD_MAC1: 500}  # junk spends nothing
    valid = [(valid_mac1_junk(net, b, i), src) for i in range(50)]
    out = dev.receive(valid, net.now, 0)
    assert not out.drops and not out.udp and dev.queued_handshakes == 50  # the burst


# ---- super-packets (a TSO read kept whole: core/ip.py) ------------------------------


def tcp_super(dst: str, payload: int, mss: int = 1000, seq: int = 1) -> SuperPacket:
    header = struct.pack(">HHIIBBHHH", 1, 2, seq, 0, 0x50, 0x10, 1000, 0, 0)
    packet = ipv4_packet("10.0.0.1", dst, header + bytes(range(256)) * (payload // 256), proto=6)
    sp = super_packet(packet, mss, 0, False)
    assert sp is not None
    return sp


def test_a_super_packet_goes_out_as_its_segments_in_one_run(net: SimNet) -> None:
    """Routed once, sealed into one GSO run (all datagrams one size but a shorter last),
    delivered as the packets `segments` cuts, in order, between packets around it."""
    a, b = nodes(net)
    handshake(net)
    sp = tcp_super("10.0.0.2", 5120)
    before, after = ipv4_packet("10.0.0.1", "10.0.0.2", b"a"), ipv4_packet("10.0.0.1", "10.0.0.2")
    tx = net.peer(a, b).tx_bytes
    out = a.device.send([before, sp, after], net.now)
    assert [(len(buf) // size, size) for buf, size, _ in out.udp.runs()][1] == (5, 32 + 1040)
    assert len(out.udp) == 2 + sp.nsegments == 8
    b.delivered.clear()
    net.pump(a, out)
    assert b.delivered == [before, *segments(sp), after]
    assert net.peer(a, b).tx_bytes - tx == sum(len(d) for d, _ in out.udp)


def test_super_packets_wait_for_a_session_as_packets(net: SimNet) -> None:
    """Staged while there is no session, a super-packet is cut: the staged queue holds the
    last MAX_STAGED_PACKETS packets, as if the TUN had handed the segments one by one."""
    a, b = nodes(net)
    net.drop = lambda data, src, dst: True  # type: ignore[method-assign]  # no handshake
    sps = [tcp_super("10.0.0.2", 40 * 1000 + 256, seq=i) for i in range(4)]
    out = a.device.send(sps, net.now)
    assert kinds([(d, A_EP, B_EP) for d, _ in out.udp]) == [MSG_INITIATION]
    peer = net.peer(a, b)
    cut = [p for sp in sps for p in segments(sp)]
    assert len(cut) == 4 * 41 and list(peer.staged) == cut[-MAX_STAGED_PACKETS:]


def test_super_packets_without_a_route_count_every_segment(net: SimNet) -> None:
    a, _ = nodes(net)
    sp = tcp_super("10.9.9.9", 3000)
    out = a.device.send([sp, b"\x45"], net.now)
    assert out.drops == {Drop.NO_ROUTE: sp.nsegments, Drop.BAD_INNER: 1}
    assert len(out.tun) == 1 and out.tun[0][9] == 1  # one ICMP error for the super-packet


def test_packets_are_routed_once_per_destination(net: SimNet) -> None:
    """A batch is grouped by destination; each destination keeps its order, and the
    allowed IPs are asked once per destination."""
    a, b = nodes(net)
    handshake(net)
    asked: list[bytes] = []
    lookup = a.device.allowed_ips.lookup

    def counting(addr: bytes) -> object:
        asked.append(bytes(addr))
        return lookup(addr)

    a.device.allowed_ips.lookup = counting  # type: ignore[method-assign,assignment]
    packets = [ipv4_packet("10.0.0.1", dst, bytes([i])) for i in range(30)
               for dst in ("10.0.0.2", "10.9.9.9")]  # fmt: skip
    b.delivered.clear()
    net.send(a, *packets)
    assert sorted(asked) == sorted([bytes([10, 0, 0, 2]), bytes([10, 9, 9, 9])])
    assert b.delivered == packets[::2]
