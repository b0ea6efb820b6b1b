"""`wgpy proxy --info ADDR`: a health endpoint, as wireproxy's `--info`.

- `GET /readyz`: with wireproxy's `CheckAlive` (`alive.py`), its answer: a JSON object of
  each address's last pong (Unix seconds, 0 for never), 503 if one is later than
  CheckAliveInterval + 2 s. Without: 200 while the tunnel's datapath runs, with each
  peer's latest handshake; 503 once it stopped.
- `GET /metrics`: Prometheus text: per peer the names of prometheus_wireguard_exporter
  (`wireguard_sent_bytes_total`, `wireguard_received_bytes_total`,
  `wireguard_latest_handshake_seconds`), and the proxy's clients now and refused so far.
Private and preshared keys are never shown. A request is answered only when its Host
is an address, `localhost` or the name the endpoint listens on; others get 421
(daemon/hosts.py: against DNS rebinding, which would let a web page read the peers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterable

from wgpy.daemon.hosts import REFUSED_BODY, REFUSED_STATUS, AllowedHosts
from wgpy.embed.interface import Interface, PeerState
from wgpy.rootless.alive import Alive
from wgpy.rootless.http import BadRequest, parse_head
from wgpy.rootless.serve import Handler

REQUEST_TIMEOUT = 10.0


def readyz(running: bool, peers: list[PeerState], alive: Alive | None) -> tuple[int, str]:
    """With CheckAlive: wireproxy's answer (each address's last pong; 503 if one is late).
    Without: each peer's latest handshake, 200 while the datapath runs."""
    if alive is not None:
        late = not alive.ready(time.time())
        return (503 if late or not running else 200), json.dumps(
            {a: int(t) for a, t in alive.last.items()})  # fmt: skip
    body = {p.public_key: int(p.last_handshake or 0) for p in peers}
    return (200 if running else 503), json.dumps(body)


def metrics(name: str, peers: list[PeerState], clients: int, refused: int) -> str:
    lines = []
    for metric, kind, value in (
        ("wireguard_sent_bytes_total", "counter", lambda p: p.tx_bytes),
        ("wireguard_received_bytes_total", "counter", lambda p: p.rx_bytes),
        ("wireguard_latest_handshake_seconds", "gauge", lambda p: int(p.last_handshake or 0)),
    ):
        lines.append(f"# TYPE {metric} {kind}")
        for p in peers:
            labels = (f'interface="{name}",public_key="{p.public_key}",'
                      f'allowed_ips="{",".join(p.allowed_ips)}"')  # fmt: skip
            lines.append(f"{metric}{{{labels}}} {value(p)}")
    lines += ["# TYPE wgpy_proxy_clients gauge", f"wgpy_proxy_clients {clients}",
              "# TYPE wgpy_proxy_refused_total counter",
              f"wgpy_proxy_refused_total {refused}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def info_handler(
    iface: Interface,
    counts: Callable[[], tuple[int, int]],
    alive: Alive | None = None,
    names: Iterable[str] = (),
) -> Handler:
    """Answers one request per connection; `counts` gives (clients now, refused); `names`
    are the host names the endpoint answers to besides addresses and localhost (the one
    it listens on)."""
    hosts = AllowedHosts(names)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError,
                                 asyncio.LimitOverrunError):  # fmt: skip
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                status, body, kind = await answer(head, iface, hosts, counts, alive)
                data = body.encode()
                writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {kind}\r\n"
                             f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                             .encode() + data)  # fmt: skip
                await writer.drain()

    return handle


async def answer(
    head: bytes,
    iface: Interface,
    hosts: AllowedHosts,
    counts: Callable[[], tuple[int, int]],
    alive: Alive | None,
) -> tuple[int, str, str]:
    """(status, body, content type) for a request's head. The Host is checked before
    anything is read: a page in a browser on this machine must not read the peers' keys
    and traffic through a name rebound to 127.0.0.1 (daemon/hosts.py)."""
    try:
        method, target, _, headers = parse_head(head)
    except BadRequest:
        return 400, "bad request\n", "text/plain"
    host = [value for name, value in headers if name.lower() == "host"]
    if len(host) != 1 or not hosts.allows(host[0].encode("latin-1")):
        return REFUSED_STATUS, REFUSED_BODY, "text/plain"
    if method != "GET":
        return 405, "GET only\n", "text/plain"
    path = target.split("?", 1)[0]
    running = iface.running
    peers = await asyncio.to_thread(iface.peers) if running else []
    if path == "/readyz":
        return (*readyz(running, peers, alive), "application/json")
    if path == "/metrics":
        return 200, metrics(iface.name, peers, *counts()), "text/plain; version=0.0.4"
    return 404, "/readyz or /metrics\n", "text/plain"


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            421: "Misdirected Request", 503: "Service Unavailable"}  # fmt: skip
