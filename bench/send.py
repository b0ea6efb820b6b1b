"""What a batch's UDP sends cost the calling thread (not a test): io/udp.py's Python sends
(the reference), the native `send_runs` (src/native/send.c) and the sender thread
(`UdpSender`), side by side on loopback, rounds alternating so that the machine's load
hits all alike.

    PYTHONPATH=src python bench/send.py [--rounds 300]

Batches as the core seals them: a lone datagram (a ping), one run of 64 x 1452 bytes (one
super-packet: two GSO sends), 64 lone datagrams (runs of one: no GSO), and 64 datagrams to
8 endpoints, 8 each. The receiver reads nothing (a small buffer): the kernel's part of
each send stops where a full socket drops, the same for all. Each round times a block of
BLOCK batches sent back to back (the sender thread's queue then flushed, as a busy loop
thread would not wait for it); per batch, medians in µs: the calling thread's CPU time,
the wall time, and the whole process's CPU time (with the sender thread: its share too).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import time
from collections.abc import Callable

from wgpy import _native as native
from wgpy.core.output import Run
from wgpy.io.udp import UdpSocket

BLOCK = 16


def shapes(port: int) -> dict[str, list[Run]]:
    ep = ("127.0.0.1", port)
    eps = [("127.0.0.1", port + k) for k in range(8)]
    return {
        "lone": [(b"p" * 128, 128, ep)],
        "64 x 1452, one run": [(b"s" * 1452 * 64, 1452, ep)],
        "64 lone datagrams": [(b"d" * (1400 + k % 2), 1400 + k % 2, ep) for k in range(64)],
        "8 runs of 8": [(b"r" * 1452 * 8, 1452, e) for e in eps],
    }


def make(kind: str) -> UdpSocket:
    sock = UdpSocket()
    if kind != "python":
        sock.use_native(native.send_runs, native.UdpSender() if kind == "sender" else None)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    sinks = []
    for _ in range(8):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sinks.append(s)
    sinks[0].bind(("127.0.0.1", 0))
    base = sinks[0].getsockname()[1]
    for k, s in enumerate(sinks[1:], 1):
        with contextlib.suppress(OSError):  # taken: ICMP unreachable, the same for all
            s.bind(("127.0.0.1", base + k))
    kinds = ["python", "native", "sender"]
    socks = {kind: make(kind) for kind in kinds}
    clocks: dict[str, Callable[[], int]] = {
        "thread CPU": time.thread_time_ns, "wall": time.perf_counter_ns,
        "process CPU": time.process_time_ns,
    }  # fmt: skip
    print(f"{args.rounds} rounds, medians in µs per batch")
    for name, runs in shapes(base).items():
        times: dict[tuple[str, str], list[int]] = {(k, c): [] for k in kinds for c in clocks}
        for _ in range(args.rounds):
            for kind in kinds:
                sock = socks[kind]
                before = {c: f() for c, f in clocks.items()}
                for _ in range(BLOCK):
                    sock.send_runs(runs)
                if sock.sender is not None:
                    sock.sender.flush()  # its work counted in the process's CPU and the wall
                for c, f in clocks.items():
                    times[kind, c].append((f() - before[c]) // BLOCK)
        print(f"  {name}")
        for kind in kinds:
            cells = "  ".join(
                f"{c} {statistics.median(times[kind, c]) / 1000:6.1f}" for c in clocks
            )
            print(f"    {kind:7s} {cells}")
    for sock in socks.values():
        sock.close()
    for s in sinks:
        s.close()


if __name__ == "__main__":
    main()
