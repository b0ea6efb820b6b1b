"""A responder and its initiators built from a seed, and the queued handshake messages of
every kind they make (tests/core/test_handshake_batch.py, tests/native): fresh
initiations, replays, forgeries, strangers, low-order ephemerals, responses to our own
initiations, stale and forged ones. Two worlds from one seed are byte for byte alike, so
the same messages worked off two ways must leave the same traces."""

from __future__ import annotations

import dataclasses
import random

from wgpy.core.backend import Backend
from wgpy.core.crypto import clamp
from wgpy.core.device import Device
from wgpy.core.endpoint import Endpoint
from wgpy.core.events import ProtocolEvent
from wgpy.core.output import Output
from wgpy.core.peer import Peer
from wgpy.sim import ipv4_packet

R_EP: Endpoint = ("192.0.2.1", 51820)
INITIATORS = 5
# points whose product with any clamped scalar is all zeros
LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def source(i: int) -> Endpoint:
    return (f"192.0.2.{10 + i}", 1000 + i)


@dataclasses.dataclass
class World:
    responder: Device
    initiators: list[Device]
    messages: list[tuple[bytes, Endpoint]]  # every message the responder may be sent


def _device(seed: int, name: str, backend: Backend | None = None) -> Device:
    rng = random.Random(f"{seed}-{name}")
    device = Device(rng.randbytes, backend=backend)
    device.set_private_key(clamp(rng.randbytes(32)))
    return device


def _peer(device: Device, other: Device, endpoint: Endpoint, net: int) -> Peer:
    assert other.public_key is not None
    peer = device.add_peer(other.public_key)
    assert peer is not None
    peer.endpoint = endpoint
    device.allowed_ips.insert(bytes([10, 0, net, 0]), 24, peer)
    return peer


def _remac(sender: Peer, message: bytes, flip: int) -> bytes:
    """`message` with one byte flipped and valid macs again (a forgery mac1 lets by)."""
    forged = bytearray(message)
    forged[flip] ^= 1
    sender.cookies.add_macs(forged, 0.0)
    return bytes(forged)


def world(seed: int, backend: Backend | None = None) -> World:
    r = _device(seed, "responder", backend)
    inits = [_device(seed, f"initiator{i}") for i in range(INITIATORS + 1)]
    *inits, stranger = inits  # the responder does not know the last one
    to_r = [_peer(d, r, R_EP, 0) for d in [*inits, stranger]]
    for i, d in enumerate(inits):
        _peer(r, d, source(i), i + 1)
    packet = ipv4_packet("10.0.9.9", "10.0.0.1", b"x")
    messages: list[tuple[bytes, Endpoint]] = []
    for i, d in enumerate(inits):
        first = d.send([packet], 10.0).udp[0][0]
        messages.append((first, source(i)))
        messages.append((_remac(to_r[i], first, 50), source(i)))  # the static forged
        # our own initiation to them, and their response
        ours = r.send([ipv4_packet("10.0.0.1", f"10.0.{i + 1}.1", b"y")], 10.0).udp[0][0]
        response = d.receive([(ours, R_EP)], 10.0).udp[0][0]
        messages.append((response, source(i)))
        messages.append((_remac(to_r[i], response, 50), source(i)))  # the empty forged
        messages.append((_remac(to_r[i], response, 9), source(i)))  # receiver unknown
    messages.append((stranger.send([packet], 10.0).udp[0][0], source(INITIATORS)))
    low = bytearray(messages[0][0])
    low[8:40] = LOW_ORDER
    to_r[0].cookies.add_macs(low, 0.0)
    messages.append((bytes(low), source(0)))
    return World(r, inits, messages)


def event_values(event: ProtocolEvent) -> tuple[object, ...]:
    """An event with its peer's key for the peer (each world has its own Peer objects)."""
    fields = dataclasses.fields(event)  # type: ignore[arg-type]
    peer = event.peer.public_key if event.peer is not None else None
    return (event.kind, peer, *(getattr(event, f.name) for f in fields if f.name != "peer"))


def summary(out: Output) -> tuple[object, ...]:
    return ([(bytes(d), e) for d, e in out.udp], dict(out.drops),
            [event_values(e) for e in out.events])  # fmt: skip


def state(device: Device) -> list[object]:
    """What the responder holds afterwards, and where its randomness stands."""
    facts: list[object] = []
    for peer in device.peers.values():
        hs = peer.handshake
        facts += [peer.rx_bytes, peer.tx_bytes, peer.endpoint, peer.last_handshake,
                  hs.state, hs.local_index, hs.latest_timestamp, hs.last_sent_handshake,
                  sorted((t.name, d) for t, d in peer.timers.deadlines.items())]  # fmt: skip
        facts += [(kp.local_index, kp.remote_index) for kp in peer.keypairs()]
    facts += [sorted(device.index.handshakes), sorted(device.index.keypairs), device.rand(8)]
    return facts


def worked_off(w: World, picks: list[int], now: float, batch: int,
               loaded: bool = False) -> tuple[list[object], list[object]]:  # fmt: skip
    """Queue the picked messages at the responder, then work them off `batch` per call
    (`loaded`: the device under load by then). What came out, call by call, joined."""
    r = w.responder
    queued = Output()
    for i in picks:
        queued.extend(r.receive([w.messages[i]], now, handshake_budget=0))
    r.intake.load.forced = loaded
    out = Output()
    while r.queued_handshakes:
        out.extend(r.process_handshakes(now, batch))
    return [summary(queued), summary(out)], state(r)
