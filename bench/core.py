"""In-memory benchmarks of the protocol core alone (no sockets, no TUN).

    python bench/core.py [--src DIR] [--seconds 3] [--native] [--threads N] [--batch N]

The wgpy measured is `--src DIR`'s, else the one PYTHONPATH holds, else this checkout's
src/ (bench/tree.py); so `PYTHONPATH=/tmp/old/src python bench/core.py` and
`python bench/core.py` (or `--src`), run in turns, compare two versions (bench/hops.py
takes several SRC at once).

- handshakes: initiations one responder answers per second (fresh initiators; MAC1 check,
  two DH + the response's three, the AEADs), `--batch` of them per receive call (the
  daemon works 16 at a time off its queue), on the pure path or `--native` with
  `--threads` crypto threads in all (the caller's counted: 1 starts none);
- datapath: µs per 1420-byte packet through Device.send and Device.receive in batches of
  64, the per-packet interpreter cost that the UDP/TUN batching cannot remove; and through
  Device.receive_read, the daemon's way in: the 64 datagrams as one UDP GRO read;
- TSO send: µs per packet of one TSO read of 44 segments (a super-packet, as the native
  datapath's TUN hands it over) through Device.send into its GSO runs;
- junk initiations: µs of the calling thread's CPU (time.thread_time: the load of other
  processes does not count, the crypto workers' time does not either) per initiation
  from an unknown static key (valid mac1, as bench/flood.py's modes a and c send), worked
  off from the queue `--batch` at a time: what a within-rate spoofed flood costs the
  loop's thread.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time

from tree import use  # bench/tree.py: the script's directory is first on sys.path

SRC = use()  # --src DIR, else the wgpy PYTHONPATH holds, else this checkout's src/

from wgpy.core import native  # noqa: E402
from wgpy.core.backend import Backend  # noqa: E402
from wgpy.core.cookie import CookieGenerator  # noqa: E402
from wgpy.core.crypto import PrivateKey, clamp, dh, tai64n  # noqa: E402
from wgpy.core.device import Device  # noqa: E402
from wgpy.core.messages import INITIATION, MSG_INITIATION  # noqa: E402
from wgpy.core.noise import SymmetricState, create_initiation  # noqa: E402

BACKEND = Backend()  # the datapath's; --native: the extension module's

A_EP = ("192.0.2.1", 1)
B_EP = ("192.0.2.2", 2)


def make_pair() -> tuple[Device, Device]:
    a, b = Device(os.urandom, backend=BACKEND), Device(os.urandom, backend=BACKEND)
    a.set_private_key(clamp(os.urandom(32)))
    b.set_private_key(clamp(os.urandom(32)))
    for here, there, net, ep in (
        (a, b, bytes([10, 0, 0, 2]), B_EP),
        (b, a, bytes([10, 0, 0, 1]), A_EP),
    ):
        assert there.public_key is not None
        peer = here.add_peer(there.public_key)
        assert peer is not None
        peer.endpoint = ep
        here.allowed_ips.insert(net, 32, peer)
    return a, b


def tcp_like(size: int) -> bytes:
    header = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 6, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    )
    return header + bytes(size - 20)


def bench_handshakes(seconds: float, backend: Backend | None = None, batch: int = 1) -> float:
    responder = Device(os.urandom, backend=backend)
    responder.set_private_key(clamp(os.urandom(32)))
    initiators = []
    for _ in range(200):
        a = Device(os.urandom)
        a.set_private_key(clamp(os.urandom(32)))
        assert responder.public_key and a.public_key
        peer = a.add_peer(responder.public_key)
        assert peer is not None
        peer.endpoint = B_EP
        a.allowed_ips.insert(bytes(4), 0, peer)
        responder.add_peer(a.public_key)
        initiators.append(a)
    # Each initiation is answered again and again: between two rounds its sender's
    # replay state at the responder is reset, which costs nothing measurable.
    rounds = []
    for i, a in enumerate(initiators):
        msg = a.send([tcp_like(100)], float(i)).udp[0][0]
        assert a.public_key is not None
        rounds.append((msg, responder.peers[a.public_key].handshake))
    done, now, start = 0, 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(rounds) - batch + 1, batch):
            now += 1.0
            for _, hs in rounds[i : i + batch]:
                hs.latest_timestamp = bytes(12)
            done += len(responder.receive([(m, A_EP) for m, _ in rounds[i : i + batch]], now).udp)
    return done / (time.perf_counter() - start)


def bench_datapath(seconds: float, size: int = 1420, batch: int = 64) -> tuple[float, ...]:
    """µs per packet: send, receive (a list of datagrams), receive_read (one GRO read)."""
    a, b = make_pair()
    out = a.send([tcp_like(100)], 0.0)
    resp = b.receive([(out.udp[0][0], A_EP)], 0.0)
    confirm = a.receive([(resp.udp[0][0], B_EP)], 0.0)
    b.receive([(d, A_EP) for d, _ in confirm.udp], 0.0)
    packets = [tcp_like(size)] * batch
    n, t_send, t_recv, t_read = 0, 0.0, 0.0, 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        sealed = a.send(packets, 1.0).udp
        t1 = time.perf_counter()
        delivered = b.receive([(d, A_EP) for d, _ in sealed], 1.0)
        t2 = time.perf_counter()
        assert len(delivered.tun_packets()) == batch
        read = b"".join(d for d, _ in a.send(packets, 1.0).udp)  # what GRO hands over
        t3 = time.perf_counter()
        got = b.receive_read(memoryview(read), len(read), len(read) // batch, A_EP, 1.0)
        t_read += time.perf_counter() - t3
        assert len(got.tun_packets()) == batch
        t_send += t1 - t0
        t_recv += t2 - t1
        n += batch
    return t_send / n * 1e6, t_recv / n * 1e6, t_read / n * 1e6


def bench_tso_send(seconds: float, segments: int = 44) -> float:
    """µs per segment: one TSO read kept whole (core/ip.py), routed once, cut and sealed
    (NaN for a checkout from before super-packets, as `--src` may name)."""
    try:
        from wgpy.core.ip import super_packet
    except ImportError:
        return float("nan")

    a, b = make_pair()
    out = a.send([tcp_like(100)], 0.0)
    resp = b.receive([(out.udp[0][0], A_EP)], 0.0)
    a.receive([(resp.udp[0][0], B_EP)], 0.0)
    payload = 1380 * segments
    tcp = struct.pack(">HHIIBBHHH", 1, 2, 0, 0, 0x50, 0x10, 1000, 0, 0) + bytes(payload)
    sp = super_packet(tcp_like(20)[:20] + tcp, 1380, 0, False)
    assert sp is not None and sp.nsegments == segments
    n, spent = 0, 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        sent = a.send([sp], 1.0)
        spent += time.perf_counter() - t0
        assert len(sent.udp) == segments
        n += segments
    return spent / n * 1e6


def junk_initiation(victim_pub: bytes) -> bytes:
    """An initiation from a random static key we do not know, with a valid mac1."""
    static = PrivateKey(os.urandom(32))
    e_pub, enc_static, enc_time = create_initiation(
        SymmetricState(victim_pub), static, victim_pub, dh(static, victim_pub),
        os.urandom(32), tai64n(time.time()),
    )  # fmt: skip
    fields = (MSG_INITIATION, 1, e_pub, enc_static, enc_time, bytes(16), bytes(16))
    msg = bytearray(INITIATION.pack(*fields))
    CookieGenerator(victim_pub).add_macs(msg, 0.0)
    return bytes(msg)


def bench_junk(seconds: float, backend: Backend | None = None, batch: int = 16) -> float:
    """µs of this thread's CPU per junk initiation worked off (queued directly: the
    intake's mac1 and rate limits are not what is measured)."""
    responder = Device(os.urandom, backend=backend)
    responder.set_private_key(clamp(os.urandom(32)))
    assert responder.public_key is not None
    pool = [junk_initiation(responder.public_key) for _ in range(256)]
    queue = responder.intake.queue
    n, spent, now = 0, 0.0, 1.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for i in range(0, len(pool), batch):
            queue.extend((m, A_EP, MSG_INITIATION, False, None) for m in pool[i : i + batch])
            t0 = time.thread_time()
            out = responder.process_handshakes(now, batch)
            spent += time.thread_time() - t0
            assert out.drops and not out.udp
            n += batch
    return spent / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--src", metavar="DIR", help="the wgpy tree to measure (read at import)")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--native", action="store_true", help="the native backend (wgpy._native)")
    p.add_argument("--threads", type=int, default=1, help="crypto threads in all, with --native")
    p.add_argument("--batch", type=int, default=1, help="initiations per receive call")
    p.add_argument("--junk", action="store_true", help="the junk initiations' figure alone")
    args = p.parse_args()
    print(f"wgpy from {os.path.dirname(os.path.dirname(os.path.dirname(native.__file__)))}")
    backend = None
    if args.native:
        module = native.load()
        if module is None:
            sys.exit("wgpy._native is not built")
        backend = Backend(module, threads=args.threads)
        backend.start_workers()
        global BACKEND
        BACKEND = backend  # the datapath figures too
    junk_us = bench_junk(args.seconds, backend, max(args.batch, 16))
    print(
        f"junk initiations (unknown static, {max(args.batch, 16)} a batch): "
        f"{junk_us:.1f} µs of the calling thread each"
    )
    if args.junk:
        return
    hps = bench_handshakes(args.seconds, backend, args.batch)
    send_us, recv_us, read_us = bench_datapath(args.seconds)
    tso_us = bench_tso_send(args.seconds)
    where = f"native, {args.threads} thread(s)" if args.native else "pure, one core"
    print(f"handshake responses per second ({where}, {args.batch} a call): {hps:,.0f}")
    print(f"core send:    {send_us:.2f} µs per 1420-byte packet")
    print(f"core send (TSO read, 44 segments): {tso_us:.2f} µs per packet")
    print(f"core receive: {recv_us:.2f} µs per 1420-byte packet")
    print(f"core receive_read (GRO): {read_us:.2f} µs per 1420-byte packet")


if __name__ == "__main__":
    main()
