"""The datapath: glue between the TUN, the UDP socket and the protocol core.

Each readable event drains up to a batch of reads, hands them to the core and gives what
comes back to the TUN and the UDP socket, which do their own offloads (TUN: coalescing
into GSO super-packets; UDP: GSO runs). One datagram's way: `UdpSocket.recv_into` ->
`Device.receive_read` -> `Tun.write_batch`, and nothing else in between (with the native
module, an opened read stays in the buffer it was decrypted into, a run of packets per
Python object, until `write_tun` writes it to the TUN from there); with the C
intake (core/intake.py), `Classifier.drain` reads the socket 64 reads at a time (or,
from READER_THREADS crypto threads, takes what a reader thread read ahead while a backlog
lasts: `udp_reader`), refuses junk and sends the cookie replies a flood is owed itself,
and only the reads that brought something go on, by `Device.open_classified`, and the
sessions they opened are accounted for once per drain (`Device.account`); a drain of one
read of one data message goes to the TUN in one C call instead (`_open_lone`). Both ways, the
packets go out first and the core settles after what they did to their peers
(`Device.settle`, `Device.account`): a lone packet (a ping) waits for no bookkeeping.

A handshake retry forgets the sticky source address of the peer's endpoint before the
retry goes out (as wireguard-go's `markEndpointSrcForClearing` and Linux's
`wg_socket_clear_peer_endpoint_src`): if our packets from that address got lost, the
kernel picks one again. The source is learnt from authenticated datagrams only: a data
read that opened, or the read of a handshake message, whose packet info the core hands
back with the handshake's event (the `tag` of `Device.receive_read`) however late the
queue works it off.

Handshake messages are queued by the core during the reads and worked off once per turn,
after the data, 16 at a time for at most 0.5 ms: an established tunnel keeps moving during
a flood. The first batch of 16 always goes (its X25519 on the crypto threads, ~0.3-0.6 ms
here); under load most messages only cost a cookie reply (~6 us), and the time bound lets
the turn answer several batches: with a fixed 16 a flood from many sources kept the queue
full, and a legitimate handshake was as likely as any to be dropped as "queue full". The
bound was 2 ms: a turn then spent most of the loop's time on strangers' Diffie-Hellman
while the tunnel's data waited, and a flood of within-rate initiations from 200 sources
at 20,000/s left the tunnel 40-49% of its throughput; at 0.5 ms 55-69%, the same
handshake times (bench/flood.py mode c, BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from wgpy.core import intake, native
from wgpy.core.backend import Backend, Item
from wgpy.core.data import Received, brought
from wgpy.core.device import Device
from wgpy.core.events import (
    CookieSent,
    HandshakeRetry,
    InitiationReceived,
    InitiationSent,
    ProtocolEvent,
    ResponseReceived,
)
from wgpy.core.output import Drop, Output
from wgpy.core.peer import Keypair
from wgpy.io import offload
from wgpy.io.tun import TSO, Tun, TunGone
from wgpy.io.udp import UdpSocket

log = logging.getLogger("wgpy.datapath")

BATCH = 64  # reads (UDP) or packets (TUN) per readable event before going back to the loop
# (a TUN batch stays under the core's 128 staged packets per peer, a TSO read included)
HANDSHAKES_PER_TURN = 16  # one batch of X25519 work (core/device.py HANDSHAKE_BATCH)
HANDSHAKE_SECONDS = 0.0005  # more batches of 16 in a turn while this lasts (cookie replies)
UDP_BUF = 65536 + 4096  # one GRO read is at most 64 KiB
DRAIN = 64  # reads per recvmmsg of the C intake; BATCH reads in all per readable event


class BatchSizes:
    """How many packets each readable event handed the core, as a histogram with
    power-of-two buckets (bucket k: at most 2**k packets). One update per event, never
    per packet; read by metrics from another thread (plain ints)."""

    BUCKETS = 14  # up to 8192: BATCH reads of up to 64 GRO segments each, and more

    __slots__ = ("counts", "events", "packets")

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.events = 0
        self.packets = 0

    def record(self, n: int) -> None:
        self.counts[min((n - 1).bit_length(), self.BUCKETS - 1)] += 1
        self.events += 1
        self.packets += n


def crypto_threads(asked: int | None = None) -> int:
    """How many threads seal and open data messages and work out the handshakes' X25519
    (the native backend; core/device.py `_work_off`): `asked` (the daemon's --threads),
    else WGPY_THREADS, else one per core this process may run on."""
    if asked is None:
        env = os.environ.get("WGPY_THREADS", "")
        asked = int(env) if env.strip() else len(os.sched_getaffinity(0))
    if asked < 1:
        raise ValueError(f"threads must be at least 1, not {asked}")
    return asked


def backend(threads: int | None = None, *, start: bool = True) -> Backend:
    """The data path's backend, chosen once for the daemon and wgpy.Interface alike: the
    native extension, unless WGPY_NATIVE=0 asks for the pure-Python one (the reference)
    or it was not built; the pure one's sealers take threading locks. The native one
    gets its crypto workers: `crypto_threads(threads)` in all, the caller's thread
    being one of them, so a single core runs no extra thread; a batch wakes only as many
    as the CPUs had to spare over the last 0.1 s, unless WGPY_SPREAD=all asks for all of
    them whatever the load (docs/design.md, "Crypto on every core"). `start=False` leaves them
    to `Backend.start_workers()`: a process that will still unshare a user namespace
    (wgpy run, wgpy proxy) must be single-threaded until then (unshare(2): EINVAL)."""
    module = _native_module()
    threads = crypto_threads(threads) if module is not None else 1
    spread = os.environ.get("WGPY_SPREAD", "spare")
    if spread not in ("spare", "all"):
        raise ValueError(f"WGPY_SPREAD is spare or all, not {spread!r}")
    chosen = Backend(module, threading.Lock, threads, spare_only=spread == "spare")
    if start:
        chosen.start_workers()
    return chosen


def _pure_asked() -> bool:
    """Whether WGPY_NATIVE=0 asks for the pure-Python path (data path and intake alike)."""
    return os.environ.get("WGPY_NATIVE", "1") == "0"


def _native_module() -> Any:
    """The native extension, unless WGPY_NATIVE=0 asks for the pure-Python path or it was
    not built (None)."""
    return None if _pure_asked() else native.load()


def native_datapath() -> bool:
    """Whether the datapath is the native one (`backend`'s choice): what the many-core
    kit (../shared/devkit/bench.sh) checks before it measures."""
    return _native_module() is not None


def native_intake() -> bool:
    """Whether the handshake intake runs in C (core/intake.py): where it was built, unless
    WGPY_NATIVE=0 asks for the pure-Python path, or WGPY_INTAKE=0 for the Python intake
    alone (beside the native data path: what a comparison of the two intakes wants)."""
    off = _pure_asked() or os.environ.get("WGPY_INTAKE", "1") == "0"
    return intake.available() and not off


def tun_offloads(device: Device, vnet_hdr: bool) -> int:
    """What TUN reads may bring: TSO pays only where C splits it (io/tun.py)."""
    return TSO if device.native is not None and vnet_hdr else 0


# crypto threads from which the TUN writes get a thread of their own by default: one core
# for the loop, one for a crypto worker, one for the writer. On 2 cores nothing overlaps
# (the threads only take turns) and the hand-off costs CPU: measured there, the receiving
# loop thread spent ~5% less per GB and the daemon ~8-12% more (docs/design.md).
WRITER_THREADS = 3


def tun_writer(device: Device, tun: Tun) -> bool:
    """Whether the TUN writes get a writer thread (src/native/writer.c): with the native
    datapath on WRITER_THREADS crypto threads or more and a virtio header (the writes
    write_tun makes); WGPY_TUN_WRITER=1 asks for it on 2 threads too, =0 never. One
    thread (a single core) never gets one."""
    wanted = os.environ.get("WGPY_TUN_WRITER", "")
    least = 2 if wanted == "1" else WRITER_THREADS
    return wanted != "0" and device.backend.threads >= least and tun.vnet_hdr


# crypto threads from which the UDP sends get a thread of their own: 2, unlike the TUN
# writes. Measured on 2 cores (docs/design.md), the sending daemon spent the same CPU per
# GB with it (perf stat: 2.0 s/GB either way, for 10x the futex calls and 6x the context
# switches) and moved 1.03-1.18x as much; the writer there cost 8-12% more CPU per GB.
SENDER_THREADS = 2


def udp_sender(device: Device) -> bool:
    """Whether the UDP sends get a sender thread (src/native/send.c `UdpSender`): with the
    native datapath on SENDER_THREADS crypto threads or more; WGPY_UDP_SENDER=0 never.
    One thread (a single core) never gets one."""
    wanted = os.environ.get("WGPY_UDP_SENDER", "")
    return wanted != "0" and device.backend.threads >= SENDER_THREADS


# crypto threads from which the UDP reads get a thread of their own (src/native/reader.c),
# with the C intake: one core for the loop, one for a crypto worker, one for the reader (as
# the TUN writer). It reads only while a backlog lasts: a lone packet is read by the loop
# as without it (docs/design.md, "The threads and their locks").
READER_THREADS = 3
READER_SLOTS = 4  # the reader's ring: DRAIN reads of UDP_BUF each a slot (pages as touched)


def udp_reader(device: Device) -> bool:
    """Whether the UDP reads get a reader thread (src/native/reader.c `UdpReader`): with
    the C intake on READER_THREADS crypto threads or more; WGPY_UDP_READER=1 asks for it
    on 2 threads too, =0 never. One thread (a single core) never gets one."""
    wanted = os.environ.get("WGPY_UDP_READER", "")
    least = 2 if wanted == "1" else READER_THREADS
    return (wanted != "0" and device.backend.threads >= least
            and device.intake.classifier is not None)  # fmt: skip


class Datapath:
    def __init__(
        self,
        device: Device,
        tun: Tun,
        udp: UdpSocket,
        on_events: Callable[[list[ProtocolEvent]], None] | None = None,
    ) -> None:
        self.device = device
        self.tun = tun
        self.udp = udp
        self._reader: Any = None  # a UdpReader (use_udp), its buffer's view
        self._lone_open: Any = None  # native.open_lone where a lone read may take it (use_udp)
        self._reader_view = memoryview(b"")
        if device.native is not None:  # the TUN's offloads in C too, byte for byte the same
            device.publish_routes()  # (the lone ways' table, from the first packet)
            tun.coalesce, tun.split = device.native.coalesce, device.native.split
            tun.read_nowait = device.native.read_nowait
            if tun.reads_fd():  # and reads kept where they were read (not a test's channel)
                tun.read_packet = device.native.read_packet
            if tun.writes_fd:  # and the writes, straight from the opened reads' buffers
                tun.write_coalesced = device.native.write_tun
                if tun_writer(device, tun):  # on a thread of their own: a pipeline
                    tun.use_writer(device.native.TunWriter())
        try:
            self.use_udp(udp)
            self.on_events = on_events  # the daemon's logger, metrics, the library's listeners
            self.drops: Counter[Drop] = Counter()  # since start, by reason
            self.udp_batches = BatchSizes()  # datagrams per readable UDP event
            self.tun_batches = BatchSizes()  # packets per TUN turn (an event, or after UDP)
            self._udp_buf = bytearray(UDP_BUF)
            self._drain_buf = bytearray()  # DRAIN reads of UDP_BUF each, made on the first read
            self._drain_view = memoryview(self._drain_buf)  # (one, not one a drain)
            self._tun_buf = bytearray(65536 + offload.VNET_HDR_LEN)
        except BaseException:  # (a MemoryError, say) no reader thread of ours left running
            self.close()
            raise
        self._reads_kept = tun.read_packet is not None and tun.vnet_hdr  # Tun.read_packets

    def use_udp(self, udp: UdpSocket) -> None:
        """Send through `udp` from now on (the daemon's new socket on a port change): with
        the native module, its sends made in C, on a sender thread where `udp_sender`."""
        self.udp = udp
        # the C intake reads it itself (`_drain`): its descriptor, not a call per drain
        self._udp_fd = udp.fileno() if udp.reads_are_its_own() else -1
        # ... DRAIN reads of up to UDP_BUF each at once, or a reader thread does
        self._drains = self.device.intake.classifier is not None and self._udp_fd >= 0
        self._use_reader()
        native = self.device.native
        # a lone read's hop to the TUN in one C call (`_open_lone`): where the C intake
        # drains (into its buffer or a reader's slot) and the TUN's writes are write(2)s
        lone = self._drains and self.tun.writes_fd
        self._lone_open = native.open_lone if native is not None and lone else None
        # its sends in C, and a lone packet's whole hop (`_send_lone`); not a test's channel
        self._lone_send = native is not None and udp.sends_are_its_own()
        if native is not None and self._lone_send:
            udp.use_native(native.send_runs, self._sender(), native.seal_send)

    def _sender(self) -> Any:
        """A sender thread where `udp_sender` wants one and a thread can be had (else the
        loop's thread sends, as on one core: a port change never leaves the socket
        unserved for want of a thread)."""
        native = self.device.native
        if native is None or not udp_sender(self.device):
            return None
        try:
            return native.UdpSender()
        except OSError as e:
            log.warning("no sender thread (%s): the loop's thread sends", e)
            return None

    def _use_reader(self) -> None:
        """The old socket's reader thread stopped (joined: before that socket is closed);
        one for the new socket where `udp_reader` wants it and a thread can be had (else
        the loop's thread reads, as on one core)."""
        if self._reader is not None:
            self._reader.close()
            self._reader, self._reader_view = None, memoryview(b"")
        if not (self._drains and udp_reader(self.device)):
            return
        from wgpy._classify import UdpReader

        try:
            self._reader = UdpReader(self._udp_fd, READER_SLOTS, DRAIN, UDP_BUF)
        except (OSError, MemoryError) as e:  # no thread, no room for its ring
            log.warning("no reader thread (%s): the loop's thread reads", e)
            return
        self._reader_view = memoryview(self._reader)

    def udp_fds(self) -> tuple[int, ...]:
        """What the loop watches for `on_udp` (after each `use_udp`): the socket, and the
        reader thread's eventfd where the socket has one."""
        if self._reader is None:
            return (self.udp.fileno(),)
        return self.udp.fileno(), self._reader.fileno()

    def close(self) -> None:
        """Stop the reader thread (before the socket is closed)."""
        if self._reader is not None:
            self._reader.close()

    def on_udp(self) -> None:
        """Drain the socket. The datagrams of one GRO read go to the core together, as
        views into the receive buffer (no copies); what comes out is sent once at the end.
        With the C intake, the opened packets go to the TUN before their sessions are
        accounted for and the queued handshakes worked off: a lone packet's way out of
        the daemon waits for neither (its latency; the two cannot change what it is).
        Where data came, the TUN is read at once after: the kernel answers what was
        written to it (an echo reply, a TCP ACK) before the write returns, so the answer
        goes out without a turn of the loop (a ping's round trip 0.558 -> 0.502 ms:
        docs/design.md, "Latency")."""
        out = Output()
        now = time.monotonic()
        received: dict[Keypair, Received] = {}
        count = self._drain(now, out, received) if self._drains else self._read(now, out)
        if received:
            try:
                self.transmit(out)
            finally:  # the sessions' part, whatever the write did (as on_tun's settle)
                out = Output()
                self.device.account(received, now, out)
        if self.device.queued_handshakes:
            self._work_off_handshakes(now, out)
        self.transmit(out)
        if count:
            self.udp_batches.record(count)
        # what the packets written caused (a ping's reply) may wait in the TUN: read it now.
        # Not after a full drain: under load the TUN keeps its one turn a round of the loop.
        # (on_tun's False, the interface gone: the loop's own read finds it too.)
        if out.authentic and count < BATCH:
            self.on_tun()

    def _read(self, now: float, out: Output) -> int:
        """Up to BATCH reads, one by one, each handed to the core as it comes."""
        view = memoryview(self._udp_buf)
        recv_into, receive = self.udp.recv_into, self.device.receive_read
        udp = self.udp
        count = 0
        for _ in range(BATCH):
            got = recv_into(view)
            if got is None:
                break
            n, seg, addr = got
            info = udp.last_info  # back with the handshake events of this read (transmit)
            read = receive(view, n, seg, addr, now, 0, info)
            if read.authentic and info is not None:
                udp.learn_source(addr, info)
            out.extend(read)
            count += (n + seg - 1) // seg if seg else 1
        return count

    def _drain(self, now: float, out: Output, received: dict[Keypair, Received]) -> int:
        """Up to BATCH reads, DRAIN at a time, read and classified in C (core/intake.py):
        refused datagrams and the cookie replies to them never become Python objects;
        the reads that brought data or a handshake that passed go to the core, tagged
        with their packet info as in `_read`, and the sessions they authenticated are
        left in `received`, for the caller to account for once (endpoint, counters,
        timers: one `now`). Returns the reads (a refused GRO read counts one)."""
        device, udp, classifier = self.device, self.udp, self.device.intake.classifier
        assert classifier is not None
        fd: Any = self._reader
        if fd is not None:  # the socket's reads in its slots (its thread's, or made here)
            buf, view = fd, self._reader_view
        else:
            buf, view = self._drain_buf, self._drain_view
            if not buf:  # 4.4 MiB zeroed: not before the daemon is up and has its signals
                buf = self._drain_buf = bytearray(UDP_BUF * DRAIN)
                view = self._drain_view = memoryview(buf)
            fd = self._udp_fd
        opened = device.open_classified
        count = 0
        while count < BATCH:
            until, queued, forced, state = device.intake.state(now)
            kept, got, until, drops, sent, counter = classifier.drain(
                fd, buf, UDP_BUF, DRAIN, now, until, queued, forced, state
            )
            try:  # a lone read's packet to the TUN first, the intake's part after, always
                if got == 1 and kept and self._lone_open is not None and self._open_lone(
                        buf, kept[0], now, out, received):  # fmt: skip
                    kept = []  # (written)
            finally:  # (the cookie replies' nonce counter is never lost)
                device.intake.done(until, drops, state is not None, counter, out)
            if sent:
                out.events.append(CookieSent(None, count=sent))  # one event per drain
            for offset, n, seg, src, info, passed, ndata in kept:
                if opened(view[offset : offset + n], n, seg, src, now, passed, ndata, info, out,
                          received) and info is not None:  # fmt: skip
                    udp.learn_source(src, info)
            count += got
            if got < DRAIN:
                break
        return count

    def _open_lone(self, buf: Any, read: tuple[Any, ...], now: float, out: Output,
                   received: dict[Keypair, Received]) -> bool:  # fmt: skip
        """A drain's one read, where it is one data message: opened in place in `buf`
        (the drain's buffer, or the reader's, whose slot is the loop's till its next
        drain), its inner source checked and its packet written to the TUN in one C call
        (`native.open_lone`: what `Device.open_classified` and `Tun.write_batch` do,
        without their Python per step; docs/design.md "Latency: a lone packet"). Its
        drop, its session (for `account`, after the write as ever) and its source are
        left as the usual way leaves them. False, nothing done, where it does not take
        that way."""
        offset, n, seg, src, info, passed, ndata = read
        if passed is not None or ndata != 1 or 0 < seg < n:  # (a GRO read of several)
            return False
        device, tun = self.device, self.tun
        index = device.index
        got = self._lone_open(buf, offset, n, index.sessions,
                              index.session_keypairs, device.allowed_ips.mirror, now,
                              tun.fileno(), tun.vnet_hdr, tun.writer)  # fmt: skip
        if got is None:  # (no mirror yet, a writer with batches queued: the usual way)
            return False
        kp, data, drop, failed = got
        if drop is not None:
            out.drops[Drop(drop)] += 1
        if kp is not None:
            brought(received, kp, src, n, data)  # (after the drains before it, if any)
            if info is not None:
                self.udp.learn_source(src, info)
        if failed:
            try:  # noqa: SIM105 (as transmit's)
                tun.failed_writes(failed, device.mtu)
            except TunGone:  # noticed and handled on the next read
                pass
        return True

    def _work_off_handshakes(self, now: float, out: Output) -> None:
        device = self.device
        stop = time.monotonic() + HANDSHAKE_SECONDS
        out.extend(device.process_handshakes(now, HANDSHAKES_PER_TURN))
        while device.queued_handshakes and time.monotonic() < stop:
            out.extend(device.process_handshakes(now, HANDSHAKES_PER_TURN))

    def on_tun(self) -> bool:
        """Drain the TUN into the core; False once the interface is gone. What was sealed
        is sent before the core settles what that does to the peers (timers, counters, a
        rekey): a lone packet goes on the wire first."""
        try:
            if self._reads_kept:  # (Tun.read_batch would call it: a call fewer)
                packets, count = self.tun.read_packets(BATCH, self.device.mtu)
            else:
                packets, count = self.tun.read_batch(memoryview(self._tun_buf), BATCH,
                                                     self.device.mtu)  # fmt: skip
        except TunGone:
            return False
        if packets:
            device, now = self.device, time.monotonic()
            try:
                if count > 1 or not self._send_lone(packets[0], now):
                    self.transmit(device.send(packets, now, settle=False))
            finally:
                self.transmit(device.settle(now))
            self.tun_batches.record(count)
        return True

    def _send_lone(self, packet: Item, now: float) -> bool:
        """A lone packet's common way (`Device.seal_one`): sealed and sent with half the
        Python calls of the batch's; with the native module, routed, sealed and sent in
        one C call (`UdpSocket.seal_send`). False where it does not take that way."""
        if self._lone_send:
            device = self.device
            return self.udp.seal_send(packet, device.allowed_ips.mirror, now, device.mtu,
                                      device.unsettled)  # fmt: skip
        sealed = self.device.seal_one(packet, now) if packet.__class__ is bytes else None
        if sealed is None:
            return False
        (buf, size), endpoint = sealed[0][0], sealed[1]  # one packet: one datagram, one run
        self.udp.send_runs([(buf, size, endpoint)])  # (no comprehension: a frame in 3.11)
        return True

    def tick(self, now: float) -> None:
        with contextlib.suppress(TunGone):  # noticed and handled on the next read
            self.tun.collect(self.device.mtu)  # the writer's late failures (a USO refusal)
        self.udp.collect()  # the sender's late findings (a source gone, GSO refused)
        self.transmit(self.device.tick(now))

    def transmit(self, out: Output) -> None:
        if out.events:
            self.sources_from_events(out.events)
        if out.tun:
            try:  # noqa: SIM105 (contextlib.suppress: three Python frames, every packet)
                self.tun.write_batch(out.tun, self.device.mtu)
            except TunGone:  # noticed and handled on the next read
                pass
        if out.udp:
            self.udp.send_runs(out.udp.runs())
        if out.drops:
            self.drops.update(out.drops)
        if out.events and self.on_events is not None:
            self.on_events(out.events)

    def sources_from_events(self, events: list[ProtocolEvent]) -> None:
        """A handshake message that authenticated moved its peer's endpoint to its source:
        replies leave from the local address that message came to (the event's tag, the
        packet info its read was tagged with), not that of any other datagram from there.
        The packet info is ours: the event goes on to listeners without it. A retried
        handshake goes out from the address the kernel picks. (Events are rare: this loop
        costs nothing per packet.)"""
        for i, event in enumerate(events):
            peer = event.peer
            if peer is None or peer.endpoint is None:
                continue
            if isinstance(event, InitiationReceived | ResponseReceived):
                if event.tag is not None:
                    events[i] = type(event)(peer)
                    if isinstance(event.tag, bytes):
                        self.udp.learn_source(peer.endpoint, event.tag)
            elif isinstance(event, HandshakeRetry) or (
                isinstance(event, InitiationSent) and event.attempt > 0
            ):
                self.udp.forget_source(peer.endpoint)
