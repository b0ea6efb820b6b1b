"""Cryptokey routing table: the Linux selftest/allowedips.c cases and a model check."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgpy.core.allowedips import AllowedIPs, format_cidr, parse_cidr


def v4(a: int, b: int, c: int, d: int) -> bytes:
    return bytes([a, b, c, d])


def v6(*words: int) -> bytes:
    return b"".join(w.to_bytes(4, "big") for w in words)


def test_linux_selftest_lookups() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    for addr, cidr, peer in [
        (v4(192, 168, 4, 0), 24, "a"), (v4(192, 168, 4, 4), 32, "b"),
        (v4(192, 168, 0, 0), 16, "c"), (v4(192, 95, 5, 64), 27, "d"),
        (v4(192, 95, 5, 65), 27, "c"),  # replaces d's entry; the address gets masked
        (v6(0x26075300, 0x60006B00, 0, 0xC05F0543), 128, "d"),
        (v6(0x26075300, 0x60006B00, 0, 0), 64, "c"),
        (v4(0, 0, 0, 0), 0, "e"), (v6(0, 0, 0, 0), 0, "e"),
        (v6(0, 0, 0, 0), 0, "f"),  # replaces e's
        (v6(0x24046800, 0, 0, 0), 32, "g"),
        (v6(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF), 64, "h"),
        (v6(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF), 128, "a"),
        (v6(0x24446800, 0x40E40800, 0xDEAEBEEF, 0xDEFBEEF), 128, "c"),
        (v6(0x24446800, 0xF0E40800, 0xEEAEBEEF, 0), 98, "b"),
        (v4(64, 15, 112, 0), 20, "g"), (v4(64, 15, 123, 211), 25, "h"),
        (v4(10, 0, 0, 0), 25, "a"), (v4(10, 0, 0, 128), 25, "b"),
        (v4(10, 1, 0, 0), 30, "a"), (v4(10, 1, 0, 4), 30, "b"),
        (v4(10, 1, 0, 8), 29, "c"), (v4(10, 1, 0, 16), 29, "d"),
    ]:  # fmt: skip
        t.insert(addr, cidr, peer)
    for peer, addr in [
        ("a", v4(192, 168, 4, 20)), ("a", v4(192, 168, 4, 0)), ("b", v4(192, 168, 4, 4)),
        ("c", v4(192, 168, 200, 182)), ("c", v4(192, 95, 5, 68)), ("e", v4(192, 95, 5, 96)),
        ("d", v6(0x26075300, 0x60006B00, 0, 0xC05F0543)),
        ("c", v6(0x26075300, 0x60006B00, 0, 0xC02E01EE)),
        ("f", v6(0x26075300, 0x60006B01, 0, 0)),
        ("g", v6(0x24046800, 0x40040806, 0, 0x1006)),
        ("g", v6(0x24046800, 0x40040806, 0x1234, 0x5678)),
        ("f", v6(0x240467FF, 0x40040806, 0x1234, 0x5678)),
        ("f", v6(0x24046801, 0x40040806, 0x1234, 0x5678)),
        ("h", v6(0x24046800, 0x40040800, 0x1234, 0x5678)),
        ("h", v6(0x24046800, 0x40040800, 0, 0)),
        ("h", v6(0x24046800, 0x40040800, 0x10101010, 0x10101010)),
        ("a", v6(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF)),
        ("g", v4(64, 15, 116, 26)), ("g", v4(64, 15, 127, 3)), ("g", v4(64, 15, 123, 1)),
        ("h", v4(64, 15, 123, 128)), ("h", v4(64, 15, 123, 129)),
        ("a", v4(10, 0, 0, 52)), ("b", v4(10, 0, 0, 220)), ("a", v4(10, 1, 0, 2)),
        ("b", v4(10, 1, 0, 6)), ("c", v4(10, 1, 0, 10)), ("d", v4(10, 1, 0, 20)),
    ]:  # fmt: skip
        assert t.lookup(addr) == peer, (peer, addr.hex())
    hosts = [v4(n, 0, 0, 0) for n in (1, 64, 128, 192, 255)]
    for h in hosts:
        t.insert(h, 32, "a")
    t.remove_value("a")
    assert all(t.lookup(h) != "a" for h in hosts)


def test_remove_by_owner_with_nested_prefixes() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(v4(192, 168, 0, 0), 16, "a")
    t.insert(v4(192, 168, 0, 0), 24, "a")
    t.remove_value("a")
    assert t.lookup(v4(192, 168, 0, 1)) is None and len(t) == 0


def test_entries_are_masked_and_in_insertion_order() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(v4(192, 95, 5, 93), 27, "a")
    t.insert(v6(0x26075300, 0x60006B00, 0, 0xC05F0543), 128, "a")
    t.insert(v4(10, 1, 0, 20), 29, "a")
    t.insert(v6(0x26075300, 0x6D8A6BF8, 0xDAB1F1DF, 0xC05F1523), 83, "a")
    t.insert(v6(0x26075300, 0x6D8A6BF8, 0xDAB1F1DF, 0xC05F1523), 21, "a")
    assert t.entries("a") == [
        (v4(192, 95, 5, 64), 27),
        (v6(0x26075300, 0x60006B00, 0, 0xC05F0543), 128),
        (v4(10, 1, 0, 16), 29),
        (v6(0x26075300, 0x6D8A6BF8, 0xDAB1E000, 0), 83),
        (v6(0x26075000, 0, 0, 0), 21),
    ]


def test_moving_an_entry_and_removing_one() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(v4(10, 0, 0, 0), 8, "a")
    t.insert(v4(10, 0, 0, 0), 8, "b")  # moves to b
    assert t.entries("a") == [] and t.entries("b") == [(v4(10, 0, 0, 0), 8)]
    assert not t.remove(v4(10, 0, 0, 0), 8, "a")  # not a's to remove
    assert t.remove(v4(10, 1, 2, 3), 8, "b")  # masked like insert
    assert t.lookup(v4(10, 0, 0, 1)) is None


def test_all_128_single_bit_v6_hosts() -> None:
    t: AllowedIPs[int] = AllowedIPs()
    for i in range(128):
        addr = ((1 << 128) - 1) ^ (1 << i)
        t.insert(addr.to_bytes(16, "big"), 128, i)
    assert all(t.lookup((((1 << 128) - 1) ^ (1 << i)).to_bytes(16, "big")) == i for i in range(128))
    assert t.lookup(bytes([0xFF]) * 16) is None and len(t) == 128


def test_bad_prefixes() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    with pytest.raises(ValueError):
        t.insert(v4(1, 2, 3, 4), 33, "a")
    with pytest.raises(ValueError):
        t.insert(b"\x01\x02\x03", 8, "a")
    assert t.lookup(b"\x01") is None
    assert parse_cidr("10.1.2.3/8") == (v4(10, 1, 2, 3), 8)
    assert parse_cidr("fd00::1") == (bytes.fromhex("fd00" + "00" * 13 + "01"), 128)
    for bad in ["10.0.0.0/33", "10.0.0.0/", "10.0.0.0/-1", "fd00::/129", "x/3", "10.0.0/8"]:
        with pytest.raises(ValueError):
            parse_cidr(bad)
    assert format_cidr(v4(10, 0, 0, 0), 8) == "10.0.0.0/8"


ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "remove", "remove_value"]),
        st.sampled_from([4, 16]),
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
        st.sampled_from("abc"),
    ),
    max_size=60,
)


@given(ops, st.lists(st.integers(0, 2**128 - 1), min_size=1, max_size=20))
def test_matches_a_naive_list_scan(
    script: list[tuple[str, int, int, int, str]], probes: list[int]
) -> None:
    t: AllowedIPs[str] = AllowedIPs()
    naive: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, str] = {}
    for op, size, raw, cidr, peer in script:
        bits = size * 8
        cidr = min(cidr, bits)
        # bias addresses toward a few shared prefixes so entries overlap
        addr = (raw >> (128 - bits)) & ~((1 << (bits - 8)) - 1) | (raw & 0x3)
        packed = addr.to_bytes(size, "big")
        net = ipaddress.ip_network((packed, cidr), strict=False)
        if op == "insert":
            t.insert(packed, cidr, peer)
            naive[net] = peer
        elif op == "remove":
            removed = t.remove(packed, cidr, peer)
            assert removed == (naive.get(net) == peer)
            if removed:
                del naive[net]
        else:
            t.remove_value(peer)
            naive = {n: p for n, p in naive.items() if p != peer}
    assert len(t) == len(naive)
    for raw in probes + [int.from_bytes(n.network_address.packed, "big") for n in naive]:
        for size in (4, 16):
            bits = size * 8
            addr = ipaddress.ip_address((raw & ((1 << bits) - 1)).to_bytes(size, "big"))
            matches = [(n.prefixlen, p) for n, p in naive.items() if addr in n]
            expect = max(matches)[1] if matches else None
            assert t.lookup(addr.packed) == expect
