"""Events: what the protocol did, one small frozen class per kind with typed fields (as
aioquic's quic/events.py and h11's _events.py have them).

Events are rare by construction (handshakes, key rotations, roaming, timers), never one
per data packet. Every event names its peer (`peer`; only a cookie sent to a stranger has
none) and its `kind` (an `EventKind`, for counting and matching); the fields beyond those
are each kind's own. Read them with `match` or `isinstance`:

    match event:
        case EndpointChanged(peer=peer, endpoint=endpoint): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Literal

from wgpy.core.endpoint import Endpoint

if TYPE_CHECKING:
    from wgpy.core.peer import Peer


class EventKind(Enum):
    INITIATION_SENT = "initiation_sent"
    INITIATION_RECEIVED = "initiation_received"
    RESPONSE_SENT = "response_sent"
    RESPONSE_RECEIVED = "response_received"
    COOKIE_SENT = "cookie_sent"
    COOKIE_RECEIVED = "cookie_received"
    KEYPAIR_CREATED = "keypair_created"
    HANDSHAKE_COMPLETED = "handshake_completed"
    ENDPOINT_CHANGED = "endpoint_changed"
    KEEPALIVE_SENT = "keepalive_sent"
    HANDSHAKE_RETRY = "handshake_retry"
    HANDSHAKE_GAVE_UP = "handshake_gave_up"
    KEYS_ZEROED = "keys_zeroed"


class ProtocolEvent:
    """The base of every event: its kind, and its peer (None only for `CookieSent`)."""

    __slots__ = ()
    kind: ClassVar[EventKind]
    peer: Peer | None


@dataclass(frozen=True, slots=True)
class InitiationSent(ProtocolEvent):
    kind: ClassVar[EventKind] = EventKind.INITIATION_SENT
    peer: Peer
    attempt: int  # 0: the first of this handshake, then one more per retry


@dataclass(frozen=True, slots=True)
class InitiationReceived(ProtocolEvent):
    kind: ClassVar[EventKind] = EventKind.INITIATION_RECEIVED
    peer: Peer
    tag: object = None  # what the caller passed with the read it came in (receive's tag)


@dataclass(frozen=True, slots=True)
class ResponseSent(ProtocolEvent):
    kind: ClassVar[EventKind] = EventKind.RESPONSE_SENT
    peer: Peer


@dataclass(frozen=True, slots=True)
class ResponseReceived(ProtocolEvent):
    kind: ClassVar[EventKind] = EventKind.RESPONSE_RECEIVED
    peer: Peer
    tag: object = None  # what the caller passed with the read it came in (receive's tag)


@dataclass(frozen=True, slots=True)
class CookieSent(ProtocolEvent):
    """Under load: a cookie reply instead of a response, to whoever sent from `source`.
    `source` None: `count` replies the C intake sent itself in one drain, to many
    sources (core/intake.py): one event for them all, not one per datagram of a flood."""

    kind: ClassVar[EventKind] = EventKind.COOKIE_SENT
    source: Endpoint | None
    peer: None = None
    count: int = 1


@dataclass(frozen=True, slots=True)
class CookieReceived(ProtocolEvent):
    kind: ClassVar[EventKind] = EventKind.COOKIE_RECEIVED
    peer: Peer


@dataclass(frozen=True, slots=True)
class KeypairCreated(ProtocolEvent):
    kind: ClassVar[EventKind] = EventKind.KEYPAIR_CREATED
    peer: Peer
    index: int  # our index of the new session


@dataclass(frozen=True, slots=True)
class HandshakeCompleted(ProtocolEvent):
    """The new session is the current one."""

    kind: ClassVar[EventKind] = EventKind.HANDSHAKE_COMPLETED
    peer: Peer


@dataclass(frozen=True, slots=True)
class EndpointChanged(ProtocolEvent):
    kind: ClassVar[EventKind] = EventKind.ENDPOINT_CHANGED
    peer: Peer
    endpoint: Endpoint  # the new one


@dataclass(frozen=True, slots=True)
class KeepaliveSent(ProtocolEvent):
    kind: ClassVar[EventKind] = EventKind.KEEPALIVE_SENT
    peer: Peer


RetryReason = Literal["no response", "no data back"]


@dataclass(frozen=True, slots=True)
class HandshakeRetry(ProtocolEvent):
    """A new handshake, because the last got no response, or because data went out and
    nothing came back (wireguard-go's two reasons)."""

    kind: ClassVar[EventKind] = EventKind.HANDSHAKE_RETRY
    peer: Peer
    reason: RetryReason


@dataclass(frozen=True, slots=True)
class HandshakeGaveUp(ProtocolEvent):
    kind: ClassVar[EventKind] = EventKind.HANDSHAKE_GAVE_UP
    peer: Peer
    attempts: int


@dataclass(frozen=True, slots=True)
class KeysZeroed(ProtocolEvent):
    kind: ClassVar[EventKind] = EventKind.KEYS_ZEROED
    peer: Peer
