"""What the daemon counts beyond the core's own state, and the status it reports.

`Stats` counts the core's events (handshakes sent, received, completed, cookies...) per
device and per peer, and the seconds the device spent under load. `build_status` is the
whole picture as one JSON-ready dict: what `wg show` prints plus drops by reason,
handshake counts, session ages, timer deadlines, load and the datapath. It answers the
wgpy-only UAPI request `wgpy_status=1` (`wgpy show --json`) and feeds the metrics.
Field names are stable; docs/status.md describes each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from wgpy._version import __version__
from wgpy.core.allowedips import format_cidr
from wgpy.core.crypto import encode_key
from wgpy.core.device import Device
from wgpy.core.endpoint import format_endpoint
from wgpy.core.events import CookieSent, EventKind, ProtocolEvent
from wgpy.core.output import Drop
from wgpy.core.peer import Keypair, Peer

STATUS_VERSION = 1  # bumped only if a field changes meaning or goes away


class Stats:
    """Event counts since start, per device and per peer (by public key), and seconds
    under load. Written by the loop thread, read by others: plain ints and floats."""

    def __init__(self) -> None:
        self.events: Counter[EventKind] = Counter()
        self.peer_events: dict[bytes, Counter[EventKind]] = {}
        self.under_load_seconds = 0.0
        self._last_tick: float | None = None

    def count(self, events: Iterable[ProtocolEvent]) -> None:
        for event in events:
            kind, peer = event.kind, event.peer
            self.events[kind] += event.count if isinstance(event, CookieSent) else 1
            if peer is not None:
                per = self.peer_events.get(peer.public_key)
                if per is None:
                    per = self.peer_events[peer.public_key] = Counter()
                per[kind] += 1

    def tick(self, now: float, device: Device) -> None:
        """Called with every loop tick: time under load is counted in ticks."""
        last, self._last_tick = self._last_tick, now
        if last is not None and device.is_under_load(now):
            self.under_load_seconds += now - last

    def forget(self, keep: Iterable[bytes]) -> None:
        """Drop the counts of peers no longer configured."""
        keep = set(keep)
        for key in [k for k in self.peer_events if k not in keep]:
            del self.peer_events[key]


def event_counts(counts: Counter[EventKind] | None) -> dict[str, int]:
    counts = counts or Counter()
    return {kind.value: counts[kind] for kind in EventKind}


def _keypair(kp: Keypair | None, now: float) -> dict[str, Any] | None:
    if kp is None:
        return None
    return {
        "index": kp.local_index,
        "age": round(now - kp.created, 3),
        "initiator": kp.initiator,
        "sent_messages": kp.send_counter,
    }


def peer_status(device: Device, peer: Peer, stats: Stats, now: float) -> dict[str, Any]:
    last = peer.last_handshake
    return {
        "public_key": encode_key(peer.public_key),
        "preshared_key": any(peer.preshared_key),
        "endpoint": format_endpoint(peer.endpoint) if peer.endpoint else None,
        "allowed_ips": [format_cidr(a, c) for a, c in device.allowed_ips.entries(peer)],
        "latest_handshake": int(last) if last is not None else 0,
        "latest_handshake_ns": int(last * 1e9) if last is not None else 0,
        "rx_bytes": peer.rx_bytes,
        "tx_bytes": peer.tx_bytes,
        "persistent_keepalive": peer.persistent_keepalive,
        "events": event_counts(stats.peer_events.get(peer.public_key)),
        "handshake_attempts": peer.timers.handshake_attempts,
        "keypairs": {
            "current": _keypair(peer.current, now),
            "previous": _keypair(peer.previous, now),
            "next": _keypair(peer.next, now),
        },
        "timers": {
            t.value: round(at - now, 3)
            for t, at in sorted(peer.timers.deadlines.items(), key=lambda x: x[1])
        },
        "staged_packets": len(peer.staged),
    }


def build_status(
    *,
    name: str,
    device: Device,
    listen_port: int,
    fwmark: int,
    drops: Counter[Drop],
    stats: Stats,
    datapath: str,
    offload: bool,
    now: float,
) -> dict[str, Any]:
    """The device's status (see docs/status.md), computed at `now` (monotonic seconds)."""
    peers = list(device.peers.values())
    return {
        "status_version": STATUS_VERSION,
        "interface": name,
        "implementation": f"wgpy {__version__}",
        "datapath": datapath,
        "offload": offload,
        "public_key": encode_key(device.public_key) if device.public_key else None,
        "listen_port": listen_port,
        "fwmark": fwmark,
        "mtu": device.mtu,
        "under_load": device.is_under_load(now),
        "queued_handshakes": device.queued_handshakes,
        "under_load_seconds": round(stats.under_load_seconds, 3),
        "drops": {d.value: drops[d] for d in Drop},
        "events": event_counts(stats.events),
        "peers": [peer_status(device, p, stats, now) for p in peers],
    }
