"""Hostile batches for wgpy._native, run by sanitize.sh under ASan/UBSan.

Every entry point gets garbage, edge-case sizes and forged-but-valid traffic, on 0, 1 and
2 crypto worker threads; open_batch is also hammered from two threads while a third wipes
sessions (the GIL is released while decrypting) and a fourth works X25519 batches; the
runs open_batch hands back (Spans over its buffer) go through coalesce and write_tun. The
answers are checked against the references where they are cheap.
Usage: python tests/native/hostile.py [seconds]
"""

from __future__ import annotations

import errno
import os
import random
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.native.reference import World, normalize, open_batch_ref
from tests.native.test_screen import initiation
from wgpy import _native as native
from wgpy.core import backend, ip
from wgpy.core.allowedips import AllowedIPs
from wgpy.core.backend import x25519 as x25519_ref
from wgpy.core.constants import REJECT_AFTER_MESSAGES
from wgpy.core.crypto import PrivateKey
from wgpy.io import offload


def edge_batches(world: World) -> None:
    rng = world.rng
    kp = world.kps[0]
    index = kp.remote_index
    good = world.seal(kp, b"\x45" + bytes(19), 0)
    cases = [
        b"", b"\x04", b"\x04\0\0\0", struct.pack("<IIQ", 4, index, 0), good[:31], good[:32],
        good, good + b"\0", struct.pack("<IIQ", 4, index, 2**64 - 1) + bytes(16),
        struct.pack("<I", 1) + bytes(144), bytes(65536),
    ]  # fmt: skip
    for c in cases:
        for seg in (-5, 0, 1, 3, 4, 16, 31, 32, 33, len(c) - 1, len(c), len(c) + 1, 2**40):
            native.open_batch(c, len(c), seg, world.native, world.now)
            for n in (0, len(c) // 2):
                native.open_batch(c, n, seg, world.native, world.now)
    big = rng.randbytes(65536 + 4096)
    native.open_batch(big, len(big), 1, world.native, world.now)


def differential(world: World, rounds: int) -> None:
    """Batches through both backends, and the runs of all of them (C's Spans, read in
    place; the pure lists) through both coalescers together, as a datapath turn does."""
    spans: list[object] = []
    lists: list[object] = []
    for _ in range(rounds):
        buf, nbytes, seg = world.batch()
        got = native.open_batch(buf, nbytes, seg, world.native, world.now)
        want = open_batch_ref(buf, nbytes, seg, world.ref, world.now)
        assert normalize(got, world.names) == normalize(want, world.names)
        spans += [packets for _, _, packets in got[0]]
        lists += [packets for _, _, packets in want[0]]
        spans.append(b"\x45" + bytes(19))
        lists.append(b"\x45" + bytes(19))
    udp = world.rng.random() < 0.5
    want = offload.coalesce(lists, udp)
    assert native.coalesce(spans, udp) == want
    for flags, failed in ((os.O_WRONLY, []), (os.O_RDONLY, [(errno.EBADF, w) for w in want])):
        fd = os.open("/dev/null", flags)  # written with writev from the Spans, or refused
        try:
            assert native.write_tun(fd, spans, udp) == failed
        finally:
            os.close(fd)


LOW_ORDER = [bytes(32), (1).to_bytes(32, "little"), bytes.fromhex(
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")]  # fmt: skip


def x25519_jobs(rng: random.Random) -> tuple[tuple[bytes, bytes | None, tuple[bytes, ...]], ...]:
    def key() -> bytes:
        return rng.choice(LOW_ORDER) if rng.random() < 0.2 else rng.randbytes(32)

    return tuple((rng.randbytes(32), None if rng.random() < 0.5 else key(),
                  tuple(key() for _ in range(rng.randrange(4))))
                 for _ in range(rng.randrange(20)))  # fmt: skip


def x25519_garbage(rng: random.Random, rounds: int) -> None:
    """X25519 batches (dh.c) against the reference, and malformed ones refused."""
    for _ in range(rounds):
        jobs = x25519_jobs(rng)
        assert native.x25519(jobs) == x25519_ref(jobs)
    key = bytes(32)
    for bad in ((b"", None, ()), (key, bytes(31), ()), (key, None, (b"x",)),
                (key, None, [key]), (key, None), [key, None, ()]):  # fmt: skip
        try:
            native.x25519((bad,))
        except (TypeError, ValueError):
            continue
        raise AssertionError(f"x25519 took {bad!r}")


SCREEN_POOL: list[bytes] = []  # valid initiations to OURS (made on first use)
OURS = bytes(range(32))


def screen_messages(rng: random.Random) -> tuple[bytes, ...]:
    """Initiations to OURS, valid, corrupted anywhere, with low-order ephemerals, random."""
    if not SCREEN_POOL:
        SCREEN_POOL.extend(initiation(i, PrivateKey(OURS))[0] for i in range(4))

    def one() -> bytes:
        m = bytearray(rng.choice(SCREEN_POOL))
        roll = rng.random()
        if roll < 0.3:
            m[rng.randrange(len(m))] ^= 1 << rng.randrange(8)
        elif roll < 0.4:
            m[8:40] = rng.choice(LOW_ORDER)
        elif roll < 0.5:
            m = bytearray(rng.randbytes(148))
        return bytes(m)

    return tuple(one() for _ in range(rng.randrange(20)))


def screen_garbage(rng: random.Random, rounds: int) -> None:
    """Initiations screened (screen.c) against the reference, and malformed calls refused."""
    public = PrivateKey(OURS).public
    for _ in range(rounds):
        messages = screen_messages(rng)
        assert native.screen(OURS, public, messages) == backend.screen(OURS, public, messages)
    for bad in ((b"", public, ()), (OURS, public[:31], ()), (OURS, public, (bytes(147),)),
                (OURS, public, [bytes(148)]), (OURS, public, (None,))):  # fmt: skip
        try:
            native.screen(*bad)
        except (TypeError, ValueError):
            continue
        raise AssertionError(f"screen took {bad!r}")


def threads(world: World, seconds: float) -> None:
    """Two readers on the same sessions, a third thread wiping and re-keying them, a
    fourth working X25519 batches on the same crypto threads."""
    batches = [world.batch() for _ in range(20)]
    stop = time.monotonic() + seconds
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while time.monotonic() < stop:
                for buf, nbytes, seg in batches:
                    native.open_batch(buf, nbytes, seg, dict(world.native), world.now)
        except BaseException as e:
            errors.append(e)

    def wiper() -> None:
        rng = random.Random(5)
        while time.monotonic() < stop:
            index = rng.choice(list(world.native))
            world.native[index].wipe()
            world.native[index] = native.Session(rng.randbytes(32), 1e9)
            time.sleep(0.001)

    def exchanger() -> None:
        rng = random.Random(7)
        public = PrivateKey(OURS).public
        try:
            while time.monotonic() < stop:
                native.x25519(x25519_jobs(rng))
                native.screen(OURS, public, screen_messages(rng))
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=f) for f in (reader, reader, wiper, exchanger)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def offload_garbage(rng: random.Random, rounds: int) -> None:
    for _ in range(rounds):
        packets = [rng.randbytes(rng.randrange(0, 120)) for _ in range(rng.randrange(0, 10))]
        for p in list(packets):
            if p and rng.random() < 0.5:
                q = bytearray(p)
                q[0] = rng.choice([0x45, 0x46, 0x4F, 0x60, 0x40])
                packets.append(bytes(q))
        assert native.coalesce(packets) == offload.coalesce(packets)
        assert native.coalesce(packets, False) == offload.coalesce(packets, False)
        for p in packets:
            hdr = struct.pack(
                "<BBHHHH", rng.choice([0, 1]), rng.choice([0, 1, 3, 4, 5, 0x81]), 0,
                rng.choice([0, 1, 7, 100, 0xFFFF]), rng.randrange(0, 90), rng.randrange(0, 90),
            )  # fmt: skip
            native.split(hdr + p, rng.choice([1500, 0, -1, 1]))
            native.split(p, 1500)
            native.checksum(p, rng.getrandbits(rng.choice([0, 16, 64, 200])))
        sealer = native.Sealer(rng.randbytes(32), rng.getrandbits(32), rng.getrandbits(63))
        sealer.seal(packets, rng.randrange(0, 2000))
        sending_garbage(rng, packets)


def sending_garbage(rng: random.Random, packets: list[bytes]) -> None:
    """Super-packets with any fields, cut and sealed on the crypto threads, and routing,
    against the pure backend."""
    items: list[object] = list(packets)
    for p in packets:
        mss = rng.choice([0, 1, 7, 100, 1380, 1 << 20, -5])
        items.append(ip.SuperPacket(p, mss, rng.choice([0, 20, 24, 40, 200, -1]),
                                    rng.random() < 0.5, 1))  # fmt: skip
    rng.shuffle(items)
    key, index, mtu = rng.randbytes(32), rng.getrandbits(32), rng.randrange(0, 2000)
    counter = rng.choice([0, REJECT_AFTER_MESSAGES - rng.randrange(0, 60)])
    runs = native.Sealer(key, index, counter).seal_runs(items, mtu)
    assert runs == backend.Sealer(key, index, counter).seal_runs(items, mtu)  # type: ignore[arg-type]
    table: AllowedIPs[object] = AllowedIPs()
    for p in packets[:8]:
        if len(p) >= 4:
            table.insert(p[:4], rng.randrange(33), rng.choice([1, 2, 3]))
    routes = native.Routes()
    table.publish(routes)
    groups, bad = native.route(items, routes)
    assert (groups, bad) == backend.route(items, table)  # type: ignore[arg-type]
    for item in items:
        if isinstance(item, ip.SuperPacket):
            assert native.segments(item) == ip.segments(item)


class Shrinker:
    """A packet whose buffer export (Python 3.12's `__buffer__`) empties its list."""

    def __init__(self, victim: list[object]) -> None:
        self.victim = victim

    def __buffer__(self, flags: int) -> memoryview:
        self.victim.clear()
        return memoryview(b"\x45" + bytes(63))


def shrinking_lists(rng: random.Random) -> None:
    """Lists emptied by their own items while seal and coalesce take their buffers."""
    for _ in range(20):
        victim: list[object] = []
        victim += [bytes([0x45]) + rng.randbytes(99) for _ in range(rng.randrange(0, 20))]
        victim.insert(rng.randrange(0, len(victim) + 1), Shrinker(victim))
        native.Sealer(rng.randbytes(32), 1).seal(list(victim), 1420)
        native.Sealer(rng.randbytes(32), 1).seal(victim, 1420)
        victim += [Shrinker(victim), bytearray(100)]
        native.coalesce(victim)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    deadline = time.monotonic() + seconds
    rng = random.Random(int.from_bytes(os.urandom(8), "little"))
    world = World(rng, 3, 1000.0, native)
    for s in world.native.values():
        s.expires = 1e9
    for s in world.ref.values():
        s.expires = 1e9
    edge_batches(world)
    if sys.version_info >= (3, 12):  # before, buffers are taken without running Python
        shrinking_lists(rng)
    native.set_threads(2)
    threads(World(rng, 3, 1000.0, native), min(5.0, seconds / 4))
    n = 0
    while time.monotonic() < deadline:
        native.set_threads(n % 3)  # rounds on 0, 1 and 2 crypto workers
        world = World(rng, rng.randrange(1, 5), 1000.0, native)
        differential(world, 5)
        offload_garbage(rng, 20)
        x25519_garbage(rng, 2)
        screen_garbage(rng, 2)
        n += 1
    native.set_threads(0)
    print(f"hostile: {n} rounds clean ({native.__file__})")


if __name__ == "__main__":
    main()
