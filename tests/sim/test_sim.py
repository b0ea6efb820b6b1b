"""wgpy.sim: the in-memory network, at scale and under bad links."""

from __future__ import annotations

import time

from wgpy.core.constants import REKEY_AFTER_TIME
from wgpy.core.events import EndpointChanged, EventKind
from wgpy.sim import Conditions, SimNet, ipv4_packet


def hub_and_spokes(n: int, seed: int = 7) -> tuple[SimNet, list[str]]:
    net = SimNet(seed=seed)
    net.keep_wire = False
    hub = net.add("hub", ("192.0.2.1", 51820))
    spokes = []
    for i in range(n):
        spoke = net.add(f"s{i}", (f"198.51.{i // 250}.{i % 250 + 1}", 51820))
        net.link(hub, spoke, "10.0.0.1/32", f"10.1.{i // 250}.{i % 250 + 1}/32")
        spokes.append(spoke)
    return net, [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(n)]


def test_a_thousand_peers_through_rekeys_in_about_a_second() -> None:
    n = 1000
    net, inner = hub_and_spokes(n)
    spokes = [node for node in net.nodes.values() if node.name != "hub"]
    hub = net.nodes[("192.0.2.1", 51820)]
    started = time.perf_counter()
    for round_ in range(3):  # data every ~REKEY_AFTER_TIME/2: the initiators rekey on send
        for spoke, ip in zip(spokes, inner, strict=True):
            net.send(spoke, ipv4_packet(ip, "10.0.0.1", f"r{round_}".encode()))
        net.advance(REKEY_AFTER_TIME * 0.55, step=5.0)
    elapsed = time.perf_counter() - started
    completed = [e for _, name, e in net.events
                 if name == "hub" and e.kind is EventKind.KEYPAIR_CREATED]  # fmt: skip
    assert len(completed) >= 2 * n, len(completed)  # the first handshakes and a rekey each
    assert len(hub.delivered) == 3 * n  # no packet lost across the rekeys
    assert elapsed < 15, f"{elapsed:.1f} s"  # about 1-3 s on a small machine
    print(f"{n} peers, {len(completed)} handshakes, {elapsed:.2f} s")


def test_lossy_duplicating_reordering_links_still_deliver() -> None:
    net = SimNet(seed=3, conditions=Conditions(loss=0.2, duplicate=0.2, delay=0.01, reorder=0.5))
    a = net.add("a", ("192.0.2.1", 1))
    b = net.add("b", ("192.0.2.2", 2))
    net.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    sent = 0
    for i in range(200):
        net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2", i.to_bytes(4, "big") * 5))
        sent += 1
        net.advance(0.05, step=0.01)
    net.advance(30, step=0.1)
    got = {bytes(p[20:24]) for p in b.delivered}
    assert len(b.delivered) == len(got)  # duplicates never reach the TUN (replay window)
    assert 0.5 * sent < len(got) < sent  # lossy, but the tunnel came up and carried most
    kinds = {e.kind for _, _, e in net.events}
    assert EventKind.HANDSHAKE_COMPLETED in kinds


def test_roaming_peer_is_followed() -> None:
    net = SimNet(seed=5)
    a = net.add("a", ("192.0.2.1", 1))
    b = net.add("b", ("192.0.2.2", 2))
    net.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    net.send(b, ipv4_packet("10.0.0.2", "10.0.0.1"))
    net.roam(b, ("203.0.113.9", 4444))
    net.send(b, ipv4_packet("10.0.0.2", "10.0.0.1", b"moved" * 4))
    assert net.peer(a, b).endpoint == ("203.0.113.9", 4444)
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2", b"back" * 5))
    assert b.delivered[-1].endswith(b"back" * 5)
    changed = [e for _, n, e in net.events if n == "a" and isinstance(e, EndpointChanged)]
    assert changed and changed[-1].endpoint == ("203.0.113.9", 4444)
