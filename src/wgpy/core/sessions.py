"""A peer's sessions, from the handshake that makes one to the zeroing of its keys: the
messages built and checked (handshake.py) under indices of the table, and which keypair
is `current`, `next` and `previous` (wireguard-go's BeginSymmetricSession and
ReceivedWithKeypair). Functions that return the session they made (as boringtun's
handshake does); the device does the rest: events, timers, counters, sending.

A responder cannot send on a new session before the initiator has used it (the initiator
might never have got the response), so the responder keeps it as `next` until the first
data message on it confirms it; an initiator uses its new session at once. At most three
sessions per peer: the one being confirmed, the one in use, and the one before it (for
packets still in flight). A session that leaves all three is dropped from the index
table and its keys wiped.
"""

from __future__ import annotations

from collections.abc import Callable, Container

from wgpy.core import handshake
from wgpy.core.backend import Backend
from wgpy.core.crypto import PrivateKey, dh
from wgpy.core.handshake import ConsumedInitiation
from wgpy.core.indextable import IndexTable
from wgpy.core.messages import ResponseMessage
from wgpy.core.noise import DH
from wgpy.core.output import Drop
from wgpy.core.peer import Keypair, Peer

# A new ephemeral key for a handshake with this peer (the device's: it may log it). Called
# after the index is taken, as the device always has (a seeded `rand`, as in tests/fuzz,
# gives the same keys).
Ephemeral = Callable[[Peer], PrivateKey]


def initiate(
    static: PrivateKey, peer: Peer, index: IndexTable, ephemeral: Ephemeral, wall: float,
    now: float,
) -> bytes:  # fmt: skip
    """Message 1 to `peer`, under a new index (a half-done handshake before it is
    forgotten). `wall`: the wall-clock time for the timestamp."""
    clear_handshake(index, peer)
    local = index.add_handshake(peer)
    return handshake.create_initiation(static, peer, ephemeral(peer), local, wall, now)


def prepare_response(
    init: ConsumedInitiation, index: IndexTable, ephemeral: Ephemeral,
    taken: Container[int] = (),
) -> tuple[int, PrivateKey]:  # fmt: skip
    """The first half of answering a consumed initiation, the part without arithmetic:
    the half-done handshake forgotten, our index for the session and our ephemeral key.
    `taken`: indices promised to responses of the same batch not yet finished."""
    clear_handshake(index, init.peer)
    local = index.new_index()
    while local in taken:
        local = index.new_index()
    return local, ephemeral(init.peer)


def finish_response(
    init: ConsumedInitiation, local: int, e_priv: PrivateKey, index: IndexTable,
    backend: Backend, now: float, dh: DH = dh,
) -> tuple[bytes, Keypair] | None:  # fmt: skip
    """Message 2 answering a consumed initiation, and the new session (`next` until
    confirmed); None if the initiator's ephemeral is a low-order point."""
    made = handshake.create_response(init, e_priv, local, now, dh)
    if made is None:
        return None
    msg, keys = made
    kp = Keypair(init.peer, keys, initiator=False, local_index=local,
                 remote_index=init.sender, now=now, backend=backend)  # fmt: skip
    begin_as_responder(index, init.peer, kp)
    return msg, kp


def complete(
    static: PrivateKey, peer: Peer, msg: ResponseMessage, index: IndexTable,
    backend: Backend, now: float, dh: DH = dh,
) -> Keypair | Drop:  # fmt: skip
    """The session a response to our initiation makes (current at once), or why the
    response is refused."""
    keys = handshake.consume_response(static, peer, msg, dh)
    if isinstance(keys, Drop):
        return keys
    clear_handshake(index, peer)
    kp = Keypair(peer, keys, initiator=True, local_index=msg.receiver, remote_index=msg.sender,
                 now=now, backend=backend)  # fmt: skip
    begin_as_initiator(index, peer, kp)
    return kp


def begin_as_responder(index: IndexTable, peer: Peer, kp: Keypair) -> None:
    """A response sent: `kp` waits as `next`; the session it replaces and the previous
    one go (the current one stays in use until `kp` is confirmed)."""
    index.add_keypair(kp)
    index.drop_keypair(peer.next)
    index.drop_keypair(peer.previous)
    peer.next, peer.previous = kp, None


def begin_as_initiator(index: IndexTable, peer: Peer, kp: Keypair) -> None:
    """A response received: `kp` is current at once. An unconfirmed `next` (a crossing
    handshake we answered) becomes the previous session; otherwise the current one does."""
    index.add_keypair(kp)
    index.drop_keypair(peer.previous)
    if peer.next is not None:
        peer.previous, peer.next = peer.next, None
        index.drop_keypair(peer.current)
    else:
        peer.previous = peer.current
    peer.current = kp


def confirm_next(index: IndexTable, peer: Peer) -> None:
    """The initiator used the session we offered: it becomes current."""
    index.drop_keypair(peer.previous)
    peer.previous, peer.current, peer.next = peer.current, peer.next, None


def clear_handshake(index: IndexTable, peer: Peer) -> None:
    """Forget a half-done handshake and its index."""
    hs = peer.handshake
    index.drop_handshake(hs.local_index)
    hs.local_index = None
    hs.clear()


def expire(index: IndexTable, peer: Peer) -> None:
    """After a key change: no more sending on old sessions, no half-done handshake, and
    no hold-off on the next initiation (wireguard-go ExpireCurrentKeypairs)."""
    clear_handshake(index, peer)
    peer.handshake.last_sent_handshake = float("-inf")
    for kp in (peer.current, peer.next):
        if kp is not None:
            kp.expire()


def zero_keys(index: IndexTable, peer: Peer) -> None:
    """Forget every session and the handshake (Python cannot wipe the bytes themselves;
    dropping the last reference is what it can do)."""
    for kp in peer.keypairs():
        index.drop_keypair(kp)
    peer.current = peer.previous = peer.next = None
    clear_handshake(index, peer)
