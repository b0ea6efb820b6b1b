"""The data path's two backends behind one contract: the native module (wgpy._native, C
over OpenSSL) or pure Python, chosen once, when the `Device` is made.

Both give a `Sealer` with the same calls: `Sealer(key, receiver_index)`, `.seal(packets,
mtu) -> list[bytes]`, `.counter`, `.expire()`, `.wipe()`. A sealer owns its session's
send counter and reserves the counters of a batch inside `seal`, under its lock, so two
threads sealing for one session never use a nonce twice.

The core starts no threads and so needs no lock of its own: the lock is the caller's to
give (`lock`, a factory of context managers, as `rand` is for randomness); the default,
`nullcontext`, is for single-threaded use (tests, the simulator).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgpy.core.constants import REJECT_AFTER_MESSAGES
from wgpy.core.messages import DATA_HEADER, MSG_DATA

_NONCE = struct.Struct("<4xQ")  # ChaCha20-Poly1305 nonce: 4 zero bytes, LE counter
LockFactory = Callable[[], AbstractContextManager[Any]]
Packet = bytes | bytearray | memoryview


class SealerLike(Protocol):
    """What both backends' sealers do (wgpy._native.Sealer and `Sealer` here)."""

    @property
    def counter(self) -> int: ...
    def seal(self, packets: Sequence[Packet], mtu: int) -> list[bytes]: ...
    def expire(self) -> None: ...
    def wipe(self) -> None: ...


def padded_length(length: int, mtu: int) -> int:
    """Plaintext length after padding to 16 bytes, never past the MTU (wireguard-go rule)."""
    last = length % mtu if length > mtu and mtu else length
    padded = (last + 15) & ~15
    if mtu and padded > mtu:
        padded = mtu
    return length + padded - last


class Sealer:
    """The pure-Python sealer: a sending key, the peer's receiver index and the counter."""

    __slots__ = ("_aead", "_index", "_lock", "counter")

    def __init__(
        self,
        key: bytes,
        receiver_index: int,
        counter: int = 0,
        lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        if not 0 <= receiver_index <= 0xFFFFFFFF or not 0 <= counter <= REJECT_AFTER_MESSAGES:
            raise ValueError("receiver_index is a u32, counter <= 2**64 - 2**13 - 1")
        self._aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(key)
        self._index = receiver_index
        self._lock = lock if lock is not None else nullcontext()
        self.counter = counter  # the next nonce; written only under the lock

    def seal(self, packets: Sequence[Packet], mtu: int) -> list[bytes]:
        """A data message per packet with the next counters; [] if they would pass
        REJECT_AFTER_MESSAGES (the session is spent). The hot loop of sending."""
        n = len(packets)
        if mtu < 0:
            raise ValueError("mtu >= 0")
        with self._lock:
            aead, counter = self._aead, self.counter
            if aead is None:
                raise ValueError("the key is wiped")
            if n > REJECT_AFTER_MESSAGES - counter:
                return []
            self.counter = counter + n
        seal, header, index = aead.encrypt, DATA_HEADER.pack, self._index
        out = []
        for packet in packets:
            length = len(packet)
            pad = -length % 16
            if length + pad > mtu:
                pad = padded_length(length, mtu) - length
            plain = bytes(packet) + bytes(pad) if pad else packet
            out.append(header(MSG_DATA, index, counter) + seal(_NONCE.pack(counter), plain, None))
            counter += 1
        return out

    def expire(self) -> None:
        with self._lock:
            self.counter = REJECT_AFTER_MESSAGES

    def wipe(self) -> None:
        """Drop the key (Python cannot zero it: dropping the reference is what it can do)."""
        with self._lock:
            self._aead = None


class Backend:
    """Where the per-packet work runs: `native` (the extension module) or pure Python.

    `lock` makes the locks of the pure path's sealers; pass `threading.Lock` wherever
    more than one thread may seal (io/datapath.py `backend()` does)."""

    def __init__(self, native: ModuleType | None = None, lock: LockFactory = nullcontext) -> None:
        self.native = native
        self.name = "native" if native is not None else "python"
        self._lock = lock

    def sealer(self, key: bytes, receiver_index: int) -> SealerLike:
        if self.native is not None:
            sealer: SealerLike = self.native.Sealer(key, receiver_index)
            return sealer
        return Sealer(key, receiver_index, lock=self._lock())
