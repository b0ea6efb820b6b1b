"""Two (or more) core devices wired together in memory, with a fake clock."""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from wgpy.core.crypto import clamp
from wgpy.core.device import Device, Output, seal_all
from wgpy.core.peer import Endpoint, Keypair, Peer

WALL = 1_700_000_000.0


def ipv4_packet(src: str, dst: str, payload: bytes = b"x" * 20, proto: int = 17) -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes = b"y" * 20) -> bytes:
    header = struct.pack(
        ">IHBB16s16s",
        0x60000000,
        len(payload),
        17,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


def seal(kp: Keypair, packet: bytes, mtu: int = 1420) -> bytes:
    """One data message on session `kp` (to forge traffic on a given session)."""
    udp: list[tuple[bytes, Endpoint]] = []
    seal_all(kp, [packet], mtu, ("", 0), udp)
    return udp[0][0]


@dataclass
class Node:
    name: str
    device: Device
    endpoint: Endpoint
    delivered: list[bytes] = field(default_factory=list)


class SimNet:
    """Routes datagrams between devices by endpoint; `drop` can lose or alter traffic."""

    def __init__(self, seed: int = 1) -> None:
        self.now = 1000.0
        self.rng = random.Random(seed)
        self.nodes: dict[Endpoint, Node] = {}
        self.wire: list[tuple[bytes, Endpoint, Endpoint]] = []  # everything sent: (data, src, dst)
        self.drop: Callable[[bytes, Endpoint, Endpoint], bool] = lambda d, s, t: False

    def add(self, name: str, endpoint: Endpoint) -> Node:
        device = Device(self.rng.randbytes, wall_offset=WALL)
        device.set_private_key(clamp(self.rng.randbytes(32)))
        node = Node(name, device, endpoint)
        self.nodes[endpoint] = node
        return node

    def link(self, a: Node, b: Node, a_ip: str, b_ip: str, psk: bytes | None = None) -> None:
        """Make each node a peer of the other; b_ip is routed to b at a, and vice versa."""
        for here, there, ip in ((a, b, b_ip), (b, a, a_ip)):
            assert there.device.public_key is not None
            peer = here.device.add_peer(there.device.public_key)
            assert peer is not None
            peer.endpoint = there.endpoint
            if psk:
                peer.preshared_key = psk
            addr = ipaddress.ip_network(ip)
            here.device.allowed_ips.insert(addr.network_address.packed, addr.prefixlen, peer)

    def peer(self, here: Node, there: Node) -> Peer:
        assert there.device.public_key is not None
        return here.device.peers[there.device.public_key]

    def pump(self, node: Node, out: Output, limit: int = 10_000) -> None:
        """Carry `out` (produced by `node`) and every answer it provokes."""
        queue = [(d, node.endpoint, dst) for d, dst in out.udp]
        node.delivered += out.tun
        while queue:
            limit -= 1
            assert limit > 0, "packet storm"
            data, src, dst = queue.pop(0)
            self.wire.append((data, src, dst))
            target = self.nodes.get(dst)
            if target is None or self.drop(data, src, dst):
                continue
            result = target.device.receive([(data, src)], self.now)
            target.delivered += result.tun
            queue += [(d, target.endpoint, to) for d, to in result.udp]

    def send(self, node: Node, *packets: bytes) -> None:
        self.pump(node, node.device.send(list(packets), self.now))

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Move the clock forward, running every node's timers as the daemon would."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for node in list(self.nodes.values()):
                self.pump(node, node.device.tick(self.now))
