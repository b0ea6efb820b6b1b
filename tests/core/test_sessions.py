"""A peer's sessions: which keypair is current, next and previous, and the index table
that finds them (core/sessions.py). The handshakes that make them are tested end to end
in test_device.py; here, the rotation alone."""

from __future__ import annotations

from wgpy.core import sessions
from wgpy.core.indextable import IndexTable
from wgpy.core.peer import Keypair, Peer


def setup() -> tuple[IndexTable, Peer]:
    seed = iter(range(1, 1 << 20))
    return IndexTable(lambda n: next(seed).to_bytes(n, "little")), Peer(bytes(32), lambda: 0.0)


def keypair(peer: Peer, index: IndexTable, initiator: bool) -> Keypair:
    return Keypair(peer, (bytes(32), bytes(32)), initiator=initiator,
                   local_index=index.new_index(), remote_index=7, now=0.0)  # fmt: skip


def test_responder_offers_next_until_confirmed() -> None:
    index, peer = setup()
    old = keypair(peer, index, initiator=True)
    sessions.begin_as_initiator(index, peer, old)
    offered = keypair(peer, index, initiator=False)
    sessions.begin_as_responder(index, peer, offered)
    assert (peer.current, peer.next, peer.previous) == (old, offered, None)
    sessions.confirm_next(index, peer)
    assert (peer.current, peer.next, peer.previous) == (offered, None, old)
    assert set(index.keypairs.values()) == {old, offered}


def test_initiator_uses_its_session_at_once_and_keeps_three_at_most() -> None:
    index, peer = setup()
    kps = [keypair(peer, index, initiator=True) for _ in range(4)]
    for kp in kps:
        sessions.begin_as_initiator(index, peer, kp)
    assert (peer.current, peer.previous) == (kps[3], kps[2])
    assert set(index.keypairs.values()) == {kps[2], kps[3]}  # the older ones are gone


def test_a_crossing_offer_becomes_previous_when_our_response_arrives() -> None:
    index, peer = setup()
    current, offered, ours = (keypair(peer, index, initiator=i) for i in (True, False, True))
    sessions.begin_as_initiator(index, peer, current)
    sessions.begin_as_responder(index, peer, offered)
    sessions.begin_as_initiator(index, peer, ours)
    assert (peer.current, peer.next, peer.previous) == (ours, None, offered)
    assert set(index.keypairs.values()) == {ours, offered}


def test_zero_keys_forgets_every_session_and_the_handshake() -> None:
    index, peer = setup()
    sessions.begin_as_initiator(index, peer, keypair(peer, index, initiator=True))
    peer.handshake.local_index = index.add_handshake(peer)
    sessions.zero_keys(index, peer)
    assert peer.keypairs() == [] and not index.keypairs and not index.handshakes
    assert peer.handshake.local_index is None
