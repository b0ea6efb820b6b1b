"""The Noise_IKpsk2 handshake as WireGuard uses it (whitepaper 5.4.2-5.4.5).

`SymmetricState` holds Noise's chaining key `ck` and hash `h`; the four functions below
are the two messages from each side. They are pure: keys and randomness come in, the
ciphertexts and the updated state come out. A consumer works on a copy of the state, so a
message that fails to authenticate leaves nothing behind. Where a caller worked the
exchanges out ahead, in a batch (exchanges.py), it passes its `dh` for crypto.dh.
"""

from __future__ import annotations

from collections.abc import Callable

from wgpy.core.crypto import (
    PrivateKey,
    aead_decrypt,
    aead_encrypt,
    dh,
    hash_,
    kdf,
    load_private,
    public_key,
)

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
_CHAIN0 = hash_(CONSTRUCTION)
DH = Callable[[bytes | PrivateKey, bytes], bytes]  # crypto.dh, or answers worked out ahead


class SymmetricState:
    """Noise's (ck, h) pair with the operations WireGuard performs on it."""

    __slots__ = ("ck", "h")

    def __init__(self, responder_static: bytes, prologue: bytes = IDENTIFIER) -> None:
        self.ck = _CHAIN0
        self.h = hash_(hash_(_CHAIN0, prologue), responder_static)

    @classmethod
    def resumed(cls, ck: bytes, h: bytes) -> SymmetricState:
        """The state at (ck, h), as a batch call left it (core/backend.py `screen`)."""
        state = cls.__new__(cls)
        state.ck, state.h = ck, h
        return state

    def copy(self) -> SymmetricState:
        other = SymmetricState.__new__(SymmetricState)
        other.ck, other.h = self.ck, self.h
        return other

    def mix_hash(self, data: bytes) -> None:
        self.h = hash_(self.h, data)

    def mix_ephemeral(self, e_pub: bytes) -> None:
        """The `e` token of a psk handshake: into ck and h."""
        (self.ck,) = kdf(self.ck, e_pub, 1)
        self.mix_hash(e_pub)

    def mix_dh(self, shared: bytes) -> bytes:
        self.ck, key = kdf(self.ck, shared, 2)
        return key

    def mix_psk(self, psk: bytes) -> bytes:
        self.ck, tau, key = kdf(self.ck, psk, 3)
        self.mix_hash(tau)
        return key

    def encrypt(self, key: bytes, plaintext: bytes) -> bytes:
        ciphertext = aead_encrypt(key, 0, plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt(self, key: bytes, ciphertext: bytes) -> bytes:
        """Raises InvalidTag when the ciphertext does not authenticate."""
        plaintext = aead_decrypt(key, 0, ciphertext, self.h)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self, initiator: bool) -> tuple[bytes, bytes]:
        """(sending key, receiving key) for this side."""
        first, second = kdf(self.ck, b"", 2)
        return (first, second) if initiator else (second, first)


def create_initiation(
    sym: SymmetricState,
    static_priv: bytes | PrivateKey,
    remote_static: bytes,
    static_static: bytes,
    e_priv: bytes | PrivateKey,
    payload: bytes,
) -> tuple[bytes, bytes, bytes]:
    """Initiator, message 1: returns (ephemeral, encrypted static, encrypted payload)."""
    e_priv = load_private(e_priv)
    e_pub = public_key(e_priv)
    sym.mix_ephemeral(e_pub)
    key = sym.mix_dh(dh(e_priv, remote_static))
    enc_static = sym.encrypt(key, public_key(static_priv))
    key = sym.mix_dh(static_static)
    enc_payload = sym.encrypt(key, payload)
    return e_pub, enc_static, enc_payload


def consume_initiation_static(
    sym: SymmetricState, static_priv: bytes | PrivateKey, e_pub: bytes, enc_static: bytes,
    dh: DH = dh,
) -> bytes:  # fmt: skip
    """Responder, message 1, first half: the initiator's static key (raises on forgery)."""
    sym.mix_ephemeral(e_pub)
    key = sym.mix_dh(dh(static_priv, e_pub))
    return sym.decrypt(key, enc_static)


def consume_initiation_payload(
    sym: SymmetricState, static_static: bytes, enc_payload: bytes
) -> bytes:
    """Responder, message 1, second half, once the peer (and so `static_static`) is known."""
    key = sym.mix_dh(static_static)
    return sym.decrypt(key, enc_payload)


def create_response(
    sym: SymmetricState,
    e_priv: bytes | PrivateKey,
    remote_ephemeral: bytes,
    remote_static: bytes,
    psk: bytes,
    payload: bytes = b"",
    dh: DH = dh,
) -> tuple[bytes, bytes]:
    """Responder, message 2: returns (ephemeral, encrypted payload)."""
    e_priv = load_private(e_priv)
    e_pub = e_priv.public
    sym.mix_ephemeral(e_pub)
    sym.mix_dh(dh(e_priv, remote_ephemeral))
    sym.mix_dh(dh(e_priv, remote_static))
    key = sym.mix_psk(psk)
    return e_pub, sym.encrypt(key, payload)


def consume_response(
    sym: SymmetricState,
    e_priv: bytes | PrivateKey,
    static_priv: bytes | PrivateKey,
    remote_ephemeral: bytes,
    psk: bytes,
    enc_payload: bytes,
    dh: DH = dh,
) -> bytes:
    """Initiator, message 2: the payload (empty in WireGuard); raises on forgery."""
    e_priv = load_private(e_priv)
    sym.mix_ephemeral(remote_ephemeral)
    sym.mix_dh(dh(e_priv, remote_ephemeral))
    sym.mix_dh(dh(static_priv, remote_ephemeral))
    key = sym.mix_psk(psk)
    return sym.decrypt(key, enc_payload)
