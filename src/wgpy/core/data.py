"""Data messages in batches (whitepaper 5.4.6; wireguard-go send.go and receive.go):
sealing what goes out, opening what came in, through the backend's calls (core/backend.py:
the pure-Python one or the native one, the same contract).

Opening returns what the device needs to know, and nothing else is touched: packets for
the TUN and drops go into the `Output`; per session, what the batch brought (`Received`:
the source, the bytes, whether any data) for the device's bookkeeping, done once per
session per batch since every packet of a batch arrives at the same `now`; and the
datagrams that were no data messages, in order, for the handshake queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from wgpy.core.backend import Item, Opened
from wgpy.core.endpoint import Endpoint
from wgpy.core.indextable import IndexTable
from wgpy.core.output import Datagrams, Drop, Output
from wgpy.core.peer import Keypair, Peer

Lookup = Callable[[bytes], Peer | None]  # allowed IPs: inner source -> its owner
Datagram = tuple[bytes | memoryview, Endpoint]
OpenBatch = Callable[[bytes | memoryview, int, int, dict[int, object], float], Opened]
_DROPS = {reason.value: reason for reason in Drop}
_NOT_DATA_DROPS = (Drop.BAD_SIZE.value, Drop.UNKNOWN_TYPE.value)  # a datagram no data message


class Received:
    """What one batch brought for one session: the last source, bytes, and any data."""

    __slots__ = ("data", "nbytes", "src")

    def __init__(self, src: Endpoint = ("", 0), nbytes: int = 0, data: bool = False) -> None:
        self.src = src
        self.nbytes = nbytes
        self.data = data


def brought(received: dict[Keypair, Received], kp: Keypair, src: Endpoint, nbytes: int,
            data: bool) -> None:  # fmt: skip
    """What one read brought session `kp`, added to what the batch's earlier reads did."""
    got = received.get(kp)
    if got is None:
        received[kp] = Received(src, nbytes, data)
    else:
        got.src, got.nbytes, got.data = src, got.nbytes + nbytes, got.data or data


def seal(
    kp: Keypair, items: Sequence[Item], mtu: int, endpoint: Endpoint, udp: Datagrams
) -> tuple[int, bool] | None:
    """Encrypt packets and super-packets into data messages added to `udp` as the GSO
    runs the sealer made: (bytes, any data?), or None if the session's counters are spent
    (nothing sealed). Python's work is per run, not per datagram."""
    runs = kp.sealer.seal_runs(items, mtu)
    if runs is None:
        return None
    count = nbytes = 0
    for buf, size in runs:
        nbytes += len(buf)
        count += -(-len(buf) // size)
    udp.add_runs(runs, count, endpoint)
    return nbytes, any(items)


def open_read(
    open_batch: OpenBatch,
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
    judged: bool = False,
) -> bool:
    """One read from the UDP socket (`n` bytes, datagrams of `seg` bytes) opened by the
    backend's `open_batch` (core/backend.py); the allowed-IPs check of the inner source
    is made here, once per run of packets of one session and source, and a run goes into
    `out.tun` whole, as `open_batch` made it (native: a Spans, no object per packet).
    True if a data message of the read authenticated. `judged`: the C intake judged the
    read's datagrams that are no data message already (core/intake.py), drops included:
    those open_batch names are not counted twice (a GRO read of data and junk of a size)."""
    runs, per_session, other_spans, drops = open_batch(read, n, seg, index.sessions, now)
    for reason, count in drops.items():  # (only the reasons that dropped something)
        if not (judged and reason in _NOT_DATA_DROPS):
            out.drops[_DROPS[reason]] += count
    keypairs, tun = index.session_keypairs, out.tun
    for session, source, packets in runs:
        if lookup(source) is keypairs[session].peer:
            tun.append(packets)
        else:
            out.drops[Drop.SOURCE_NOT_ALLOWED] += len(packets)
    for session, nbytes, data in per_session:
        brought(received, keypairs[session], src, nbytes, data)
    if other_spans:
        others += [(read[offset : offset + length], src) for offset, length in other_spans]
    return bool(per_session)
