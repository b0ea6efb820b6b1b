"""Packet offload for a TUN opened with IFF_VNET_HDR (pure functions, no I/O).

Every TUN read and write then starts with a 10-byte `struct virtio_net_hdr` (native byte
order, little-endian on the machines we run on): flags, gso_type, hdr_len, gso_size,
csum_start, csum_offset.

`coalesce` turns a train of decrypted TCP segments into GSO super-packets (one write
instead of ~44: see docs/design.md, "The datapath"). The kernel's contract for such a
write, and what we put in it:

* flags=NEEDS_CSUM, csum_start=L4 offset, csum_offset=16: the kernel (or NIC) finishes the
  checksum by summing from csum_start to the end and storing the complement, so the TCP
  checksum field must hold the folded, *not inverted*, pseudo-header sum for the full
  super-packet length. When it segments, tcp_gso_segment adjusts that sum per segment.
* gso_type=TCPV4/TCPV6, gso_size=payload bytes per segment (the last may be shorter),
  hdr_len=IP+TCP header length. IPv4 segments get ids counting up from the first one's.

`split` is the inverse for reads when TSO/USO was offered with TUNSETOFFLOAD;
`super_packet` keeps such a read whole for the sealer to cut (core/ip.py), so that a 64 KB
read stays one object until it is sealed.

`checksum` (core/ip.py) returns the folded one's-complement sum, NOT inverted; a checksum field is
`~checksum(...) & 0xFFFF`, and a packet verifies when the sum over it is 0xFFFF.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import ClassVar

from wgpy.core.ip import IPV4_ADDRS, IPV4_FLOW, IPV6_FLOW, SuperPacket, checksum, segment
from wgpy.core.ip import pseudo_sum as _pseudo_sum
from wgpy.core.ip import set_ip_length as _set_ip_length
from wgpy.core.ip import super_packet as make_super_packet
from wgpy.core.output import ToTun

VNET_HDR_LEN = 10
NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

_PROTO_TCP = 6
_PROTO_UDP = 17
_PSH, _ACK = 0x08, 0x10  # TCP flags
_MAX_IP_LEN = 0xFFFF
_MERGEABLE_FLAGS = frozenset((_ACK, _ACK | _PSH))
_MAX_UDP_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
# IPv6 next-header values that are extension headers: the TCP header (if any) is further on.
_V6_EXT = frozenset({0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254})

_VNET = struct.Struct("<BBHHHH")
_U16 = struct.Struct("!H")
_PLAIN = bytes(VNET_HDR_LEN)


def plain_header() -> bytes:
    """The virtio header of a packet written or read without any offload."""
    return _PLAIN


# ---------------------------------------------------------------- coalescing (TUN writes)


# Per IP version and header length, one Struct reads in a single call every header field
# that coalescing looks at: (fixed bytes..., ip id or 0, seq, fixed bytes...). The fixed
# bytes must be equal along a run: IP version/TOS/flags/TTL (v4) or class/flow label/hop
# limit (v6), then TCP ack number, data offset, window, urgent pointer and options. The
# lengths, IPv4 id and checksums, the sequence number and the TCP checksum may differ.
_SHAPES: dict[tuple[int, int], struct.Struct] = {}


def _shape(l4: int, hlen: int) -> struct.Struct:
    shape = _SHAPES.get((l4, hlen))
    if shape is None:
        options = hlen - l4 - 18
        # v4: ver/tos, (len), id, frag/ttl/proto, (csum, addresses, ports), seq, ack/offset,
        # (flags), window, (csum), urgent+options; v6: ver/class/flow, payload length (H,
        # unused), next header/hop limit, (addresses, ports), then TCP as for v4
        head = "2s2xH4s2x12x" if l4 == 20 else "4sH2s32x4x"
        shape = _SHAPES[(l4, hlen)] = struct.Struct(f"!{head}I5sx2s2x{options}s")
    return shape


class _Run:
    """Consecutive segments of one TCP flow that will go out as one super-packet."""

    __slots__ = ("fixed", "gso", "hlen", "l4", "members", "next_id", "next_seq", "shape", "total")

    def __init__(self, p: bytes, l4: int, hlen: int) -> None:
        self.members = [p]
        self.l4 = l4
        self.hlen = hlen
        self.gso = len(p) - hlen
        self.total = len(p)
        self.shape = _shape(l4, hlen)
        head = self.shape.unpack_from(p)
        self.fixed = (head[0], head[2], *head[4:])
        self.next_id = (head[1] + 1) & 0xFFFF if l4 == 20 else 0
        self.next_seq = (head[3] + self.gso) & 0xFFFFFFFF

    def take(self, p: bytes, hlen: int) -> bool:
        """Add `p` if it continues this run (same headers, next in sequence, fits)."""
        size = len(p) - hlen
        if hlen != self.hlen or size > self.gso or self.total + size > _MAX_IP_LEN:
            return False
        head = self.shape.unpack_from(p)
        if (
            head[3] != self.next_seq
            or (head[0], head[2], *head[4:]) != self.fixed
            or (self.l4 == 20 and head[1] != self.next_id)
        ):
            return False
        self.members.append(p)
        self.total += size
        self.next_seq = (self.next_seq + size) & 0xFFFFFFFF
        self.next_id = (self.next_id + 1) & 0xFFFF
        return True

    def follows(self, p: bytes, key: bytes) -> bool:
        """`take` for a packet not classified yet: the checks `_classify` would make that
        the header fields compared by `take` do not already imply (the fast path for the
        common case, a segment of the same flow as the packet before it)."""
        l4 = self.l4
        n = len(p)
        if (
            n <= self.hlen
            or p[l4 + 13] not in _MERGEABLE_FLAGS
            or (p[2] << 8 | p[3] if l4 == 20 else (p[4] << 8 | p[5]) + 40) != n
            or (p[IPV4_FLOW] if l4 == 20 else p[IPV6_FLOW]) != key
        ):
            return False
        return self.take(p, self.hlen)

    def closed_by(self, p: bytes) -> bool:
        """Whether no segment may follow `p`, its last: it was short, or carried PSH."""
        return len(p) - self.hlen < self.gso or bool(p[self.l4 + 13] & _PSH)

    def build(self) -> bytes:
        members = self.members
        first = members[0]
        if len(members) == 1:
            return _PLAIN + first
        l4, hlen, total = self.l4, self.hlen, self.total
        hdr = bytearray(first[:hlen])
        _set_ip_length(hdr, l4, total)
        _U16.pack_into(hdr, l4 + 16, _pseudo_sum(first, _PROTO_TCP, total - l4))
        hdr[l4 + 13] = members[-1][l4 + 13]  # the PSH of the last segment, if it has one
        gso_type = GSO_TCPV4 if l4 == 20 else GSO_TCPV6
        vnet = _VNET.pack(NEEDS_CSUM, gso_type, hlen, self.gso, l4, 16)
        return b"".join([vnet, hdr, *(memoryview(p)[hlen:] for p in members)])


class _UdpRun:
    """Consecutive datagrams of one UDP flow, all of one size but a shorter last: one USO
    super-packet (GSO_UDP_L4), which the kernel cuts back at exactly those boundaries."""

    __slots__ = ("fixed", "gso", "l4", "members", "next_id", "total")

    # (fixed bytes, IPv4 id or IPv6 payload length, fixed bytes)
    SHAPES: ClassVar[dict[int, struct.Struct]] = {
        20: struct.Struct("!2s2xH4s"),
        40: struct.Struct("!4sH2s"),
    }

    def __init__(self, p: bytes, l4: int, hlen: int) -> None:
        self.members = [p]
        self.l4 = l4
        self.gso = len(p) - hlen
        self.total = len(p)
        a, ident, b = self.SHAPES[l4].unpack_from(p)
        self.fixed = (a, b)
        self.next_id = (ident + 1) & 0xFFFF

    def take(self, p: bytes, hlen: int) -> bool:
        size = len(p) - hlen
        if (
            hlen != self.l4 + 8
            or size > self.gso
            or len(self.members) >= _MAX_UDP_SEGMENTS
            or self.total + size > _MAX_IP_LEN
        ):
            return False
        a, ident, b = self.SHAPES[self.l4].unpack_from(p)
        if (a, b) != self.fixed or (self.l4 == 20 and ident != self.next_id):
            return False
        self.members.append(p)
        self.total += size
        self.next_id = (self.next_id + 1) & 0xFFFF
        return True

    def closed_by(self, p: bytes) -> bool:
        return len(p) - self.l4 - 8 < self.gso

    def build(self) -> bytes:
        members, l4, total = self.members, self.l4, self.total
        first = members[0]
        if len(members) == 1:
            return _PLAIN + first
        hdr = bytearray(first[: l4 + 8])
        _set_ip_length(hdr, l4, total)
        _U16.pack_into(hdr, l4 + 4, total - l4)  # the UDP length of the whole
        _U16.pack_into(hdr, l4 + 6, _pseudo_sum(first, _PROTO_UDP, total - l4))
        vnet = _VNET.pack(NEEDS_CSUM, GSO_UDP_L4, l4 + 8, self.gso, l4, 6)
        return b"".join([vnet, hdr, *(memoryview(p)[l4 + 8 :] for p in members)])


def _classify(p: bytes) -> tuple[bytes | None, int, int, bool]:
    """(flow key, L4 offset, header length if `p` may be coalesced else 0, UDP?).

    key None: neither TCP nor UDP, order against flows does not matter. key b"": TCP or
    UDP we cannot place in a flow (fragment, IPv6 extension headers): every open run must
    end. UDP keys end in a 0x11 byte, so that they never meet a TCP flow's.
    """
    n = len(p)
    if n < 20:
        return None, 0, 0, False
    version = p[0] >> 4
    if version == 4:
        proto = p[9]
        if proto != _PROTO_TCP and proto != _PROTO_UDP:
            return None, 0, 0, False
        l4 = (p[0] & 15) * 4
        # MF or a fragment offset, or too short: no usable L4 header
        if p[6] & 0x3F or p[7] or n < l4 + (20 if proto == _PROTO_TCP else 8):
            return b"", 0, 0, False
        # addresses and ports: contiguous unless there are IP options (never merged)
        key = p[IPV4_FLOW] if l4 == 20 else p[IPV4_ADDRS] + p[l4 : l4 + 4]
        ok = l4 == 20 and (p[2] << 8 | p[3]) == n
    elif version == 6:
        proto = p[6] if n >= 40 else 0
        if proto != _PROTO_TCP and proto != _PROTO_UDP:
            return (b"" if n >= 40 and proto in _V6_EXT else None), 0, 0, False
        l4 = 40
        if n < (60 if proto == _PROTO_TCP else 48):
            return b"", 0, 0, False
        key = p[IPV6_FLOW]
        ok = (p[4] << 8 | p[5]) + 40 == n
    else:
        return None, 0, 0, False
    if proto == _PROTO_UDP:
        key += b"\x11"
        # whole datagrams with a payload and a checksum (an IPv4 zero means "none")
        ok = ok and (p[l4 + 4] << 8 | p[l4 + 5]) == n - l4 > 8 and (p[l4 + 6] | p[l4 + 7]) > 0
        return key, l4, l4 + 8 if ok else 0, True
    hlen = l4 + (p[l4 + 12] >> 4) * 4
    if not (ok and l4 + 20 <= hlen < n and p[l4 + 13] in _MERGEABLE_FLAGS):
        return key, l4, 0, False
    # Inner checksums are not verified: like Linux's WireGuard, which marks what it
    # decrypted CHECKSUM_UNNECESSARY, we rely on the Poly1305 tag, which already proved
    # that the packet is exactly what the peer sent. (Verifying costs 3 us a segment.)
    return key, l4, hlen, False


def packets_of(items: Iterable[ToTun]) -> list[bytes]:
    """`Output.tun`'s items (packets, and runs of them as `open_batch` made them) as one
    packet each: O(1) Python work per run (a run's list is extended in C)."""
    packets: list[bytes] = []
    for item in items:
        if isinstance(item, bytes | bytearray | memoryview):
            packets.append(item)  # type: ignore[arg-type]  # a bytes-like packet
        else:
            packets += item
    return packets


def coalesce(packets: Iterable[ToTun], udp: bool = True) -> list[bytes]:
    """Group decrypted packets into TUN writes, each starting with a virtio header. An
    item is a packet or a run of them (`Output.tun`: see `packets_of`).

    Segments of one TCP flow merge when they are consecutive *within that flow* (packets of
    other flows may sit between them): each output buffer is placed where its first packet
    was, so no flow is ever reordered. Anything unusual (not TCP, IPv4 options, no payload,
    flags other than ACK or a final ACK|PSH) goes out alone, unchanged. Datagrams of one
    UDP flow merge likewise when they share a size (but a shorter last): `udp=False` for
    kernels without USO on TUN writes.
    IPv4 segments merge only if their ids count up by one, as the kernel recreates them.
    """
    items: list[bytes | _Run | _UdpRun] = []
    runs: dict[bytes, _Run | _UdpRun] = {}  # flow key -> its run still open for more
    last: _Run | None = None  # the TCP run the previous packet went into, if still open
    last_key = b""
    for p in packets_of(packets):
        if last is not None:
            if last.follows(p, last_key):
                if last.closed_by(p):
                    del runs[last_key]
                    last = None
                continue
            last = None
        key, l4, hlen, is_udp = _classify(p)
        if key is None or (is_udp and not udp):
            items.append(_PLAIN + p)
            continue
        if not key:
            runs.clear()
            items.append(_PLAIN + p)
            continue
        run = runs.get(key)
        if not hlen:
            if run is not None:
                del runs[key]
            items.append(_PLAIN + p)
            continue
        if run is None or not run.take(p, hlen):
            run = _UdpRun(p, l4, hlen) if is_udp else _Run(p, l4, hlen)
            items.append(run)
        if run.closed_by(p):
            runs.pop(key, None)
        else:
            runs[key] = run
            if isinstance(run, _Run):
                last, last_key = run, key
    return [it if isinstance(it, bytes) else it.build() for it in items]


# ---------------------------------------------------------------- splitting (TUN reads)


def split(buf: bytes | bytearray | memoryview, mtu: int) -> list[bytes]:
    """Turn one TUN read (virtio header + packet) into plain packets with full checksums.

    `mtu` stands in for gso_size if the kernel left that zero. A buffer we cannot parse
    (or a gso type we never offered, such as UFO) yields no packet: it is dropped.
    """
    view = memoryview(buf)
    if len(view) < VNET_HDR_LEN:
        return []
    flags, gso_type, _, gso_size, csum_start, csum_offset = _VNET.unpack_from(view)
    pkt = view[VNET_HDR_LEN:]
    gso = gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if flags & NEEDS_CSUM:
            return _complete(pkt, csum_start, csum_offset)
        return [bytes(pkt)]
    if gso in (GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4) and len(pkt) >= 28:  # IPv4 + UDP at least
        l4 = csum_start if flags & NEEDS_CSUM else 0
        return segment(pkt, gso == GSO_UDP_L4, gso_size or mtu, l4)
    return []


def super_packet(buf: bytes | bytearray | memoryview, mtu: int) -> SuperPacket | None:
    """A TSO/USO read (virtio header + packet) kept whole, for the sealer to cut (core/ip.py
    SuperPacket): what `split` would make of it, but segmented only once sealed. None if
    the header asks for no segmentation, or for a kind we never offered (UFO), or if the
    packet cannot be cut: `split` for those."""
    if len(buf) < VNET_HDR_LEN + 28:  # IPv4 + UDP at least
        return None
    return super_packet_of(buf, bytes(buf[VNET_HDR_LEN:]), mtu)


def super_packet_of(header: bytes | bytearray | memoryview, packet: bytes,
                    mtu: int) -> SuperPacket | None:  # fmt: skip
    """`super_packet` of a read whose virtio header (the first VNET_HDR_LEN bytes of
    `header`) and packet lie apart (io/tun.py `read_packet`): the packet kept as it is."""
    if len(packet) < 28:  # IPv4 + UDP at least
        return None
    flags, gso_type, _, gso_size, csum_start, _ = _VNET.unpack_from(header)
    gso = gso_type & ~GSO_ECN
    if gso != GSO_TCPV4 and gso != GSO_TCPV6 and gso != GSO_UDP_L4:
        return None
    l4 = csum_start if flags & NEEDS_CSUM else 0
    return make_super_packet(packet, gso_size or mtu, l4, gso == GSO_UDP_L4)


def _complete(pkt: memoryview, start: int, offset: int) -> list[bytes]:
    """Finish a partial checksum: the field holds the pseudo-header sum, add the rest."""
    at = start + offset
    if at + 2 > len(pkt):
        return []
    out = bytearray(pkt)
    # 0 is "no checksum" for UDP; 0xFFFF is the same value in one's complement (as Linux).
    _U16.pack_into(out, at, ~checksum(pkt[start:]) & 0xFFFF or 0xFFFF)
    return [bytes(out)]
