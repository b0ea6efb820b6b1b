"""Micro-benchmark of wgpy._native against the pure-Python paths (not a test).

Per packet, on batches of 44 x 1420-byte IPv4 packets (one UDP GRO read / GSO send):
  open:  Device.receive on one session vs open_batch (+ slicing the packets out, as a
         caller must), GIL released inside
  seal:  the pure Sealer.seal vs the native one
    PYTHONPATH=src python bench/native.py
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable

from wgpy import _native as native
from wgpy.core.backend import Sealer, SealerLike
from wgpy.core.device import Device
from wgpy.core.endpoint import Endpoint
from wgpy.core.peer import Keypair

BATCH = 44
SIZE = 1420
ROUNDS = 300


def best_us_per_packet(fn: Callable[[], object], packets: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / packets * 1e6


def main() -> None:
    key = os.urandom(32)
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, SIZE, 0, 0, 64, 6, 0, src, dst)
    packets = [hdr + os.urandom(SIZE - 20) for _ in range(BATCH)]

    device = Device(os.urandom)
    peer = device.add_peer(os.urandom(32))
    assert peer is not None
    device.allowed_ips.insert(src, 32, peer)
    kp = Keypair(peer, (key, key), initiator=True, local_index=77, remote_index=77, now=0.0)
    device.index.add_keypair(kp)
    ep: Endpoint = ("192.0.2.1", 51820)

    # ROUNDS batches with fresh counters, so that every packet is accepted
    sealer = native.Sealer(key, 77)
    reads = [b"".join(sealer.seal(packets, 1420)) for _ in range(ROUNDS)]
    seg = len(reads[0]) // BATCH

    def pure_open() -> None:
        kp.replay.reset()
        for buf in reads:
            view = memoryview(buf)
            device.receive([(view[i : i + seg], ep) for i in range(0, len(buf), seg)], 1.0)

    def native_open(materialize: bool) -> Callable[[], None]:
        def run() -> None:
            session = native.Session(key, 1e9)
            sessions = {77: session}
            out = bytearray(len(reads[0]))
            for buf in reads:
                runs = native.open_batch(buf, len(buf), seg, sessions, 1.0, out)[0]
                if materialize:
                    got = [
                        out[a : a + n]
                        for _, _, spans in runs
                        for a, n in struct.iter_unpack("<II", spans)
                    ]
                    assert len(got) == BATCH

        return run

    def seal_with(make: Callable[[bytes, int], SealerLike]) -> Callable[[], None]:
        def run() -> None:
            sealer = make(key, 77)
            for _ in range(ROUNDS):
                sealer.seal(packets, 1420)

        return run

    n = ROUNDS * BATCH
    rows = [
        ("open: Device.receive (pure)", best_us_per_packet(pure_open, n)),
        ("open: open_batch", best_us_per_packet(native_open(False), n)),
        ("open: open_batch + packets sliced out", best_us_per_packet(native_open(True), n)),
        ("seal: Sealer.seal (pure)", best_us_per_packet(seal_with(Sealer), n)),
        ("seal: Sealer.seal (native)", best_us_per_packet(seal_with(native.Sealer), n)),
    ]
    print(f"{BATCH} x {SIZE}-byte packets per batch, {ROUNDS} batches, best of 5")
    for name, us in rows:
        print(f"  {name:40s} {us:6.2f} us/packet")


if __name__ == "__main__":
    main()
