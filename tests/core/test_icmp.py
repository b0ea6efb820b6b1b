"""ICMP unreachable for packets the device cannot send: format, checksums, quoting, limits."""

from __future__ import annotations

import ipaddress
import struct

from wgpy.core import icmp
from wgpy.core.crypto import clamp
from wgpy.core.device import Device
from wgpy.core.ip import checksum
from wgpy.core.output import Drop
from wgpy.core.tokenbucket import TokenBucket
from wgpy.sim import ipv4_packet


def v4(src: str, dst: str, payload: bytes = b"x" * 20, proto: int = 17, frag: int = 0) -> bytes:
    p = bytearray(ipv4_packet(src, dst, payload, proto))
    struct.pack_into(">H", p, 6, frag)
    struct.pack_into(">H", p, 10, 0)
    struct.pack_into(">H", p, 10, ~checksum(p[:20]) & 0xFFFF)
    return bytes(p)


def v6(src: str, dst: str, payload: bytes = b"y" * 20, next_header: int = 17) -> bytes:
    return (
        struct.pack(">IHBB", 0x60000000, len(payload), next_header, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )


def echo_request(n: int = 56) -> bytes:
    return struct.pack(">BBHHH", 8, 0, 0, 1, 1) + bytes(n)


def test_checksum_rfc1071_example() -> None:
    # RFC 1071's worked example: the sum of these words is 0xddf2, its complement 0x220d
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum(data) == 0xDDF2 and ~checksum(data) & 0xFFFF == 0x220D
    assert checksum(data + struct.pack(">H", 0x220D)) == 0xFFFF  # it verifies


def test_v4_host_unreachable_swaps_addresses_and_checksums() -> None:
    packet = v4("10.0.0.1", "10.0.0.9", echo_request(), proto=1)
    reply = icmp.unreachable(packet)
    assert reply is not None
    assert reply[0] == 0x45 and reply[9] == 1
    assert struct.unpack_from(">H", reply, 2)[0] == len(reply)
    assert reply[12:16] == packet[16:20] and reply[16:20] == packet[12:16]
    assert checksum(reply[:20]) == 0xFFFF  # the IP header
    assert reply[20:22] == bytes((3, 1))  # destination unreachable, host unreachable
    assert checksum(reply[20:]) == 0xFFFF  # the ICMP message
    assert reply[28:] == packet  # a short packet is quoted whole


def test_v4_quotes_up_to_576_bytes() -> None:
    packet = v4("10.0.0.1", "10.0.0.9", bytes(1400))
    reply = icmp.unreachable(packet)
    assert reply is not None and len(reply) == 576
    assert reply[28:] == packet[:548]
    assert checksum(reply[20:]) == 0xFFFF


def test_v6_address_unreachable_with_pseudo_header_checksum() -> None:
    packet = v6("fd01::1", "fd01::9", echo_request(), next_header=58)
    packet = packet[:40] + bytes((128,)) + packet[41:]  # an echo request
    reply = icmp.unreachable(packet)
    assert reply is not None
    assert reply[0] >> 4 == 6 and reply[6] == 58
    assert struct.unpack_from(">H", reply, 4)[0] == len(reply) - 40
    assert reply[8:24] == packet[24:40] and reply[24:40] == packet[8:24]
    assert reply[40:42] == bytes((1, 3))  # destination unreachable, address unreachable
    pseudo = reply[8:40] + struct.pack(">I3xB", len(reply) - 40, 58)
    assert checksum(pseudo + reply[40:]) == 0xFFFF
    assert reply[48:] == packet


def test_v6_quotes_up_to_1280_bytes() -> None:
    packet = v6("fd01::1", "fd01::9", bytes(1400))
    reply = icmp.unreachable(packet)
    assert reply is not None and len(reply) == 1280
    assert reply[48:] == packet[:1232]


def test_no_reply_to_icmp_errors() -> None:
    for kind in (3, 4, 5, 11, 12, 19, 200):  # errors, and types Linux does not know
        error = struct.pack(">BBHI", kind, 0, 0, 0) + bytes(28)
        assert icmp.unreachable(v4("10.0.0.1", "10.0.0.9", error, proto=1)) is None
    for kind in (0, 8, 13):  # echo reply, echo request, timestamp: informational
        info = struct.pack(">BBHI", kind, 0, 0, 0)
        assert icmp.unreachable(v4("10.0.0.1", "10.0.0.9", info, proto=1)) is not None
    for kind in (1, 2, 3, 4, 127):
        error6 = struct.pack(">BBHI", kind, 0, 0, 0) + bytes(48)
        assert icmp.unreachable(v6("fd01::1", "fd01::9", error6, next_header=58)) is None
    # an ICMPv6 error behind a destination-options header is still an error
    opts = bytes((58, 0)) + bytes(6)
    hidden = v6("fd01::1", "fd01::9", opts + struct.pack(">BBHI", 1, 0, 0, 0), next_header=60)
    assert icmp.unreachable(hidden) is None
    echo6 = v6("fd01::1", "fd01::9", opts + struct.pack(">BBHI", 128, 0, 0, 0), next_header=60)
    assert icmp.unreachable(echo6) is not None


def test_no_reply_to_later_fragments() -> None:
    assert icmp.unreachable(v4("10.0.0.1", "10.0.0.9", frag=0x2000)) is not None  # MF, first
    assert icmp.unreachable(v4("10.0.0.1", "10.0.0.9", frag=0x0010)) is None  # offset 128
    first = struct.pack(">BBHI", 17, 0, 0x0001, 7)  # fragment header: offset 0, M=1
    later = struct.pack(">BBHI", 17, 0, 0x0100, 7)  # offset 32 (8-byte units)
    assert icmp.unreachable(v6("fd01::1", "fd01::9", first + bytes(8), 44)) is not None
    assert icmp.unreachable(v6("fd01::1", "fd01::9", later + bytes(8), 44)) is None


def test_no_reply_to_multicast_broadcast_or_no_source() -> None:
    assert icmp.unreachable(v4("10.0.0.1", "224.0.0.251")) is None
    assert icmp.unreachable(v4("10.0.0.1", "255.255.255.255")) is None
    assert icmp.unreachable(v4("0.0.0.0", "10.0.0.9")) is None
    assert icmp.unreachable(v6("fd01::1", "ff02::1")) is None
    assert icmp.unreachable(v6("::", "fd01::9")) is None
    assert icmp.unreachable(b"") is None
    assert icmp.unreachable(b"\x45" + bytes(10)) is None  # truncated


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(rate=1000, burst=50)
    assert sum(bucket.allow(10.0) for _ in range(200)) == 50
    assert not bucket.allow(10.0)
    assert sum(bucket.allow(10.015625) for _ in range(200)) == 15  # 15.6 ms: 15 more
    assert sum(bucket.allow(20.0) for _ in range(200)) == 50  # refilled to the burst only
    assert bucket.level(20.0) == 0.0 and bucket.level(20.00390625) == 3.90625  # a look takes none
    assert not bucket.allow(19.0) and bucket.level(20.00390625) == 3.90625  # a clock gone back


def device() -> Device:
    seed = iter(range(1, 1 << 30))
    dev = Device(lambda n: bytes([next(seed) % 256]) * n)
    dev.set_private_key(clamp(bytes(range(32))))
    return dev


def test_device_answers_no_route_with_icmp() -> None:
    dev = device()
    packet = v4("10.0.0.1", "10.0.0.9", echo_request(), proto=1)
    out = dev.send([packet], 1.0)
    assert out.drops[Drop.NO_ROUTE] == 1
    assert out.tun == [icmp.unreachable(packet)]


def test_device_answers_no_endpoint_with_icmp() -> None:
    dev = device()
    peer = dev.add_peer(bytes(range(1, 33)))
    assert peer is not None
    dev.allowed_ips.insert(ipaddress.IPv6Address("fd01::2").packed, 128, peer)
    packet = v6("fd01::1", "fd01::2", bytes(8))
    out = dev.send([packet], 1.0)
    assert out.drops[Drop.NO_ENDPOINT] == 1
    assert out.tun == [icmp.unreachable(packet)] and not out.udp
    assert not peer.staged


def test_device_icmp_is_rate_limited_and_can_be_off() -> None:
    dev = device()
    packets = [v4("10.0.0.1", f"10.0.1.{i % 250}") for i in range(500)]
    out = dev.send(packets, 1.0)
    assert out.drops[Drop.NO_ROUTE] == 500 and len(out.tun) == icmp.BURST
    out = dev.send(packets, 1.1)  # 100 ms later: 100 tokens, capped at the burst
    assert len(out.tun) == icmp.BURST
    dev.icmp_limit = None
    assert not dev.send(packets, 5.0).tun
