"""virtio_net_hdr framing for an IFF_VNET_HDR TUN (plain headers; coalescing comes next)."""

from __future__ import annotations

VNET_HDR_LEN = 10
_PLAIN = bytes(VNET_HDR_LEN)


def plain_header() -> bytes:
    return _PLAIN


def coalesce(packets: list[bytes]) -> list[bytes]:
    return [_PLAIN + p for p in packets]


def split(buf: bytes | memoryview, mtu: int) -> list[bytes]:
    return [bytes(buf[VNET_HDR_LEN:])]
