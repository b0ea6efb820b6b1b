"""MAC1, MAC2 and cookie replies: WireGuard's DoS mitigation (whitepaper 5.3, 5.4.7).

Every handshake message carries mac1 (keyed by the receiver's public key, so only a sender
that knows it gets an answer) and mac2 (keyed by a cookie the receiver handed out, checked
only when the receiver is under load). Offsets: mac1 covers everything before it, mac2
everything before mac2.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgpy.core.constants import COOKIE_REFRESH_TIME, REKEY_TIMEOUT
from wgpy.core.crypto import (
    InvalidTag,
    constant_time_eq,
    hash_,
    hchacha20,
    mac,
    xaead_decrypt,
)
from wgpy.core.endpoint import Endpoint
from wgpy.core.messages import CookieReply, pack_cookie_reply

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
MAC_LEN = 16
_NO_MAC = bytes(MAC_LEN)
_ZERO4 = bytes(4)  # XChaCha20-Poly1305's inner nonce: 4 zero bytes, the last 8 of its own
_MAX_HOSTS = 16384  # addresses whose bytes are remembered (parsing one costs ~2 us)



def _mac_offsets(msg: bytes | bytearray) -> tuple[int, int]:
    mac2_at = len(msg) - MAC_LEN
    return mac2_at - MAC_LEN, mac2_at


def has_mac2(msg: bytes) -> bool:
    """Whether a handshake message carries a mac2 at all (a look, no MAC computed)."""
    return msg[-MAC_LEN:] != _NO_MAC


class CookieChecker:
    """The receiving side: checks macs and makes cookie replies for one local key.

    A cookie reply is what a source over its rate gets for each message (ratelimit.py),
    so it must be cheap: XChaCha20-Poly1305 is HChaCha20 of the first 16 nonce bytes,
    then ChaCha20-Poly1305 under that subkey with the last 8 as its nonce. HChaCha20
    costs ~17 us here (an OpenSSL cipher set up for one block), the rest ~3 us; so the
    first 16 bytes are drawn once per cookie secret and the last 8 count up from a
    random start: every reply still has its own nonce, and a reply costs ~3 us, not 33.
    """

    def __init__(self, rand: Callable[[int], bytes]) -> None:
        self._rand = rand
        self.mac1_key = b""
        self.cookie_key = b""
        self._secret = b""
        self._secret_born = float("-inf")
        self._prefix = b""  # the first 16 nonce bytes while this secret lasts
        self._subkey = b""  # HChaCha20(cookie_key, prefix)
        self._sealer: ChaCha20Poly1305 | None = None  # under the subkey
        self._counter = 0  # the last 8 nonce bytes, little-endian
        self._hosts: dict[str, bytes] = {}  # address -> its bytes

    def set_public_key(self, pub: bytes | None) -> None:
        self.mac1_key = hash_(LABEL_MAC1, pub) if pub else b""
        self.cookie_key = hash_(LABEL_COOKIE, pub) if pub else b""
        self._prefix = b""

    @property
    def secret(self) -> tuple[bytes, float]:
        """The cookie secret and when it was drawn (core/intake.py checks mac2 with it)."""
        return self._secret, self._secret_born

    def state(self, now: float) -> tuple[bytes, float, tuple[bytes, bytes, int] | None]:
        """What the C intake (core/intake.py) goes on from, in one call (it is made on every
        drain): the secret and when it was drawn (mac2 is checked with it), and (nonce
        prefix, subkey, counter) while the next reply draws nothing new (the secret is
        fresh and the prefix drawn), else None: the intake makes replies in C with it, and
        hands the counter back with `replies_made`."""
        born = self._secret_born
        if not self._prefix or now - born > COOKIE_REFRESH_TIME:
            return self._secret, born, None
        return self._secret, born, (self._prefix, self._subkey, self._counter)

    def replies_made(self, counter: int) -> None:
        self._counter = counter

    def check_mac1(self, msg: bytes) -> bool:
        if not self.mac1_key:
            return False
        at, end = _mac_offsets(msg)
        return constant_time_eq(mac(self.mac1_key, msg[:at]), msg[at:end])

    def _cookie(self, src: Endpoint, now: float) -> bytes:
        if now - self._secret_born > COOKIE_REFRESH_TIME:
            self._secret = self._rand(32)
            self._secret_born = now
            self._prefix = b""
        host = self._hosts.get(src[0])
        if host is None:
            if len(self._hosts) >= _MAX_HOSTS:
                self._hosts.clear()
            host = self._hosts[src[0]] = ipaddress.ip_address(src[0]).packed
        return mac(self._secret, host + src[1].to_bytes(2, "big"))

    def check_mac2(self, msg: bytes, src: Endpoint, now: float) -> bool:
        if now - self._secret_born > COOKIE_REFRESH_TIME:
            return False  # no cookie handed out under the current secret
        _, at = _mac_offsets(msg)
        return constant_time_eq(mac(self._cookie(src, now), msg[:at]), msg[at:])

    def make_reply(self, msg: bytes, sender: int, src: Endpoint, now: float) -> bytes:
        """A cookie reply to a handshake message whose mac1 was valid."""
        at, end = _mac_offsets(msg)
        cookie = self._cookie(src, now)
        if not self._prefix:
            self._prefix = self._rand(16)
            self._subkey = hchacha20(self.cookie_key, self._prefix)
            self._sealer = ChaCha20Poly1305(self._subkey)
            self._counter = int.from_bytes(self._rand(8), "little")
        assert self._sealer is not None
        self._counter = (self._counter + 1) & 0xFFFF_FFFF_FFFF_FFFF
        tail = self._counter.to_bytes(8, "little")
        sealed = self._sealer.encrypt(_ZERO4 + tail, cookie, msg[at:end])
        nonce = self._prefix + tail
        return pack_cookie_reply(CookieReply(sender, nonce, sealed))


class CookieGenerator:
    """The sending side, one per peer: writes macs and keeps the cookie it was given."""

    def __init__(self, remote_pub: bytes) -> None:
        self._mac1_key = hash_(LABEL_MAC1, remote_pub)
        self._cookie_key = hash_(LABEL_COOKIE, remote_pub)
        self._cookie = b""
        self._cookie_born = float("-inf")
        self._last_mac1 = b""
        self._last_mac1_at = float("-inf")

    def add_macs(self, msg: bytearray, now: float) -> None:
        at, end = _mac_offsets(msg)
        mac1 = mac(self._mac1_key, bytes(msg[:at]))
        msg[at:end] = mac1
        self._last_mac1, self._last_mac1_at = mac1, now
        if self._cookie and now - self._cookie_born < COOKIE_REFRESH_TIME:
            msg[end:] = mac(self._cookie, bytes(msg[:end]))

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Accepts a cookie that answers our last mac1 (sent at most REKEY_TIMEOUT ago)."""
        if not self._last_mac1 or now - self._last_mac1_at > REKEY_TIMEOUT:
            return False
        try:
            cookie = xaead_decrypt(self._cookie_key, reply.nonce, reply.cookie, self._last_mac1)
        except InvalidTag:
            return False
        self._cookie, self._cookie_born = cookie, now
        self._last_mac1 = b""  # one reply per mac1
        return True
