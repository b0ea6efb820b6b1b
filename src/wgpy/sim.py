"""An in-memory network of wgpy core devices with a fake clock: no sockets, no threads.

For tests and for research: thousands of peers go through handshakes and rekeys in
seconds of real time, since the clock only moves when told (`advance`). Links between
endpoints can lose, duplicate, delay and reorder datagrams (`Conditions`), seeded, so a
run repeats exactly; a node can move to another endpoint (`roam`), as a phone between
networks. Every datagram on the wire is kept in `wire`, every core event in `events`.

    net = SimNet(seed=1)
    a, b = net.add("a", ("192.0.2.1", 51820)), net.add("b", ("192.0.2.2", 51820))
    net.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))   # a handshake, then the packet
    assert b.delivered
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from wgpy.core.crypto import clamp
from wgpy.core.device import Device, Output
from wgpy.core.endpoint import Endpoint
from wgpy.core.events import ProtocolEvent
from wgpy.core.peer import Keypair, Peer

__all__ = [
    "WALL",
    "Conditions",
    "SimNet",
    "SimNode",
    "ipv4_packet",
    "ipv6_packet",
    "seal",
]

WALL = 1_700_000_000.0  # the wall clock at fake time 0


def ipv4_packet(src: str, dst: str, payload: bytes = b"x" * 20, proto: int = 17) -> bytes:
    """A minimal IPv4 packet (the core checks only what routing needs)."""
    total = 20 + len(payload)
    header = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes = b"y" * 20) -> bytes:
    header = struct.pack(
        ">IHBB16s16s", 0x60000000, len(payload), 17, 64,
        ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed,
    )  # fmt: skip
    return header + payload


def seal(kp: Keypair, packet: bytes, mtu: int = 1420) -> bytes:
    """One data message on session `kp` (to forge traffic on a given session)."""
    return kp.sealer.seal([packet], mtu)[0]


@dataclass
class Conditions:
    """What a link does to each datagram: lose it (probability `loss`), deliver it twice
    (`duplicate`), hold it `delay` seconds, and hold some (`reorder`) up to `jitter`
    seconds longer so that later ones overtake them."""

    loss: float = 0.0
    duplicate: float = 0.0
    delay: float = 0.0
    reorder: float = 0.0
    jitter: float = 0.05

    @property
    def immediate(self) -> bool:
        return self.delay == 0 and self.reorder == 0


@dataclass
class SimNode:
    name: str
    device: Device
    endpoint: Endpoint
    delivered: list[bytes] = field(default_factory=list)  # packets its TUN would get


class SimNet:
    """Routes datagrams between devices by endpoint, through `conditions` (per pair of
    nodes via `set_conditions`); `drop(data, src, dst)` can also refuse any datagram."""

    classify = False  # the nodes' devices take handshakes through the C intake (intake.py)

    def __init__(self, seed: int = 1, conditions: Conditions | None = None) -> None:
        self.now = 1000.0
        self.rng = random.Random(seed)
        self.nodes: dict[Endpoint, SimNode] = {}
        self.wire: list[tuple[bytes, Endpoint, Endpoint]] = []  # everything sent: (data, src, dst)
        self.keep_wire = True  # turn off for big runs
        self.events: list[tuple[float, str, ProtocolEvent]] = []  # (time, node name, event)
        self.drop: Callable[[bytes, Endpoint, Endpoint], bool] = lambda d, s, t: False
        self.conditions = conditions or Conditions()
        self._pair: dict[tuple[str, str], Conditions] = {}
        self._in_flight: list[tuple[float, int, bytes, Endpoint, Endpoint]] = []
        self._order = itertools.count()

    # ---- building -----------------------------------------------------------------------

    def add(self, name: str, endpoint: Endpoint) -> SimNode:
        device = Device(self.rng.randbytes, wall_offset=WALL, classify=self.classify)
        device.set_private_key(clamp(self.rng.randbytes(32)))
        node = SimNode(name, device, endpoint)
        self.nodes[endpoint] = node
        return node

    def link(self, a: SimNode, b: SimNode, a_ip: str, b_ip: str, psk: bytes | None = None) -> None:
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

    def set_conditions(self, a: SimNode, b: SimNode, conditions: Conditions) -> None:
        """Conditions for datagrams between a and b (both ways)."""
        self._pair[(a.name, b.name)] = self._pair[(b.name, a.name)] = conditions

    def roam(self, node: SimNode, endpoint: Endpoint) -> None:
        """Move `node` to a new address; its peers learn it from its next authenticated
        datagram (what reaches the old address from now on is lost)."""
        del self.nodes[node.endpoint]
        node.endpoint = endpoint
        self.nodes[endpoint] = node

    def peer(self, here: SimNode, there: SimNode) -> Peer:
        assert there.device.public_key is not None
        return here.device.peers[there.device.public_key]

    # ---- moving datagrams --------------------------------------------------------------

    def _conditions(self, src: Endpoint, dst: Endpoint) -> Conditions:
        if self._pair:
            a, b = self.nodes.get(src), self.nodes.get(dst)
            if a is not None and b is not None:
                return self._pair.get((a.name, b.name), self.conditions)
        return self.conditions

    def _route(self, data: bytes, src: Endpoint, dst: Endpoint, now_queue: deque[
            tuple[bytes, Endpoint, Endpoint]]) -> None:  # fmt: skip
        c = self._conditions(src, dst)
        if c.loss and self.rng.random() < c.loss:
            return
        copies = 2 if c.duplicate and self.rng.random() < c.duplicate else 1
        for _ in range(copies):
            if c.immediate:
                now_queue.append((data, src, dst))
                continue
            at = self.now + c.delay
            if c.reorder and self.rng.random() < c.reorder:
                at += self.rng.uniform(0, c.jitter)
            heapq.heappush(self._in_flight, (at, next(self._order), data, src, dst))

    def _record(self, node: SimNode, out: Output) -> None:
        node.delivered += out.tun_packets()
        if out.events:
            self.events += [(self.now, node.name, e) for e in out.events]

    def pump(self, node: SimNode, out: Output, limit: int = 1_000_000) -> None:
        """Carry `out` (produced by `node`) and every answer it provokes."""
        self._record(node, out)
        queue: deque[tuple[bytes, Endpoint, Endpoint]] = deque()
        for d, dst in out.udp:
            self._route(d, node.endpoint, dst, queue)
        self._carry(queue, limit)

    def _carry(self, queue: deque[tuple[bytes, Endpoint, Endpoint]], limit: int) -> None:
        while queue:
            limit -= 1
            assert limit > 0, "packet storm"
            data, src, dst = queue.popleft()
            if self.keep_wire:
                self.wire.append((data, src, dst))
            target = self.nodes.get(dst)
            if target is None or self.drop(data, src, dst):
                continue
            result = target.device.receive([(data, src)], self.now)
            self._record(target, result)
            for d, to in result.udp:
                self._route(d, target.endpoint, to, queue)

    def send(self, node: SimNode, *packets: bytes) -> None:
        """Packets `node`'s TUN would read: sealed (after a handshake) and carried."""
        self.pump(node, node.device.send(list(packets), self.now))

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Move the clock forward, delivering delayed datagrams when due and running
        every node's timers at each step, as the daemon's loop would."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            self._deliver_due()
            for node in list(self.nodes.values()):
                self.pump(node, node.device.tick(self.now))

    def _deliver_due(self) -> None:
        queue: deque[tuple[bytes, Endpoint, Endpoint]] = deque()
        while self._in_flight and self._in_flight[0][0] <= self.now:
            _, _, data, src, dst = heapq.heappop(self._in_flight)
            queue.append((data, src, dst))
        self._carry(queue, 1_000_000)
