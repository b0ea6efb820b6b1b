"""The few IP header fields the core reads (wireguard-go device/ip.go names the same),
the Internet checksum that the core (ICMP errors) and the I/O (offloads) share, and
super-packets: a TCP or UDP packet too long for the link that whoever seals it cuts into
segments (a TSO read of the TUN; io/tun.py makes them, the backends seal them).

The receive loop (core/data.py) reads the source and length with these offsets inline (a
call per packet costs measurably there); everything else calls the functions.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
IPV4_TOTAL_LEN = 2  # u16: the whole packet
IPV6_PAYLOAD_LEN = 4  # u16: what follows the fixed header
IPV4_SRC, IPV4_DST = slice(12, 16), slice(16, 20)
IPV6_SRC, IPV6_DST = slice(8, 24), slice(24, 40)
IPV4_ADDRS, IPV6_ADDRS = slice(12, 20), slice(8, 40)  # source and destination together
# addresses then ports: a flow's key, when the L4 header follows a fixed-size IP header
IPV4_FLOW, IPV6_FLOW = slice(12, 24), slice(8, 44)
PROTO_TCP, PROTO_UDP = 6, 17
MAX_IP_LEN = 0xFFFF
_FIN, _PSH, _CWR = 0x01, 0x08, 0x80  # TCP flags
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_ZERO16 = b"\0\0"


def version(packet: bytes | memoryview) -> int:
    return packet[0] >> 4 if packet else 0


def destination(packet: bytes | memoryview) -> bytes | None:
    """The destination address of an IPv4 or IPv6 packet, or None if it is neither."""
    n = len(packet)
    v = version(packet)
    if v == 4 and n >= IPV4_HEADER_LEN:
        return bytes(packet[IPV4_DST])
    if v == 6 and n >= IPV6_HEADER_LEN:
        return bytes(packet[IPV6_DST])
    return None


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """One's-complement sum of 16-bit big-endian words, folded to 16 bits, not inverted.

    An odd length is padded with a zero byte. `initial` is any earlier sum (it may be
    unfolded). Fast because it never loops in Python: 2**16 = 1 (mod 0xFFFF), so the whole
    buffer read as one big integer is congruent to the sum of its words modulo 0xFFFF; only
    zero versus 0xFFFF needs care (a non-zero sum folds to 0xFFFF, never to 0).
    A checksum field holds `~checksum(...) & 0xFFFF`; a packet verifies when the sum over
    it (field included) is 0xFFFF.
    """
    s = int.from_bytes(data, "big")
    if len(data) & 1:
        s <<= 8
    s += initial
    if not s:
        return 0
    return s % 0xFFFF or 0xFFFF


def pseudo_sum(p: bytes | memoryview, proto: int, length: int) -> int:
    """The TCP/UDP pseudo-header sum: the packet's addresses, protocol and L4 length."""
    addresses = p[IPV4_ADDRS] if p[0] >> 4 == 4 else p[IPV6_ADDRS]
    return checksum(addresses, proto + length)


def set_ip_length(hdr: bytearray, iphl: int, total: int) -> None:
    """Give the IP header at the start of `hdr` a new total length (and, for IPv4, the
    header checksum that goes with it)."""
    if hdr[0] >> 4 == 4:
        _U16.pack_into(hdr, 2, total)
        hdr[10:12] = _ZERO16
        _U16.pack_into(hdr, 10, ~checksum(hdr[:iphl]) & 0xFFFF)
    else:
        _U16.pack_into(hdr, 4, total - 40)


class SuperPacket(NamedTuple):
    """A TCP or UDP packet whose payload goes out in segments of `mss` bytes (the last may
    be shorter), each with its own headers and checksums: what a TSO read brings. Every
    segment has the packet's addresses, so it is routed once; the sealer cuts it
    (`segments` here is the reference; C's Sealer.seal_runs cuts straight into the
    datagrams). `l4`: where the TCP/UDP header starts (0: right after the IP header);
    `nsegments`: how many. Made by `super_packet`, which refuses what cannot be cut."""

    packet: bytes
    mss: int
    l4: int
    udp: bool
    nsegments: int


class _Layout(NamedTuple):
    iphl: int
    l4: int
    thl: int  # the TCP/UDP header's length
    nsegments: int


def _layout(pkt: bytes | memoryview, udp: bool, mss: int, l4: int) -> _Layout | None:
    """Where a super-packet's headers end and how many segments it makes; None for one
    that cannot be cut (garbage: the kernel never hands such a read)."""
    if not pkt:
        return None
    version = pkt[0] >> 4
    if version == 4:
        iphl = (pkt[0] & 15) * 4
        if iphl < 20:
            return None
    elif version == 6:
        iphl = 40
    else:
        return None
    l4 = l4 or iphl
    if l4 < iphl or l4 + (8 if udp else 20) > len(pkt):  # L4 inside the IP header: garbage
        return None
    thl = 8 if udp else (pkt[l4 + 12] >> 4) * 4
    hlen = l4 + thl
    if mss <= 0 or thl < (8 if udp else 20) or hlen > len(pkt):
        return None
    n = len(pkt) - hlen
    # the longest segment's IP length field: IPv4's counts the header, IPv6's does not
    if hlen + min(mss, n) - (40 if version == 6 else 0) > MAX_IP_LEN:
        return None
    return _Layout(iphl, l4, thl, max(1, -(-n // mss)))


def super_packet(packet: bytes, mss: int, l4: int, udp: bool) -> SuperPacket | None:
    """`packet` to be cut into segments of `mss` payload bytes, or None if it cannot be."""
    layout = _layout(packet, udp, mss, l4)
    return None if layout is None else SuperPacket(packet, mss, l4, udp, layout.nsegments)


def segments(sp: SuperPacket) -> list[bytes]:
    """The segments of a super-packet, each a whole IP packet with its checksums (offload's
    `split` of a TSO read; [] for one `super_packet` would refuse)."""
    return segment(memoryview(sp.packet), sp.udp, sp.mss, sp.l4)


def segment(pkt: memoryview, udp: bool, mss: int, l4: int) -> list[bytes]:
    """Cut a TSO/USO super-packet into segments of `mss` payload bytes each."""
    layout = _layout(pkt, udp, mss, l4)
    if layout is None:
        return []
    iphl, l4, thl, _ = layout
    hlen = l4 + thl
    payload = pkt[hlen:]
    n = len(payload)
    base = pseudo_sum(pkt, PROTO_UDP if udp else PROTO_TCP, 0)  # the length comes later
    hdr = bytearray(pkt[:hlen])
    hview = memoryview(hdr)
    seq = _U32.unpack_from(pkt, l4 + 4)[0]
    ip_id = _U16.unpack_from(pkt, 4)[0]
    tcp_flags = 0 if udp else pkt[l4 + 13]
    csum_at = l4 + (6 if udp else 16)
    v4 = pkt[0] >> 4 == 4
    out = []
    for i, off in enumerate(range(0, n or 1, mss)):
        chunk = payload[off : off + mss]
        l4len = thl + len(chunk)
        if v4:
            _U16.pack_into(hdr, 4, (ip_id + i) & 0xFFFF)
        set_ip_length(hdr, iphl, l4 + l4len)
        if udp:
            _U16.pack_into(hdr, l4 + 4, l4len)
        else:
            _U32.pack_into(hdr, l4 + 4, (seq + off) & 0xFFFFFFFF)
            f = tcp_flags if i == 0 else tcp_flags & ~_CWR
            hdr[l4 + 13] = f if off + mss >= n else f & ~(_PSH | _FIN)
        hdr[csum_at : csum_at + 2] = _ZERO16
        s = checksum(chunk, checksum(hview[l4:], base + l4len))  # header length is even
        c = ~s & 0xFFFF
        if udp and not c:
            c = 0xFFFF  # 0 would mean "no checksum"
        _U16.pack_into(hdr, csum_at, c)
        out.append(b"".join((hdr, chunk)))
    return out
