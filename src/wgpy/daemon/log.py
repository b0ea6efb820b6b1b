"""Log lines for what the core reports, in wireguard-go's words.

With `LOG_LEVEL=verbose` each event becomes one line, as wireguard-go logs it
(`peer(AbCd…wXyZ) - Sending handshake initiation`). Drops never get a line each (a flood
would become a log flood): `DropSummary` writes their counts by reason once per interval,
and only when there were any.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from wgpy.core.constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT, ZERO_KEYS_AFTER
from wgpy.core.crypto import encode_key
from wgpy.core.output import Drop, Event, EventKind
from wgpy.daemon.uapi import format_endpoint

log = logging.getLogger("wgpy")
DROP_SUMMARY_EVERY = 10.0  # seconds


def peer_name(public_key: bytes) -> str:
    """As wireguard-go's Peer.String(): the base64 key's first 4 and last 4 characters
    (before the padding '=')."""
    b64 = encode_key(public_key)
    return f"peer({b64[:4]}…{b64[39:43]})"


def _endpoint(detail: object) -> str:
    if isinstance(detail, tuple) and len(detail) == 2:
        return format_endpoint((str(detail[0]), int(detail[1])))
    return str(detail)


# wireguard-go's words; {name}: the peer, {detail}: the event's detail
_LINES = {
    EventKind.INITIATION_SENT: "{name} - Sending handshake initiation",
    EventKind.INITIATION_RECEIVED: "{name} - Received handshake initiation",
    EventKind.RESPONSE_SENT: "{name} - Sending handshake response",
    EventKind.RESPONSE_RECEIVED: "{name} - Received handshake response",
    EventKind.COOKIE_SENT: "Sending cookie response for denied handshake message for {detail}",
    EventKind.COOKIE_RECEIVED: "{name} - Receiving cookie response",
    EventKind.KEYPAIR_CREATED: "Keypair {detail} created for {name}",
    EventKind.HANDSHAKE_COMPLETED: "{name} - Handshake completed",
    EventKind.ENDPOINT_CHANGED: "{name} - Endpoint changed to {detail}",
    EventKind.KEEPALIVE_SENT: "{name} - Sending keepalive packet",
    EventKind.HANDSHAKE_GAVE_UP: "{name} - Handshake did not complete after {detail} attempts, "
    "giving up",
    EventKind.KEYS_ZEROED: "{name} - Removing all keys, since we haven't received a new one in "
    f"{int(ZERO_KEYS_AFTER)} seconds",
}


def describe(event: Event, attempt: int | None = None) -> str:
    """The log line of one event. `attempt`: for a retry, the attempt number of the
    initiation that follows it (as `describe_all` finds it)."""
    kind, peer, detail = event
    name = peer_name(peer.public_key) if peer is not None else "peer(?)"
    if kind is EventKind.COOKIE_SENT and detail is None:  # sent by the C intake, unnamed
        return "Sending cookie response for denied handshake message"
    if kind is not EventKind.HANDSHAKE_RETRY:
        return _LINES[kind].format(name=name, detail=_endpoint(detail))
    if detail == "no data back":
        seconds = int(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)
        return (
            f"{name} - Retrying handshake because we stopped hearing back after "
            f"{seconds} seconds"
        )
    if attempt is None:
        attempt = peer.timers.handshake_attempts if peer is not None else 0
    tries = attempt + 1  # wireguard-go counts the first initiation as try 1
    return (
        f"{name} - Handshake did not complete after {int(REKEY_TIMEOUT)} seconds, "
        f"retrying (try {tries})"
    )


def describe_all(events: Sequence[Event]) -> list[str]:
    """The lines of a call's events, in order. A retry is numbered by the initiation it
    caused, which follows it in the same output."""
    lines = []
    for i, event in enumerate(events):
        attempt = None
        if event.kind is EventKind.HANDSHAKE_RETRY:
            for later in events[i + 1 :]:
                if later.kind is EventKind.INITIATION_SENT and later.peer is event.peer:
                    attempt = later.detail if isinstance(later.detail, int) else None
                    break
        lines.append(describe(event, attempt))
    return lines


def log_events(events: Sequence[Event]) -> None:
    """The Datapath's `on_events` (part of it): one verbose line per event."""
    if log.isEnabledFor(logging.DEBUG):
        for line in describe_all(events):
            log.debug("%s", line)


class DropSummary:
    """Counts by reason of what was dropped since the last summary, once per interval."""

    def __init__(self, every: float = DROP_SUMMARY_EVERY) -> None:
        self.every = every
        self._seen: Counter[Drop] = Counter()
        self._next: float | None = None

    def tick(self, now: float, drops: Counter[Drop]) -> str | None:
        """The summary line if one is due and anything was dropped, else None."""
        if self._next is None:
            self._next = now + self.every
        if now < self._next:
            return None
        self._next = now + self.every
        new = drops - self._seen
        self._seen = drops.copy()
        if not new:
            return None
        parts = ", ".join(f"{n} {d.value}" for d, n in sorted(new.items(), key=lambda x: -x[1]))
        return f"Dropped in the last {self.every:g} seconds: {parts}"

    def log(self, now: float, drops: Counter[Drop]) -> None:
        line = self.tick(now, drops)
        if line is not None:
            log.debug("%s", line)
