"""Data messages in batches (whitepaper 5.4.6; wireguard-go send.go and receive.go):
sealing what goes out, opening what came in, on the pure-Python path or the native one.

Opening returns what the device needs to know, and nothing else is touched: packets for
the TUN and drops go into the `Output`; per session, what the batch brought (`Received`:
the source, the bytes, whether any data) for the device's bookkeeping, done once per
session per batch since every packet of a batch arrives at the same `now`; and the
datagrams that were no data messages, in order, for the handshake queue.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType

from wgpy.core.constants import REJECT_AFTER_MESSAGES
from wgpy.core.crypto import InvalidTag
from wgpy.core.endpoint import Endpoint
from wgpy.core.indextable import IndexTable
from wgpy.core.ip import IPV4_SRC, IPV4_TOTAL_LEN, IPV6_PAYLOAD_LEN, IPV6_SRC
from wgpy.core.messages import DATA_HEADER, DATA_MIN_LEN, MSG_DATA
from wgpy.core.output import Drop, Output
from wgpy.core.peer import Keypair, Peer

_NOT_DATA = (0, 0, 0)  # (type, index, counter) of anything too short to be data
_NONCE = struct.Struct("<4xQ")  # ChaCha20-Poly1305 nonce: 4 zero bytes, LE counter
_SPAN = struct.Struct("<II")  # a packet in the native open's output: (start, length)
_V4_LEN, _V6_LEN = IPV4_TOTAL_LEN, IPV6_PAYLOAD_LEN

Lookup = Callable[[bytes], Peer | None]  # allowed IPs: inner source -> its owner
Datagram = tuple[bytes | memoryview, Endpoint]


class Received:
    """What one batch brought for one session: the last source, bytes, and any data."""

    __slots__ = ("data", "nbytes", "src")

    def __init__(self, src: Endpoint = ("", 0), nbytes: int = 0, data: bool = False) -> None:
        self.src = src
        self.nbytes = nbytes
        self.data = data


def seal(
    kp: Keypair,
    packets: Sequence[bytes],
    mtu: int,
    endpoint: Endpoint,
    udp: list[tuple[bytes, Endpoint]],
) -> tuple[int, bool] | None:
    """Encrypt `packets` into data messages appended to `udp`: (bytes, any data?), or
    None if the session's counters are spent (nothing sealed)."""
    sealed = kp.sealer.seal(packets, mtu)
    if len(sealed) < len(packets):
        return None
    udp += [(datagram, endpoint) for datagram in sealed]
    return sum(map(len, sealed)), any(packets)


def open_python(
    datagrams: Iterable[Datagram],
    keypairs: dict[int, Keypair],
    lookup: Lookup,
    now: float,
    out: Output,
    received: dict[Keypair, Received],
    others: list[Datagram],
) -> None:
    """The fast path of receiving: per packet only what must be (decrypt, replay check,
    the inner source against the session's peer's allowed IPs)."""
    drops, tun = out.drops, out.tun
    owners: dict[bytes, Peer | None] = {}  # inner source address -> owner, this batch
    unpack = DATA_HEADER.unpack_from
    for data, src in datagrams:
        # the type is a little-endian u32: 4 means "data" with the three reserved zeros
        kind, index, counter = unpack(data) if len(data) >= DATA_MIN_LEN else _NOT_DATA
        if kind != MSG_DATA:
            others.append((data, src))
            continue
        kp = keypairs.get(index)
        if kp is None:
            drops[Drop.UNKNOWN_INDEX] += 1
            continue
        if counter >= REJECT_AFTER_MESSAGES or now >= kp.expires:  # as C and can_send
            drops[Drop.EXPIRED] += 1
            continue
        try:
            plain = kp.recv.decrypt(_NONCE.pack(counter), memoryview(data)[16:], None)
        except InvalidTag:
            drops[Drop.BAD_TAG] += 1
            continue
        if not kp.replay.accept(counter):  # the window moves only after the tag verified
            drops[Drop.REPLAYED] += 1
            continue
        got = received.get(kp)
        if got is None:
            got = received[kp] = Received()
        got.src = src
        got.nbytes += len(data)
        if not plain:
            continue  # a keepalive
        got.data = True
        # the inner source address and true length, for the allowed-IPs source filter
        # (read inline with the offsets of core/ip.py: a call per packet costs here)
        n = len(plain)
        version = plain[0] >> 4
        if version == 4 and n >= 20:
            addr, length = plain[IPV4_SRC], (plain[_V4_LEN] << 8) | plain[_V4_LEN + 1]
            if length < 20:
                length = n + 1  # refused just below
        elif version == 6 and n >= 40:
            addr, length = plain[IPV6_SRC], 40 + ((plain[_V6_LEN] << 8) | plain[_V6_LEN + 1])
        else:
            drops[Drop.BAD_INNER] += 1
            continue
        if length > n:
            drops[Drop.BAD_INNER] += 1
            continue
        try:
            owner = owners[addr]
        except KeyError:
            owner = owners[addr] = lookup(addr)
        if owner is kp.peer:
            tun.append(plain if length == n else plain[:length])
        else:
            drops[Drop.SOURCE_NOT_ALLOWED] += 1


def open_native(
    native: ModuleType,
    read: bytes | memoryview,
    n: int,
    seg: int,
    src: Endpoint,
    index: IndexTable,
    lookup: Lookup,
    now: float,
    out: Output,
    received: dict[Keypair, Received],
    others: list[Datagram],
) -> None:
    """`open_python` for one read from the UDP socket in one native call; the allowed-IPs
    check is made once per run of packets of one session and inner source."""
    plain = bytearray(n)
    runs, per_session, other_spans, drops = native.open_batch(
        read, n, seg, index.sessions, now, plain
    )
    for reason, count in drops.items():
        if count:
            out.drops[Drop(reason)] += count
    keypairs, tun = index.session_keypairs, out.tun
    for session, source, spans in runs:
        if lookup(source) is not keypairs[session].peer:
            out.drops[Drop.SOURCE_NOT_ALLOWED] += len(spans) // _SPAN.size
            continue
        for start, length in _SPAN.iter_unpack(spans):
            tun.append(bytes(plain[start : start + length]))
    for session, nbytes, data in per_session:
        kp = keypairs[session]
        got = received.get(kp)
        if got is None:
            received[kp] = Received(src, nbytes, data)
        else:
            got.src, got.nbytes, got.data = src, got.nbytes + nbytes, got.data or data
    others += [(read[offset : offset + length], src) for offset, length in other_spans]
