"""The three handshake messages on the wire (whitepaper 5.4.2-5.4.7).

`noise.py` is the Noise_IKpsk2 arithmetic; this module frames it into messages, checks what
the peer's handshake state requires (timestamps, floods, the pending initiation), and
returns what it found, a peer and keys or the reason for a drop, as wireguard-go's
`ConsumeMessageInitiation` returns the peer. It never touches the device: the device
decides what a result does to sessions, indices and timers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from wgpy.core import noise
from wgpy.core.backend import Screened
from wgpy.core.constants import INITIATION_MIN_INTERVAL
from wgpy.core.crypto import InvalidTag, PrivateKey, dh, tai64n
from wgpy.core.messages import (
    INITIATION,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE,
    InitiationMessage,
    ResponseMessage,
    parse_initiation,
)
from wgpy.core.output import Drop
from wgpy.core.peer import HandshakeState, Peer

_NO_MAC = bytes(16)  # mac1/mac2 placeholders, filled in by add_macs


class ConsumedInitiation(NamedTuple):
    """A consumed initiation: who sent it and what the response needs."""

    peer: Peer
    sym: noise.SymmetricState
    ephemeral: bytes
    sender: int


def create_initiation(
    static: PrivateKey, peer: Peer, ephemeral: PrivateKey, index: int, wall: float, now: float
) -> bytes:
    """Message 1 to `peer` under our `index`; its handshake state keeps what the
    response will need. `wall` is the wall-clock time for the TAI64N timestamp."""
    assert peer.static_static is not None
    sym = noise.SymmetricState(peer.public_key)
    e_pub, enc_static, enc_time = noise.create_initiation(
        sym, static, peer.public_key, peer.static_static, ephemeral, tai64n(wall)
    )
    hs = peer.handshake
    hs.state, hs.sym, hs.e_priv, hs.local_index = (
        HandshakeState.INITIATION_SENT, sym, ephemeral, index)  # fmt: skip
    msg = bytearray(
        INITIATION.pack(MSG_INITIATION, index, e_pub, enc_static, enc_time, _NO_MAC, _NO_MAC)
    )
    peer.cookies.add_macs(msg, now)
    return bytes(msg)


def consume_initiation(
    static: PrivateKey, public_key: bytes, data: bytes, peers: Mapping[bytes, Peer], now: float,
    dh: noise.DH = dh,
) -> ConsumedInitiation | Drop:  # fmt: skip
    """The peer behind an initiation (macs already checked), or why it is refused. Only a
    fully authenticated, fresh initiation updates the peer's replay and flood state."""
    msg = parse_initiation(data)
    sym = noise.SymmetricState(public_key)
    try:
        initiator = noise.consume_initiation_static(sym, static, msg.ephemeral, msg.static, dh)
    except (InvalidTag, ValueError):
        return Drop.BAD_HANDSHAKE
    return _consume_rest(msg, initiator, sym, peers, now)


def consume_screened(
    data: bytes, found: Screened, peers: Mapping[bytes, Peer], now: float
) -> ConsumedInitiation | Drop:
    """`consume_initiation` for an initiation the backend took as far as its static key
    (core/backend.py `screen`): what it `found`, (static key, ck, h) or None, stands for
    the first half; the same answer, without that half's arithmetic."""
    if found is None:
        return Drop.BAD_HANDSHAKE
    initiator, ck, h = found
    return _consume_rest(parse_initiation(data), initiator, noise.SymmetricState.resumed(ck, h),
                         peers, now)  # fmt: skip


def _consume_rest(
    msg: InitiationMessage, initiator: bytes, sym: noise.SymmetricState,
    peers: Mapping[bytes, Peer], now: float,
) -> ConsumedInitiation | Drop:  # fmt: skip
    """An initiation from the static key on: its peer, its timestamp, replay and flood."""
    peer = peers.get(initiator)
    if peer is None or peer.static_static is None:
        return Drop.UNKNOWN_PEER
    try:
        timestamp = noise.consume_initiation_payload(sym, peer.static_static, msg.timestamp)
    except (InvalidTag, ValueError):
        return Drop.BAD_HANDSHAKE
    hs = peer.handshake
    if timestamp <= hs.latest_timestamp:
        return Drop.STALE_TIMESTAMP  # a replay, or an older initiation
    if now - hs.last_initiation_consumed < INITIATION_MIN_INTERVAL:
        return Drop.FLOOD
    hs.latest_timestamp, hs.last_initiation_consumed = timestamp, now
    return ConsumedInitiation(peer, sym, msg.ephemeral, msg.sender)


def create_response(
    init: ConsumedInitiation, ephemeral: PrivateKey, index: int, now: float, dh: noise.DH = dh
) -> tuple[bytes, tuple[bytes, bytes]] | None:
    """Message 2 answering `init` under our `index`, and the session keys (sending,
    receiving); None if the initiator's ephemeral is a low-order point."""
    peer = init.peer
    try:
        e_pub, enc_empty = noise.create_response(
            init.sym, ephemeral, init.ephemeral, peer.public_key, peer.preshared_key, dh=dh
        )
    except ValueError:
        return None
    msg = bytearray(
        RESPONSE.pack(MSG_RESPONSE, index, init.sender, e_pub, enc_empty, _NO_MAC, _NO_MAC)
    )
    peer.cookies.add_macs(msg, now)
    return bytes(msg), init.sym.split(initiator=False)


def consume_response(
    static: PrivateKey, peer: Peer, msg: ResponseMessage, dh: noise.DH = dh
) -> tuple[bytes, bytes] | Drop:
    """The session keys (sending, receiving) from a response to our pending initiation."""
    hs = peer.handshake
    if hs.state is not HandshakeState.INITIATION_SENT or hs.sym is None or hs.e_priv is None:
        return Drop.UNEXPECTED
    sym = hs.sym.copy()
    try:
        noise.consume_response(
            sym, hs.e_priv, static, msg.ephemeral, peer.preshared_key, msg.empty, dh
        )
    except (InvalidTag, ValueError):
        return Drop.BAD_HANDSHAKE
    return sym.split(initiator=True)
