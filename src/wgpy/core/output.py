"""What a call into the core produced: packets to deliver, datagrams to send, and an
account of what happened (events: core/events.py) and of what was refused (drops, by
reason).

Events are rare by construction (handshakes, key rotations, roaming, timers), never one per
data packet. Drops are counted on the drop branches only, so the fast path pays nothing;
the caller sums them (`Counter.update`) for logs and metrics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from enum import Enum
from typing import overload

from wgpy.core.backend import Packets
from wgpy.core.endpoint import Endpoint
from wgpy.core.events import ProtocolEvent


class Drop(Enum):
    """Why a datagram (from the network) or a packet (from the TUN) went no further."""

    BAD_SIZE = "bad_size"  # shorter or longer than its type allows
    UNKNOWN_TYPE = "unknown_type"  # a type other than 1-4, or non-zero reserved bytes
    BAD_MAC1 = "bad_mac1"  # not meant for our public key
    RATE_LIMITED = "rate_limited"  # with a mac2, from a source over both its limits
    QUEUE_FULL = "queue_full"  # the handshake queue is full: a flood
    NO_PRIVATE_KEY = "no_private_key"
    REPLY_SHED = "reply_shed"  # owed a cookie reply while the socket overflowed: a stranger
    # past the bucket strangers still get then (ratelimit.py SHED_REPLIES)
    UNKNOWN_PEER = "unknown_peer"  # a valid initiation from a key we don't know
    BAD_HANDSHAKE = "bad_handshake"  # does not decrypt, or a low-order point
    STALE_TIMESTAMP = "stale_timestamp"  # an initiation replayed or older than the last
    FLOOD = "flood"  # a peer's initiations less than 20 ms apart
    UNKNOWN_INDEX = "unknown_index"  # no session or handshake of ours has that index
    UNEXPECTED = "unexpected"  # a response or cookie when we sent no initiation
    EXPIRED = "expired"  # the session is too old or its counter is spent
    BAD_TAG = "bad_tag"  # the AEAD tag did not verify
    REPLAYED = "replayed"  # the counter was seen before or is left of the window
    BAD_INNER = "bad_inner"  # the decrypted packet is not a well-formed IP packet
    SOURCE_NOT_ALLOWED = "source_not_allowed"  # inner source not in the peer's allowed IPs
    NO_ROUTE = "no_route"  # (sending) no peer's allowed IPs cover the destination
    NO_ENDPOINT = "no_endpoint"  # (sending) the peer has no endpoint yet


class Drops(Counter[Drop]):
    """A Counter made by dict's own __init__: every call into the core makes one, and
    Counter's __init__ (two Python frames in collections) cost a lone packet ~20 us when
    the caches are cold (an idle tunnel's ping: docs/design.md, "Latency")."""

    __init__ = dict.__init__  # the C slot: no Python frame


ToTun = bytes | Packets  # a packet the core made itself (ICMP), or a run of opened ones


Run = tuple[bytes, int, Endpoint]  # datagrams of `size` bytes back to back, the last may be shorter


class Datagrams:
    """Datagrams to send, kept as the runs one UDP GSO send carries: (buf, size, endpoint),
    `buf` holding datagrams of `size` bytes back to back, the last of them possibly
    shorter (a lone datagram: size == len(buf)). The sealer makes the runs (one per
    super-packet, say), and the UDP socket sends each as it is (`runs`), so no datagram
    becomes an object of its own on the way. Read one by one (iteration, indexing: the
    tests, the simulator), it is the list of (datagram, endpoint) it stands for."""

    __slots__ = ("_count", "_runs")

    def __init__(self) -> None:  # one frame, no more: every call into the core makes one
        self._runs: list[Run] = []
        self._count = 0

    def append(self, datagram: tuple[bytes, Endpoint]) -> None:
        data, endpoint = datagram
        self._runs.append((data, len(data), endpoint))
        self._count += 1

    def add_runs(self, runs: list[tuple[bytes, int]], count: int, endpoint: Endpoint) -> None:
        """`count` datagrams to `endpoint`, as runs of (buf, size)."""
        append = self._runs.append
        for buf, size in runs:  # a loop, not a comprehension: no frame of its own (3.11)
            append((buf, size, endpoint))
        self._count += count

    def runs(self) -> list[Run]:
        return self._runs

    def clear(self) -> None:
        self._runs.clear()
        self._count = 0

    def __iadd__(self, other: Iterable[tuple[bytes, Endpoint]]) -> Datagrams:
        if isinstance(other, Datagrams):
            self._runs += other._runs
            self._count += other._count
        else:
            for datagram in other:
                self.append(datagram)
        return self

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[bytes, Endpoint]]:
        for buf, size, endpoint in self._runs:
            if len(buf) <= size:
                yield buf, endpoint
            else:
                for i in range(0, len(buf), size):
                    yield buf[i : i + size], endpoint

    @overload
    def __getitem__(self, i: int) -> tuple[bytes, Endpoint]: ...
    @overload
    def __getitem__(self, i: slice) -> list[tuple[bytes, Endpoint]]: ...
    def __getitem__(
        self, i: int | slice
    ) -> tuple[bytes, Endpoint] | list[tuple[bytes, Endpoint]]:
        return list(self)[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Datagrams | list):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Datagrams({list(self)!r})"


class Output:
    """IP packets for the TUN, datagrams for the UDP socket, events and drops."""

    __slots__ = ("authentic", "drops", "events", "tun", "udp")

    def __init__(self) -> None:
        self.authentic = False  # a data message (keepalives too) authenticated in this call
        self.tun: list[ToTun] = []  # in order; see `tun_packets`
        self.udp = Datagrams()
        self.events: list[ProtocolEvent] = []
        self.drops: Counter[Drop] = Drops()

    def tun_packets(self) -> list[bytes]:
        """`tun` as one packet per item (for tests and the simulator: the datapath hands
        `tun` to `Tun.write_batch` as it is, the runs unopened)."""
        return [p for item in self.tun for p in ((item,) if isinstance(item, bytes) else item)]

    def extend(self, other: Output) -> None:
        self.authentic = self.authentic or other.authentic
        self.tun += other.tun
        self.udp += other.udp
        self.events += other.events
        if other.drops:
            self.drops.update(other.drops)
