"""Fuzz target: TUN offload (`offload.split` for reads, `offload.coalesce` for writes).

Input: the first byte picks the function. Even: `split(rest[2:], mtu)` with the MTU from
the next two bytes (big-endian), `rest` a TUN read that starts with its virtio header.
Odd: `coalesce(packets, udp=bit 1)`, packets framed as a 2-byte big-endian length and
the packet's bytes.

Invariants: nothing raises; `split` gives segments no longer than the read; `coalesce`
gives at most as many buffers as packets, each starting with a virtio header, and the
buffers split again (as the kernel would cut them) give back, per flow and in order,
exactly the packets' transport payloads, one segment per packet.
"""

from __future__ import annotations

import sys

from tests.fuzz.common import fuzz, instrumented

with instrumented():
    from wgpy.io.offload import VNET_HDR_LEN, coalesce, split

MAX_PACKETS = 128


def packets_of(data: bytes) -> list[bytes]:
    out = []
    i = 0
    while i < len(data) and len(out) < MAX_PACKETS:
        n = int.from_bytes(data[i : i + 2], "big")
        out.append(data[i + 2 : i + 2 + n])
        i += 2 + n
    return out


def frame(packets: list[bytes]) -> bytes:
    return b"".join(len(p).to_bytes(2, "big") + p for p in packets)


def flow(p: bytes) -> tuple[object, bytes]:
    """(flow key, transport payload) of a TCP or UDP packet; (None, p) for anything else.
    A segment cut from a super-packet has the same key and its share of the payload."""
    n = len(p)
    if n >= 20 and p[0] >> 4 == 4:
        proto, l4 = p[9], (p[0] & 15) * 4
        addresses = p[12:20]
    elif n >= 40 and p[0] >> 4 == 6:
        proto, l4 = p[6], 40
        addresses = p[8:40]
    else:
        return None, p
    if proto == 6 and n >= l4 + 20 and l4 >= 20:
        return (6, addresses, p[l4 : l4 + 4]), p[l4 + (p[l4 + 12] >> 4) * 4 :]
    if proto == 17 and n >= l4 + 8 and l4 >= 20:
        return (17, addresses, p[l4 : l4 + 4]), p[l4 + 8 :]
    return None, p


def per_flow(packets: list[bytes]) -> dict[object, list[bytes]]:
    flows: dict[object, list[bytes]] = {}
    for p in packets:
        key, payload = flow(p)
        flows.setdefault(key, []).append(payload)
    return flows


def check_split(buf: bytes, mtu: int) -> None:
    for segment in split(buf, mtu):
        assert isinstance(segment, bytes) and len(segment) <= len(buf)


def check_coalesce(packets: list[bytes], udp: bool) -> None:
    bufs = coalesce(packets, udp)
    assert len(bufs) <= len(packets)
    assert all(len(b) >= VNET_HDR_LEN for b in bufs)
    back = [p for b in bufs for p in split(b, 0xFFFF)]
    assert per_flow(back) == per_flow(packets), "split(coalesce(packets)) lost or moved data"


def one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        check_coalesce(packets_of(data[1:]), bool(data[0] & 2))
    else:
        check_split(data[3:], int.from_bytes(data[1:3], "big"))


if __name__ == "__main__":
    fuzz(one_input, sys.argv)
