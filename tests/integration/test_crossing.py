"""A timer detail on the wire: a response holds off a crossing initiation.

wgpy (A) is the responder: wireguard-go (B) has traffic first and initiates; wgpy
answers, and then has traffic of its own before B's first data message has confirmed the
new session (a firewall in A's namespace holds B's data messages back for a moment, so
that this window, normally a round trip long, is wide). wgpy must not start a handshake
of its own, which would cross B's and cost a second one: it keeps its packets until B's
data arrives, then sends them in the session it answered. Observable: nft counters of
handshake messages by type in A's namespace, and both pings getting through.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

from tests.integration.conftest import load_nft
from wgpy.demo.testbed import WGPY, WIREGUARD_GO, Namespace, Tunnel

COUNT = """
table inet wgpy_count {{
    counter initiations_out {{ }}
    counter responses_out {{ }}
    counter initiations_in {{ }}
    counter responses_in {{ }}
    chain output {{
        type filter hook output priority 0; policy accept;
        udp sport {port} @th,64,8 1 counter name initiations_out
        udp sport {port} @th,64,8 2 counter name responses_out
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        udp dport {port} @th,64,8 1 counter name initiations_in
        udp dport {port} @th,64,8 2 counter name responses_in
    }}
}}
table inet wgpy_hold {{
    chain input {{
        type filter hook input priority 0; policy accept;
        udp dport {port} @th,64,8 4 drop
    }}
}}
"""


def counters(ns: Namespace) -> dict[str, int]:
    out = json.loads(ns.run("nft", "-j", "list", "counters", "table", "inet", "wgpy_count"))
    found = [o["counter"] for o in out["nftables"] if "counter" in o]
    return {c["name"]: int(c["packets"]) for c in found}


def received(ping: subprocess.Popen[str]) -> int:
    out, _ = ping.communicate(timeout=20)
    for line in out.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    return 0


def test_a_response_holds_off_a_crossing_initiation(make_tunnel: Callable[..., Tunnel]) -> None:
    t = make_tunnel("x", WGPY, WIREGUARD_GO)
    a, b = t.a, t.b  # both know each other's endpoint; neither has sent anything yet
    load_nft(a.ns, COUNT.format(port=a.port))
    ping_b = b.ns.popen("ping", "-c", "12", "-i", "0.2", "-W", "2", a.inner4,
                        stdout=subprocess.PIPE, text=True)  # fmt: skip
    ping_a = None
    try:
        deadline = time.monotonic() + 5
        while counters(a.ns)["responses_out"] == 0:  # wgpy answered B's initiation
            assert time.monotonic() < deadline, "no handshake response from wgpy"
            time.sleep(0.02)
        # now wgpy has traffic too, while B's data is held back: no initiation of its own
        ping_a = a.ns.popen("ping", "-c", "5", "-i", "0.2", "-W", "3", b.inner4,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(0.6)
        assert counters(a.ns)["initiations_out"] == 0, "wgpy crossed B's handshake"
        a.ns.run("nft", "delete", "table", "inet", "wgpy_hold")
        got_a, got_b = received(ping_a), received(ping_b)
    finally:
        for p in (ping_b, ping_a):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    seen = counters(a.ns)
    assert seen == {"initiations_in": 1, "responses_out": 1,
                    "initiations_out": 0, "responses_in": 0}, seen  # fmt: skip
    assert got_a >= 4, f"wgpy's pings: {got_a}/5"  # its first ones waited for B's data
    assert got_b >= 8, f"B's pings: {got_b}/12"
