"""A peer's five timers as a pure state machine (whitepaper 6, wireguard-go timers.go).

Each timer is a deadline (or None). Events from the datapath arm or disarm them; `due`
says which fired at `now` and disarms those. The device decides what each one does.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from wgpy.core.constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT, ZERO_KEYS_AFTER


class Timer(Enum):
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

    def next_deadline(self) -> float | None:
        return min(self.deadlines.values(), default=None)

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

    def data_sent(self, now: float) -> None:
        """Expect an answer: without one, start a new handshake."""
        if Timer.NEW_HANDSHAKE not in self.deadlines:
            deadline = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            self.deadlines[Timer.NEW_HANDSHAKE] = deadline

    def data_received(self, now: float) -> None:
        """Owe the peer an answer: a keepalive unless data goes back first."""
        if Timer.SEND_KEEPALIVE not in self.deadlines:
            self.deadlines[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def authenticated_sent(self) -> None:
        self.stop(Timer.SEND_KEEPALIVE)

    def authenticated_received(self) -> None:
        self.stop(Timer.NEW_HANDSHAKE)

    def authenticated_traversal(self, now: float, persistent_keepalive: int) -> None:
        if persistent_keepalive:
            self.deadlines[Timer.PERSISTENT_KEEPALIVE] = now + persistent_keepalive
