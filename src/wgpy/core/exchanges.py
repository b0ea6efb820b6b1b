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

Initiations go further where the backend screens (`Backend.screen`, the native one): a
batch of them is taken as far as the initiator's static key (`want_initiation`,
`screened`), DH(our static, ephemeral) included. The device then drops a stranger's at
once, and a peer's goes on from the Noise state the screen reached.

A batch call that raises MemoryError or OSError (the native ones do where a crypto
thread's OpenSSL could not set the work up: its memory, no verdict on any message) costs
the batch nothing: its initiations stay unscreened and its exchanges not worked out, so
that the handshake code computes each on the spot as the pure path does; a failed
screen's initiations have their DH(static, ephemeral) wanted instead, for the x25519
batch call that follows in the same `run` (as without a screen). `failed` counts
such calls; the device adds them up (Device.crypto_fallbacks) for the daemon to report.
"""

from __future__ import annotations

from wgpy.core.backend import Screen, Screened, X25519Batch
from wgpy.core.crypto import PrivateKey, dh
from wgpy.core.noise import DH

_MISSING = b""  # not worked out ahead: computed when asked for
_EPHEMERAL = slice(8, 40)  # an initiation's ephemeral key
# what a batch call raises where it could not do the work (module.c's x25519, screen)
_NOT_WORKED_OUT = (MemoryError, OSError)


class Exchanges:
    """Exchanges wanted, then worked out by `batch` (None: none ahead of time), and
    initiations screened by `screen` (None: none). Either call may raise MemoryError or
    OSError (no verdict: backend.py's X25519Batch, Screen); that call's work is then left
    to the loop thread, and counted in `failed`."""

    __slots__ = (
        "_batch", "_done", "_screen", "_to_screen", "_wanted", "dh", "failed", "screened"
    )

    def __init__(self, batch: X25519Batch | None, screen: Screen | None = None) -> None:
        self._batch = batch
        self._screen = screen
        self._wanted: dict[PrivateKey, dict[bytes, None]] = {}  # private -> peers, in order
        self._done: dict[tuple[PrivateKey, bytes], bytes | None] = {}
        self._to_screen: dict[PrivateKey, dict[bytes, None]] = {}  # static -> initiations
        # an initiation -> what the screen found (backend.screen); absent: not screened
        self.screened: dict[bytes, Screened] = {}
        # crypto.dh's answer: the shared secret; ValueError where it is all zeros
        self.dh: DH = dh if batch is None else self._found
        self.failed = 0  # batch calls that raised: their work is left to `dh` and Noise

    def want_initiation(self, static: PrivateKey, message: bytes) -> None:
        """The initiation `message` (148 bytes) will be consumed with our `static` key:
        screened if the backend screens, else its DH(static, ephemeral) wanted."""
        if self._screen is not None:
            self._to_screen.setdefault(static, {})[message] = None
        else:
            self.want(static, message[_EPHEMERAL])

    def want(self, private: PrivateKey, peer: bytes) -> None:
        """DH(private, peer) will be asked for (and, unless known, private's public key)."""
        if self._batch is not None:
            self._wanted.setdefault(private, {})[peer] = None

    def run(self) -> None:
        """Screen the initiations and work out the exchanges wanted since the last run,
        one backend call each."""
        if self._to_screen:
            self._run_screen()
        wanted, self._wanted = self._wanted, {}
        if not wanted or self._batch is None:
            return
        jobs = tuple((k.raw, k.known_public, tuple(peers)) for k, peers in wanted.items())
        try:
            results = self._batch(jobs)
        except _NOT_WORKED_OUT:
            self.failed += 1
            return  # each exchange is worked out when asked for (`_found`)
        for (private, peers), (public, *shared) in zip(wanted.items(), results, strict=True):
            assert public is not None
            private.learn_public(public)
            for peer, secret in zip(peers, shared, strict=True):
                self._done[private, peer] = secret

    def _run_screen(self) -> None:
        assert self._screen is not None
        to_screen, self._to_screen = self._to_screen, {}
        for static, messages in to_screen.items():
            batch = tuple(messages)
            try:
                found = self._screen(static.raw, static.public, batch)
            except _NOT_WORKED_OUT:
                self.failed += 1
                # unscreened: Noise's path from the start, its first DH out of this run's
                # x25519 batch (as without a screen), not on the loop's thread
                for message in batch:
                    self.want(static, message[_EPHEMERAL])
                continue
            self.screened.update(zip(batch, found, strict=True))

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
