"""A peer's state: its keys, handshake, up to three sessions and counters."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum

from wgpy.core.backend import Backend, Item
from wgpy.core.constants import MAX_STAGED_PACKETS, REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from wgpy.core.cookie import CookieGenerator
from wgpy.core.crypto import ZERO_KEY, PrivateKey
from wgpy.core.endpoint import Endpoint
from wgpy.core.noise import SymmetricState
from wgpy.core.timers import Timers


class Keypair:
    """One session: a key each way, the send counter and the receive window."""

    __slots__ = (
        "created",
        "expires",
        "initiator",
        "local_index",
        "peer",
        "remote_index",
        "sealer",
        "session",
    )

    def __init__(
        self,
        peer: Peer,
        keys: tuple[bytes, bytes],
        *,
        initiator: bool,
        local_index: int,
        remote_index: int,
        now: float,
        backend: Backend | None = None,
    ) -> None:
        backend = backend or Backend()
        self.peer = peer
        # One instant ends the session on both paths, compared one way (now >= expires)
        # by the open (either backend) and can_send: never `now - created` against 180 in
        # one place and `created + 180` in another, which differ by an ulp.
        self.expires = now + REJECT_AFTER_TIME
        # the backend's (core/backend.py): the sending key with the send counter, and the
        # receiving key with the replay window; with the native one, C holds the keys,
        # wiped when the session is dropped
        self.sealer = backend.sealer(keys[0], remote_index)
        self.session = backend.session(keys[1], self.expires)
        self.created = now
        self.initiator = initiator
        self.local_index = local_index
        self.remote_index = remote_index

    @property
    def send_counter(self) -> int:
        """Data messages sealed so far (REJECT_AFTER_MESSAGES once expired)."""
        return self.sealer.counter

    def wipe(self) -> None:
        """Zero the key copies C holds (Python's own cannot be wiped: dropping the last
        reference is what it can do)."""
        self.sealer.wipe()
        self.session.wipe()

    def expire(self) -> None:
        """No more sending on this session (receiving goes on until it is replaced)."""
        self.sealer.expire()

    def can_send(self, now: float) -> bool:
        # the sealer's counter itself, not `send_counter`: a call fewer on every send.
        # (The native seal_send makes this test itself: src/native/send.c lone_way.)
        return self.sealer.counter < REJECT_AFTER_MESSAGES and now < self.expires


class HandshakeState(Enum):
    NONE = 0
    INITIATION_SENT = 1  # we are the initiator, waiting for a response


class Handshake:
    """The initiator's half-done handshake plus what the responder remembers per peer."""

    __slots__ = (
        "e_priv",
        "last_initiation_consumed",
        "last_sent_handshake",
        "latest_timestamp",
        "local_index",
        "state",
        "sym",
    )

    def __init__(self) -> None:
        self.state = HandshakeState.NONE
        self.sym: SymmetricState | None = None
        self.e_priv: PrivateKey | None = None
        self.local_index: int | None = None
        self.latest_timestamp = bytes(12)  # newest TAI64N accepted from this peer
        self.last_initiation_consumed = float("-inf")
        self.last_sent_handshake = float("-inf")  # an initiation or a response

    def clear(self) -> None:
        self.state = HandshakeState.NONE
        self.sym = None
        self.e_priv = None


class Peer:
    __slots__ = (
        "cookies",
        "current",
        "endpoint",
        "handshake",
        "last_handshake",
        "next",
        "persistent_keepalive",
        "preshared_key",
        "previous",
        "public_key",
        "rx_bytes",
        "staged",
        "static_static",
        "timers",
        "tx_bytes",
    )

    def __init__(self, public_key: bytes, jitter: Callable[[], float]) -> None:
        self.public_key = public_key
        self.preshared_key = ZERO_KEY
        self.endpoint: Endpoint | None = None
        self.persistent_keepalive = 0
        self.static_static: bytes | None = None  # DH(our static, its static), precomputed
        self.handshake = Handshake()
        self.cookies = CookieGenerator(public_key)
        self.timers = Timers(jitter)
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None  # responder's, until the initiator uses it
        self.staged: deque[Item] = deque(maxlen=MAX_STAGED_PACKETS)  # packets, super-packets
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake: float | None = None  # wall-clock seconds

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]

    def __repr__(self) -> str:
        return f"Peer({self.public_key.hex()[:8]}…)"
