"""The few IP header fields the core reads (wireguard-go device/ip.go names the same),
and the Internet checksum that the core (ICMP errors) and the I/O (offloads) share.

The receive loop (core/data.py) reads the source and length with these offsets inline (a
call per packet costs measurably there); everything else calls the functions.
"""

from __future__ import annotations

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
IPV4_TOTAL_LEN = 2  # u16: the whole packet
IPV6_PAYLOAD_LEN = 4  # u16: what follows the fixed header
IPV4_SRC, IPV4_DST = slice(12, 16), slice(16, 20)
IPV6_SRC, IPV6_DST = slice(8, 24), slice(24, 40)
IPV4_ADDRS, IPV6_ADDRS = slice(12, 20), slice(8, 40)  # source and destination together
# addresses then ports: a flow's key, when the L4 header follows a fixed-size IP header
IPV4_FLOW, IPV6_FLOW = slice(12, 24), slice(8, 44)


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
