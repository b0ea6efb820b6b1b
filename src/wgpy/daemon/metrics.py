"""Prometheus metrics, opt-in: `wgpy IFNAME --metrics 127.0.0.1:9586`.

Served by `prometheus_client` (an optional dependency: `pip install 'wgpy[metrics]'`) on its
own thread. A custom collector reads the device when Prometheus scrapes, so the datapath
does no work for metrics at all: it keeps its plain integer counters as it always does,
and a scrape copies them (each copy is one C-level operation under the GIL; a structure
that changes while it is read, which only a UAPI `set` can cause, makes the scrape try
again). A scrape costs the loop thread at most the GIL for the time of the copies.

Per peer, the names and labels of prometheus_wireguard_exporter, so its dashboards work:
`wireguard_sent_bytes_total`, `wireguard_received_bytes_total`,
`wireguard_latest_handshake_seconds` (Unix time; 0: never) and
`wireguard_latest_handshake_delay_seconds`, labelled `interface`, `public_key`,
`allowed_ips`. wgpy's own metrics start with `wgpy_`; docs/status.md lists them.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from wgpy._version import __version__
from wgpy.core.allowedips import format_cidr
from wgpy.core.crypto import encode_key
from wgpy.core.device import Device
from wgpy.core.endpoint import Endpoint, format_endpoint, parse_port, split_endpoint
from wgpy.core.events import EventKind
from wgpy.core.output import Drop
from wgpy.daemon.hosts import REFUSED_BODY, REFUSED_STATUS, AllowedHosts
from wgpy.daemon.status import Stats
from wgpy.io.datapath import BatchSizes, Datapath

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("wgpy.metrics")
WSGIApp = Callable[[dict[str, Any], Any], Iterable[bytes]]
SNAPSHOT_TRIES = 5


def parse_listen(value: str) -> Endpoint:
    """`PORT`, `HOST:PORT` or `[V6]:PORT` (ASCII digits); a bare port binds to loopback
    only."""
    value = value.strip()
    host, port = split_endpoint(value) if ":" in value else ("127.0.0.1", parse_port(value))
    ipaddress.ip_address(host)  # an address, not a name: no resolver surprises
    return host, port


@dataclass
class Source:
    """What the collector reads; the daemon hands over its live objects."""

    name: str
    device: Device
    datapath: Datapath
    stats: Stats
    offload: bool
    kind: str  # the datapath: "python" or "native"


def _snapshot(src: Source) -> dict[str, Any]:
    dev = src.device
    dp = src.datapath
    now = time.monotonic()
    peers = []
    for peer in list(dev.peers.values()):
        allowed = ",".join(format_cidr(a, c) for a, c in dev.allowed_ips.entries(peer))
        peers.append((encode_key(peer.public_key), allowed, peer.tx_bytes, peer.rx_bytes,
                      peer.last_handshake))  # fmt: skip
    return {
        "peers": peers,
        "drops": Counter(dict(dp.drops)),
        "events": Counter(dict(src.stats.events)),
        "under_load": dev.is_under_load(now),
        "queued": dev.queued_handshakes,
        "crypto_fallbacks": dev.crypto_fallbacks,
        "under_load_seconds": src.stats.under_load_seconds,
        "batches": {"udp_rx": _batches(dp.udp_batches), "tun_rx": _batches(dp.tun_batches)},
        "kind": src.kind,
    }


def _batches(b: BatchSizes) -> tuple[list[int], int, int]:
    return list(b.counts), b.events, b.packets


class Collector:
    """Reads the device at scrape time (prometheus_client's custom-collector protocol)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def snapshot(self) -> dict[str, Any]:
        for _ in range(SNAPSHOT_TRIES - 1):
            try:
                return _snapshot(self.source)
            except RuntimeError:  # changed size during iteration: a `set` meanwhile
                continue
        return _snapshot(self.source)

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        name = self.source.name
        yield from _peer_families(name, snap["peers"])
        yield from _event_families(name, snap["events"])
        yield from _drop_families(name, snap["drops"])
        yield from _load_families(name, snap)
        yield _batch_family(name, snap["batches"])
        yield _info_family(name, snap["kind"], self.source.offload)


# wgpy's own event counters: (metric, the event kind it counts, help)
_EVENT_COUNTERS = [
    ("handshake_initiations_sent", EventKind.INITIATION_SENT, "Handshake initiations sent"),
    ("handshake_initiations_received", EventKind.INITIATION_RECEIVED,
     "Valid handshake initiations received"),
    ("handshake_responses_sent", EventKind.RESPONSE_SENT, "Handshake responses sent"),
    ("handshake_responses_received", EventKind.RESPONSE_RECEIVED,
     "Valid handshake responses received"),
    ("handshakes_completed", EventKind.HANDSHAKE_COMPLETED,
     "Handshakes completed (a new session in use)"),
    ("cookie_replies_sent", EventKind.COOKIE_SENT,
     "Cookie replies sent (under load, or to a source over its rate)"),
    ("cookie_replies_received", EventKind.COOKIE_RECEIVED, "Cookie replies accepted"),
    ("keepalives_sent", EventKind.KEEPALIVE_SENT, "Keepalives sent"),
    ("handshake_retries", EventKind.HANDSHAKE_RETRY, "Handshakes retried"),
    ("endpoint_changes", EventKind.ENDPOINT_CHANGED, "Peer endpoints changed (roaming)"),
]  # fmt: skip


def _peer_families(name: str, peers: list[tuple[Any, ...]]) -> Iterator[Metric]:
    """The prometheus_wireguard_exporter's per-peer metrics, under its names."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["interface", "public_key", "allowed_ips"]
    sent = CounterMetricFamily("wireguard_sent_bytes", "Bytes sent to the peer", labels=labels)
    received = CounterMetricFamily(
        "wireguard_received_bytes", "Bytes received from the peer", labels=labels
    )
    latest = GaugeMetricFamily(
        "wireguard_latest_handshake_seconds",
        "Seconds from the last handshake (Unix time; 0: never)",
        labels=labels,
    )
    delay = GaugeMetricFamily(
        "wireguard_latest_handshake_delay_seconds",
        "Seconds since the last handshake (absent: never)",
        labels=labels,
    )
    wall = time.time()
    for key, allowed, tx, rx, last in peers:
        values = [name, key, allowed]
        sent.add_metric(values, tx)
        received.add_metric(values, rx)
        latest.add_metric(values, int(last) if last is not None else 0)
        if last is not None:
            delay.add_metric(values, max(0.0, wall - last))
    yield from (sent, received, latest, delay)


def _event_families(name: str, events: Counter[EventKind]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    for metric, kind, text in _EVENT_COUNTERS:
        family = CounterMetricFamily(f"wgpy_{metric}", text, labels=["interface"])
        family.add_metric([name], events[kind])
        yield family


def _drop_families(name: str, drops: Counter[Drop]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    limited = CounterMetricFamily(
        "wgpy_handshakes_rate_limited",
        "Handshake messages with a cookie dropped over their source's cookie rate",
        labels=["interface"],
    )  # fmt: skip
    limited.add_metric([name], drops[Drop.RATE_LIMITED])
    yield limited
    by_reason = CounterMetricFamily(
        "wgpy_drops", "Datagrams and packets dropped, by reason",
        labels=["interface", "reason"],
    )  # fmt: skip
    for reason in Drop:
        by_reason.add_metric([name, reason.value], drops[reason])
    yield by_reason


def _load_families(name: str, snap: dict[str, Any]) -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    under = GaugeMetricFamily(
        "wgpy_under_load", "1 while the device is under load (cookies)", labels=["interface"]
    )
    under.add_metric([name], 1 if snap["under_load"] else 0)
    yield under
    seconds = CounterMetricFamily(
        "wgpy_under_load_seconds", "Seconds spent under load", labels=["interface"]
    )
    seconds.add_metric([name], snap["under_load_seconds"])
    yield seconds
    queued = GaugeMetricFamily(
        "wgpy_queued_handshakes", "Handshake messages waiting", labels=["interface"]
    )
    queued.add_metric([name], snap["queued"])
    yield queued
    fallbacks = CounterMetricFamily(
        "wgpy_crypto_fallbacks",
        "Batch calls to the crypto threads that failed (no memory): their handshakes "
        "were worked off on the loop thread",
        labels=["interface"],
    )
    fallbacks.add_metric([name], snap["crypto_fallbacks"])
    yield fallbacks


def _batch_family(name: str, batches: dict[str, tuple[list[int], int, int]]) -> Metric:
    from prometheus_client.core import HistogramMetricFamily

    batch = HistogramMetricFamily(
        "wgpy_batch_size", "Packets per readable event of the datapath",
        labels=["interface", "direction"],
    )  # fmt: skip
    for direction, (counts, _, packets) in batches.items():
        buckets, total = [], 0
        for k, n in enumerate(counts):
            total += n
            bound = "+Inf" if k == len(counts) - 1 else str(float(1 << k))
            buckets.append((bound, total))
        batch.add_metric([name, direction], buckets, float(packets))
    return batch


def _info_family(name: str, kind: str, offload: bool) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    info = GaugeMetricFamily(
        "wgpy_info", "The daemon: version and datapath",
        labels=["interface", "version", "datapath", "offload"],
    )  # fmt: skip
    info.add_metric([name, __version__, kind, str(offload).lower()], 1)
    return info


class MetricsServer:
    """The HTTP endpoint on its own thread; `close` stops it. It answers only a request
    whose Host is an address, `localhost` or the name it listens on (daemon/hosts.py:
    against DNS rebinding, a web page in a browser here would read every peer's key and
    traffic); Prometheus scrapes by address."""

    def __init__(self, source: Source, listen: Endpoint) -> None:
        try:
            from prometheus_client import CollectorRegistry, make_wsgi_app
        except ImportError as e:
            raise OSError(
                f"--metrics needs prometheus-client (pip install 'wgpy[metrics]'): {e}"
            ) from None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(source))
        host, port = listen
        app = _host_checked(make_wsgi_app(self.registry), AllowedHosts([host]))
        self.server = _serve(host, port, app)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="wgpy-metrics")  # fmt: skip
        self.thread.start()
        self.address = (host, self.server.server_port)
        log.info("metrics on http://%s/metrics", format_endpoint(self.address))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _host_checked(app: WSGIApp, hosts: AllowedHosts) -> WSGIApp:
    def checked(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST")
        if not hosts.allows(host.encode("latin-1") if host else None):
            start_response(f"{REFUSED_STATUS} Misdirected Request",
                           [("Content-Type", "text/plain; charset=utf-8")])  # fmt: skip
            return [REFUSED_BODY.encode()]
        return app(environ, start_response)

    return checked


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line on stderr per scrape."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow client never holds the daemon's exit


def _serve(host: str, port: int, app: WSGIApp) -> WSGIServer:
    """A threading WSGI server on (host, port), IPv6 where the host is an IPv6 address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("_Server", (_Server,), {"address_family": family})
    return make_server(host, port, app, server_class, _Quiet)
