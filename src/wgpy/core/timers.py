"""A peer's five timers as a pure state machine (whitepaper 6, wireguard-go timers.go).

Each timer is a deadline (or absent). Events from the datapath arm or disarm them; `due`
says which fired at `now` and disarms those. The device decides what a fired timer sends;
the `expired_*` methods are the timers' own part of it (re-arming, wireguard-go's
`expired*` functions), so that nothing outside this class writes a deadline.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from wgpy.core.constants import (
    KEEPALIVE_TIMEOUT,
    MAX_HANDSHAKE_ATTEMPTS,
    REKEY_TIMEOUT,
    ZERO_KEYS_AFTER,
)


class Timer(Enum):
    # members are singletons: the identity hash (C) is right, and Enum's own __hash__ (a
    # Python frame) cost every packet's timer updates ~5 us each with cold caches
    __hash__ = object.__hash__

    RETRANSMIT_HANDSHAKE = "retransmit_handshake"
    SEND_KEEPALIVE = "send_keepalive"
    NEW_HANDSHAKE = "new_handshake"
    ZERO_KEYS = "zero_keys"
    PERSISTENT_KEEPALIVE = "persistent_keepalive"


class Timers:
    __slots__ = (
        "_jitter",
        "deadlines",
        "handshake_attempts",
        "need_another_keepalive",
        "sent_last_minute_handshake",
    )

    def __init__(self, jitter: Callable[[], float]) -> None:
        self._jitter = jitter  # seconds in [0, 0.333]
        self.deadlines: dict[Timer, float] = {}
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False

    def pending(self, timer: Timer) -> bool:
        return timer in self.deadlines

    def stop(self, timer: Timer) -> None:
        self.deadlines.pop(timer, None)

    def due(self, now: float) -> list[Timer]:
        fired = [t for t, at in self.deadlines.items() if at <= now]
        for t in fired:
            del self.deadlines[t]
        return fired

    def clear(self) -> None:
        self.deadlines.clear()

    # Events, named as in wireguard-go so the two can be read side by side.

    def handshake_initiated(self, now: float) -> None:
        self.deadlines[Timer.RETRANSMIT_HANDSHAKE] = now + REKEY_TIMEOUT + self._jitter()

    def handshake_complete(self) -> None:
        self.stop(Timer.RETRANSMIT_HANDSHAKE)
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def session_derived(self, now: float) -> None:
        self.deadlines[Timer.ZERO_KEYS] = now + ZERO_KEYS_AFTER

    def data_message_sent(self, now: float, persistent_keepalive: int, data: bool) -> None:
        """A data message went out (a keepalive unless `data`): wireguard-go's
        AnyAuthenticatedPacketTraversal, AnyAuthenticatedPacketSent and, with data,
        DataSent (expect an answer: without one, a new handshake), in one call on the
        send path (three fewer a hop, and the work they repeated)."""
        deadlines = self.deadlines
        if persistent_keepalive:
            deadlines[Timer.PERSISTENT_KEEPALIVE] = now + persistent_keepalive
        deadlines.pop(Timer.SEND_KEEPALIVE, None)
        if data and Timer.NEW_HANDSHAKE not in deadlines:
            deadline = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            deadlines[Timer.NEW_HANDSHAKE] = deadline

    def data_message_received(self, now: float, persistent_keepalive: int, data: bool) -> None:
        """A data message authenticated (a keepalive unless `data`): traversal,
        AnyAuthenticatedPacketReceived and, with data, DataReceived (owe the peer an
        answer: a keepalive unless data goes back first), in one call."""
        deadlines = self.deadlines
        if persistent_keepalive:
            deadlines[Timer.PERSISTENT_KEEPALIVE] = now + persistent_keepalive
        deadlines.pop(Timer.NEW_HANDSHAKE, None)
        if not data:
            return
        if Timer.SEND_KEEPALIVE not in deadlines:
            deadlines[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def authenticated_sent(self) -> None:
        self.stop(Timer.SEND_KEEPALIVE)

    def authenticated_received(self) -> None:
        self.stop(Timer.NEW_HANDSHAKE)

    def authenticated_traversal(self, now: float, persistent_keepalive: int) -> None:
        if persistent_keepalive:
            self.deadlines[Timer.PERSISTENT_KEEPALIVE] = now + persistent_keepalive

    def handshake_sent(self) -> None:
        """An initiation or response went out: it counts as an authenticated packet sent
        (wireguard-go send.go), so no passive keepalive is owed any more."""
        self.authenticated_sent()

    # What a fired timer means for the timers themselves.

    def expired_retransmit_handshake(self, now: float) -> bool:
        """True: retry the handshake. False: give up after MAX_HANDSHAKE_ATTEMPTS retries;
        keys then go in 3 x REJECT_AFTER_TIME unless that is already armed."""
        if self.handshake_attempts > MAX_HANDSHAKE_ATTEMPTS:
            self.stop(Timer.SEND_KEEPALIVE)
            if Timer.ZERO_KEYS not in self.deadlines:
                self.deadlines[Timer.ZERO_KEYS] = now + ZERO_KEYS_AFTER
            return False
        self.handshake_attempts += 1
        return True

    def expired_send_keepalive(self, now: float) -> None:
        """A keepalive went out; if more data arrived meanwhile, another is owed."""
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self.deadlines[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
