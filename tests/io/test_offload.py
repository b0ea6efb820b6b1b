"""Tests for wgpy.io.offload: checksums, GSO coalescing for TUN writes, splitting reads."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgpy.core.ip import checksum
from wgpy.io import offload
from wgpy.io.offload import VNET_HDR_LEN, coalesce, plain_header, split

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 1, 2, 4, 8, 16, 32, 64, 128
V4 = (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
V6 = (bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02"))
VNET = struct.Struct("<BBHHHH")


def naive_sum(data: bytes) -> int:
    """Reference one's-complement sum: word by word, end-around carry."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += data[i] << 8 | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def ip_packet(
    proto: int,
    l4: bytes,
    csum_at: int,
    addrs: tuple[bytes, bytes] = V4,
    ip_id: int = 0,
    ip_options: bytes = b"",
) -> bytes:
    """An IPv4/IPv6 packet around `l4` with the checksum at `csum_at` filled in correctly."""
    src, dst = addrs
    c = ~naive_sum(pseudo(src, dst, proto, len(l4)) + l4) & 0xFFFF
    if proto == 17 and c == 0:
        c = 0xFFFF
    l4 = l4[:csum_at] + struct.pack("!H", c) + l4[csum_at + 2 :]
    if len(src) == 16:
        return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst) + l4
    ihl = 5 + len(ip_options) // 4
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), ip_id, 0x4000, 64, proto, 0, src, dst
    )
    hdr += ip_options
    c = ~naive_sum(hdr) & 0xFFFF
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + l4


def tcp(
    seq: int,
    payload: bytes,
    flags: int = ACK,
    addrs: tuple[bytes, bytes] = V4,
    ports: tuple[int, int] = (1000, 2000),
    ack: int = 77,
    window: int = 512,
    options: bytes = b"",
    ip_id: int = 0,
    ip_options: bytes = b"",
) -> bytes:
    off = (20 + len(options)) // 4 << 4
    hdr = struct.pack("!HHIIBBHHH", *ports, seq & 0xFFFFFFFF, ack, off, flags, window, 0, 0)
    return ip_packet(6, hdr + options + payload, 16, addrs, ip_id, ip_options)


def udp(payload: bytes, addrs: tuple[bytes, bytes] = V4, ip_id: int = 0) -> bytes:
    return ip_packet(
        17, struct.pack("!HHHH", 53, 5353, 8 + len(payload), 0) + payload, 6, addrs, ip_id
    )


def flow(
    n: int,
    size: int,
    addrs: tuple[bytes, bytes] = V4,
    seq: int = 1000,
    last: int | None = None,
    last_flags: int = ACK,
    ip_id: int = 100,
    **kw: object,
) -> list[bytes]:
    """n in-order segments of `size` payload bytes (the last of `last` bytes if given)."""
    out = []
    for i in range(n):
        final = i == n - 1
        length = last if final and last is not None else size
        payload = bytes((seq + j) & 0xFF for j in range(length))
        flags = last_flags if final else ACK
        out.append(tcp(seq, payload, flags, addrs, ip_id=(ip_id + i) & 0xFFFF, **kw))  # type: ignore[arg-type]
        seq += length
    return out


def unsplit(bufs: list[bytes]) -> list[bytes]:
    return [p for b in bufs for p in split(b, 1500)]


def n_segments(buf: bytes) -> int:
    return len(split(buf, 1500))


def valid_l4(p: bytes) -> bool:
    """The packet's TCP/UDP checksum verifies (and the IPv4 header checksum, if any)."""
    if p[0] >> 4 == 4:
        ihl = (p[0] & 15) * 4
        return (
            naive_sum(p[:ihl]) == 0xFFFF
            and naive_sum(pseudo(p[12:16], p[16:20], p[9], len(p) - ihl) + p[ihl:]) == 0xFFFF
        )
    return naive_sum(pseudo(p[8:24], p[24:40], p[6], len(p) - 40) + p[40:]) == 0xFFFF


# ---------------------------------------------------------------- checksum


@given(st.binary(max_size=300), st.integers(0, 0xFFFF))
def test_checksum_matches_word_sum(data: bytes, initial: int) -> None:
    want = naive_sum(initial.to_bytes(2, "big") + data)
    assert checksum(data, initial) == want
    assert checksum(memoryview(data), initial) == want


def test_checksum_edges() -> None:
    assert checksum(b"") == 0
    assert checksum(b"\0\0\0") == 0
    assert checksum(b"\xff\xff") == 0xFFFF
    assert checksum(b"\xff\xff\x00\x01") == 1  # end-around carry
    assert checksum(b"\x01") == 0x0100  # odd length pads a zero byte
    assert checksum(b"\x80\x00\x80\x00") == 1
    assert plain_header() == bytes(VNET_HDR_LEN)


# ---------------------------------------------------------------- coalesce


def check_super(buf: bytes, packets: list[bytes]) -> None:
    """`buf` is the correct GSO super-packet for `packets`."""
    first = packets[0]
    v6 = first[0] >> 4 == 6
    l4 = 40 if v6 else 20
    hlen = l4 + (first[l4 + 12] >> 4) * 4
    flags, gso_type, hdr_len, gso_size, start, offset = VNET.unpack_from(buf)
    assert (flags, gso_type, hdr_len, gso_size, start, offset) == (
        offload.NEEDS_CSUM,
        offload.GSO_TCPV6 if v6 else offload.GSO_TCPV4,
        hlen,
        len(first) - hlen,
        l4,
        16,
    )
    pkt = buf[VNET_HDR_LEN:]
    assert pkt[hlen:] == b"".join(p[hlen:] for p in packets)
    if v6:
        assert struct.unpack_from("!H", pkt, 4)[0] == len(pkt) - 40
        assert pkt[:4] + pkt[6:40] == first[:4] + first[6:40]
        src, dst = pkt[8:24], pkt[24:40]
    else:
        assert struct.unpack_from("!H", pkt, 2)[0] == len(pkt)
        assert naive_sum(pkt[:20]) == 0xFFFF
        assert pkt[:2] + pkt[4:10] + pkt[12:20] == first[:2] + first[4:10] + first[12:20]
        src, dst = pkt[12:16], pkt[16:20]
    # The TCP checksum field holds the folded, non-inverted pseudo-header sum of the whole.
    assert struct.unpack_from("!H", pkt, l4 + 16)[0] == naive_sum(
        pseudo(src, dst, 6, len(pkt) - l4)
    )
    # Finishing it the way the kernel/NIC does gives a valid checksum for the whole packet.
    done = bytearray(pkt)
    done[l4 + 16 : l4 + 18] = struct.pack("!H", ~naive_sum(pkt[start:]) & 0xFFFF)
    assert valid_l4(bytes(done))
    assert (
        pkt[l4 : l4 + 13] + pkt[l4 + 14 : l4 + 16] == first[l4 : l4 + 13] + first[l4 + 14 : l4 + 16]
    )
    assert pkt[l4 + 13] == packets[-1][l4 + 13]  # flags of the last segment (its PSH)
    assert pkt[l4 + 18 : hlen] == first[l4 + 18 : hlen]


def test_coalesce_v4_one_super_packet() -> None:
    packets = flow(10, 1000, last=300, last_flags=ACK | PSH)
    out = coalesce(packets)
    assert len(out) == 1
    check_super(out[0], packets)
    assert unsplit(out) == packets


def test_coalesce_v6_with_options() -> None:
    opts = b"\x01\x01\x08\x0a" + bytes(range(8))  # NOP NOP timestamp
    packets = flow(7, 1200, V6, options=opts, seq=0xFFFFF000)  # seq wraps around 2**32
    out = coalesce(packets)
    assert len(out) == 1
    check_super(out[0], packets)
    assert unsplit(out) == packets


def test_coalesce_respects_64k_limit() -> None:
    packets = flow(100, 1400)
    out = coalesce(packets)
    assert [n_segments(b) for b in out] == [46, 46, 8]  # 40 + 46 * 1400 <= 65535 < 40 + 47 * 1400
    for b in out:
        assert len(b) - VNET_HDR_LEN <= 0xFFFF
    assert unsplit(out) == packets


def test_single_and_non_tcp_pass_through() -> None:
    others = [udp(b"x" * 30), udp(b"y" * 40, V6), b"\x45garbage", b"", bytes(60)]
    single = flow(1, 500)
    out = coalesce([*others, *single])
    assert out == [plain_header() + p for p in [*others, *single]]


def test_flags_end_runs() -> None:
    for bad in (FIN, RST, SYN, URG, CWR | ACK, ECE | ACK, FIN | ACK, RST | ACK):
        packets = [*flow(4, 800), tcp(1000 + 4 * 800, b"z" * 800, bad), *flow(3, 800, seq=4200)]
        out = coalesce(packets)
        assert [n_segments(b) for b in out] == [4, 1, 3], bad
        assert out[1] == plain_header() + packets[4]
    # PSH may end a run but never sits inside one
    packets = flow(3, 800, last_flags=ACK | PSH) + flow(3, 800, seq=1000 + 3 * 800, ip_id=103)
    assert [n_segments(b) for b in coalesce(packets)] == [3, 3]


def test_mismatches_end_runs() -> None:
    base = flow(3, 800)
    nxt = 1000 + 3 * 800
    cases = {
        "seq gap": tcp(nxt + 1, b"a" * 800, ip_id=103),
        "ack": tcp(nxt, b"a" * 800, ack=78, ip_id=103),
        "window": tcp(nxt, b"a" * 800, window=513, ip_id=103),
        "ip id": tcp(nxt, b"a" * 800, ip_id=105),
        "longer": tcp(nxt, b"a" * 801, ip_id=103),
        "options": tcp(nxt, b"a" * 800, ip_id=103, options=b"\x01\x01\x01\x01"),
    }
    for name, p in cases.items():
        out = coalesce([*base, p])
        assert [n_segments(b) for b in out] == [3, 1], name
        assert unsplit(out) == [*base, p], name
    # a short segment ends its run
    packets = [*flow(3, 800, last=100), tcp(1000 + 1700, b"b" * 800, ip_id=103)]
    assert [n_segments(b) for b in coalesce(packets)] == [3, 1]


def test_interleaved_flows_keep_their_order() -> None:
    a = flow(4, 700)
    b = flow(4, 900, V6)
    c = flow(4, 600, ports=(3000, 4000))
    mixed = [p for trio in zip(a, b, c, strict=True) for p in trio]
    mixed.insert(5, udp(b"hello"))
    out = coalesce(mixed)
    assert len(out) == 4
    check_super(out[0], a)
    check_super(out[1], b)
    check_super(out[2], c)
    assert out[3] == plain_header() + udp(b"hello")


def test_inner_checksums_are_not_verified() -> None:
    """Decrypted packets are authenticated, so, as Linux's WireGuard does, we trust their
    checksums: a segment with a wrong one still joins its run (the kernel recomputes)."""
    packets = flow(6, 500)
    bad = bytearray(packets[3])
    bad[-1] ^= 1
    packets[3] = bytes(bad)
    assert [n_segments(b) for b in coalesce(packets)] == [6]


def test_ipv4_options_not_merged() -> None:
    packets = flow(4, 500, ip_options=b"\x01\x01\x01\x00")
    assert coalesce(packets) == [plain_header() + p for p in packets]


def test_unplaceable_tcp_ends_all_runs() -> None:
    a = flow(4, 500)
    frag = bytearray(tcp(9, b"q" * 100, ports=(5, 6)))
    frag[6] |= 0x20  # more fragments: no flow can be trusted after it
    packets = [*a[:2], bytes(frag), *a[2:]]
    assert [n_segments(b) for b in coalesce(packets)] == [2, 1, 2]


@st.composite
def traffic(draw: st.DrawFn) -> list[bytes]:
    streams: list[list[bytes]] = []
    for k in range(draw(st.integers(1, 4))):
        addrs = draw(st.sampled_from([V4, V6]))
        size = draw(st.integers(1, 1400))
        last = draw(st.one_of(st.none(), st.integers(1, size)))
        flags = draw(st.sampled_from([ACK, ACK | PSH, ACK | FIN]))
        n = draw(st.integers(1, 60))
        seq = draw(st.integers(0, 2**32 - 1))
        ip_id = draw(st.integers(0, 0xFFFF))
        streams.append(flow(n, size, addrs, seq, last, flags, ip_id, ports=(k, 80)))
    streams.append([udp(bytes(k)) for k in range(draw(st.integers(0, 3)))])
    rng = random.Random(draw(st.integers(0, 2**32)))
    mixed = []
    while any(streams):
        s = rng.choice([s for s in streams if s])
        mixed.append(s.pop(0))
    return mixed


def key(p: bytes) -> bytes:
    if p[0] >> 4 == 4:
        return p[12:24] if p[9] == 6 else b"other"
    return p[8:44] if p[6] == 6 else b"other"


@settings(max_examples=60, deadline=None)
@given(traffic())
def test_split_inverts_coalesce(packets: list[bytes]) -> None:
    out = coalesce(packets)
    back = unsplit(out)
    assert sorted(back) == sorted(packets)
    for k in {key(p) for p in packets}:  # order within each flow is kept
        assert [p for p in back if key(p) == k] == [p for p in packets if key(p) == k]
    assert len(out) <= len(packets)


@given(st.lists(st.binary(max_size=80), max_size=8))
def test_coalesce_never_fails_on_garbage(packets: list[bytes]) -> None:
    out = coalesce(packets)
    assert len(out) <= len(packets)


# ---------------------------------------------------------------- split


def test_split_plain_and_partial_checksum() -> None:
    for p in (tcp(5, b"data" * 100), tcp(5, b"odd", addrs=V6), udp(b"abc"), udp(b"", V6)):
        assert split(plain_header() + p, 1500) == [p]
        v6 = p[0] >> 4 == 6
        l4 = 40 if v6 else 20
        at = l4 + (16 if (p[6] if v6 else p[9]) == 6 else 6)
        src, dst = (p[8:24], p[24:40]) if v6 else (p[12:16], p[16:20])
        partial = bytearray(p)
        proto = p[6] if v6 else p[9]
        struct.pack_into("!H", partial, at, naive_sum(pseudo(src, dst, proto, len(p) - l4)))
        hdr = VNET.pack(offload.NEEDS_CSUM, 0, 0, 0, l4, at - l4)
        got = split(hdr + bytes(partial), 1500)
        assert len(got) == 1 and valid_l4(got[0])
        assert got[0][:at] + got[0][at + 2 :] == p[:at] + p[at + 2 :]


def test_split_tcp_flags_and_ids() -> None:
    packets = flow(4, 1000, last=10)
    sup = bytearray(coalesce(packets)[0])
    sup[VNET_HDR_LEN + 20 + 13] = ACK | PSH | FIN | CWR | ECE
    segs = split(bytes(sup), 1500)
    assert [s[20 + 13] for s in segs] == [
        ACK | CWR | ECE,
        ACK | ECE,
        ACK | ECE,
        ACK | PSH | FIN | ECE,
    ]
    assert [struct.unpack_from("!H", s, 4)[0] for s in segs] == [100, 101, 102, 103]
    assert all(valid_l4(s) for s in segs)
    # the ECN bit in gso_type does not change how the packet is cut
    sup[1] |= offload.GSO_ECN
    assert len(split(bytes(sup), 1500)) == 4


def test_split_udp_l4() -> None:
    for addrs in (V4, V6):
        want = [udp(bytes([i]) * (300 if i < 3 else 77), addrs, ip_id=7 + i) for i in range(4)]
        l4 = 20 if addrs is V4 else 40
        payload = b"".join(p[l4 + 8 :] for p in want)
        sup = bytearray(udp(payload, addrs, ip_id=7))
        vnet = VNET.pack(offload.NEEDS_CSUM, offload.GSO_UDP_L4, l4 + 8, 300, l4, 6)
        assert split(vnet + bytes(sup), 1500) == want


def test_split_uses_mtu_when_gso_size_missing() -> None:
    packets = flow(3, 1000)
    sup = bytearray(coalesce(packets)[0])
    struct.pack_into("<H", sup, 4, 0)
    assert split(bytes(sup), 1000) == packets


def test_split_drops_malformed() -> None:
    sup = bytearray(coalesce(flow(3, 100))[0])
    for off in range(5):  # TCP data offset below 20 bytes
        sup[VNET_HDR_LEN + 20 + 12] = off << 4
        assert split(bytes(sup), 1500) == []
    assert split(b"\x01\x01", 1500) == []
    assert split(VNET.pack(1, offload.GSO_UDP, 28, 100, 20, 6) + udp(bytes(300)), 1500) == []


@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 80),
    st.integers(0, 80),
    st.binary(max_size=200),
)
def test_split_never_fails_on_garbage(
    flags: int, gso: int, size: int, start: int, offset: int, data: bytes
) -> None:
    for pkt in (data, tcp(1, data), tcp(1, data, addrs=V6), udp(data)):
        for b in (VNET.pack(flags, gso, 0, size, start, offset) + pkt, pkt):
            for p in split(b, 1500):
                assert len(p) <= len(b)


# ---------------------------------------------------------------- the real kernel

# Runs inside a fresh network namespace: tun0 (IFF_VNET_HDR) takes our writes, the kernel
# forwards them out of tun1, and we print what tun1 reads. With tun1 plain, the kernel
# itself must cut our super-packets and finish their checksums from the pseudo-header sum.
CHILD = r"""
import fcntl, json, os, select, struct, subprocess, sys, time
mode, bufs = json.loads(sys.stdin.read())
def tun(name, vnet, offload):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    flags = 0x0001 | 0x1000 | (0x4000 if vnet else 0)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", name.encode(), flags))
    if vnet:
        fcntl.ioctl(fd, 0x400454D0, offload)
    return fd
w = tun("tun0", True, 7)
r = tun("tun1", mode == "tso", 7)
for cmd in (
    "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
    "sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0",
    "ip link set tun0 up", "ip link set tun1 up",
    "ip addr add 10.0.0.1/24 dev tun0", "ip addr add 10.1.0.1/24 dev tun1",
    "ip addr add fd00::1/64 dev tun0 nodad", "ip addr add fd01::1/64 dev tun1 nodad",
):
    subprocess.run(cmd.split(), check=True)
for b in bufs:
    os.write(w, bytes.fromhex(b))
got, deadline = [], time.monotonic() + 3
while time.monotonic() < deadline:
    if select.select([r], [], [], 0.3)[0]:
        got.append(os.read(r, 70000).hex())
    elif got:
        break
print(json.dumps(got))
"""


def forwarded(p: bytes) -> bytes:
    """`p` as it leaves the router: TTL / hop limit one lower."""
    q = bytearray(p)
    if p[0] >> 4 == 6:
        q[7] -= 1
        return bytes(q)
    q[8] -= 1
    q[10:12] = b"\0\0"
    q[10:12] = struct.pack("!H", ~naive_sum(bytes(q[:20])) & 0xFFFF)
    return bytes(q)


def through_kernel(bufs: list[bytes], mode: str) -> list[bytes]:
    import json
    import os
    import subprocess
    import sys

    import pytest

    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    ns = f"wgpy-offload-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        res = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CHILD],
            input=json.dumps([mode, [b.hex() for b in bufs]]),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return [bytes.fromhex(h) for h in json.loads(res.stdout)]


def kernel_traffic() -> list[bytes]:
    dst4 = (bytes([10, 0, 0, 2]), bytes([10, 1, 0, 2]))
    dst6 = (bytes.fromhex("fd00" + "00" * 13 + "02"), bytes.fromhex("fd01" + "00" * 13 + "02"))
    a = flow(30, 1400, dst4, last=123, last_flags=ACK | PSH)
    b = flow(20, 1300, dst6, options=b"\x01\x01\x08\x0a" + bytes(range(8)))
    return [*a, udp(b"ping", dst4), *b]


def ours(packets: list[bytes]) -> list[bytes]:
    """Our packets, sorted, without the kernel's own (IPv6 router solicitations, MLD)."""
    return sorted(p for p in packets if p[0] >> 4 == 4 or p[8:10] == b"\xfd\x00")


def test_kernel_segments_our_super_packets() -> None:
    packets = kernel_traffic()
    bufs = coalesce(packets)
    assert len(bufs) == 3
    got = through_kernel(bufs, "plain")
    assert ours(got) == sorted(forwarded(p) for p in packets)


def test_split_reads_kernel_tso() -> None:
    packets = kernel_traffic()
    got = through_kernel(coalesce(packets), "tso")
    assert sum(b[1] != 0 for b in got) >= 2  # the kernel really handed us GSO super-packets
    assert ours([p for b in got for p in split(b, 1500)]) == sorted(map(forwarded, packets))


# ---------------------------------------------------------------- UDP (USO) coalescing


def udp_flow(sizes: list[int], addrs: tuple[bytes, bytes] = V4, ip_id: int = 40) -> list[bytes]:
    return [
        udp(bytes([i]) * size, addrs, ip_id=(ip_id + i) & 0xFFFF) for i, size in enumerate(sizes)
    ]


def test_udp_datagrams_of_one_size_become_one_uso_write() -> None:
    for addrs in (V4, V6):
        packets = udp_flow([300] * 5 + [120], addrs)
        out = coalesce(packets)
        assert len(out) == 1
        flags, gso_type, hdr_len, gso_size, start, offset = VNET.unpack_from(out[0])
        l4 = 20 if addrs is V4 else 40
        assert (flags, gso_type, hdr_len, gso_size, start, offset) == (1, 5, l4 + 8, 300, l4, 6)
        assert split(out[0], 1500) == packets
        # a longer datagram starts a new run (which a shorter one may close); nothing
        # follows a shorter one
        assert len(coalesce(udp_flow([300, 300, 400, 300], addrs))) == 2
        assert len(coalesce(udp_flow([300, 100, 300], addrs))) == 2
        assert coalesce(packets, udp=False) == [plain_header() + p for p in packets]


def test_udp_without_checksum_or_with_gapped_ids_goes_alone() -> None:
    packets = udp_flow([200] * 3)
    no_sum = bytearray(packets[1])
    no_sum[26:28] = b"\0\0"  # IPv4 UDP checksum 0: "none"; the kernel would add one
    assert len(coalesce([packets[0], bytes(no_sum), packets[2]])) == 3
    assert len(coalesce([packets[0], packets[2]])) == 2  # ids 40, 42


@given(st.lists(st.tuples(st.sampled_from([0, 1]), st.integers(1, 600)), min_size=1, max_size=40))
@settings(max_examples=60)
def test_udp_coalesce_then_split_gives_back_each_flow(script: list[tuple[int, int]]) -> None:
    flows: dict[int, list[bytes]] = {0: [], 1: []}
    mixed = []
    for which, size in script:
        addrs = V4 if which == 0 else V6
        p = udp(bytes([len(flows[which]) & 0xFF]) * size, addrs, ip_id=len(flows[which]))
        flows[which].append(p)
        mixed.append(p)
    back = unsplit(coalesce(mixed))
    assert [p for p in back if p[0] >> 4 == 4] == flows[0]
    assert [p for p in back if p[0] >> 4 == 6] == flows[1]


USO_KERNEL = """
import socket, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/src")
from tests.io.test_offload import udp_flow
from wgpy.io.offload import coalesce
from wgpy.io.tun import Tun
import subprocess
t = Tun.create("usot0", vnet_hdr=True)
subprocess.run(["ip", "addr", "add", "10.0.0.2/24", "dev", "usot0"], check=True)
subprocess.run(["ip", "link", "set", "usot0", "up"], check=True)
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.bind(("10.0.0.2", 5353))
r.settimeout(2)
packets = udp_flow([500] * 7 + [33])
(super_packet,) = coalesce(packets)
t.write(super_packet)
got = [r.recv(2000) for _ in packets]
print(got == [p[28:] for p in packets])
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace")
def test_kernel_cuts_our_uso_write_into_the_datagrams() -> None:
    ns = f"wgpy-uso{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", USO_KERNEL.format(root=root)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.stdout.strip() == "True", done.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_split_refuses_garbage_headers_without_raising() -> None:
    """Found by fuzzing (and by the native differential test): an IPv4 header length
    under 20 once resized a buffer in use, and an oversized segment overflowed a u16."""
    tiny_ihl = VNET.pack(0, offload.GSO_UDP_L4, 0, 100, 0, 0) + b"\x40" + bytes(40)
    assert split(tiny_ihl, 1420) == []
    huge = VNET.pack(1, offload.GSO_TCPV4, 0, 65535, 20, 16) + b"\x45" + bytes(70000)
    assert split(huge, 1420) == []
