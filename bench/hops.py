"""What one hop of a lone packet costs the daemon's thread, caches cold: in-process, no ping.

    sudo python bench/hops.py [--idle 0.01] [--count 300] [SRC ...]

Two Datapaths (the daemon's, with its real TUN and UDP socket, native backend and C
intake when built) in a fresh network namespace, A and B, with a session between them.
Each round puts one packet in A's TUN, leaves the process idle for `--idle` seconds (a
ping every 10 ms leaves the CPU that long; the caches go cold meanwhile), then times
`A.on_tun()` (read, seal, send) and `B.on_udp()` (read, open, write to B's TUN). With
several SRC trees (e.g. a copy of another commit's src/) each runs in its own process and
the rounds alternate between them, so that the machine's load hits all alike: far less
noisy than ping round trips (bench/latency.py) for comparing two versions. A SRC may
end in @NAME=VALUE,... for its process's environment: `src src@WGPY_UDP_READER=1`
compares a datapath with and without its UDP reader thread in one run. `--idle 0`
gives the warm figures. The kernel's part (the syscalls, the loopback delivery) is in
the times as it is in a real hop; the epoll wake-up is not. While idle, both datapaths
tick every 0.1 s, as the daemon's loop makes them, and read what came.

"To the wire" is the part of a hop a ping waits for: from the call to the kernel's
timestamp of the packet it put out (packet sockets on `lo` for A's datagram, on B's TUN
for the packet B wrote), what a datapath does after its send or write not included.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20  # rounds not counted (the handshake's and the first ones)
TICK = 0.1  # the daemon loop's tick (io/loop.py)


def idle_as_the_loop(seconds: float, paths: list[Any]) -> None:
    """Sleep `seconds`, ticking the datapaths every TICK as the daemon's loop does, and
    reading what came meanwhile (keepalives, handshakes: else A would keep retrying)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, TICK))
        if left > TICK:
            for path in paths:
                if select.select([path.udp.fileno()], [], [], 0)[0]:  # as the loop: if readable
                    path.on_udp()
                path.tick(time.monotonic())


SO_TIMESTAMPNS = 35  # <asm/socket.h>; Python's socket module does not name it
ETH_P_ALL = 3


class Wire:
    """A packet socket on one interface that tells when the kernel saw the first packet
    since the last call (its receive timestamp, CLOCK_REALTIME ns)."""

    def __init__(self, ifname: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)

    def first(self, least: int) -> int:
        """The timestamp of the first packet of at least `least` bytes waiting (0 if
        none), the others read and dropped."""
        stamp = 0
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(2048, 64)
            except BlockingIOError:
                return stamp
            for level, kind, raw in ancillary:
                if kind == SO_TIMESTAMPNS and level == socket.SOL_SOCKET and len(data) >= least:
                    sec, nsec = struct.unpack("qq", raw[:16])
                    stamp = stamp or sec * 1_000_000_000 + nsec


def serve(idle: float) -> None:
    """Inside a fresh namespace: build A and B, then one round per line on stdin, its two
    times (ns) on stdout."""
    from wgpy.core.crypto import clamp
    from wgpy.core.device import Device
    from wgpy.io.datapath import Datapath, backend, native_intake, tun_offloads
    from wgpy.io.tun import open_tun
    from wgpy.io.udp import UdpSocket

    chosen = backend()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    paths: list[Datapath] = []
    for name, net in (("hopa", "10.77.0"), ("hopb", "10.78.0")):
        device = Device(os.urandom, backend=chosen, classify=native_intake())
        device.set_private_key(clamp(os.urandom(32)))
        tun = open_tun(name, True, tun_offloads(device, True))
        for command in (["addr", "add", f"{net}.1/24", "dev", name],
                        ["link", "set", name, "mtu", "1420", "up"]):  # fmt: skip
            subprocess.run(["ip", *command], check=True)
        device.mtu = 1420
        paths.append(Datapath(device, tun, UdpSocket(0)))
    a, b = paths
    for here, there, allowed in ((a, b, bytes([10, 77, 0, 99])), (b, a, bytes([10, 77, 0, 1]))):
        assert there.device.public_key is not None
        peer = here.device.add_peer(there.device.public_key)
        assert peer is not None
        peer.endpoint = ("127.0.0.1", there.udp.port)
        here.device.allowed_ips.insert(allowed, 32, peer)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def packet_into_a() -> None:  # routed into A's TUN: a lone 84-byte packet
        sender.sendto(bytes(56), ("10.77.0.99", 9))

    packet_into_a()  # the handshake: A initiates, B answers, A completes
    for step in (a.on_tun, b.on_udp, a.on_udp):
        time.sleep(0.01)
        step()
    clock, wall = time.perf_counter_ns, time.time_ns
    # A's data message on loopback (32 + 96 bytes, an IP header before it); B's packet in
    wires = ((Wire("lo"), 20 + 8 + 128), (Wire("hopb"), 84))
    for _ in sys.stdin:
        packet_into_a()
        idle_as_the_loop(idle, paths)
        for wire, least in wires:
            wire.first(least)
        w0, t0 = wall(), clock()
        a.on_tun()
        t1, w1 = clock(), wall()
        b.on_udp()
        t2 = clock()
        sent, wrote = (wire.first(least) for wire, least in wires)
        print(t1 - t0, t2 - t1, sent - w0 if sent else -1, wrote - w1 if wrote else -1, flush=True)


def start(src: str, idle: float) -> subprocess.Popen[Any]:
    """A `serve` process with `src` as its wgpy, in a namespace of its own; `src` may end
    in @NAME=VALUE,... for its environment (e.g. src@WGPY_UDP_READER=1)."""
    argv = ["unshare", "-n", sys.executable, __file__, "--serve", "--idle", str(idle)]
    src, _, settings = src.partition("@")
    extra = dict(item.split("=", 1) for item in settings.split(",") if item)
    env = {**os.environ, "PYTHONPATH": src, **extra}
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=float, default=0.01, help="seconds idle before a hop")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("src", nargs="*", default=[str(ROOT / "src")])
    args = parser.parse_args()
    if args.serve:
        serve(args.idle)
        return 0
    procs = [start(src, args.idle) for src in args.src]
    times: dict[str, list[tuple[int, int, int, int]]] = {src: [] for src in args.src}
    try:
        for i in range(args.count + WARMUP):
            order = list(zip(args.src, procs, strict=True))
            for src, proc in order if i % 2 else order[::-1]:
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write("\n")
                proc.stdin.flush()
                tun_hop, udp_hop, sent, wrote = map(int, proc.stdout.readline().split())
                if i >= WARMUP:
                    times[src].append((tun_hop, udp_hop, sent, wrote))
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(10)
    print(f"idle {args.idle} s before each hop, {args.count} rounds, medians in µs:")
    for src, got in times.items():
        tun_hop, udp_hop = (statistics.median(t[k] for t in got) / 1e3 for k in (0, 1))
        total = statistics.median(t[0] + t[1] for t in got) / 1e3
        print(f"  A.on_tun {tun_hop:6.1f}  B.on_udp {udp_hop:6.1f}  both {total:6.1f}  {src}")
        seen = [t for t in got if t[2] > 0 and t[3] > 0]  # both packets seen on the wire
        if seen:
            sent, wrote = (statistics.median(t[k] for t in seen) / 1e3 for k in (2, 3))
            both = statistics.median(t[2] + t[3] for t in seen) / 1e3
            print(f"    to the wire {sent:6.1f}  {wrote:6.1f}  both {both:6.1f}"
                  f"  ({len(seen)} of {len(got)} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
