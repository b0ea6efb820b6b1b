"""A deterministic little WireGuard world in memory, for fuzzing a device's receive path.

The victim V has a private key and two peers: A, with an established and confirmed
session (V answered A's initiation and both sent data), and C, to which V has sent an
initiation that C answered (the response and a cookie reply are captured but not yet
delivered). S is a stranger: V is its peer, but it is not V's, so its initiation carries
a valid mac1 and still must change nothing.

`build()` makes the same world, byte for byte, every time (seeded keys and indices, a
fixed clock), so the messages captured while building it are *genuine* for every fresh
copy: `World.pending` are those that V has not seen yet, the only datagrams allowed to
change V's peer state. Everything else, however close to a real message, is garbage.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType

from wgpy.core import native
from wgpy.core.backend import Backend
from wgpy.core.constants import REJECT_AFTER_TIME
from wgpy.core.device import Device
from wgpy.core.endpoint import Endpoint
from wgpy.core.messages import (
    COOKIE_REPLY_LEN,
    INITIATION_LEN,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_LEN,
    message_type,
)
from wgpy.sim import SimNet, ipv4_packet, ipv6_packet

V_EP = ("192.0.2.10", 51820)
A_EP = ("192.0.2.1", 51820)
C_EP = ("192.0.2.3", 51822)
S_EP = ("203.0.113.9", 9)
# where fuzzed datagrams come from: A's address, C's, a stranger's, an IPv6 one
SOURCES: tuple[Endpoint, ...] = (A_EP, C_EP, S_EP, ("2001:db8::7", 51820))
V_IP, A_IP, C_IP = "10.0.0.1", "10.0.0.2", "10.0.0.3"
V_IP6, A_IP6 = "fd00::1", "fd00::2"


@dataclass
class World:
    net: SimNet
    victim: Device
    now: float  # when fuzzed traffic starts arriving
    pending: dict[str, bytes] = field(default_factory=dict)  # genuine, not yet delivered
    other: dict[str, bytes] = field(default_factory=dict)  # seen already, or not genuine


def victim_native() -> ModuleType | None:
    """WGPY_FUZZ_NATIVE=1: V opens and seals data with the native extension (which must be
    built); else the pure-Python path. (The peers' sides stay pure: the same bytes.)"""
    if os.environ.get("WGPY_FUZZ_NATIVE") != "1":
        return None
    module = native.load()
    if module is None:
        raise RuntimeError("WGPY_FUZZ_NATIVE=1 but wgpy._native is not built")
    return module


def build() -> World:
    net = SimNet(seed=12)
    v, a, c, s = (net.add(n, ep) for n, ep in (("v", V_EP), ("a", A_EP), ("c", C_EP), ("s", S_EP)))
    v.device.backend = Backend(victim_native())  # before any session exists
    net.link(v, a, f"{V_IP}/32", f"{A_IP}/32")
    net.link(v, c, f"{V_IP}/32", f"{C_IP}/32")
    net.link(s, v, "10.0.0.9/32", f"{V_IP}/32")  # V is S's peer; S is not V's
    v.device.remove_peer(s.device.public_key or b"")
    net.peer(v, a).endpoint = None  # learned from A's initiation, as a server would
    dev_v = v.device
    dev_v.allowed_ips.insert(bytes.fromhex("fd00" + "00" * 13 + "02"), 128, net.peer(v, a))
    a.device.allowed_ips.insert(bytes.fromhex("fd00" + "00" * 13 + "01"), 128, net.peer(a, v))

    w = World(net, dev_v, net.now + 1)
    # A <-> V: A initiates, V responds, A's first packet confirms, V answers with data
    net.send(a, ipv4_packet(A_IP, V_IP, b"hello v"))
    net.send(v, ipv4_packet(V_IP, A_IP, b"hello a"))
    for i, (data, _, _) in enumerate(net.wire):
        w.other[f"seen-{i}-type{data[0]}"] = data
    t = net.now
    # what A sends next, on the same session
    for name, packet in (
        ("data-a", ipv4_packet(A_IP, V_IP, b"more from a")),
        ("data-a-v6", ipv6_packet(A_IP6, V_IP6, b"v6 from a")),
        ("data-a-spoofed-inner", ipv4_packet("10.9.9.9", V_IP, b"not a's address")),
        ("data-a-tcp", ipv4_packet(A_IP, V_IP, bytes(40), proto=6)),
    ):
        (w.pending[name], _), *_ = a.device.send([packet], t).udp
    (w.pending["keepalive-a"], _), *_ = a.device.set_persistent_keepalive(net.peer(a, v), 25, t).udp
    # V -> C: V's initiation; C under load answers with a cookie reply, then responds
    (init_v, _), *_ = dev_v.send([ipv4_packet(V_IP, C_IP, b"to c")], t).udp
    w.other["initiation-v-to-c"] = init_v
    force_load(c.device, True)
    (w.pending["cookie-reply-c"], _), *_ = c.device.receive([(init_v, V_EP)], t).udp
    force_load(c.device, False)
    (w.pending["response-c"], _), *_ = c.device.receive([(init_v, V_EP)], t).udp
    # the stranger's initiation: a valid mac1 for V, from a key V does not know
    (w.other["initiation-stranger"], _), *_ = s.device.send(
        [ipv4_packet("10.0.0.9", V_IP, b"let me in")], t
    ).udp
    # A's next initiation (its session has expired on its clock; V's has not)
    (w.pending["initiation-a"], _), *_ = a.device.send(
        [ipv4_packet(A_IP, V_IP, b"rekey")], t + REJECT_AFTER_TIME + 1
    ).udp
    return w


def force_load(device: Device, on: bool) -> None:
    """Put the device under load (or not) as a test may: mac2 is then required."""
    device.intake.load.forced = on


def canonical(data: bytes) -> bytes:
    """What authenticates a message: all of it but the parts a receiver does not check
    (mac2 when not under load; a cookie reply's receiver index, which only picks a
    peer whose key then decides)."""
    kind = data[0] if data else 0
    if (kind == MSG_INITIATION and len(data) == INITIATION_LEN) or (
        kind == MSG_RESPONSE and len(data) == RESPONSE_LEN
    ):
        return data[:-16]
    if kind == MSG_COOKIE_REPLY and len(data) == COOKIE_REPLY_LEN:
        return b"cookie" + data[8:]
    return data


def genuine_set(world: World) -> set[bytes]:
    return {canonical(d) for d in world.pending.values()}


def authentic(world: World, genuine: set[bytes], data: bytes) -> bool:
    """May `data` change V's state? A pending message may; and so may any initiation
    with a valid mac1 that this world did not make: one of A's from a world built by an
    older core (a stale seed; the fuzzer cannot forge mac1, so it has it from the corpus),
    which V rightly answers. The stranger's initiation stays garbage."""
    if canonical(data) in genuine:
        return True
    return (
        message_type(data) == MSG_INITIATION
        and world.victim.cookie_checker.check_mac1(data)
        and data not in world.other.values()
    )


# ---- peer state, compared before and after garbage ----------------------------------


def _state(obj: object, seen: set[int]) -> object:
    if obj is None or isinstance(obj, bool | int | float | str | bytes | enum.Enum):
        return obj
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    if isinstance(obj, list | tuple | deque):
        return tuple(_state(x, seen) for x in obj)
    if isinstance(obj, dict):
        return tuple(sorted(((repr(k), _state(v, seen)) for k, v in obj.items()), key=repr))
    if id(obj) in seen:
        return ("ref", id(obj))
    seen.add(id(obj))
    names: list[str] = []
    for cls in type(obj).__mro__:
        names += [s for s in getattr(cls, "__slots__", ()) if s != "__weakref__"]
    names += list(getattr(obj, "__dict__", {}))
    if not names:  # an opaque object (a key, an AEAD context): its identity
        return ("obj", type(obj).__name__, id(obj))
    fields = []
    for name in names:
        value = getattr(obj, name, None)
        if not callable(value):
            fields.append((name, _state(value, seen)))
    return (type(obj).__name__, tuple(fields))


def peer_state(device: Device) -> object:
    """Every peer (its endpoint, counters, sessions, handshake, cookie, timers, staged
    packets) and the device's index tables: what no garbage may change."""
    seen: set[int] = set()
    indices = (tuple(sorted(device.index.keypairs)), tuple(sorted(device.index.handshakes)))
    return (
        tuple((pub, _state(peer, seen)) for pub, peer in device.peers.items()),
        indices,
        _state(device.allowed_ips, seen),
    )


def replay(world: World, names: Iterable[str]) -> None:
    """Deliver pending messages (by name) to the victim from their sender's address."""
    for name in names:
        src = C_EP if name.endswith("-c") else A_EP
        world.victim.receive([(world.pending[name], src)], world.now)
