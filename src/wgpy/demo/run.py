"""`wgpy demo`: a real tunnel between two network namespaces on this machine.

Two namespaces joined by a veth pair, a wgpy instance in each, configured through the
UAPI with the `wg` tool; pings both ways over IPv4 and IPv6, a TCP transfer through the
tunnel (iperf3 if installed, else a Python sender), then a `wg show`-like status of both
ends. Everything is removed at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from wgpy.core.crypto import decode_key, public_key
from wgpy.demo.testbed import WGPY, WIREGUARD_GO, Tunnel, TunnelEnd
from wgpy.tools import uapi_client

# A receiver and a sender for when iperf3 is absent: bytes over TCP, timed by the sender.
_SINK = (
    "import socket;s=socket.create_server(('{addr}',5201));c,_=s.accept()\n"
    "while c.recv(1<<20): pass"
)
_SOURCE = (
    "import socket,time;c=socket.create_connection(('{addr}',5201),timeout=10);"
    "b=bytes(1<<20);t=time.monotonic();e=t+{seconds};n=0\n"
    "while time.monotonic()<e: c.sendall(b);n+=len(b)\n"
    "c.close();print(n*8/(time.monotonic()-t))"
)


def ping(src: TunnelEnd, dst_addr: str) -> str:
    out = src.ns.run("ping", "-c", "3", "-i", "0.2", "-W", "2", dst_addr, timeout=20)
    return out.strip().splitlines()[-1]  # rtt min/avg/max/mdev


def iperf3(client: TunnelEnd, server: TunnelEnd, seconds: float) -> float:
    """Bits per second of an iperf3 TCP transfer from client to server, in the tunnel."""
    srv = server.ns.popen("iperf3", "-s", "-1", "-B", server.inner4, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = client.ns.run(
            "iperf3", "-c", server.inner4, "-t", str(seconds), "-J", timeout=seconds + 60
        )
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"])
    finally:
        srv.kill()
        srv.wait()


def throughput(client: TunnelEnd, server: TunnelEnd, seconds: float) -> tuple[str, float]:
    """(tool, bits per second) of a TCP transfer from client to server, inside the tunnel."""
    if shutil.which("iperf3"):
        return "iperf3", iperf3(client, server, seconds)
    sink = server.ns.popen(sys.executable, "-c", _SINK.format(addr=server.inner4))
    try:
        time.sleep(0.5)
        code = _SOURCE.format(addr=server.inner4, seconds=seconds)
        return "python", float(client.ns.run(sys.executable, "-c", code, timeout=seconds + 30))
    finally:
        sink.kill()
        sink.wait()


def status(end: TunnelEnd) -> str:
    return uapi_client.render(uapi_client.get(end.ifname), public_key(decode_key(end.private_key)))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="wgpy demo", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5, help="length of the transfer")
    parser.add_argument(
        "--peer", choices=("wgpy", "wireguard-go"), default="wgpy", help="the other end"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("wgpy demo: needs root (network namespaces, TUN devices)", file=sys.stderr)
        return 1
    right = WGPY if args.peer == "wgpy" else WIREGUARD_GO
    print(f"Setting up two namespaces joined by veth, wgpy <-> {args.peer} ...")
    try:
        with Tunnel("demo", WGPY, right) as t:
            a, b = t.a, t.b
            print(f"  {a.ns.name}: {a.ifname} {a.inner4} (outside {a.outer4}:{a.port})")
            print(f"  {b.ns.name}: {b.ifname} {b.inner4} (outside {b.outer4}:{b.port})")
            for src, dst in ((a, b.inner4), (b, a.inner4), (a, b.inner6), (b, a.inner6)):
                print(f"ping {dst} from {src.ifname}: {ping(src, dst)}")
            tool, bps = throughput(a, b, args.seconds)
            rate = f"{bps / 1e9:.2f} Gbit/s"
            print(f"TCP {a.inner4} -> {b.inner4} ({tool}, {args.seconds:g} s): {rate}")
            for end in (a, b):
                print()
                print(status(end))
        print("\nCleaned up: namespaces, interfaces and processes removed.")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
        print(f"wgpy demo failed (cleaned up): {e}", file=sys.stderr)
        return 1
