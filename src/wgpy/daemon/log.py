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
from wgpy.core.endpoint import format_endpoint
from wgpy.core.events import (
    CookieSent,
    EndpointChanged,
    EventKind,
    HandshakeGaveUp,
    HandshakeRetry,
    InitiationSent,
    KeypairCreated,
    ProtocolEvent,
)
from wgpy.core.output import Drop

log = logging.getLogger("wgpy")
DROP_SUMMARY_EVERY = 10.0  # seconds
CRYPTO_FALLBACK = (
    "the crypto threads could not set OpenSSL up (out of memory?): handshakes are worked "
    "out on the loop's thread instead, more slowly (said once)"
)


def peer_name(public_key: bytes) -> str:
    """As wireguard-go's Peer.String(): the base64 key's first 4 and last 4 characters
    (before the padding '=')."""
    b64 = encode_key(public_key)
    return f"peer({b64[:4]}…{b64[39:43]})"


# wireguard-go's words for the events that carry nothing but their peer ({name})
_LINES = {
    EventKind.INITIATION_SENT: "{name} - Sending handshake initiation",
    EventKind.INITIATION_RECEIVED: "{name} - Received handshake initiation",
    EventKind.RESPONSE_SENT: "{name} - Sending handshake response",
    EventKind.RESPONSE_RECEIVED: "{name} - Received handshake response",
    EventKind.COOKIE_RECEIVED: "{name} - Receiving cookie response",
    EventKind.HANDSHAKE_COMPLETED: "{name} - Handshake completed",
    EventKind.KEEPALIVE_SENT: "{name} - Sending keepalive packet",
    EventKind.KEYS_ZEROED: "{name} - Removing all keys, since we haven't received a new one in "
    f"{int(ZERO_KEYS_AFTER)} seconds",
}


def describe(event: ProtocolEvent, attempt: int | None = None) -> str:
    """The log line of one event. `attempt`: for a retry, the attempt number of the
    initiation that follows it (as `describe_all` finds it)."""
    peer = event.peer
    name = peer_name(peer.public_key) if peer is not None else "peer(?)"
    match event:
        case CookieSent(source=source, count=count):
            # count > 1: a drain's worth (no source) or one read's, told by the C intake
            what = (f"{count} cookie responses for denied handshake messages" if count > 1
                    else "cookie response for denied handshake message")  # fmt: skip
            if source is None:
                return f"Sending {what}"
            return f"Sending {what} for {format_endpoint(source)}"
        case KeypairCreated(index=index):
            return f"Keypair {index} created for {name}"
        case EndpointChanged(endpoint=endpoint):
            return f"{name} - Endpoint changed to {format_endpoint(endpoint)}"
        case HandshakeGaveUp(attempts=attempts):
            return f"{name} - Handshake did not complete after {attempts} attempts, giving up"
        case HandshakeRetry(reason="no data back"):
            seconds = int(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)
            return (
                f"{name} - Retrying handshake because we stopped hearing back after "
                f"{seconds} seconds"
            )
        case HandshakeRetry(peer=peer):
            tries = (attempt if attempt is not None else peer.timers.handshake_attempts) + 1
            return (  # wireguard-go counts the first initiation as try 1
                f"{name} - Handshake did not complete after {int(REKEY_TIMEOUT)} seconds, "
                f"retrying (try {tries})"
            )
    return _LINES[event.kind].format(name=name)


def describe_all(events: Sequence[ProtocolEvent]) -> list[str]:
    """The lines of a call's events, in order. A retry is numbered by the initiation it
    caused, which follows it in the same output."""
    lines = []
    for i, event in enumerate(events):
        attempt = None
        if isinstance(event, HandshakeRetry):
            for later in events[i + 1 :]:
                if isinstance(later, InitiationSent) and later.peer is event.peer:
                    attempt = later.attempt
                    break
        lines.append(describe(event, attempt))
    return lines


def log_events(events: Sequence[ProtocolEvent]) -> None:
    """The Datapath's `on_events` (part of it): one verbose line per event."""
    if log.isEnabledFor(logging.DEBUG):
        for line in describe_all(events):
            log.debug("%s", line)


class FallbackWarning:
    """One warning the first time the device did a batch's handshake crypto on the loop's
    thread (Device.crypto_fallbacks): a failure that persists would otherwise be a line
    per batch, or none."""

    def __init__(self) -> None:
        self.warned = False

    def check(self, fallbacks: int) -> None:
        if fallbacks and not self.warned:
            self.warned = True
            log.warning("%s", CRYPTO_FALLBACK)


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
