"""Defences against handshake floods: token buckets by source, and the load meter.

A handshake costs Diffie-Hellman work (tens of microseconds here), a data packet a
microsecond: so handshakes wait in a bounded queue and are worked off after the data of the
same read. What may enter the queue (intake.py `HandshakeIntake.admit`; Linux receive.c and
wireguard-go receive.go for the rule it extends):

* A message **needs a cookie** when the device is under load (`LoadMeter`), or when its
  source (an IPv4 address, or the /64 of an IPv6 one, since one host owns a whole /64) is
  over its rate: 50 handshake messages a second, a burst of 50 (`RateLimiter`). Linux and
  wireguard-go apply no per-source limit until the whole device is under load; wgpy must,
  since one Python thread absorbs far fewer handshakes than Go's goroutines or the
  kernel's workers, and a flood from one source must not put the device under load for
  everyone. The numbers are a NAT's: a thousand laptops behind one address, rekeying
  every two minutes at their own times, send 8 a second and bursts of 50, and need no
  cookie; one source at 50 a second costs the device a few milliseconds a second.
* A message that needs a cookie and carries a valid mac2 (a cookie bound to its source
  address and port, which only who receives at that address can have) is counted in a
  second bucket, Linux's 20 a second with a burst of 5, and queued or dropped.
* One without gets a **cookie reply**, 64 bytes, one per message: never silence. That is
  what keeps the limit from being a weapon (issue 21). mac1 needs only our public key, so
  an off-path sender can spend an address's tokens with initiations from that address; if
  the address were then refused, or answered only within a budget, its owner would be
  locked out for as long as the spoofer sends faster than the budget (25 a second did it,
  when the bucket was 20/s and refused). Answered message by message, the owner's own
  initiation gets its own reply, its retry carries mac2, and that bucket is one the
  spoofer cannot touch: the owner is through within one cookie round trip (REKEY_TIMEOUT),
  at any rate the device can read, from any port, the owner's included. The replies are
  bounded by what caused them: one per message with a valid mac1, 64 bytes for 148 (an
  initiation) or 92 (a response), to the address it came from; a reflector that returns
  less than it is sent (0.43 or 0.70 of it) amplifies nothing. Such a message costs ~5.6 us
  (its mac1, and the reply: cookie.py), against ~1 us for the silent refusal it replaced.
* **Shedding**, the one exception: while the socket is not read as fast as datagrams come
  (for a second after a full drain found its queue over half full; not the kernel's drop
  count, which a datagram with a bad UDP checksum grows), a message owed a cookie reply
  gets one if it came from a peer's endpoint, or while the device's bucket of replies to
  strangers lasts (SHED_REPLIES a second: a peer that roamed, or one with no endpoint yet,
  is not locked out by a flood that overflows the socket in bursts, nor by a small flood
  of valid initiations once the socket is shedding); past it a stranger's is dropped
  (`reply_shed`). Past that point the flood, not the rule, decides who is read: every
  reply costs a send (5-8 us here, against ~1.5 us to read and refuse), and on 2 cores
  answering a 250k/s flood from 200 spoofed sources left 35% of the datagrams read, the
  peers' pings and handshakes among the rest (65% ping loss, no handshake within 9.5 s).
  Shed, the reads keep up: no ping lost, the peer through in one cookie round trip
  (bench/flood.py mode c, BENCHMARKS.md). Below the overflow nothing changes, so the owner
  of a spoofed address still gets its reply at any rate the device can read; above it, a
  peer's endpoint still does (the peers the device has keep their tunnels, as the brief
  asks), and a stranger is no worse off than a datagram the kernel dropped. Linux and
  wireguard-go do the same by dropping at their full handshake queue. The C drain decides
  it (src/native/classify.c `shedding`, SO_MEMINFO); the Python intake takes `shedding`
  from its caller.
* The only refusal before the mac1 is computed: a message with a mac2 from a source whose
  two buckets are both spent. Only a sender that receives at that address can spend the
  second, so this is cheap against a flood that echoes its cookies (bench/flood.py mode b)
  and harmless to others.

`LoadMeter`: the device is "under load" while its handshake queue is more than an eighth
full, and for a second after (wireguard-go device.IsUnderLoad); then every message needs a
cookie, as in Linux and wireguard-go, and what was queued without one before gets a
cookie reply when it is worked off.
"""

from __future__ import annotations

import ipaddress

from wgpy.core.endpoint import Endpoint
from wgpy.core.tokenbucket import TokenBucket

PACKETS_PER_SECOND = 50  # handshakes a second from one address that need no cookie
BURST = 50  # a NAT's peers rekey at their own times: 50 may come within a second
COOKIE_PACKETS_PER_SECOND = 20  # with a valid mac2, when one is needed: Linux's numbers
COOKIE_BURST = 5
MAX_SOURCES = 16384  # table bound: past it, sources that are full again are forgotten
UNDER_LOAD_HOLD = 1.0
# while shedding, the cookie replies strangers still get (one bucket for the device, not
# one per source): 5-8 ms of sends a second at most, and a peer that roamed or has no
# endpoint yet is not locked out by a flood that overflows the socket in bursts
SHED_REPLIES = 1000  # a second
SHED_BURST = 1000


def source_key(endpoint: Endpoint) -> bytes:
    """The IPv4 address, or the /64 of an IPv6 one (a link-local scope is ignored)."""
    addr = ipaddress.ip_address(endpoint[0].partition("%")[0])
    return addr.packed if addr.version == 4 else addr.packed[:8]


class RateLimiter:
    """Token buckets by source, refilled by the clock the caller passes in."""

    def __init__(self, rate: float = PACKETS_PER_SECOND, burst: int = BURST) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[bytes, TokenBucket] = {}
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
        return bucket is not None and bucket.level(now) < 1.0

    def allow(self, endpoint: Endpoint, now: float) -> bool:
        key = self._key(endpoint)
        bucket = self._buckets.get(key)
        if bucket is None:  # a new source: its bucket is full
            if len(self._buckets) >= MAX_SOURCES:
                self.collect(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.allow(now)

    def collect(self, now: float) -> None:
        """Forget the sources whose buckets are full again (they lose nothing by it);
        if all are still busy, forget all: a bounded table beats a perfect one."""
        full = (self.burst - 1.0) / self.rate
        stale = [k for k, b in self._buckets.items() if b.at is None or now - b.at >= full]
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
