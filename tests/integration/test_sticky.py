"""Sticky source addresses on the wire: wgpy's side of the veth has two addresses of one
subnet, the wireguard-go peer is told the SECOND one, and a firewall in the peer's
namespace drops everything from the first (the address the kernel would pick): the
handshake and the pings work only if wgpy answers from the address the peer sent to.
Then the second address goes away, and wgpy's next send leaves from one that works (the
peer roams to it): sticky, but not too sticky."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest

from tests.integration.conftest import eventually
from wgpy.demo.testbed import WGPY, WIREGUARD_GO, Namespace, Node, Tunnel

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
    path = f"/tmp/wgpy-sticky-{os.getpid()}.nft"
    with open(path, "w") as f:
        f.write(rules)
    try:
        ns.run("nft", "-f", path, timeout=10)
    finally:
        os.unlink(path)


def counter(ns: Namespace, name: str) -> int:
    out = json.loads(ns.run("nft", "-j", "list", "counter", "inet", "wgpy_sticky", name))
    return int(next(o["counter"]["packets"] for o in out["nftables"] if "counter" in o))


def ping(src: Node, addr: str, count: int = 2) -> None:
    src.ns.run("ping", "-c", str(count), "-i", "0.2", "-W", "2", addr, timeout=15)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_replies_leave_from_the_address_the_peer_sent_to(
    make_tunnel: Callable[..., Tunnel], family: str
) -> None:
    fam, first, second, fmt, prefix = FAMILIES[family]
    t = make_tunnel("st", WGPY, WIREGUARD_GO)
    a, b = t.a, t.b  # a: wgpy (the responder), b: wireguard-go
    veth_a = f"va{'st'}{os.getpid() % 100000}"[:15]
    a.ns.run("ip", "addr", "add", f"{second}/{prefix}", "dev", veth_a, "nodad")
    peer_addr = b.outer6 if family == "ipv6" else b.outer4
    if family == "ipv6":  # between equals the kernel picks the newest: make that the first
        a.ns.run("ip", "addr", "del", f"{first}/{prefix}", "dev", veth_a)
        a.ns.run("ip", "addr", "add", f"{first}/{prefix}", "dev", veth_a, "nodad")
    # what the kernel would answer from, without sticky sources: the first address
    assert f"src {first} " in a.ns.run("ip", "route", "get", peer_addr)
    a.wg("set", a.ifname, "peer", b.public_key, "endpoint", fmt.format(peer_addr, b.port))
    b.wg("set", b.ifname, "peer", a.public_key, "endpoint", fmt.format(second, a.port))
    firewall(b.ns, fam, drop=first, allow=second, port=a.port, swapped=False)

    # b initiates to the second address; the response and the echo replies must come
    # from it, or the firewall eats them and the handshake never completes
    ping(b, a.inner4, count=3)
    assert counter(b.ns, "from_second") >= 4  # the response and three echo replies
    assert counter(b.ns, "from_first") == 0
    assert fmt.format(second, a.port) in b.wg("show", b.ifname, "endpoints")

    # the second address goes away: wgpy's send from it fails, it sends from the first
    # (which the firewall now lets through), and the peer roams to that
    a.ns.run("ip", "addr", "del", f"{second}/{prefix}", "dev", veth_a)
    firewall(b.ns, fam, drop=second, allow=first, port=a.port, swapped=True)
    ping(a, b.inner4, count=2)
    assert counter(b.ns, "from_first") >= 2
    roamed = fmt.format(first, a.port)
    eventually(lambda: roamed in b.wg("show", b.ifname, "endpoints"),
               timeout=5, what="the peer roaming to the first address")  # fmt: skip
