"""The web page's locks: the password hash, sessions with their CSRF tokens, and a limit
on failed logins. The page hands out private keys, so every piece errs on the safe side."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

# scrypt at N=2^15, r=8: 32 MiB and ~0.1 s per try on this machine's cores, which makes a
# stolen registry slow to guess from; the rate limit below bounds guessing over the web
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
MIN_PASSWORD = 8
SESSION_IDLE = 12 * 3600.0
FAILURES, WINDOW = 5, 60.0  # five failed logins a minute from one address, then a pause
# scrypt's 32 MiB per try, at most two at once: logins from many addresses queue here
# instead of filling the memory
_HASHING = threading.BoundedSemaphore(2)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    if n > 1 << 20 or r > 32 or p > 16:  # a hash someone wrote into the registry by hand
        raise ValueError("scrypt parameters out of range")
    with _HASHING:
        return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                              maxmem=128 * n * r * 2, dklen=32)  # fmt: skip


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"the password needs at least {MIN_PASSWORD} characters")
    salt = os.urandom(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, stored: str | None) -> bool:
    if not stored:
        return False
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return kind == "scrypt" and hmac.compare_digest(got, expected)


@dataclass
class Session:
    csrf: str
    seen: float
    password: str = ""  # the hash it logged in with: a new password ends the session


@dataclass
class Sessions:
    """Sessions live in the server's memory: a restart logs everyone out, which is fine."""

    idle: float = SESSION_IDLE
    _by_token: dict[str, Session] = field(default_factory=dict)

    def create(self, password: str = "") -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), time.monotonic(), password)
        self._by_token[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        session = self._by_token.get(token or "")
        now = time.monotonic()
        if session is None or now - session.seen > self.idle:
            self._by_token.pop(token or "", None)
            return None
        session.seen = now
        return session

    def drop(self, token: str | None) -> None:
        self._by_token.pop(token or "", None)


def _source(address: str) -> str:
    """Whom a limit counts: an IPv4 address, or an IPv6 address's /64 (one host has a
    whole /64 to pick source addresses from)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return address
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


@dataclass
class LoginLimit:
    """At most FAILURES failed logins per WINDOW seconds from one address."""

    failures: int = FAILURES
    window: float = WINDOW
    _seen: dict[str, deque[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def attempt(self, address: str) -> float:
        """Before a password is checked: 0 and the try counted as a failure (until
        `succeeded`), or the seconds to wait. Counting before the slow hash means guesses
        sent all at once cannot all pass before the first failure is known."""
        with self._lock:
            wait = self.retry_after(address)
            if not wait:
                self.failed(address)
            return wait

    def retry_after(self, address: str) -> float:
        """0 when a login may be tried now; else the seconds to wait."""
        address = _source(address)
        recent = self._seen.get(address)
        if not recent:
            return 0.0
        now = time.monotonic()
        while recent and now - recent[0] > self.window:
            recent.popleft()
        if len(recent) < self.failures:
            return 0.0
        return self.window - (now - recent[0])

    def failed(self, address: str) -> None:
        self._seen.setdefault(_source(address), deque()).append(time.monotonic())
        if len(self._seen) > 10000:  # bound the memory an address-hopping guesser costs
            self._seen.pop(next(iter(self._seen)))

    def succeeded(self, address: str) -> None:
        self._seen.pop(_source(address), None)
