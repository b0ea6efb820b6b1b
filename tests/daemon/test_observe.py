"""Logs, status and metrics from the core's events, with the in-memory network and a fake
clock: the timer-driven lines (retries, giving up, zeroing keys) take minutes for real."""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter

import pytest

from tests.daemon.test_uapi import MemoryHost, req
from wgpy.core import events as ev
from wgpy.core.events import EventKind, ProtocolEvent
from wgpy.core.output import Drop
from wgpy.daemon import log as wlog
from wgpy.daemon.status import Stats, build_status
from wgpy.sim import SimNet, ipv4_packet

A_EP = ("192.0.2.1", 51820)
B_EP = ("192.0.2.2", 51821)


def recorded(net: SimNet) -> list[ProtocolEvent]:
    """Every event the nodes' outputs carry, as the daemon's on_events would get them."""
    events: list[ProtocolEvent] = []
    for node in net.nodes.values():
        dev = node.device
        for name in ("receive", "send", "tick", "process_handshakes"):
            original = getattr(dev, name)

            def wrapped(*args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                out = _original(*args, **kwargs)
                events.extend(out.events)
                return out

            setattr(dev, name, wrapped)
    return events


def test_peer_name_as_wireguard_go() -> None:
    key = bytes(range(32))
    b64 = base64.b64encode(key).decode()
    assert wlog.peer_name(key) == f"peer({b64[:4]}…{b64[39:43]})"
    assert wlog.peer_name(key) == "peer(AAEC…Hh8)".replace("Hh8", b64[39:43])


def test_one_event_class_per_kind() -> None:
    # (slots=True makes a second class per dataclass: count them by name)
    kinds = {c.__name__: c.kind for c in ProtocolEvent.__subclasses__()}
    assert sorted(k.value for k in kinds.values()) == sorted(k.value for k in EventKind)


def test_every_event_kind_has_a_line() -> None:
    net = SimNet()
    a = net.add("a", A_EP)
    peer = a.device.add_peer(bytes(range(32)))
    assert peer is not None
    samples: list[ProtocolEvent] = [
        ev.InitiationSent(peer, 1), ev.InitiationReceived(peer), ev.ResponseSent(peer),
        ev.ResponseReceived(peer), ev.CookieSent(("192.0.2.9", 7)), ev.CookieReceived(peer),
        ev.KeypairCreated(peer, 1), ev.HandshakeCompleted(peer),
        ev.EndpointChanged(peer, ("192.0.2.1", 1)), ev.KeepaliveSent(peer),
        ev.HandshakeRetry(peer, "no response"), ev.HandshakeRetry(peer, "no data back"),
        ev.HandshakeGaveUp(peer, 1), ev.KeysZeroed(peer),
    ]  # fmt: skip
    assert {e.kind for e in samples} == set(EventKind)
    for event in samples:
        line = wlog.describe(event)
        assert event.kind.value not in line, f"{event.kind} has no line of its own"


def test_lines_for_a_handshake_retries_giving_up_and_zeroing() -> None:
    net = SimNet()
    a, b = net.add("a", A_EP), net.add("b", B_EP)
    net.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    events = recorded(net)
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    net.advance(11)  # b owes a keepalive after 10 s
    lines = [wlog.describe(e) for e in events]
    pa, pb = (wlog.peer_name(n.device.public_key or b"") for n in (a, b))
    for line in (
        f"{pb} - Sending handshake initiation",
        f"{pa} - Received handshake initiation",
        f"{pa} - Sending handshake response",
        f"{pb} - Received handshake response",
        f"{pb} - Handshake completed",
        f"{pa} - Handshake completed",
        f"{pa} - Sending keepalive packet",  # b got data, sent none back
    ):
        assert line in lines, line
    assert any(line.startswith("Keypair ") and line.endswith(f"created for {pa}") for line in lines)

    # b goes away: a stops hearing back, retries, gives up, and zeroes the keys
    net.drop = lambda d, s, t: True
    del events[:]
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    net.advance(16, step=0.5)
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    net.advance(600, step=0.5)
    lines = wlog.describe_all(events)
    assert f"{pb} - Retrying handshake because we stopped hearing back after 15 seconds" in lines
    assert f"{pb} - Handshake did not complete after 5 seconds, retrying (try 2)" in lines
    assert f"{pb} - Handshake did not complete after 5 seconds, retrying (try 20)" in lines
    assert f"{pb} - Handshake did not complete after 5 seconds, retrying (try 21)" not in lines
    assert f"{pb} - Handshake did not complete after 20 attempts, giving up" in lines
    assert f"{pb} - Removing all keys, since we haven't received a new one in 540 seconds" in lines


def test_roaming_and_cookie_lines() -> None:
    peer = SimNet().add("a", A_EP).device.add_peer(bytes(range(32)))
    name = wlog.peer_name(bytes(range(32)))
    assert peer is not None
    assert wlog.describe(ev.EndpointChanged(peer, ("fd00::1", 5))) == (
        f"{name} - Endpoint changed to [fd00::1]:5"
    )
    assert wlog.describe(ev.CookieSent(("192.0.2.9", 7))) == (
        "Sending cookie response for denied handshake message for 192.0.2.9:7"
    )
    assert wlog.describe(ev.CookieSent(None, count=40)) == (
        "Sending 40 cookie responses for denied handshake messages"
    )
    assert wlog.describe(ev.CookieSent(("192.0.2.9", 7), count=3)) == (  # one read's, in C
        "Sending 3 cookie responses for denied handshake messages for 192.0.2.9:7"
    )


def test_a_drains_cookie_replies_count_one_by_one() -> None:
    """The C intake reports a drain's cookie replies as one event: the counts (status,
    metrics) still count every reply."""
    stats = Stats()
    stats.count([ev.CookieSent(None, count=40), ev.CookieSent(("192.0.2.9", 7))])
    assert stats.events[ev.EventKind.COOKIE_SENT] == 41


def test_drop_summary_once_per_interval_and_only_when_new() -> None:
    summary = wlog.DropSummary(every=10)
    drops: Counter[Drop] = Counter()
    assert summary.tick(0.0, drops) is None
    drops[Drop.BAD_MAC1] += 700
    drops[Drop.RATE_LIMITED] += 3
    assert summary.tick(5.0, drops) is None  # not yet
    assert summary.tick(10.0, drops) == (
        "Dropped in the last 10 seconds: 700 bad_mac1, 3 rate_limited"
    )
    assert summary.tick(20.0, drops) is None  # nothing new
    drops[Drop.RATE_LIMITED] += 1
    assert summary.tick(30.0, drops) == "Dropped in the last 10 seconds: 1 rate_limited"


def test_status_counts_and_is_json() -> None:
    net = SimNet()
    a, b = net.add("a", A_EP), net.add("b", B_EP)
    net.link(a, b, "10.0.0.1/32", "10.0.0.2/32")
    events = recorded(net)
    net.send(a, ipv4_packet("10.0.0.1", "10.0.0.2"))
    stats = Stats()
    stats.count(e for e in events if e.peer is None or e.peer in a.device.peers.values())
    status = build_status(
        name="wg0", device=a.device, listen_port=51820, fwmark=0,
        drops=Counter({Drop.BAD_MAC1: 2}), stats=stats, datapath="python", offload=True,
        now=net.now + 1,
    )  # fmt: skip
    json.dumps(status)
    assert status["drops"]["bad_mac1"] == 2 and status["drops"]["no_route"] == 0
    assert status["events"]["initiation_sent"] == 1
    assert status["events"]["handshake_completed"] == 1
    (peer,) = status["peers"]
    assert peer["allowed_ips"] == ["10.0.0.2/32"] and peer["endpoint"] == "192.0.2.2:51821"
    assert peer["keypairs"]["current"]["age"] == 1.0
    assert peer["keypairs"]["current"]["initiator"] is True
    assert peer["keypairs"]["previous"] is None
    assert peer["events"]["response_received"] == 1
    assert 539 <= peer["timers"]["zero_keys"] <= 540
    assert status["under_load"] is False and status["queued_handshakes"] == 0


class StatusHost(MemoryHost):
    def wgpy_status(self) -> str:
        return json.dumps({"interface": "wg0"})


def test_uapi_wgpy_status_request() -> None:
    assert req(StatusHost(), "wgpy_status=1") == '{"interface": "wg0"}\nerrno=0\n\n'
    assert req(StatusHost(), "wgpy_status=1", "x=1").startswith("errno=-")
    assert req(MemoryHost(), "wgpy_status=1") == "errno=-71\n\n"  # EPROTO: not offered


def test_metrics_collector_names_and_values() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from tests.io.test_datapath import pair
    from wgpy.daemon.metrics import Collector, Source, parse_listen

    a, b = pair()
    from tests.io.test_datapath import carry
    from tests.io.test_offload import V4, udp

    carry(a, b, [udp(b"hello", V4)])
    stats = Stats()
    stats.count(a.events)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(Source("wg0", a.device, a.datapath, stats, True, "python")))
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (sent,) = families["wireguard_sent_bytes"].samples
    peer = next(iter(a.device.peers.values()))
    assert sent.labels == {
        "interface": "wg0",
        "public_key": base64.b64encode(peer.public_key).decode(),
        "allowed_ips": "10.0.0.2/32,fd00::2/128",
    }
    assert sent.value == peer.tx_bytes > 0
    assert families["wireguard_received_bytes"].samples[0].value == peer.rx_bytes
    assert families["wgpy_handshake_initiations_sent"].samples[0].value == 1
    assert families["wgpy_handshakes_completed"].samples[0].value == 1
    reasons = {s.labels["reason"] for s in families["wgpy_drops"].samples}
    assert reasons == {d.value for d in Drop}
    batch = {s.name: s.value for s in families["wgpy_batch_size"].samples
             if s.labels["direction"] == "tun_rx"}  # fmt: skip
    assert batch["wgpy_batch_size_count"] >= 1
    assert families["wgpy_info"].samples[0].labels["datapath"] == "python"
    assert families["wgpy_crypto_fallbacks"].samples[0].value == 0
    a.device.crypto_fallbacks = 2  # (as Device._work_off counts them)
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}  # fmt: skip
    assert families["wgpy_crypto_fallbacks"].samples[0].value == 2
    assert parse_listen("9586") == ("127.0.0.1", 9586)
    assert parse_listen("[::1]:9") == ("::1", 9)
    with pytest.raises(ValueError):
        parse_listen("localhost:9586")
    for bad in ["\u0669\u0660\u0669\u0660", "9\u00b2", "0", "65536"]:  # Arabic-Indic 9090, ...
        with pytest.raises(ValueError):
            parse_listen(bad)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_metrics_endpoint_answers_only_an_address_or_localhost(host: str) -> None:
    """`--metrics`: a scrape by address (Prometheus) or by localhost gets the metrics; a
    request naming any other host gets 421, as a web page would send it after DNS
    rebinding (it would read every peer's key and traffic); one without a Host too."""
    pytest.importorskip("prometheus_client")
    import http.client
    import socket

    from tests.io.test_datapath import pair
    from wgpy.daemon.metrics import MetricsServer, Source

    a, _ = pair()
    server = MetricsServer(Source("wg0", a.device, a.datapath, Stats(), True, "python"),
                           (host, 0))  # fmt: skip
    port = server.address[1]
    literal = f"[{host}]" if ":" in host else host

    def get(host_header: str | None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.putrequest("GET", "/metrics", skip_host=True)
            if host_header is not None:
                conn.putheader("Host", host_header)
            conn.endheaders()
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    try:
        for allowed in (f"{literal}:{port}", literal, f"localhost:{port}"):
            status, body = get(allowed)
            assert status == 200 and b"wgpy_info" in body, allowed
        for refused in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
            status, body = get(refused)
            assert status == 421 and b"wgpy" not in body, refused
        with socket.create_connection((host, port), timeout=5) as raw:  # HTTP/1.0, no Host
            raw.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert raw.recv(100).split()[1] == b"421"
    finally:
        server.close()


def test_interface_events_carry_each_kinds_detail() -> None:
    from wgpy.embed.interface import detail_of

    peer = SimNet().add("a", A_EP).device.add_peer(bytes(range(32)))
    assert peer is not None
    assert detail_of(ev.InitiationSent(peer, 3)) == 3
    assert detail_of(ev.KeypairCreated(peer, 77)) == 77
    assert detail_of(ev.EndpointChanged(peer, ("fd00::1", 5))) == ("fd00::1", 5)
    assert detail_of(ev.CookieSent(("192.0.2.9", 7))) == ("192.0.2.9", 7)
    assert detail_of(ev.CookieSent(None, count=40)) is None
    assert detail_of(ev.HandshakeRetry(peer, "no data back")) == "no data back"
    assert detail_of(ev.HandshakeGaveUp(peer, 20)) == 20
    assert detail_of(ev.KeysZeroed(peer)) is None


def test_the_librarys_events_keep_a_drains_count() -> None:
    """A drain's cookie replies are one core event; the library's copy says how many."""
    from wgpy.embed.interface import public_event

    many = public_event(ev.CookieSent(None, count=40), 1.0)
    assert (many.kind, many.peer, many.detail, many.count) == (
        ev.EventKind.COOKIE_SENT,
        None,
        None,
        40,
    )
    assert public_event(ev.CookieSent(("192.0.2.9", 7)), 1.0).count == 1


def test_crypto_fallbacks_are_warned_of_once(caplog: pytest.LogCaptureFixture) -> None:
    """A batch's crypto done on the loop's thread (core/exchanges.py) is one warning, the
    first time, however many batches follow."""
    warning = wlog.FallbackWarning()
    with caplog.at_level(logging.WARNING, logger="wgpy"):
        warning.check(0)
        assert not caplog.records
        warning.check(1)
        warning.check(7)
    assert [r.getMessage() for r in caplog.records] == [wlog.CRYPTO_FALLBACK]
    assert caplog.records[0].levelno == logging.WARNING
