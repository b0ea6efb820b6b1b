"""Micro-benchmark of wgpy._native against the pure-Python paths (not a test).

Per packet, on batches of 44 x 1420-byte IPv4 packets (one UDP GRO read / GSO send), the
two backends' calls (core/backend.py) side by side:
  open:  open_batch on one session, the packets out as runs (native: a Spans over one
         buffer per read, no object per packet; GIL released inside)
  open + coalesce: the same, and the runs made into TUN writes (GSO super-packets) as
         Tun.write_batch does (native: the Spans read in place)
  seal:  Sealer.seal
    PYTHONPATH=src python bench/native.py
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from typing import Any

from wgpy import _native as native
from wgpy.core import backend
from wgpy.core.backend import Sealer, SealerLike, Session
from wgpy.io import offload

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
    # ROUNDS reads with fresh counters, so that every packet is accepted
    sealer = native.Sealer(key, 77)
    reads = [b"".join(sealer.seal(packets, 1420)) for _ in range(ROUNDS)]
    seg = len(reads[0]) // BATCH

    def open_with(
        make: Callable[[bytes, float], Any], open_batch: Any, coalesce: Any = None
    ) -> Callable[[], None]:
        def run() -> None:
            sessions = {77: make(key, 1e9)}
            for buf in reads:
                runs = open_batch(buf, len(buf), seg, sessions, 1.0)[0]
                assert sum(len(p) for _, _, p in runs) == BATCH
                if coalesce is not None:
                    coalesce([p for _, _, p in runs], True)

        return run

    def seal_with(make: Callable[[bytes, int], SealerLike]) -> Callable[[], None]:
        def run() -> None:
            sealer = make(key, 77)
            for _ in range(ROUNDS):
                sealer.seal(packets, 1420)

        return run

    n = ROUNDS * BATCH
    c_open = open_with(native.Session, native.open_batch)
    rows = [
        ("open_batch (pure)", best_us_per_packet(open_with(Session, backend.open_batch), n)),
        ("open_batch (native)", best_us_per_packet(c_open, n)),
        (
            "open_batch + coalesce (pure)",
            best_us_per_packet(open_with(Session, backend.open_batch, offload.coalesce), n),
        ),
        (
            "open_batch + coalesce (native)",
            best_us_per_packet(open_with(native.Session, native.open_batch, native.coalesce), n),
        ),
        ("Sealer.seal (pure)", best_us_per_packet(seal_with(Sealer), n)),
        ("Sealer.seal (native)", best_us_per_packet(seal_with(native.Sealer), n)),
    ]
    print(f"{BATCH} x {SIZE}-byte packets per batch, {ROUNDS} batches, best of 5")
    for name, us in rows:
        print(f"  {name:40s} {us:6.2f} us/packet")


if __name__ == "__main__":
    main()
