"""A stress run of the data path on either backend: traffic in full batches (one GRO read
per sender, so the native backend cuts them across its crypto threads) while peers rekey,
are removed and added back (`wg set`), lose and regain allowed IPs, roam, and rotate keys.

What must hold, checked as it runs:
- no (receiver index, counter) on the wire twice: no nonce used twice;
- the server delivers no packet whose inner source its configuration of that moment does
  not give to the sending peer (a removed peer, a moved IP, a spoofed source);
- each client's packets reach the server in the order they were sent (the network here
  neither loses nor reorders, so any reordering would be the data path's), none twice;
  natively also through the server's TUN writes, made by a writer thread (`TunWriter`)
  into a SEQPACKET socket read back on another thread, and each session's data messages
  through the server's UDP sends, made by a sender thread (`UdpSender`) to a socket on
  loopback read back on another; and the data messages to the server through a socket on
  loopback read by a reader thread (`UdpReader` of wgpy._classify, replaced now and then
  as a port change replaces it) and drained by the C intake, in order per session;
- nothing raises.

Usage: python tests/native/stress.py [seconds] [native|python] [harnesses]: the run the
ThreadSanitizer build (tests/native/tsan.sh) makes, several harnesses on as many threads
(and, native, one more thread working X25519 batches on the same crypto threads).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import ModuleType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from wgpy.core.backend import Backend
from wgpy.core.crypto import PrivateKey, clamp
from wgpy.core.device import Device
from wgpy.core.ip import SuperPacket, super_packet
from wgpy.core.messages import DATA_HEADER, MSG_DATA
from wgpy.core.output import Endpoint, Output, ToTun
from wgpy.io import offload

SERVER_EP: Endpoint = ("192.0.2.1", 51820)
SERVER_IP = bytes([10, 9, 0, 1])
TAG = struct.Struct("!HIB")  # payload: client number, sequence number, spoofed?
Wire = list[tuple[bytes, Endpoint, Endpoint]]


def packet(src: bytes, dst: bytes, client: int, seq: int, spoofed: bool, size: int) -> bytes:
    body = TAG.pack(client, seq, spoofed) + bytes(size)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 17, 0, src, dst)
    return header + body


def tso_read(src: bytes, dst: bytes, size: int) -> SuperPacket | None:
    """A TCP super-packet as a TSO read brings it: the sealer cuts it (on the crypto
    threads, natively) into segments of 1000 payload bytes."""
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 0x50, 0x10, 1000, 0, 0) + bytes(size)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, src, dst)
    return super_packet(header + tcp, 1000, 0, False)


@dataclass
class Client:
    number: int
    device: Device
    endpoint: Endpoint
    ip: bytes
    seq: int = 0
    delivered: int = -1  # the last sequence number the server delivered


class TunSink:
    """The server's TUN: its writes go through a writer thread (the native `TunWriter`,
    a short queue, every batch queued) into a SEQPACKET socket, read back on a thread of
    its own; each client's packets must come out of it in the order they went in."""

    def __init__(self, module: ModuleType) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.writer = module.TunWriter(depth=2, inline=0)
        self.last: dict[int, int] = {}
        self.count = 0
        self.failed: list[str] = []
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def write(self, items: list[ToTun]) -> None:
        assert self.writer.write(self.ours.fileno(), items, True) == []

    def _read(self) -> None:
        for message in iter(lambda: self.theirs.recv(1 << 17), b""):
            for p in offload.split(message, 1420):
                if p[16:20] != SERVER_IP:
                    continue
                number, seq, _ = TAG.unpack_from(p, 20)
                if seq <= self.last.get(number, -1):
                    self.failed.append(f"TUN: client {number}: {seq} after {self.last[number]}")
                self.last[number] = seq
                self.count += 1

    def close(self) -> int:
        """Everything written and read: how many of the test's packets came through."""
        assert self.writer.flush() == []
        self.writer.close()
        self.ours.shutdown(socket.SHUT_WR)
        self.reader.join(30)
        self.ours.close()
        self.theirs.close()
        assert not self.failed, self.failed[0]
        return self.count


class UdpSink:
    """The server's UDP sends: through a sender thread (the native `UdpSender`, a short
    queue, every batch queued) to a UDP socket on loopback, read back on a thread of its
    own; each session's data messages must come out in the order of their counters (the
    network here neither loses nor reorders, but the socket may drop: no count)."""

    def __init__(self, module: ModuleType) -> None:
        self.theirs = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.theirs.bind(("127.0.0.1", 0))
        self.theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.theirs.settimeout(10)
        self.ours = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        port = self.theirs.getsockname()[1].to_bytes(2, "big")
        addr = struct.pack("=H2s4s8x", socket.AF_INET, port, socket.inet_aton("127.0.0.1"))
        self.dest = (addr, None)  # every endpoint: the reader's socket
        self.sender = module.UdpSender(depth=2, inline=0)
        self.last: dict[int, int] = {}
        self.count = 0
        self.failed: list[str] = []
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def send(self, out: Output) -> None:
        got = self.sender.send(self.ours.fileno(), out.udp.runs(), {}, self._dest, True)
        assert got == []

    def _dest(self, endpoint: Endpoint) -> tuple[bytes, None]:
        return self.dest

    def _read(self) -> None:
        with contextlib.suppress(TimeoutError):
            for data in iter(lambda: self.theirs.recv(1 << 16), b"stop"):
                if len(data) < 32 or DATA_HEADER.unpack_from(data)[0] != MSG_DATA:
                    continue
                _, index, counter = DATA_HEADER.unpack_from(data)
                if counter <= self.last.get(index, -1):
                    self.failed.append(f"UDP: index {index}: {counter} after {self.last[index]}")
                self.last[index] = counter
                self.count += 1

    def close(self) -> int:
        """Everything sent and read: how many data messages came through."""
        assert self.sender.flush() == []
        self.sender.close()
        self.ours.sendto(b"stop", self.theirs.getsockname())
        self.reader.join(30)
        self.ours.close()
        self.theirs.close()
        assert not self.failed, self.failed[0]
        return self.count


class UdpSource:
    """The server's UDP reads: the data messages to the server also go through a socket on
    loopback, read by the C intake (`Classifier.drain`) through a reader (`UdpReader`, a
    ring of 2 slots; its thread reads ahead while the reads come back full) after each
    step; each session's come out in the order of their counters (the socket may drop: no
    count). Every 50 drains the reader is closed and a new one started on the socket
    while datagrams wait (a port change's)."""

    def __init__(self) -> None:
        from wgpy._classify import UdpReader
        from wgpy.core import intake

        self.reader_type = UdpReader
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.rx.bind(("127.0.0.1", 0))
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.classifier = intake.classifier(b"stress", 4096)
        self.reader = UdpReader(self.rx.fileno(), slots=2, count=16, size=2048)
        self.last: dict[int, int] = {}
        self.count = self.drains = 0

    def send(self, data: bytes) -> None:
        with contextlib.suppress(BlockingIOError):
            self.tx.sendto(data, socket.MSG_DONTWAIT, self.rx.getsockname())

    def drain(self, wait: float = 0.0) -> int:
        """Drain what the thread read; the reads drained."""
        got = 0
        while select.select([self.rx, self.reader.fileno()], [], [], wait)[0]:  # as the loop
            kept, n, *_ = self.classifier.drain(self.reader, self.reader, 2048, 16, 1.0, 0.0,
                                                0, False, None)  # fmt: skip
            view = memoryview(self.reader)
            for offset, size, seg, *_ in kept:
                for at in range(offset, offset + size, seg or size):
                    _, index, counter = DATA_HEADER.unpack_from(view, at)
                    assert counter > self.last.get(index, -1), f"UDP in: {index}: {counter}"
                    self.last[index] = counter
                    self.count += 1
            got += n
            self.drains += 1
            if not n:
                break  # the thread's read under way came back empty
            if self.drains % 50 == 0:
                self.reader.close()
                self.reader = self.reader_type(self.rx.fileno(), slots=2, count=16, size=2048)
        return got

    def close(self) -> int:
        """Everything read: how many data messages came through."""
        while self.drain(0.2):
            pass
        self.reader.close()
        self.rx.close()
        self.tx.close()
        return self.count


@dataclass
class Stress:
    backend: Backend
    seed: int
    rng: random.Random = field(init=False)
    now: float = 1000.0
    counters: set[tuple[Endpoint, int, int]] = field(default_factory=set)
    owner: dict[bytes, int] = field(default_factory=dict)  # server's allowed IPs: ip -> client
    delivered: int = 0
    sink: TunSink | None = None  # the server's TUN writes on a writer thread (native)
    udp_sink: UdpSink | None = None  # the server's UDP sends on a sender thread (native)
    udp_source: UdpSource | None = None  # the server's UDP reads on a reader thread (C intake)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.server = self._device()
        self.clients = [self._client(i) for i in range(4)]

    def _device(self) -> Device:
        device = Device(self.rng.randbytes, backend=self.backend)
        device.set_private_key(clamp(self.rng.randbytes(32)))
        return device

    def _client(self, i: int) -> Client:
        c = Client(i, self._device(), ("192.0.2.100", 40000 + i), bytes([10, 9, 1, i]))
        assert self.server.public_key is not None
        peer = c.device.add_peer(self.server.public_key)
        assert peer is not None
        peer.endpoint = SERVER_EP
        c.device.allowed_ips.insert(bytes(4), 0, peer)
        self._configure(c)
        return c

    def _configure(self, c: Client) -> None:
        """The server's peer for client c (`wg set peer ... allowed-ips`)."""
        assert c.device.public_key is not None
        peer = self.server.add_peer(c.device.public_key)
        assert peer is not None
        self.server.allowed_ips.insert(c.ip, 32, peer)
        self.owner[c.ip] = c.number

    # ---- moving datagrams ---------------------------------------------------------------

    def _device_at(self, ep: Endpoint) -> Device | None:
        if ep == SERVER_EP:
            return self.server
        return next((c.device for c in self.clients if c.endpoint == ep), None)

    def carry(self, wire: Wire) -> None:
        """Deliver datagrams (and all they provoke), each sender's as GRO reads."""
        while wire:
            reads: dict[tuple[Endpoint, Endpoint], list[bytes]] = defaultdict(list)
            for data, src, dst in wire:
                self._note(data, dst)
                reads[(src, dst)].append(data)
                if dst == SERVER_EP and self.udp_source is not None and data[0] == MSG_DATA:
                    self.udp_source.send(data)
            wire = []
            for (src, dst), grams in reads.items():
                device = self._device_at(dst)
                if device is None:
                    continue
                for read, seg in gro_reads(grams):
                    out = device.receive_read(memoryview(read), len(read), seg, src, self.now)
                    if device is self.server:
                        self._check_delivered(out.tun_packets())
                        if self.sink is not None:
                            self.sink.write(out.tun)
                    wire += self._outputs(device, out)

    def _outputs(self, device: Device, out: Output) -> Wire:
        if device is self.server and self.udp_sink is not None:
            self.udp_sink.send(out)
        ep = SERVER_EP if device is self.server else self._client_of(device).endpoint
        return [(d, ep, dst) for d, dst in out.udp]

    def _client_of(self, device: Device) -> Client:
        return next(c for c in self.clients if c.device is device)

    def _note(self, data: bytes, dst: Endpoint) -> None:
        """No nonce twice: every data message's (receiver, index, counter) is new."""
        if len(data) >= 32 and DATA_HEADER.unpack_from(data)[0] == MSG_DATA:
            _, index, counter = DATA_HEADER.unpack_from(data)
            key = (dst, index, counter)
            assert key not in self.counters, f"counter {counter} used twice on index {index}"
            self.counters.add(key)

    def _check_delivered(self, packets: list[bytes]) -> None:
        for p in packets:
            if p[16:20] != SERVER_IP:
                continue  # not the test's traffic
            number, seq, spoofed = TAG.unpack_from(p, 20)
            assert not spoofed, f"a spoofed packet of client {number} was delivered"
            assert self.owner.get(p[12:16]) == number, "a source the server does not allow"
            c = self.clients[number]
            assert seq > c.delivered, f"client {number}: {seq} after {c.delivered}"
            c.delivered = seq
            self.delivered += 1

    # ---- what happens -------------------------------------------------------------------

    def traffic(self) -> None:
        wire: Wire = []
        for c in self.clients:
            batch = []
            for _ in range(self.rng.choice([1, 7, 30, 64])):
                spoofed = self.rng.random() < 0.05
                src = bytes([10, 9, 2, self.rng.randrange(256)]) if spoofed else c.ip
                size = self.rng.choice([0, 100, 1300])
                batch.append(packet(src, SERVER_IP, c.number, c.seq, spoofed, size))
                c.seq += 1
            out = c.device.send(batch, self.now)
            wire += [(d, c.endpoint, dst) for d, dst in out.udp]
        replies: list[bytes | SuperPacket | None] = [
            packet(SERVER_IP, c.ip, 0, 0, False, 500) for c in self.clients
        ] * 8
        sizes = [0, 999, 9000]
        replies += [tso_read(SERVER_IP, c.ip, self.rng.choice(sizes)) for c in self.clients]
        wire += self._outputs(self.server, self.server.send([r for r in replies if r], self.now))
        self.carry(wire)

    def tick(self, seconds: float) -> None:
        self.now += seconds
        for device in [self.server, *(c.device for c in self.clients)]:
            out = device.tick(self.now)
            ep = SERVER_EP if device is self.server else self._client_of(device).endpoint
            self.carry([(d, ep, dst) for d, dst in out.udp])

    def remove_and_readd(self, c: Client) -> None:
        assert c.device.public_key is not None
        self.server.remove_peer(c.device.public_key)
        self.owner = {ip: n for ip, n in self.owner.items() if n != c.number}
        self.traffic()  # in the gap: nothing of c's may be delivered
        self._configure(c)

    def move_ip(self, c: Client, to: Client) -> None:
        """c's address to another client at the server (`wg set ... allowed-ips`)."""
        assert to.device.public_key is not None
        self.server.allowed_ips.insert(c.ip, 32, self.server.peers[to.device.public_key])
        self.owner[c.ip] = to.number
        self.traffic()
        self._configure(c)  # and back

    def roam(self, c: Client) -> None:
        c.endpoint = (c.endpoint[0], c.endpoint[1] + 100)

    def rotate_key(self, c: Client) -> None:
        assert c.device.public_key is not None
        self.server.remove_peer(c.device.public_key)
        c.device.set_private_key(clamp(self.rng.randbytes(32)))
        self._configure(c)

    def step(self) -> None:
        roll = self.rng.random()
        c = self.rng.choice(self.clients)
        if roll < 0.6:
            self.traffic()
        elif roll < 0.75:
            self.tick(self.rng.choice([0.5, 5.0, 30.0, 125.0]))  # 125: past a rekey
        elif roll < 0.82:
            self.remove_and_readd(c)
        elif roll < 0.89:
            self.move_ip(c, self.rng.choice(self.clients))
        elif roll < 0.95:
            self.roam(c)
        else:
            self.rotate_key(c)
        if self.udp_source is not None:
            self.udp_source.drain()


def gro_reads(grams: list[bytes]) -> list[tuple[bytes, int]]:
    """Datagrams as GRO would merge them: runs of one size, the last may be shorter."""
    reads: list[tuple[bytes, int]] = []
    run: list[bytes] = []
    for g in grams:
        if run and (len(g) > len(run[0]) or len(run[-1]) < len(run[0])):
            reads.append((b"".join(run), len(run[0])))
            run = []
        run.append(g)
    if run:
        reads.append((b"".join(run), len(run[0])))
    return reads


def udp_source() -> UdpSource | None:
    """A reader thread's reads where wgpy._classify was built."""
    from wgpy.core import intake

    return UdpSource() if intake.available() else None


def run(backend: Backend, seed: int, steps: int) -> Stress:
    native = backend.native
    s = Stress(backend, seed, sink=TunSink(native) if native is not None else None,
               udp_sink=UdpSink(native) if native is not None else None,
               udp_source=udp_source() if native is not None else None)  # fmt: skip
    try:
        for _ in range(steps):
            s.step()
    finally:
        if s.sink is not None:
            assert s.sink.close() == s.delivered  # every delivered packet, in order
        if s.udp_sink is not None:
            assert s.udp_sink.close() > 0  # in order, each session's
        if s.udp_source is not None:
            assert s.udp_source.close() > 0  # in order, each session's
    return s


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    kind = sys.argv[2] if len(sys.argv) > 2 else "native"
    harnesses = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    module: ModuleType | None = None
    if kind == "native":
        from wgpy import _native as module

        module.set_threads(3)
    deadline = time.monotonic() + seconds
    errors: list[BaseException] = []
    totals: list[int] = []

    def harness(seed: int) -> None:
        try:
            sink = TunSink(module) if module is not None else None
            udp_sink = UdpSink(module) if module is not None else None
            source = udp_source() if module is not None else None
            s = Stress(Backend(module, threading.Lock), seed, sink=sink, udp_sink=udp_sink,
                       udp_source=source)  # fmt: skip
            while time.monotonic() < deadline:
                s.step()
            assert sink is None or sink.close() == s.delivered
            assert udp_sink is None or udp_sink.close() > 0
            assert source is None or source.close() > 0
            totals.append(s.delivered)
        except BaseException as e:
            errors.append(e)

    def exchanger() -> None:  # X25519 batches (dh.c), screens (screen.c), same threads
        assert module is not None
        rng = random.Random(99)
        ours = clamp(rng.randbytes(32))
        public = PrivateKey(ours).public
        try:
            while time.monotonic() < deadline:
                jobs = tuple((rng.randbytes(32), None, (rng.randbytes(32), rng.randbytes(32)))
                             for _ in range(rng.randrange(1, 17)))  # fmt: skip
                module.x25519(jobs)
                module.screen(ours, public, tuple(rng.randbytes(148) for _ in range(16)))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=harness, args=(seed,)) for seed in range(harnesses)]
    if module is not None:
        threads.append(threading.Thread(target=exchanger))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    print(f"stress: {sum(totals)} packets delivered, every check held ({kind})")


if __name__ == "__main__":
    main()
