"""Defences against handshake floods: a per-source token bucket and the load meter.

A handshake costs Diffie-Hellman work (tens of microseconds here), a data packet a
microsecond: so handshakes wait in a bounded queue and are worked off after the data of the
same read, and two things keep a flood from crowding out established peers:

* `RateLimiter` (Linux ratelimiter.c, wireguard-go ratelimiter/): a token bucket per source
  address, 20 handshakes a second with a burst of 5; IPv6 sources are keyed by their /64,
  since one host owns a whole /64. Linux and wireguard-go apply it only under load, to
  messages that carry a valid cookie. wgpy applies it to every handshake message with a
  valid mac1, before it is queued: one Python thread absorbs far fewer handshakes per second
  than Go's goroutines or the kernel's workers, and a flood from one source must not put
  the device under load for everyone else. A legitimate peer sends a handshake at most
  every 5 seconds, far below the limit.
* `LoadMeter`: the device is "under load" while its handshake queue is more than an eighth
  full, and for a second after (wireguard-go device.IsUnderLoad). Under load, handshakes
  must carry mac2 (a cookie bound to their source address), so a spoofed flood costs one
  cookie reply per message instead of a Diffie-Hellman.
"""

from __future__ import annotations

import ipaddress

from wgpy.core.output import Endpoint

PACKETS_PER_SECOND = 50  # handshakes a second from one address that need no cookie
BURST = 50  # a NAT's peers rekey at their own times: 50 may come within a second
COOKIE_PACKETS_PER_SECOND = 20  # with a valid mac2, when one is needed: Linux's numbers
COOKIE_BURST = 5
MAX_SOURCES = 16384  # table bound: past it, sources that are full again are forgotten
UNDER_LOAD_HOLD = 1.0


def source_key(endpoint: Endpoint) -> bytes:
    """The IPv4 address, or the /64 of an IPv6 one (a link-local scope is ignored)."""
    addr = ipaddress.ip_address(endpoint[0].partition("%")[0])
    return addr.packed if addr.version == 4 else addr.packed[:8]


class RateLimiter:
    """Token buckets by source, refilled by the clock the caller passes in."""

    def __init__(self, rate: float = PACKETS_PER_SECOND, burst: int = BURST) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, at)
        self._keys: dict[str, bytes] = {}  # host -> its key: parsing costs more than a look

    def _key(self, endpoint: Endpoint) -> bytes:
        key = self._keys.get(endpoint[0])
        if key is None:
            if len(self._keys) >= MAX_SOURCES:
                self._keys.clear()
            key = self._keys[endpoint[0]] = source_key(endpoint)
        return key

    def spent(self, endpoint: Endpoint, now: float) -> bool:
        """Whether the source has no token now (a look that takes none)."""
        bucket = self._buckets.get(self._key(endpoint))
        return bucket is not None and bucket[0] + (now - bucket[1]) * self.rate < 1.0

    def allow(self, endpoint: Endpoint, now: float) -> bool:
        key = self._key(endpoint)
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if len(self._buckets) >= MAX_SOURCES and key not in self._buckets:
            self.collect(now)
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def collect(self, now: float) -> None:
        """Forget the sources whose buckets are full again (they lose nothing by it);
        if all are still busy, forget all: a bounded table beats a perfect one."""
        full = (self.burst - 1.0) / self.rate
        stale = [k for k, (tokens, at) in self._buckets.items() if now - at >= full]
        for key in stale:
            del self._buckets[key]
        if len(self._buckets) >= MAX_SOURCES:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)


class LoadMeter:
    """Under load while the handshake queue is deep, and for a second after."""

    def __init__(self, queue_size: int) -> None:
        self.threshold = queue_size // 8
        self.forced = False  # a test or the caller may force it on
        self.until = float("-inf")  # under load before this (core/intake.py moves it too)

    def update(self, queued: int, now: float) -> None:
        if queued > self.threshold:
            self.until = now + UNDER_LOAD_HOLD

    def under_load(self, now: float) -> bool:
        return self.forced or now < self.until
