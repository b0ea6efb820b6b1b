"""The sending calls of both backends against each other, byte for byte: super-packets
(core/ip.py) cut as `split` cuts a TSO read, `Sealer.seal_runs` (GSO runs, super-packets
cut inside) against `seal` and reference.forge. (`route`: test_route.py.)"""

from __future__ import annotations

import random
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.io.test_offload import V4, V6, tcp, udp
from tests.native.reference import forge
from tests.native.test_offload_seal import python_split, super_packets
from wgpy.core import backend, ip
from wgpy.core.backend import Sealer
from wgpy.core.constants import REJECT_AFTER_MESSAGES
from wgpy.core.ip import SuperPacket
from wgpy.core.messages import DATA_HEADER
from wgpy.io import offload

native = pytest.importorskip(
    "wgpy._native", reason="wgpy._native is not built (python setup.py build_ext --inplace)"
)


def cut(items: list[Any]) -> list[bytes]:
    """The packets a batch stands for, super-packets cut (the pure reference)."""
    return [q for p in items for q in (ip.segments(p) if isinstance(p, SuperPacket) else [p])]


def flat(runs: list[tuple[bytes, int]]) -> list[bytes]:
    return [buf[i : i + size] for buf, size in runs for i in range(0, len(buf), size)]


@settings(max_examples=300, deadline=None)
@given(super_packets(), st.sampled_from([1500, 1000, 1]))
def test_a_tso_read_kept_whole_cuts_as_split_does(buf: bytes, mtu: int) -> None:
    """offload.super_packet + either backend's `segments` == `split` of the read."""
    sp = offload.super_packet(buf, mtu)
    want = python_split(buf, mtu)
    assert native.split(buf, mtu) == want
    if sp is None:
        assert want == []
        return
    assert ip.segments(sp) == native.segments(sp) == want
    assert sp.nsegments == len(want)


@st.composite
def batches(draw: st.DrawFn) -> list[Any]:
    """Packets of any size (keepalives too), super-packets that cut, and ones that do not
    (their fields garbage: they make nothing), in any order."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    items: list[Any] = []
    for kind in draw(st.lists(st.sampled_from("pppsg"), max_size=8)):
        if kind == "p":
            items += [rng.randbytes(rng.choice([0, 1, 40, 100, 1420, 1421, 3000]))
                      for _ in range(rng.randint(1, 5))]  # fmt: skip
        elif kind == "s":
            sp = offload.super_packet(draw(super_packets()), 1420)
            items += [sp] if sp is not None else []
        else:
            packet = tcp(1, rng.randbytes(rng.randint(0, 4000)), addrs=rng.choice([V4, V6]))
            items.append(SuperPacket(packet, rng.choice([0, -1, 10**6]), rng.choice([0, 3, 200]),
                                     False, 1))  # fmt: skip
    return items


def runs_are_gso_shaped(runs: list[tuple[bytes, int]]) -> bool:
    """Every datagram of a run `size` bytes but the last, which may be shorter."""
    return all(0 < len(buf) - (len(buf) - 1) // size * size <= size for buf, size in runs)


@settings(max_examples=150, deadline=None)
@given(
    batches(),
    st.integers(0, 2**32 - 1),
    st.one_of(st.integers(0, 2**40), st.integers(2**64 - 8400, 2**64 - 8193)),
    st.sampled_from([0, 16, 576, 1420, 1500, 9000]),
    st.binary(min_size=32, max_size=32),
)
def test_seal_runs_matches_seal_and_forge(
    items: list[Any], index: int, counter: int, mtu: int, key: bytes
) -> None:
    c_sealer, py_sealer = native.Sealer(key, index, counter), Sealer(key, index, counter)
    runs = c_sealer.seal_runs(items, mtu)
    assert runs == py_sealer.seal_runs(items, mtu)
    packets = cut(items)
    if counter + len(packets) > REJECT_AFTER_MESSAGES:  # spent: nothing sealed, no counter used
        assert runs is None and c_sealer.counter == py_sealer.counter == counter
        return
    assert runs is not None and runs_are_gso_shaped(runs)
    assert flat(runs) == [forge(key, index, counter + i, p, mtu) for i, p in enumerate(packets)]
    assert flat(runs) == Sealer(key, index, counter).seal(packets, mtu)
    assert backend.gso_runs(flat(runs)) == runs  # the longest runs GSO allows, as UDP had them
    assert c_sealer.counter == py_sealer.counter == counter + len(packets)


def test_seal_runs_on_the_crypto_threads_matches() -> None:
    """Super-packets cut and sealed in chunks on four threads: the bytes of one thread."""
    rng = random.Random(3)
    items: list[Any] = []
    for i in range(6):
        packet = tcp(i, rng.randbytes(20_000 + i), addrs=V6 if i % 2 else V4)
        items += [ip.super_packet(packet, 1360 + i, 0, False), rng.randbytes(60)]
    key = rng.randbytes(32)
    native.set_threads(3)
    try:
        got = native.Sealer(key, 9).seal_runs(items, 1420)
    finally:
        native.set_threads(0)
    assert got == Sealer(key, 9).seal_runs(items, 1420)
    assert got is not None and len(flat(got)) == len(cut(items)) > 90


def test_seal_runs_edges() -> None:
    for make in (native.Sealer, Sealer):
        s = make(bytes(32), 1)
        assert s.seal_runs([], 1420) == [] and s.counter == 0
        runs = s.seal_runs([b"", b""], 1420)  # keepalives: one run of two 32-byte datagrams
        assert runs is not None and [(len(b), size) for b, size in runs] == [(64, 32)]
        assert s.counter == 2
        s.expire()
        assert s.seal_runs([b"x"], 1420) is None
        assert s.seal_runs([], 1420) == []
        s = make(bytes(32), 1)
        with pytest.raises(ValueError):
            s.seal_runs([b""], -1)
        s.wipe()
        with pytest.raises(ValueError):
            s.seal_runs([b"x"], 1420)
    with pytest.raises(TypeError):
        native.Sealer(bytes(32), 1).seal_runs([(b"x",)], 1420)  # not a super-packet


def test_threads_sealing_runs_for_one_session_never_share_a_counter() -> None:
    sealer = native.Sealer(bytes(32), 7)
    sp = ip.super_packet(tcp(1, bytes(1380 * 16)), 1380, 0, False)
    got: list[list[tuple[bytes, int]] | None] = []

    def work() -> None:
        got.extend(sealer.seal_runs([sp], 1420) for _ in range(100))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters = [DATA_HEADER.unpack_from(d)[2] for runs in got for d in flat(runs or [])]
    assert len(counters) == 4 * 100 * 16 and len(set(counters)) == len(counters)


@st.composite
def routed(draw: st.DrawFn) -> list[Any]:  # for test_route.py
    """Packets to a few destinations (v4, v6, with the headers cut short or not IP at all),
    some of them super-packets, as bytes, bytearrays or memoryviews."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    dsts = [bytes([10, 0, 0, rng.randint(1, 3)]) for _ in range(3)]
    dsts += [bytes(15) + bytes([rng.randint(1, 3)]) for _ in range(2)]
    items: list[Any] = []
    for _ in range(draw(st.integers(0, 80))):
        dst = rng.choice(dsts)
        addrs = (dst, dst)
        p = tcp(1, bytes(rng.randint(0, 50)), addrs=addrs) if rng.random() < 0.7 else udp(
            b"x", addrs)
        shape = rng.random()
        if shape < 0.1:
            p = p[: rng.randint(0, 41)]  # too short, or an empty read
        elif shape < 0.15:
            p = bytes([rng.randint(0, 255)]) + p[1:]  # any version
        if shape > 0.9 and (sp := ip.super_packet(p, 8, 0, p[9 if len(dst) == 4 else 6] == 17)):
            items.append(sp)
            continue
        items.append(rng.choice([bytes, bytearray, memoryview])(p))
    return items


def test_the_longest_segment_there_is_seals_alike() -> None:
    """An IPv6 segment of 40 + 65,535 bytes (the payload length field's limit): cut into
    the crypto threads' scratch whole (ASan: tests/native/sanitize.sh)."""
    payload = bytes(range(256)) * 256
    packet = tcp(1, payload[: 65535 - 20], addrs=V6)
    sp = ip.super_packet(packet, 65535 - 20, 0, False)
    assert sp is not None and sp.nsegments == 1
    key = bytes(range(32))
    runs = native.Sealer(key, 1).seal_runs([sp, sp], 0)
    assert runs == Sealer(key, 1).seal_runs([sp, sp], 0)
    assert runs is not None and [len(d) for d in flat(runs)] == [32 + 65584] * 2  # padded
