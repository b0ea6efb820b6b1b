"""A token bucket with the clock injected: `rate` tokens a second, at most `burst`.

The ICMP errors (one bucket for the device, as Linux's icmp_global) and the handshake
rate limiter (one bucket per source) both spend from one. A bucket starts full. A clock
that goes back refills nothing (and is not remembered), so a bucket never gains from it.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = self.burst
        self.at: float | None = None  # when `tokens` was last brought up to date

    def level(self, now: float) -> float:
        """The tokens there are at `now` (a look: it takes none and changes nothing)."""
        at = self.at
        if at is None or now <= at:
            return self.tokens
        return min(self.burst, self.tokens + (now - at) * self.rate)

    def allow(self, now: float) -> bool:
        """Take a token if there is one at `now`."""
        tokens = self.level(now)
        if self.at is None or now > self.at:
            self.at = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True
