"""WireGuard's cryptographic primitives, built on `cryptography` (OpenSSL) and hashlib.

Nothing here is written by hand: X25519 and ChaCha20-Poly1305 come from OpenSSL, BLAKE2s
from hashlib. XChaCha20-Poly1305 (used only for cookie replies) is HChaCha20 followed by
ChaCha20-Poly1305; HChaCha20 is read off one OpenSSL ChaCha20 block (see `hchacha20`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac as _hmac
import re
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

__all__ = [
    "KEY_LEN",
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "clamp",
    "decode_key",
    "dh",
    "encode_key",
    "hash_",
    "hchacha20",
    "hide_keys",
    "hmac",
    "kdf",
    "mac",
    "public_key",
    "tai64n",
    "xaead_decrypt",
    "xaead_encrypt",
]

KEY_LEN = 32
ZERO_KEY = bytes(KEY_LEN)
_ZERO_NONCE4 = bytes(4)


def hash_(*parts: bytes) -> bytes:
    """HASH(a || b || ...) = BLAKE2s-256."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data) = keyed BLAKE2s with a 16-byte output."""
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


_BLOCK = 64  # BLAKE2s block size
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 over BLAKE2s, not BLAKE2s' own keyed mode).

    Written out rather than through the `hmac` module, whose generic path for a hashlib
    constructor costs four times as much; WireGuard's keys (32 bytes) never exceed a block.
    """
    padded = key.ljust(_BLOCK, b"\0")
    inner = hashlib.blake2s(padded.translate(_IPAD))
    inner.update(data)
    return hashlib.blake2s(padded.translate(_OPAD) + inner.digest()).digest()


def kdf(key: bytes, data: bytes, n: int) -> tuple[bytes, ...]:
    """KDF1/KDF2/KDF3 of the whitepaper: HKDF-style chain over HMAC-BLAKE2s."""
    prk = hmac(key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = hmac(prk, prev + bytes((i,)))
        out.append(prev)
    return tuple(out)


def clamp(private: bytes) -> bytes:
    """Curve25519 clamping, as `wg genkey` applies it."""
    k = bytearray(private)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


class PrivateKey:
    """An X25519 private key, loaded into OpenSSL once and only when first used: a load
    costs as much as an exchange. `raw` is the key; `public` is worked out on first use
    unless a batch of exchanges (core/exchanges.py) already learned it."""

    __slots__ = ("_key", "_public", "raw")

    def __init__(self, private: bytes) -> None:
        if len(private) != KEY_LEN:
            raise ValueError("an X25519 private key is 32 bytes")
        self.raw = bytes(private)
        self._key: X25519PrivateKey | None = None
        self._public: bytes | None = None

    @property
    def key(self) -> X25519PrivateKey:
        if self._key is None:
            self._key = X25519PrivateKey.from_private_bytes(self.raw)
        return self._key

    @property
    def public(self) -> bytes:
        if self._public is None:
            self._public = self.key.public_key().public_bytes_raw()
        return self._public

    @property
    def known_public(self) -> bytes | None:
        """The public key if it was worked out already, else None."""
        return self._public

    def learn_public(self, public: bytes) -> None:
        """The public key as a batch of exchanges computed it."""
        self._public = public


def load_private(private: bytes | PrivateKey) -> PrivateKey:
    """The key loaded, once: callers that use one key several times load it first."""
    return private if isinstance(private, PrivateKey) else PrivateKey(private)


def public_key(private: bytes | PrivateKey) -> bytes:
    return load_private(private).public


def dh(private: bytes | PrivateKey, public: bytes) -> bytes:
    """X25519; raises ValueError when the result is all zeros (a low-order point)."""
    shared = load_private(private).key.exchange(X25519PublicKey.from_public_bytes(public))
    if _hmac.compare_digest(shared, ZERO_KEY):  # OpenSSL usually refuses first; be sure
        raise ValueError("X25519 result is the all-zero point")
    return shared


def _nonce(counter: int) -> bytes:
    return _ZERO_NONCE4 + counter.to_bytes(8, "little")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """ChaCha20-Poly1305 with WireGuard's nonce: 32 zero bits then a little-endian u64."""
    return ChaCha20Poly1305(key).encrypt(_nonce(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """Raises InvalidTag when the ciphertext does not authenticate."""
    return ChaCha20Poly1305(key).decrypt(_nonce(counter), ciphertext, ad)


_SIGMA = struct.unpack("<4I", b"expand 32-byte k")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 from one OpenSSL ChaCha20 block.

    A ChaCha20 block is (state after 20 rounds) + (initial state), word by word. HChaCha20
    is words 0-3 and 12-15 of the state after the rounds, with no final addition. With
    the 16 nonce bytes placed in state words 12-15 (OpenSSL takes counter||nonce as one
    16-byte value), subtracting the known initial words recovers exactly those eight.
    """
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    words = struct.unpack("<16I", block)
    n = struct.unpack("<4I", nonce16)
    out = [(words[i] - _SIGMA[i]) & 0xFFFFFFFF for i in range(4)]
    out += [(words[12 + i] - n[i]) & 0xFFFFFFFF for i in range(4)]
    return struct.pack("<8I", *out)


def _xsplit(key: bytes, nonce24: bytes) -> tuple[bytes, bytes]:
    return hchacha20(key, nonce24[:16]), _ZERO_NONCE4 + nonce24[16:]


def xaead_encrypt(key: bytes, nonce24: bytes, plaintext: bytes, ad: bytes) -> bytes:
    subkey, nonce = _xsplit(key, nonce24)
    return ChaCha20Poly1305(subkey).encrypt(nonce, plaintext, ad)


def xaead_decrypt(key: bytes, nonce24: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    subkey, nonce = _xsplit(key, nonce24)
    return ChaCha20Poly1305(subkey).decrypt(nonce, ciphertext, ad)


def tai64n(wall: float) -> bytes:
    """TAI64N label for a Unix time, rounded down to ~16 ms so it leaks little.

    2^62 + 10 is the TAI64 label of the Unix epoch, as WireGuard writes it.
    """
    sec = int(wall)
    nsec = int((wall - sec) * 1e9)
    nsec -= nsec % 0x1000000  # wireguard-go's whitener: 2^24 ns ~ 16.8 ms
    return struct.pack(">QI", 0x400000000000000A + sec, nsec)


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str) -> bytes:
    """A base64 key as `wg` writes it; raises ValueError unless it is exactly 32 bytes."""
    text = text.strip()
    if len(text) != 44 or not text.endswith("="):
        raise ValueError("a key is 44 base64 characters ending in '='")
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"invalid base64 key: {e}") from None
    if len(key) != KEY_LEN:
        raise ValueError("a key is 32 bytes")
    return key


# What key material is judged in: a stretch of one base64 alphabet, as `wg` writes keys
# ("+" and "/"; hex is in it too) or URL-safe ("-" and "_"), of 20 characters or more
# (none of a message's words: the longest config key, PersistentKeepalive, has 19). Each
# alphabet's stretches are judged alone, so a key glued to a name or a path of the other
# alphabet ("key_<key>", "/keys/<url-safe key>") is judged as itself, and hidden whole.
_STRETCHES = (re.compile(r"[A-Za-z0-9+/]{20,}=*"), re.compile(r"[A-Za-z0-9_-]{20,}=*"))
# A key's characters before its "=": a stretch this long is a key (or one glued to
# something), unless it is a path or a host name (`_words`): lower-case words and digits
# split by single "/", "-" or "_", with a word of 4 letters at least in every stretch of
# a key's length. A random key written so (no upper case, no "+", no two separators in a
# row) comes 1 in ~10^10 times; one repeating a byte (b"\x7f" * 32: "f39/f39/...") has no
# 4 letters in a row, even glued to a path that has ("/etc/keys/f39/f39/...").
_KEY_CHARS = 43
_WORDS = re.compile(r"[/_-]?[a-z0-9]{1,19}(?:[/_-][a-z0-9]{1,19})*[/_-]?")
_WORD = re.compile(r"[a-z]{4,}")
# 40 hex digits or more: a key in hex (64), or most of one
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{40}")
# Shorter, a stretch is part of a key where it looks like base64: lower case and an upper-
# case letter inside a word (all but 1 in 7,000 random stretches of 20, and near all of
# the longer ones, where most of a key would show: a key cut short, pasted wrong). A
# path, a host name, an all-capitals name or a dashed Title-Case one does not.
_LOWER = re.compile(r"[a-z]")
_INNER_UPPER = re.compile(r"[A-Za-z0-9][A-Z]")
# Hex bytes with a separator ("ab cd ef", "ab:cd:ef"): 10 or more, so a MAC address (6)
# and an IPv6 address of two-digit groups (8 at most) stay readable.
_HEX_PAIRS = re.compile(r"[0-9A-Fa-f]{2}([ :-])(?:[0-9A-Fa-f]{2}\1){8,}[0-9A-Fa-f]{2}")


def _words(text: str) -> bool:
    """Whether a stretch of a key's length or more is a path's or a host name's words."""
    if _WORDS.fullmatch(text) is None:
        return False
    # the gaps around the words of 4 letters: each too short to hold a key's 43 characters
    # with no such word in them (a word's last 3 letters may begin the key: 43 - 2 * 3)
    ends = [0, *(end for m in _WORD.finditer(text) for end in m.span()), len(text)]
    return all(b - a < _KEY_CHARS - 6 for a, b in zip(ends[::2], ends[1::2], strict=True))


def _is_key(stretch: str) -> bool:
    text = stretch.rstrip("=")
    if _HEX_RUN.search(text):
        return True
    if len(text) >= _KEY_CHARS:
        return not _words(text)
    return bool(_LOWER.search(text) and _INNER_UPPER.search(text))


def _hide_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with every span (overlapping ones as one) replaced by a single "…"."""
    pieces: list[str] = []
    at = 0
    for start, end in sorted(spans):
        if start > at or not pieces:
            pieces += [text[at:start], "…"]
        at = max(at, end)
    return "".join(pieces) + text[at:]


def hide_keys(text: str) -> str:
    """`text` with anything that could be key material replaced by "…": for error messages
    that quote their input, which end up in logs and bug reports. A key is caught as `wg`
    writes it (base64), URL-safe, or in hex (bare, or bytes split by spaces, colons or
    dashes), alone, glued to a name or a path, or cut short; an address, a port, a path,
    a host name or a word stays as it was."""
    spans = [m.span() for p in _STRETCHES for m in p.finditer(text) if _is_key(m.group())]
    return _HEX_PAIRS.sub("…", _hide_spans(text, spans))


def constant_time_eq(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)


def is_zero(key: bytes) -> bool:
    return _hmac.compare_digest(key, bytes(len(key)))
