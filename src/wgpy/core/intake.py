"""The handshake intake: what a handshake message meets before any Diffie-Hellman work.

`HandshakeIntake` owns the admission rule of ratelimit.py (type and size, mac1, the
per-source token buckets, the cookie buckets, the queue bound and the under-load
deadline), the cookie replies it makes instead of work, and the bounded queue of messages
that passed. The device (device.py) hands it the handshake messages of each batch and
works its queue off; the Diffie-Hellman work and the cookie replies *for us* stay there.

The same rule runs in C when the extension is built: `wgpy._classify`
(src/native/classify.c), optional. In Python every datagram of a flood became a read's
tuple, a memoryview, a `bytes`, a mac1 computed in `hashlib` and two dict looks before it
was refused: 6-16 us of one Python thread, and the kernel dropped what it could not read,
a tunnel's datagrams among them. The classifier gives a whole read its verdicts in one
call (`classify`), or reads the socket itself, 64 reads a `recvmmsg` (`drain`, used by
io/datapath.py), with what `HandshakeIntake.admit` decides. It makes the cookie replies a
flood is owed (and `drain` sends them), so only the messages that pass become Python
objects; the refused ones are counted by their `Drop` reason. The Python intake stays the
reference (tests/native/test_classify.py holds the two to identical verdicts, counts and
reply bytes) and what runs without the extension, with WGPY_NATIVE=0, or with
WGPY_INTAKE=0; with the classifier, the Python limiters go unused.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from wgpy.core.constants import COOKIE_REFRESH_TIME
from wgpy.core.cookie import CookieChecker, has_mac2
from wgpy.core.crypto import hash_
from wgpy.core.endpoint import Endpoint
from wgpy.core.events import CookieSent
from wgpy.core.messages import (
    COOKIE_REPLY_LEN,
    INITIATION_LEN,
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_LEN,
    TYPE,
    message_type,
)
from wgpy.core.output import Drop, Output
from wgpy.core.ratelimit import (
    BURST,
    COOKIE_BURST,
    COOKIE_PACKETS_PER_SECOND,
    MAX_SOURCES,
    PACKETS_PER_SECOND,
    SHED_BURST,
    SHED_REPLIES,
    UNDER_LOAD_HOLD,
    LoadMeter,
    RateLimiter,
)
from wgpy.core.tokenbucket import TokenBucket

if TYPE_CHECKING:
    from wgpy._classify import Classifier

# what passes, as `Classifier.classify` says it
ENQUEUE = 1  # queue it: a source within its rate while not under load
ENQUEUE_COOKIE = 2  # queue it: it needed a cookie and came with a valid mac2
SEND_COOKIE = 3  # it needed a cookie and had none: a cookie reply
COOKIE_REPLY = 4  # a cookie reply for us
COOKIE_MADE = 5  # as SEND_COOKIE, and the classifier made the reply

HANDSHAKE_QUEUE = 1024  # handshake messages waiting for work; under load past 1/8
KNOWN_REFRESH = 1.0  # seconds: how old the peers' endpoints the shedding rule sees may be
# the tick (every 0.1 s) reads them this much earlier than a drain would have to: so the
# datagram that comes after a second of quiet (a ping) does not pay for the rebuild
KNOWN_EARLY = 0.1
_SENDER = struct.Struct("<4xI")  # the sender index of an initiation or response
_KNOWN_TYPES = (MSG_INITIATION, MSG_RESPONSE, MSG_COOKIE_REPLY, MSG_DATA)
_SIZES = {MSG_INITIATION: INITIATION_LEN, MSG_RESPONSE: RESPONSE_LEN,
          MSG_COOKIE_REPLY: COOKIE_REPLY_LEN}  # fmt: skip

# a queued message: (message, source, type, whether it came with a valid mac2, the
# caller's tag for the read it came in)
Entry = tuple[bytes, Endpoint, int, bool, object]


def available() -> bool:
    """Whether the extension was built."""
    try:
        import wgpy._classify  # noqa: F401
    except ImportError:
        return False
    return True


def classifier(seed: bytes, queue_size: int) -> Classifier:
    """A classifier with the limits of ratelimit.py (the extension must be there); its
    bucket table's hash is keyed from `seed` (sources are the attacker's to choose), and
    drawing nothing from the device's `rand` keeps both paths' randomness in step."""
    from wgpy._classify import Classifier

    return Classifier(hash_(b"wgpy intake", seed)[:8], PACKETS_PER_SECOND, BURST,
                      COOKIE_PACKETS_PER_SECOND, COOKIE_BURST, MAX_SOURCES, queue_size,
                      UNDER_LOAD_HOLD, COOKIE_REFRESH_TIME, SHED_REPLIES, SHED_BURST)  # fmt: skip


def _known_key(endpoint: Endpoint) -> tuple[bytes, int] | None:
    """An endpoint as the shedding rule compares it: the address packed (an IPv4-mapped
    one as IPv4, a scope ignored), and the port; None for what is no IP address."""
    try:
        ip = ipaddress.ip_address(endpoint[0].partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.packed, endpoint[1]


def _why_refused(data: bytes | memoryview) -> Drop:
    """The drop reason for a datagram `message_type` refused."""
    known = len(data) < 4 or TYPE.unpack_from(data)[0] in _KNOWN_TYPES
    return Drop.BAD_SIZE if known else Drop.UNKNOWN_TYPE


class HandshakeIntake:
    """The checks that cost no Diffie-Hellman, and the queue behind them. Nothing that
    fails them (junk, a bad mac1, a source over its rate) counts toward load."""

    def __init__(
        self,
        checker: CookieChecker,
        cookie_reply: Callable[[bytes, float, Output], None],
        seed: bytes,
        endpoints: Callable[[], Iterable[Endpoint | None]],
        *,
        classify: bool,
    ) -> None:
        """`checker`: the device's mac1/mac2/cookie state; `cookie_reply`: what the device
        does with a cookie reply sent to us; `seed`: keys the classifier's hash table;
        `endpoints`: the peers' endpoints, now (who still gets a cookie reply while replies
        are shed); `classify`: the intake in C (the extension must be there)."""
        self.checker = checker
        self._cookie_reply = cookie_reply
        self.rate_limiter = RateLimiter()  # handshakes that need no cookie, by source
        self.cookie_limiter = RateLimiter(COOKIE_PACKETS_PER_SECOND, COOKIE_BURST)  # with mac2
        self.load = LoadMeter(HANDSHAKE_QUEUE)
        self.classifier = classifier(seed, HANDSHAKE_QUEUE) if classify else None
        self._classifier_born = float("-inf")  # the cookie secret the classifier has
        self.queue: deque[Entry] = deque()
        # while the socket overflows (its reader says so; the C drain sees it itself), a
        # cookie reply goes only to a peer's endpoint, as of at most KNOWN_REFRESH ago
        self.shedding = False
        self.spare = TokenBucket(SHED_REPLIES, SHED_BURST)  # what strangers still get then
        self._endpoints = endpoints
        self._known: set[tuple[bytes, int]] = set()
        self._known_at = float("-inf")
        self._key_of: dict[Endpoint, tuple[bytes, int] | None] = {}  # the last refresh's

    def key_changed(self) -> None:
        """The device's key (so the mac1 key) changed."""
        if self.classifier is not None:
            self.classifier.set_mac1_key(self.checker.mac1_key)

    def offer(self, data: bytes | memoryview, src: Endpoint, now: float, out: Output,
              tag: object, keyed: bool) -> None:  # fmt: skip
        """One handshake-path datagram (`keyed`: the device has a private key): refused,
        answered with a cookie reply, handed to the device (a cookie reply for us), or
        queued."""
        if self.classifier is not None:
            self.classify(data, len(data), 0, src, now, out, tag)
            return
        kind = message_type(data)
        if not kind:
            out.drops[_why_refused(data)] += 1
            return
        data = bytes(data)
        if kind == MSG_COOKIE_REPLY:
            self._cookie_reply(data, now, out)
        elif not keyed:
            out.drops[Drop.NO_PRIVATE_KEY] += 1
        else:
            self.admit(data, src, kind, now, out, tag)

    def admit(self, data: bytes, src: Endpoint, kind: int, now: float, out: Output,
              tag: object) -> None:  # fmt: skip
        """The rule of ratelimit.py: a message needs a cookie when the device is under
        load or its source is over its rate; then a valid mac2 is counted in the source's
        cookie bucket, and one without gets a cookie reply (never silence: the owner of a
        spoofed address must get its cookie). The only refusal before the mac1 is for a
        message with a mac2 from a source whose cookie bucket is spent as well."""
        checker = self.checker
        needs_cookie = self.load.under_load(now) or self.rate_limiter.spent(src, now)
        mac2 = has_mac2(data)
        if needs_cookie and mac2 and self.cookie_limiter.spent(src, now):
            out.drops[Drop.RATE_LIMITED] += 1
        elif not checker.check_mac1(data):
            out.drops[Drop.BAD_MAC1] += 1
        elif not needs_cookie:
            self.rate_limiter.allow(src, now)  # not spent: this takes a token
            self._enqueue((data, src, kind, False, tag), now, out)
        elif not (mac2 and checker.check_mac2(data, src, now)):
            if (self.shedding and _known_key(src) not in self.known(now)
                    and not self.spare.allow(now)):  # fmt: skip
                out.drops[Drop.REPLY_SHED] += 1
            else:
                self.send_cookie(data, src, now, out)
        elif self.cookie_limiter.allow(src, now):
            self._enqueue((data, src, kind, True, tag), now, out)
        else:
            out.drops[Drop.RATE_LIMITED] += 1

    def known(self, now: float, early: float = 0.0) -> set[tuple[bytes, int]]:
        """The peers' endpoints (as `_known_key` gives them), read again once they are
        KNOWN_REFRESH (less `early`: the tick's call) old (O(peers) once a second at most,
        not per message), and pushed to the C intake when they changed. It runs on the
        loop's thread whether or not anything is shed: an endpoint is parsed when it is
        new only (ipaddress, ~14 us: at 10,000 peers, 280 ms of every second)."""
        if not self._known_at <= now < self._known_at + KNOWN_REFRESH - early:
            self._known_at = now
            old, key_of = self._key_of, {}
            for e in self._endpoints():
                if e is not None:
                    key_of[e] = old[e] if e in old else _known_key(e)
            self._key_of = key_of
            known = {key for key in key_of.values() if key is not None}
            if known != self._known:
                self._known = known
                if self.classifier is not None:
                    self.classifier.set_known(
                        [(str(ipaddress.ip_address(host)), port) for host, port in known]
                    )
        return self._known

    def _enqueue(self, entry: Entry, now: float, out: Output) -> None:
        if len(self.queue) >= HANDSHAKE_QUEUE:
            out.drops[Drop.QUEUE_FULL] += 1
        else:
            self.queue.append(entry)
            self.load.update(len(self.queue), now)

    def send_cookie(self, data: bytes, src: Endpoint, now: float, out: Output) -> None:
        """A cookie reply (64 bytes) instead of the work: smaller than any handshake
        message, one per message, to the address the message came from."""
        sender = _SENDER.unpack_from(data)[0]
        out.udp.append((self.checker.make_reply(data, sender, src, now), src))
        out.events.append(CookieSent(src))

    # ---- the intake in C -----------------------------------------------------------

    def state(self, now: float) -> tuple[float, int, bool, tuple[bytes, bytes, int] | None]:
        """What the C intake needs to go on from where the device stands: the under-load
        deadline, the queue's length, whether load is forced, the cookie reply state (and
        the cookie secret, given to it when a reply drew a new one)."""
        assert self.classifier is not None
        secret, born, replies = self.checker.state(now)
        if born != self._classifier_born:
            self.classifier.set_cookie_secret(secret, born)
            self._classifier_born = born
        if not self._known_at <= now < self._known_at + KNOWN_REFRESH:  # known's own test,
            self.known(now)  # here: a call fewer on each drain (a ping's hop, cold)
        load = self.load
        return load.until, len(self.queue), load.forced, replies

    def done(self, until: float, drops: dict[str, int], made: bool, counter: int,
             out: Output) -> None:  # fmt: skip
        """The C intake's batch is over: the load deadline it moved, the refusals it
        counted, the cookie replies it made (`counter`: the nonce counter after them)."""
        self.load.until = until
        for reason, count in drops.items():
            out.drops[Drop(reason)] += count
        if made:
            self.checker.replies_made(counter)

    def classify(self, buf: bytes | memoryview, n: int, seg: int, src: Endpoint, now: float,
                 out: Output, tag: object) -> int:  # fmt: skip
        """The C intake of one read: what passed taken as `admit` would, refusals
        counted; returns how many data messages the read holds."""
        assert self.classifier is not None
        until, queued, forced, state = self.state(now)
        passed, ndata, until, drops, replies, counter = self.classifier.classify(
            buf, n, seg, src[0], src[1], now, until, queued, forced, state, self.shedding
        )
        self.done(until, drops, replies is not None, counter, out)
        self.take(buf, passed, src, replies, now, out, tag)
        return ndata

    def take(self, buf: bytes | memoryview, passed: list[tuple[int, int]], src: Endpoint,
             replies: bytes | None, now: float, out: Output, tag: object) -> None:  # fmt: skip
        """What passed the C intake, in order, as `admit` would have taken it; the cookie
        replies made in C (all to `src`) are told as one event."""
        made = 0
        for offset, verdict in passed:
            if verdict == COOKIE_MADE:
                assert replies is not None
                out.udp.append((replies[offset : offset + COOKIE_REPLY_LEN], src))
                made += 1
                continue
            kind = buf[offset]
            message = bytes(buf[offset : offset + _SIZES[kind]])
            if verdict == COOKIE_REPLY:
                self._cookie_reply(message, now, out)
            elif verdict == SEND_COOKIE:
                self.send_cookie(message, src, now, out)
            else:  # the classifier counted it against the bound and moved the load
                self.queue.append((message, src, kind, verdict == ENQUEUE_COOKIE, tag))
        if made:
            out.events.append(CookieSent(src, count=made))
