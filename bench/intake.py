"""The handshake intake's cost per datagram on a real socket, under the C sender.

    sudo python bench/intake.py                # C intake, valid mac1 and junk, 64 reads a call
    sudo python bench/intake.py --reads 8,64,256 --python

The wgpy measured is `--src DIR`'s, else the one PYTHONPATH holds, else this checkout's
src/ (bench/tree.py).

A device with a key reads its UDP socket on loopback as `Datapath.on_udp` does, the C
intake draining it (`Classifier.drain`) or, with --python, the Python intake one read at a
time, while bench/flood_send.c floods it from --sources addresses for --seconds: valid-mac1
initiations (every one answered with a cookie reply: the device is over its rate for each
source) or junk (a bad mac1). Prints reads a second and the process's CPU time per read
(user + system: the cookie replies' sends count). The queue is emptied after each call (no
Diffie-Hellman here: only the intake is measured).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from tree import use  # noqa: E402

SRC = use()  # --src DIR, else the wgpy PYTHONPATH holds, else this checkout's src/

from flood import build_sender  # noqa: E402

from wgpy.core.cookie import CookieGenerator  # noqa: E402
from wgpy.core.crypto import clamp  # noqa: E402
from wgpy.core.device import Device  # noqa: E402
from wgpy.core.output import Output  # noqa: E402
from wgpy.io.datapath import UDP_BUF, backend  # noqa: E402
from wgpy.io.udp import SO_RCVBUFFORCE, UdpSocket  # noqa: E402


def pool(device_pub: bytes, valid: bool, path: Path) -> None:
    out = bytearray()
    for _ in range(256):
        msg = bytearray(b"\x01\0\0\0" + os.urandom(112) + bytes(32))
        if valid:
            CookieGenerator(device_pub).add_macs(msg, 0.0)
        out += msg
    path.write_bytes(out)


def drain_c(device: Device, udp: UdpSocket, buf: bytearray, reads: int, now: float) -> int:
    assert device.intake.classifier is not None
    out = Output()
    until, queued, forced, state = device.intake.state(now)
    kept, got, until, drops, _, counter = device.intake.classifier.drain(
        udp.fileno(), buf, UDP_BUF, reads, now, until, queued, forced, state
    )
    device.intake.done(until, drops, state is not None, counter, out)
    view = memoryview(buf)
    for offset, n, seg, src, _, passed, ndata in kept:
        out.extend(device.receive_classified(view[offset : offset + n], n, seg, src, now,
                                             passed, ndata))  # fmt: skip
    if out.udp:
        udp.send_runs(out.udp.runs())
    return int(got)


def drain_python(device: Device, udp: UdpSocket, buf: bytearray, reads: int, now: float) -> int:
    view, got = memoryview(buf), 0
    out = Output()
    for _ in range(reads):
        r = udp.recv_into(view)
        if r is None:
            break
        out.extend(device.receive_read(view, r[0], r[1], r[2], now, 0))
        got += 1
    if out.udp:
        udp.send_runs(out.udp.runs())
    return got


def run(python: bool, valid: bool, reads: int, seconds: float, rcvbuf: int, nsrc: int) -> str:
    device = Device(os.urandom, backend=backend(), classify=not python)
    device.set_private_key(clamp(bytes(range(1, 33))))
    assert device.public_key is not None
    udp = UdpSocket(0)
    udp._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    sources = ",".join(f"127.0.{i // 200}.{1 + i % 200}" for i in range(nsrc))
    buf = bytearray(UDP_BUF * reads)
    drain = drain_python if python else drain_c
    with tempfile.NamedTemporaryFile() as f:
        pool(device.public_key, valid, Path(f.name))
        sender = subprocess.Popen([str(build_sender()), "127.0.0.1", str(udp.port), "0",
                                   str(seconds + 0.5), f.name, "148", sources],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert sender.stdout is not None and sender.stdout.readline() == "ready\n"
        start, cpu0, total = time.monotonic(), time.process_time(), 0
        while (now := time.monotonic()) - start < seconds:
            got = drain(device, udp, buf, reads, now)
            device.intake.queue.clear()  # only the intake is measured
            total += got
            if not got:
                time.sleep(0.0001)
        cpu = time.process_time() - cpu0
        sent = sender.communicate(timeout=10)[0].strip()
    udp.close()
    kind = "python" if python else "C"
    flood = "valid mac1" if valid else "junk"
    return (
        f"| {kind} | {flood} | {nsrc} | {reads} | {rcvbuf >> 10} KiB "
        f"| {total / seconds:,.0f} | {cpu / max(total, 1) * 1e6:.2f} | {sent} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", metavar="DIR", help="the wgpy tree to measure (read at import)")
    ap.add_argument("--reads", default="64", help="reads per call, comma-separated")
    ap.add_argument("--python", action="store_true", help="the Python intake as well")
    ap.add_argument("--seconds", type=float, default=2.5)
    ap.add_argument("--rcvbuf", type=int, default=8 << 20)
    ap.add_argument("--sources", default="200", help="source addresses, comma-separated runs")
    args = ap.parse_args()
    print("| intake | flood | sources | reads a call | rcvbuf | reads/s | CPU us a read | sender |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for python in [False, True] if args.python else [False]:
        for nsrc in map(int, args.sources.split(",")):
            for valid in (True, False):
                for reads in map(int, args.reads.split(",")):
                    print(run(python, valid, reads, args.seconds, args.rcvbuf, nsrc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
