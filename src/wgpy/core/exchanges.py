"""The X25519 exchanges of a batch of handshake messages, worked out ahead of their use.

A handshake's cost is its four X25519 operations (~35 us each); `cryptography` holds the
GIL through every one. The device (device.py `_work_off`) therefore says up front which
exchanges a batch of queued messages will need (`want`), has the backend work them all
out in one call (`run`: the native backend spreads them over its crypto threads without
the GIL), and the handshake code then finds each result where it used to compute it
(`dh`, the same contract as crypto.dh). Only the order of the arithmetic moves: every
decision is still taken by the same code, in the same order, on the results it always
had. An exchange not asked for is computed on the spot; on the pure-Python backend
(no batch call) every one is, as before.
"""

from __future__ import annotations

from wgpy.core.backend import X25519Batch
from wgpy.core.crypto import PrivateKey, dh
from wgpy.core.noise import DH

_MISSING = b""  # not worked out ahead: computed when asked for


class Exchanges:
    """Exchanges wanted, then worked out by `batch` (None: none ahead of time)."""

    __slots__ = ("_batch", "_done", "_wanted", "dh")

    def __init__(self, batch: X25519Batch | None) -> None:
        self._batch = batch
        self._wanted: dict[PrivateKey, dict[bytes, None]] = {}  # private -> peers, in order
        self._done: dict[tuple[PrivateKey, bytes], bytes | None] = {}
        # crypto.dh's answer: the shared secret; ValueError where it is all zeros
        self.dh: DH = dh if batch is None else self._found

    def want(self, private: PrivateKey, peer: bytes) -> None:
        """DH(private, peer) will be asked for (and, unless known, private's public key)."""
        if self._batch is not None:
            self._wanted.setdefault(private, {})[peer] = None

    def run(self) -> None:
        """Work out everything wanted since the last run, in one backend call."""
        wanted, self._wanted = self._wanted, {}
        if not wanted or self._batch is None:
            return
        jobs = tuple((k.raw, k.known_public, tuple(peers)) for k, peers in wanted.items())
        for (private, peers), (public, *shared) in zip(
            wanted.items(), self._batch(jobs), strict=True
        ):
            assert public is not None
            private.learn_public(public)
            for peer, secret in zip(peers, shared, strict=True):
                self._done[private, peer] = secret

    def _found(self, private: bytes | PrivateKey, peer: bytes) -> bytes:
        """The answer worked out ahead, or worked out now."""
        if not isinstance(private, PrivateKey):
            return dh(private, peer)
        secret = self._done.get((private, peer), _MISSING)
        if secret is _MISSING:
            return dh(private, peer)
        if secret is None:
            raise ValueError("X25519 result is the all-zero point")
        return secret
