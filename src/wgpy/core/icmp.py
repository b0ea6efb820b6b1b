"""ICMP "unreachable" for packets the device cannot send, as Linux WireGuard does it.

Linux's WireGuard answers a packet from the host that no peer's allowed IPs cover, or whose
peer has no endpoint, with `icmp_ndo_send`: ICMP destination unreachable, host unreachable
(type 3 code 1) for IPv4, ICMPv6 destination unreachable, address unreachable (type 1 code 3)
for IPv6. `ping` then says "Destination Host Unreachable" at once instead of timing out.

What Linux's `icmp_send` / `icmp6_send` do and this module copies:
- the error quotes as much of the offending packet as fits in 576 bytes (IPv4: the RFC 1812
  minimum MTU) or 1280 bytes (IPv6: the minimum MTU), headers of the error included;
- no error about an ICMP error (IPv4 types 3, 4, 5, 11, 12 and unknown types past 18;
  ICMPv6 types below 128), about a fragment other than the first, about a packet to a
  multicast or broadcast address, or from an unspecified or multicast source;
- a global token bucket: `icmp_msgs_per_sec` = 1000, `icmp_msgs_burst` = 50.

The source address: Linux picks the address of the interface the error leaves through
(wg0's own address). The core does not know the interface's addresses, and the original
source (the host's own address) would be dropped by the kernel as a martian ("a packet from
myself arriving on wg0"). wgpy uses the original *destination*: it passes reverse-path
filtering (the host routes that address into this very interface), and `ping` names the
address it could not reach ("From 10.0.0.9 icmp_seq=1 Destination Host Unreachable").

Pure functions; the device sends the errors under a `TokenBucket(RATE, BURST)` (time
injected): the core stays sans-I/O.
"""

from __future__ import annotations

import struct

from wgpy.core.ip import checksum

IPV4_MAX = 576  # an ICMPv4 error is at most this long (Linux: 576 - headers of quote)
IPV6_MAX = 1280  # an ICMPv6 error is at most the IPv6 minimum MTU
RATE = 1000.0  # errors per second (net.ipv4.icmp_msgs_per_sec)
BURST = 50  # (net.ipv4.icmp_msgs_burst)

ICMP_DEST_UNREACH, ICMP_HOST_UNREACH = 3, 1
ICMPV6_DEST_UNREACH, ICMPV6_ADDR_UNREACH = 1, 3
_PROTO_ICMP, _PROTO_ICMPV6 = 1, 58
_ICMP_ERRORS = frozenset((3, 4, 5, 11, 12))  # Linux icmp_pointers[].error
_NR_ICMP_TYPES = 18
_V6_EXT_HEADERS = frozenset((0, 43, 60))  # hop-by-hop, routing, destination options
_V6_FRAGMENT = 44
_TTL = 64
_IPV4 = struct.Struct(">BBHHHBBH4s4s")


def unreachable(packet: bytes | bytearray | memoryview) -> bytes | None:
    """The ICMP error answering `packet` (an IP packet from the host), or None when Linux
    would not send one."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        return _unreachable_v4(bytes(packet))
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        return _unreachable_v6(bytes(packet))
    return None


def _unreachable_v4(packet: bytes) -> bytes | None:
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl:
        return None
    if struct.unpack_from(">H", packet, 6)[0] & 0x1FFF:
        return None  # not the first fragment
    src, dst = packet[12:16], packet[16:20]
    if dst[0] >= 224 or src[0] >= 224 or src == bytes(4):
        return None  # multicast, broadcast, class E, or no source to answer
    if packet[9] == _PROTO_ICMP:
        if len(packet) < ihl + 1:
            return None
        kind = packet[ihl]
        if kind > _NR_ICMP_TYPES or kind in _ICMP_ERRORS:
            return None
    quote = packet[: IPV4_MAX - 20 - 8]
    body = bytearray(struct.pack(">BBHI", ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, 0, 0) + quote)
    struct.pack_into(">H", body, 2, ~checksum(body) & 0xFFFF)
    tos = (packet[1] & 0x1E) | 0xC0  # IPTOS_TOS_MASK | IPTOS_PREC_INTERNETCONTROL
    header = bytearray(_IPV4.pack(0x45, tos, 20 + len(body), 0, 0, _TTL, _PROTO_ICMP, 0, dst, src))
    struct.pack_into(">H", header, 10, ~checksum(header) & 0xFFFF)
    return bytes(header + body)


def _unreachable_v6(packet: bytes) -> bytes | None:
    src, dst = packet[8:24], packet[24:40]
    if dst[0] == 0xFF or src[0] == 0xFF or src == bytes(16):
        return None  # multicast destination or source, or the unspecified source
    next_header, at = packet[6], 40
    while next_header in _V6_EXT_HEADERS or next_header == _V6_FRAGMENT:
        if len(packet) < at + 8:
            return None
        if next_header == _V6_FRAGMENT:
            if struct.unpack_from(">H", packet, at + 2)[0] & 0xFFF8:
                return None  # not the first fragment
            length = 8
        else:
            length = (packet[at + 1] + 1) * 8
        next_header, at = packet[at], at + length
    if next_header == _PROTO_ICMPV6:
        if len(packet) < at + 1:
            return None
        if packet[at] < 128:
            return None  # an ICMPv6 error
    quote = packet[: IPV6_MAX - 40 - 8]
    body = bytearray(struct.pack(">BBHI", ICMPV6_DEST_UNREACH, ICMPV6_ADDR_UNREACH, 0, 0) + quote)
    # the pseudo-header: source, destination, upper-layer length, next header
    pseudo = dst + src + struct.pack(">I3xB", len(body), _PROTO_ICMPV6)
    struct.pack_into(">H", body, 2, ~checksum(pseudo + body) & 0xFFFF)
    header = struct.pack(">IHBB", 6 << 28, len(body), _PROTO_ICMPV6, _TTL) + dst + src
    return header + bytes(body)
