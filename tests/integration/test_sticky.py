"""Sticky source addresses on the wire: wgpy's side of the veth has two addresses of one
subnet, the wireguard-go peer is told the SECOND one, and a firewall in the peer's
namespace drops everything from the first (the address the kernel would pick): the
handshake and the pings work only if wgpy answers from the address the peer sent to.
Then the second address goes away, and wgpy's next send leaves from one that works (the
peer roams to it): sticky, but not too sticky."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest

from tests.integration.conftest import eventually, load_nft
from wgpy.demo.testbed import WGPY, WIREGUARD_GO, Namespace, Tunnel, TunnelEnd

FAMILIES = {
    # family: (nft family keyword, first address, second address, endpoint format)
    "ipv4": ("ip", "10.200.0.1", "10.200.0.11", "{}:{}", "24"),
    "ipv6": ("ip6", "fd00::1", "fd00::11", "[{}]:{}", "64"),
}

RULES = """
table inet wgpy_sticky {{
    counter from_first {{ }}
    counter from_second {{ }}
    chain input {{
        type filter hook input priority 0; policy accept;
        {fam} saddr {drop} udp sport {port} counter name {drop_counter} drop
        {fam} saddr {allow} udp sport {port} counter name {allow_counter} accept
    }}
}}
"""


def firewall(ns: Namespace, fam: str, drop: str, allow: str, port: int, swapped: bool) -> None:
    """Drop what comes from `drop`, count what comes from `allow` (replacing any earlier
    table: the counters start from zero)."""
    ns.run("nft", "delete", "table", "inet", "wgpy_sticky", check=False)
    names = ("from_second", "from_first") if swapped else ("from_first", "from_second")
    rules = RULES.format(fam=fam, drop=drop, allow=allow, port=port,
                         drop_counter=names[0], allow_counter=names[1])  # fmt: skip
    load_nft(ns, rules)


def counter(ns: Namespace, name: str) -> int:
    out = json.loads(ns.run("nft", "-j", "list", "counter", "inet", "wgpy_sticky", name))
    return int(next(o["counter"]["packets"] for o in out["nftables"] if "counter" in o))


def ping(src: TunnelEnd, addr: str, count: int = 2) -> None:
    src.ns.run("ping", "-c", str(count), "-i", "0.2", "-W", "2", addr, timeout=15)


class Sticky:
    """wgpy (a) with a second address on its veth, which wireguard-go (b) has for it; b's
    firewall drops what comes from a's first address (the kernel's pick)."""

    def __init__(self, make_tunnel: Callable[..., Tunnel], tag: str, family: str) -> None:
        self.fam, self.first, self.second, self.fmt, self.prefix = FAMILIES[family]
        t = make_tunnel(tag, WGPY, WIREGUARD_GO)
        self.t, a, b = t, t.a, t.b
        self.veth_a = f"va{tag}{os.getpid() % 100000}"[:15]
        first, second, prefix = self.first, self.second, self.prefix
        a.ns.run("ip", "addr", "add", f"{second}/{prefix}", "dev", self.veth_a, "nodad")
        peer_addr = b.outer6 if family == "ipv6" else b.outer4
        if family == "ipv6":  # between equals the kernel picks the newest: make it the first
            a.ns.run("ip", "addr", "del", f"{first}/{prefix}", "dev", self.veth_a)
            a.ns.run("ip", "addr", "add", f"{first}/{prefix}", "dev", self.veth_a, "nodad")
        # what the kernel would answer from, without sticky sources: the first address
        assert f"src {first} " in a.ns.run("ip", "route", "get", peer_addr)
        self.peer_endpoint = self.fmt.format(peer_addr, b.port)
        a.wg("set", a.ifname, "peer", b.public_key, "endpoint", self.peer_endpoint)
        b.wg("set", b.ifname, "peer", a.public_key, "endpoint", self.fmt.format(second, a.port))
        self.firewall(drop_first=True)

    def firewall(self, drop_first: bool) -> None:
        drop, allow = (self.first, self.second) if drop_first else (self.second, self.first)
        firewall(self.t.b.ns, self.fam, drop, allow, self.t.a.port, swapped=not drop_first)

    def counter(self, name: str) -> int:
        return counter(self.t.b.ns, name)

    def b_initiates(self) -> None:
        """b initiates to the second address; the response and the echo replies must come
        from it, or the firewall eats them and the handshake never completes."""
        a, b = self.t.a, self.t.b
        ping(b, a.inner4, count=3)
        assert self.counter("from_second") >= 4  # the response and three echo replies
        assert self.counter("from_first") == 0
        assert self.fmt.format(self.second, a.port) in b.wg("show", b.ifname, "endpoints")

    def b_roams_to_first(self) -> None:
        a, b = self.t.a, self.t.b
        roamed = self.fmt.format(self.first, a.port)
        eventually(lambda: roamed in b.wg("show", b.ifname, "endpoints"),
                   timeout=5, what="the peer roaming to the first address")  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replies_leave_from_the_address_the_peer_sent_to(
    make_tunnel: Callable[..., Tunnel], family: str
) -> None:
    s = Sticky(make_tunnel, "st", family)
    a, b = s.t.a, s.t.b
    s.b_initiates()
    # the second address goes away: wgpy's send from it fails, it sends from the first
    # (which the firewall now lets through), and the peer roams to that
    a.ns.run("ip", "addr", "del", f"{s.second}/{s.prefix}", "dev", s.veth_a)
    s.firewall(drop_first=False)
    ping(a, b.inner4, count=2)
    assert s.counter("from_first") >= 2
    s.b_roams_to_first()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_handshake_retry_leaves_from_the_kernels_pick(
    make_tunnel: Callable[..., Tunnel], family: str
) -> None:
    """The second address stays, but what leaves from it is lost (b's firewall turns
    around): wgpy's fresh initiation still goes from the sticky address, and its retry,
    REKEY_TIMEOUT later, from the kernel's pick (the datapath forgot the source)."""
    s = Sticky(make_tunnel, "sr", family)
    a, b = s.t.a, s.t.b
    s.b_initiates()
    s.firewall(drop_first=False)
    # a forgets its session (the peer removed and added again), then has traffic for b
    a.wg("set", a.ifname, "peer", b.public_key, "remove")
    s.t.connect(a, b)
    a.wg("set", a.ifname, "peer", b.public_key, "endpoint", s.peer_endpoint)
    start = time.monotonic()
    a.ns.run("ping", "-c", "1", "-W", "9", b.inner4, timeout=15)
    took = time.monotonic() - start
    assert s.counter("from_second") >= 1, "the first initiation left from the sticky address"
    assert s.counter("from_first") >= 2  # the retried initiation, the echo request
    assert 4.5 < took < 9, f"answered after {took:.1f} s, not at the first retry"
    s.b_roams_to_first()
