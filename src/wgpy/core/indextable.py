"""Our receiver indices (wireguard-go device/indextable.go): every message a peer sends
us after the first names a 32-bit index we picked, so we can find its handshake or session
without trying keys. Indices are random, so they say nothing about how many we have."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wgpy.core.peer import Keypair, Peer


class IndexTable:
    def __init__(self, rand: Callable[[int], bytes]) -> None:
        self._rand = rand
        self.handshakes: dict[int, Peer] = {}  # index of a pending initiation -> its peer
        self.keypairs: dict[int, Keypair] = {}  # index of a session -> the session
        # the same for the backend's open_batch: index -> the receiving session, and back
        self.sessions: dict[int, Any] = {}
        self.session_keypairs: dict[Any, Keypair] = {}

    def new_index(self) -> int:
        while True:
            index = int.from_bytes(self._rand(4), "little")
            if index not in self.handshakes and index not in self.keypairs:
                return index

    def add_handshake(self, peer: Peer) -> int:
        index = self.new_index()
        self.handshakes[index] = peer
        return index

    def drop_handshake(self, index: int | None) -> None:
        if index is not None:
            self.handshakes.pop(index, None)

    def add_keypair(self, kp: Keypair) -> None:
        self.keypairs[kp.local_index] = kp
        self.sessions[kp.local_index] = kp.session
        self.session_keypairs[kp.session] = kp

    def drop_keypair(self, kp: Keypair | None) -> None:
        if kp is not None and self.keypairs.pop(kp.local_index, None) is kp:
            del self.sessions[kp.local_index]
            del self.session_keypairs[kp.session]
            kp.wipe()

    def peer_of(self, index: int) -> Peer | None:
        """Whose handshake or session this index is (for cookie replies, which may
        answer either an initiation or a response)."""
        peer = self.handshakes.get(index)
        if peer is None:
            kp = self.keypairs.get(index)
            peer = kp.peer if kp is not None else None
        return peer
