"""MAC1, MAC2 and cookie replies: WireGuard's DoS mitigation (whitepaper 5.3, 5.4.7).

Every handshake message carries mac1 (keyed by the receiver's public key, so only a sender
that knows it gets an answer) and mac2 (keyed by a cookie the receiver handed out, checked
only when the receiver is under load). Offsets: mac1 covers everything before it, mac2
everything before mac2.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from wgpy.core.constants import COOKIE_REFRESH_TIME, REKEY_TIMEOUT
from wgpy.core.crypto import (
    InvalidTag,
    constant_time_eq,
    hash_,
    mac,
    xaead_decrypt,
    xaead_encrypt,
)
from wgpy.core.endpoint import Endpoint
from wgpy.core.messages import CookieReply, pack_cookie_reply

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
MAC_LEN = 16



def _mac_offsets(msg: bytes | bytearray) -> tuple[int, int]:
    mac2_at = len(msg) - MAC_LEN
    return mac2_at - MAC_LEN, mac2_at


def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """The source address a cookie is bound to: IP bytes then the big-endian port."""
    return ipaddress.ip_address(endpoint[0]).packed + endpoint[1].to_bytes(2, "big")


class CookieChecker:
    """The receiving side: checks macs and makes cookie replies for one local key."""

    def __init__(self, rand: Callable[[int], bytes]) -> None:
        self._rand = rand
        self.mac1_key = b""
        self.cookie_key = b""
        self._secret = b""
        self._secret_born = float("-inf")

    def set_public_key(self, pub: bytes | None) -> None:
        self.mac1_key = hash_(LABEL_MAC1, pub) if pub else b""
        self.cookie_key = hash_(LABEL_COOKIE, pub) if pub else b""

    def check_mac1(self, msg: bytes) -> bool:
        if not self.mac1_key:
            return False
        at, end = _mac_offsets(msg)
        return constant_time_eq(mac(self.mac1_key, msg[:at]), msg[at:end])

    def _cookie(self, src: Endpoint, now: float) -> bytes:
        if now - self._secret_born > COOKIE_REFRESH_TIME:
            self._secret = self._rand(32)
            self._secret_born = now
        return mac(self._secret, endpoint_bytes(src))

    def check_mac2(self, msg: bytes, src: Endpoint, now: float) -> bool:
        if now - self._secret_born > COOKIE_REFRESH_TIME:
            return False  # no cookie handed out under the current secret
        _, at = _mac_offsets(msg)
        return constant_time_eq(mac(self._cookie(src, now), msg[:at]), msg[at:])

    def make_reply(self, msg: bytes, sender: int, src: Endpoint, now: float) -> bytes:
        """A cookie reply to a handshake message whose mac1 was valid."""
        at, end = _mac_offsets(msg)
        nonce = self._rand(24)
        sealed = xaead_encrypt(self.cookie_key, nonce, self._cookie(src, now), msg[at:end])
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
