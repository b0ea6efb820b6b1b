"""Routing in C: a Routes kept a mirror of the allowed IPs through every change, and
`route` grouping a batch by peer as the pure backend's `route` does, byte for byte."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.native.test_send import routed
from wgpy.core import backend
from wgpy.core.allowedips import AllowedIPs
from wgpy.core.backend import Backend
from wgpy.core.crypto import clamp, public_key
from wgpy.core.output import Drop
from wgpy.sim import SimNet, ipv4_packet

native = pytest.importorskip(
    "wgpy._native", reason="wgpy._native is not built (python setup.py build_ext --inplace)"
)
OWNERS = [object() for _ in range(4)]


def address(rng: random.Random) -> bytes:
    """Addresses that share prefixes often: a few networks, any host."""
    if rng.random() < 0.6:
        return bytes([10, 0, rng.randrange(3), rng.randrange(4)])
    return bytes(14) + bytes([rng.randrange(3), rng.randrange(4)])


def probes(rng: random.Random) -> list[bytes]:
    return [address(rng) for _ in range(40)] + [bytes(4), bytes(16), b"\xff" * 4, b"\xff" * 16]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 60), st.integers(0, 60))
def test_the_mirror_follows_every_change(seed: int, before: int, after: int) -> None:
    """Entries inserted, moved to another owner, removed (by entry and by owner) and
    cleared, before and after the mirror is published: every lookup agrees."""
    rng = random.Random(seed)
    table: AllowedIPs[object] = AllowedIPs()
    mirror = native.Routes()
    for step in range(before + after):
        if step == before:
            table.publish(mirror)
        roll, addr = rng.random(), address(rng)
        cidr = rng.randrange(len(addr) * 8 + 1)
        owner = rng.choice(OWNERS)
        if roll < 0.6:
            table.insert(addr, cidr, owner)
        elif roll < 0.85:
            table.remove(addr, cidr, owner)
        elif roll < 0.97:
            table.remove_value(owner)
        else:
            table.clear()
    if after == 0:
        table.publish(mirror)
    for addr in probes(rng):
        assert mirror.lookup(addr) is table.lookup(addr)


@settings(max_examples=200, deadline=None)
@given(routed(), st.integers(0, 2**32))
def test_route_matches(items: list[Any], seed: int) -> None:
    rng = random.Random(seed)
    table: AllowedIPs[object] = AllowedIPs()
    for _ in range(rng.randrange(8)):
        addr = rng.choice([bytes([10, 0, 0, rng.randint(1, 3)]), bytes(15) + bytes([1])])
        table.insert(addr, rng.choice([len(addr) * 8, len(addr) * 8 - 1, 0]), rng.choice(OWNERS))
    mirror = native.Routes()
    table.publish(mirror)
    groups, bad = native.route(items, mirror)
    want_groups, want_bad = backend.route(items, table)
    assert [id(owner) for owner, _ in groups] == [id(owner) for owner, _ in want_groups]
    for (_, got), (_, want) in zip(groups, want_groups, strict=True):
        assert list(map(id, got)) == list(map(id, want))
    assert list(map(id, bad)) == list(map(id, want_bad))


def test_routes_edges() -> None:
    r = native.Routes()
    assert r.lookup(bytes(4)) is None and r.lookup(b"abc") is None
    for bad in ((bytes(4), 33, 1), (bytes(16), -1, 1), (bytes(5), 1, 1)):
        with pytest.raises(ValueError):
            r.insert(*bad)
    r.insert(bytes(4), 0, OWNERS[0])
    assert r.lookup(b"\xff" * 4) is OWNERS[0] and r.lookup(bytes(16)) is None
    assert r.remove(b"\x01" * 4, 0) and not r.remove(bytes(4), 0)
    many = [(i.to_bytes(4, "big"), 32) for i in range(20000)]
    for addr, cidr in many:
        r.insert(addr, cidr, OWNERS[1])
    assert all(r.lookup(a) is OWNERS[1] for a, _ in many[::97])
    for addr, cidr in many[::2]:
        assert r.remove(addr, cidr)
    assert [r.lookup(a) for a, _ in many[:6]] == [None, OWNERS[1]] * 3
    with pytest.raises(TypeError):
        native.route([b"x"], object())
    for bad in ([1], [None], [(1, 2)]):  # not buffers, nor super-packets of one
        with pytest.raises(TypeError):
            native.route(bad, r)
    dsts = [bytes([11, 0, i >> 8, i & 255]) for i in range(5000)]  # as many groups as packets
    table: AllowedIPs[object] = AllowedIPs()
    for i, dst in enumerate(dsts):
        table.insert(dst, 32, OWNERS[i % 4] if i % 5 else object())
    table.publish(r)
    items = [ipv4_packet("10.0.0.1", ".".join(map(str, d))) for d in dsts]
    groups, bad = native.route(items, r)
    want, want_bad = backend.route(items, table)
    assert [(id(o), list(map(id, g))) for o, g in groups] == \
        [(id(o), list(map(id, g))) for o, g in want] and bad == want_bad == []  # fmt: skip


def test_a_change_between_two_sends_routes_the_next_packet_anew() -> None:
    """Native and pure devices alike: an address moved to another peer, then removed, then
    every allowed IP cleared: each send goes where the table says at that moment."""
    for use_native in (True, False):
        net = SimNet(seed=3)
        a, b = net.add("a", ("192.0.2.1", 1)), net.add("b", ("192.0.2.2", 2))
        net.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
        a.device.backend = Backend(native if use_native else None)
        c = a.device.add_peer(public_key(clamp(bytes(range(32)))))
        assert c is not None
        c.endpoint = ("192.0.2.3", 3)
        packet = ipv4_packet("10.0.0.1", "10.0.0.2")
        net.send(a, packet)
        assert b.delivered == [packet]
        a.device.allowed_ips.insert(bytes([10, 0, 0, 2]), 32, c)  # moved to c
        out = a.device.send([packet], net.now)
        assert [dst for _, dst in out.udp] == [c.endpoint] and c.staged  # c has no session
        a.device.remove_peer(c.public_key)
        assert a.device.send([packet], net.now).drops == {Drop.NO_ROUTE: 1}
        a.device.allowed_ips.insert(bytes([10, 0, 0, 0]), 8, net.peer(a, b))
        assert [dst for _, dst in a.device.send([packet], net.now).udp] == [b.endpoint]
        a.device.allowed_ips.clear()
        assert a.device.send([packet], net.now).drops == {Drop.NO_ROUTE: 1}
