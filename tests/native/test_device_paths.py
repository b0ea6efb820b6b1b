"""The whole core, native against pure: two worlds built from the same seed, one Device
pair with the native datapath and one without, fed the same reads (valid, replayed,
reordered, truncated, bit-flipped, wrong index, keepalives, handshake-shaped junk, IPv4
and IPv6, TCP and UDP, spoofed inner sources, GRO-packed or one by one). Everything that
leaves must be the same: packets for the TUN, datagrams, drops, events, peer state and the
replay windows."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.native.reference import forge
from wgpy.core import native
from wgpy.core.backend import Backend
from wgpy.core.constants import REJECT_AFTER_TIME
from wgpy.core.crypto import clamp, public_key
from wgpy.core.device import Device, Output
from wgpy.core.events import ProtocolEvent
from wgpy.core.ip import SuperPacket, super_packet
from wgpy.core.output import Drop
from wgpy.core.peer import Keypair, Peer
from wgpy.sim import SimNet, ipv4_packet, ipv6_packet

module = native.load()
pytestmark = pytest.mark.skipif(module is None, reason="wgpy._native is not built")

A_EP = ("192.0.2.1", 51820)
B_EP = ("192.0.2.2", 51821)


def world(use_native: bool) -> tuple[SimNet, Device, Device]:
    net = SimNet(seed=11)
    a, b = net.add("a", A_EP), net.add("b", B_EP)
    net.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    for node, other, ip in ((a, b, "fd00::1"), (b, a, "fd00::2")):
        other.device.allowed_ips.insert(ipaddress.ip_address(ip).packed, 128, net.peer(other, node))
    third = b.device.add_peer(public_key(clamp(bytes(range(32)))))  # owns 10.7.0.0/16 at b
    assert third is not None
    b.device.allowed_ips.insert(bytes([10, 7, 0, 0]), 16, third)
    for node in (a, b):
        node.device.backend = Backend(module if use_native else None)
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2", b"hello"))  # the handshake
    return net, a.device, b.device


def inner(rng: random.Random, i: int) -> bytes:
    roll = rng.random()
    payload = bytes([i & 255]) * rng.choice([0, 1, 100, 1200, 1380])
    if roll < 0.45:
        return ipv4_packet("10.0.0.1", "10.0.0.2", payload, proto=rng.choice([6, 17]))
    if roll < 0.8:
        return ipv6_packet("fd00::1", "fd00::2", payload)
    if roll < 0.85:
        return ipv4_packet("10.9.9.9", "10.0.0.2", payload)  # a source nobody owns
    if roll < 0.9:
        return ipv4_packet("10.7.1.1", "10.0.0.2", payload)  # a source another peer owns
    return b""  # a keepalive


def big(rng: random.Random) -> SuperPacket:
    """A TSO read kept whole (core/ip.py), to b, to nobody, IPv4 or IPv6."""
    tcp = struct.pack(">HHIIBBHHH", 1, 2, rng.getrandbits(32), 0, 0x50, 0x10, 1000, 0, 0)
    payload = tcp + rng.randbytes(rng.randrange(0, 9000))
    dst = rng.choice(["10.0.0.2", "fd00::2", "10.5.5.5"])
    packet = (ipv6_packet("fd00::1", dst, payload) if ":" in dst else
              ipv4_packet("10.0.0.1", dst, payload, proto=6))  # fmt: skip
    if ":" in dst:
        packet = packet[:6] + b"\x06" + packet[7:]
    sp = super_packet(packet, rng.choice([500, 1000, 1380]), 0, False)
    assert sp is not None
    return sp


def mutate(rng: random.Random, datagrams: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for d in datagrams:
        roll = rng.random()
        if roll < 0.08:
            out += [d, d]  # replayed
        elif roll < 0.14:
            out.append(d[: rng.randrange(len(d))])  # truncated
        elif roll < 0.2:
            flip = bytearray(d)
            flip[rng.randrange(len(flip))] ^= 1 << rng.randrange(8)
            out.append(bytes(flip))
        elif roll < 0.24:
            out.append(d[:4] + rng.randbytes(4) + d[8:])  # an index nobody has
        elif roll < 0.27:
            out.append(bytes([1, 0, 0, 0]) + rng.randbytes(144))  # a handshake-shaped junk
        else:
            out.append(d)
    if rng.random() < 0.3:
        rng.shuffle(out)
    return out


def reads(rng: random.Random, datagrams: list[bytes]) -> list[tuple[bytes, int]]:
    """GRO-shaped reads (equal sizes, a shorter last one) or one datagram a read."""
    if rng.random() < 0.5:
        return [(d, 0) for d in datagrams]
    result, run = [], []  # type: ignore[var-annotated]
    for d in [*datagrams, b""]:
        if run and (not d or len(d) > len(run[0]) or len(run[-1]) < len(run[0])):
            result.append((b"".join(run), len(run[0]) if len(run) > 1 else 0))
            run = []
        if d:
            run.append(d)
    return result


def state(device: Device) -> list[object]:
    """What the receiving device holds: per peer counters, endpoint and replay windows."""
    facts: list[object] = []
    for peer in device.peers.values():
        facts += [peer.rx_bytes, peer.tx_bytes, peer.endpoint, peer.last_handshake]
        for kp in peer.keypairs():
            facts.append(window(kp))
    return facts


def window(kp: Keypair) -> tuple[int, bytes]:
    top, bitmap = kp.session.window_state()
    return int(top), bytes(bitmap)


def event_values(event: ProtocolEvent) -> tuple[object, ...]:
    """An event without its peer (each path has its own Peer objects)."""
    fields = dataclasses.fields(event)  # type: ignore[arg-type]
    return (event.kind, *(getattr(event, f.name) for f in fields if f.name != "peer"))


def summary(out: Output) -> tuple[object, ...]:
    return (out.tun_packets(), [(bytes(d), e) for d, e in out.udp],
            dict(out.drops), [event_values(e) for e in out.events])  # fmt: skip


@given(st.integers(0, 2**32), st.integers(1, 4))
@settings(max_examples=60, deadline=None)
def test_native_and_pure_devices_agree(seed: int, batches: int) -> None:
    worlds = [world(True), world(False)]
    rng_seed = random.Random(seed).random()
    for step in range(batches):
        results = []
        for net, a, b in worlds:
            rng = random.Random(f"{rng_seed}-{step}")
            packets: list[bytes | SuperPacket] = [inner(rng, i) for i in range(rng.randrange(40))]
            for _ in range(rng.choice([0, 0, 1, 3])):
                packets.insert(rng.randrange(len(packets) + 1), big(rng))
            sent = a.send(packets, net.now).udp
            datagrams = mutate(rng, [d for d, _ in sent])
            outs = []
            for buf, seg in reads(rng, datagrams):
                outs.append(summary(b.receive_read(memoryview(buf), len(buf), seg, A_EP,
                                                   net.now)))  # fmt: skip
            results.append(([d for d, _ in sent], outs, state(b)))
        assert results[0] == results[1]


def test_a_dropped_session_wipes_what_c_holds() -> None:
    net, a, b = world(True)
    peer = next(iter(b.peers.values()))
    kp = peer.current or peer.next
    assert kp is not None and isinstance(kp.session, module.Session)
    session = kp.session
    b.remove_peer(peer.public_key)
    assert session.expires == float("-inf")  # wiped: every packet now counts as expired
    assert b.index.sessions == {} and b.index.session_keypairs == {}


# a session start where created + 180 rounds up: `now - created >= 180` and
# `now >= created + 180` disagree at now = created + 180 (one ulp)
ULP_CREATED = 4002.353689016469


@pytest.mark.parametrize("use_native", [False, True])
def test_expiry_is_one_comparison_to_the_ulp(use_native: bool) -> None:
    """Receiving and sending end at the same instant on both paths: now >= kp.expires."""
    if use_native and module is None:
        pytest.skip("wgpy._native is not built")
    backend = Backend(module if use_native else None)
    peer = Peer(bytes(32), lambda: 0.0)
    key = bytes(range(32))
    kp = Keypair(peer, (key, key), initiator=True, local_index=9, remote_index=9,
                 now=ULP_CREATED, backend=backend)  # fmt: skip
    assert kp.expires == ULP_CREATED + REJECT_AFTER_TIME
    assert (kp.expires - ULP_CREATED < REJECT_AFTER_TIME) is True  # the ulp case
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", b"x")
    before = math.nextafter(kp.expires, -math.inf)
    for now, alive in ((before, True), (kp.expires, False)):
        device = Device(random.Random(1).randbytes, backend=backend)
        device.allowed_ips.insert(bytes([10, 0, 0, 1]), 32, peer)
        device.index.add_keypair(kp)
        datagram = forge(key, 9, int(now * 1000) % 2**32, packet)
        out = device.receive([(datagram, ("192.0.2.1", 1))], now)
        assert (out.tun_packets() == [packet]) is alive
        assert (out.drops[Drop.EXPIRED] == 1) is not alive
        assert kp.can_send(now) is alive
