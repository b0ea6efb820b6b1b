"""`open_lone` (src/native/open.c), a lone read's hop to the TUN in one C call, against the
usual way it stands in for: `Device.open_classified` (open_batch, the allowed-IPs check of
data.open_read) and then `Tun.write_batch`'s write (write_tun with the virtio header,
write(2) per packet without it). Two worlds built from the same seed (so the same keys and
indices), one read through each way: the same drops, sessions accounted (bytes, data?),
authentication, bytes written, replay windows and peer state after."""

from __future__ import annotations

import errno
import fcntl
import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.namespaces import run_in_new_namespace
from tests.native.test_device_paths import A_EP, inner, mutate, state, world
from wgpy.core import native
from wgpy.core.data import Received
from wgpy.core.device import Device
from wgpy.core.output import Drop, Output
from wgpy.core.peer import Keypair
from wgpy.io import offload
from wgpy.sim import ipv4_packet, ipv6_packet

module = native.load()
pytestmark = pytest.mark.skipif(module is None, reason="wgpy._native is not built")

Outcome = tuple[bool, dict[Drop, int], list[tuple[int, int, bool]]]
Pipes = tuple[tuple[int, int], tuple[int, int]]


@pytest.fixture
def pipes() -> Iterator[Pipes]:
    """Two pipes standing in for the TUN's descriptor: what each way wrote, in order."""
    made = [os.pipe(), os.pipe()]
    for r, w in made:
        fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: room for a test's writes
    try:
        yield made[0], made[1]
    finally:
        for r, w in made:
            os.close(r)
            os.close(w)


def drained(fd: int) -> bytes:
    got = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return got
        if not chunk:
            return got
        got += chunk


def accounted(received: dict[Keypair, Received]) -> list[tuple[int, int, bool]]:
    return [(kp.local_index, got.nbytes, got.data) for kp, got in received.items()]


def usual(b: Device, datagram: bytes, now: float, fd: int, vnet: bool) -> Outcome:
    """The way a read takes without open_lone, to the TUN write and the accounting."""
    out, received = Output(), {}  # type: ignore[var-annotated]
    authentic = b.open_classified(memoryview(datagram), len(datagram), 0, A_EP, now, None, 1,
                                  None, out, received)  # fmt: skip
    if out.tun and vnet:
        assert module.write_tun(fd, out.tun) == []
    elif out.tun:
        for packet in offload.packets_of(out.tun):
            os.write(fd, packet)
    b.account(received, now, Output())
    return authentic, dict(out.drops), accounted(received)


def lone(b: Device, datagram: bytes, now: float, fd: int, vnet: bool) -> Outcome | None:
    """open_lone's way, its answer turned into what the datapath makes of it; None where
    it declines (the datapath then takes the usual way)."""
    before, after = b"\xaa" * 7, b"\x55" * 9  # the read lies inside a larger buffer
    buf = bytearray(before + datagram + after)
    index = b.index
    mirror = b.allowed_ips.mirror
    got = module.open_lone(buf, len(before), len(datagram), index.sessions,
                           index.session_keypairs, mirror, now, fd, vnet, None)  # fmt: skip
    if got is None:
        assert buf == before + datagram + after  # nothing touched
        return None
    assert bytes(buf[: len(before) + 16]) == before + datagram[:16]  # the header stays
    assert not any(buf[len(before) + 16 : len(before) + len(datagram)])  # the rest zeroed
    assert bytes(buf[len(before) + len(datagram) :]) == after
    kp, data, drop, failed = got
    assert failed is None
    received = {kp: Received(A_EP, len(datagram), data)} if kp is not None else {}
    b.account(received, now, Output())
    return kp is not None, {Drop(drop): 1} if drop else {}, accounted(received)


def compare(worlds: list[tuple[object, Device, Device]], datagrams: list[bytes], now: float,
            pipes: Pipes, vnet: bool) -> int:  # fmt: skip
    """Each datagram through both ways; how many open_lone took."""
    (r1, w1), (r2, w2) = pipes
    (_, _, b1), (_, _, b2) = worlds
    taken = 0
    for d in datagrams:
        expected = usual(b1, d, now, w1, vnet)
        got = lone(b2, d, now, w2, vnet)
        if got is None:  # only what is no data message at all
            assert len(d) < 32 or d[:4] != b"\x04\0\0\0", d[:16]
            got = usual(b2, d, now, w2, vnet)
        else:
            taken += 1
        assert got == expected
        assert drained(r2) == drained(r1)
        assert state(b2) == state(b1)
    return taken


@given(st.integers(0, 2**32), st.booleans())
@settings(max_examples=40, deadline=None)
def test_open_lone_does_what_the_usual_way_does(seed: int, vnet: bool) -> None:
    made = (os.pipe(), os.pipe())
    try:
        for r, _ in made:
            fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)
        worlds = [world(True), world(True)]
        rng = random.Random(seed)
        packets = [inner(rng, i) for i in range(rng.randrange(1, 12))]
        sent = [[bytes(d) for d, _ in a.send(packets, net.now).udp] for net, a, _ in worlds]
        assert sent[0] == sent[1]
        now = worlds[0][0].now  # type: ignore[attr-defined]
        compare(worlds, mutate(rng, sent[0]), now, made, vnet)
    finally:
        for r, w in made:
            os.close(r)
            os.close(w)


def sealed(worlds: list[tuple[object, Device, Device]], packet: bytes) -> bytes:
    """`packet` sealed by a in both worlds: the same datagram."""
    got = {bytes(a.send([packet], net.now).udp[0][0])  # type: ignore[attr-defined]
           for net, a, _ in worlds}
    assert len(got) == 1
    return got.pop()


def raw(worlds: list[tuple[object, Device, Device]], packet: bytes) -> bytes:
    """`packet` (a keepalive, a malformed one) sealed by a's session in both worlds."""
    got = set()
    for _, a, _ in worlds:
        kp = next(iter(a.peers.values())).current
        assert kp is not None
        got.add(bytes(kp.sealer.seal([packet], 1420)[0]))
    assert len(got) == 1
    return got.pop()


CASES = ["good", "good6", "replayed", "bad_tag", "keepalive", "bad_inner", "not_allowed",
         "other_peers_source", "unknown_index", "removed_peer", "expired"]  # fmt: skip


@pytest.mark.parametrize("vnet", [True, False], ids=["vnet", "plain"])
@pytest.mark.parametrize("case", CASES)
def test_each_case_as_the_usual_way(case: str, vnet: bool, pipes: Pipes) -> None:
    worlds = [world(True), world(True)]
    now = worlds[0][0].now  # type: ignore[attr-defined]
    good = sealed(worlds, ipv4_packet("10.0.0.1", "10.0.0.2", b"ping" * 10))
    datagrams = {
        "good": [good],
        "good6": [sealed(worlds, ipv6_packet("fd00::1", "fd00::2", b"v6"))],
        "replayed": [good, good],
        "bad_tag": [good[:-1] + bytes([good[-1] ^ 1])],
        "keepalive": [raw(worlds, b"")],
        "bad_inner": [raw(worlds, b"\x45" + bytes(30))],  # an IPv4 length below 20
        "not_allowed": [sealed(worlds, ipv4_packet("10.9.9.9", "10.0.0.2", b"x"))],
        "other_peers_source": [sealed(worlds, ipv4_packet("10.7.1.1", "10.0.0.2", b"x"))],
        "unknown_index": [good[:4] + bytes([good[4] ^ 0xFF]) + good[5:]],
        "removed_peer": [good],
        "expired": [good],
    }[case]
    if case == "removed_peer":
        for _, _, b in worlds:
            b.remove_peer(next(p for p in b.peers.values() if p.endpoint == A_EP).public_key)
    if case == "expired":
        now += 181
    expect = {"good": None, "good6": None, "replayed": Drop.REPLAYED, "bad_tag": Drop.BAD_TAG,
              "keepalive": None, "bad_inner": Drop.BAD_INNER,
              "not_allowed": Drop.SOURCE_NOT_ALLOWED,
              "other_peers_source": Drop.SOURCE_NOT_ALLOWED,
              "unknown_index": Drop.UNKNOWN_INDEX, "removed_peer": Drop.UNKNOWN_INDEX,
              "expired": Drop.EXPIRED}[case]  # fmt: skip
    (r1, w1), (r2, w2) = pipes
    (_, _, b1), (_, _, b2) = worlds
    for d in datagrams:
        expected = usual(b1, d, now, w1, vnet)
        assert lone(b2, d, now, w2, vnet) == expected
        assert drained(r2) == drained(r1)
        assert state(b2) == state(b1)
    assert (expected[1] == {expect: 1}) if expect else expected[1] == {}
    if case in ("good", "good6"):
        assert expected[0] and expected[2][0][2]  # authentic, data: a packet was written


def test_a_writer_with_a_batch_queued_or_uncollected_keeps_the_usual_way() -> None:
    net, a, b = world(True)
    r, w = os.pipe()
    writer = module.TunWriter(depth=4, inline=0)  # every batch queued: the thread's
    try:
        datagram = bytes(a.send([ipv4_packet("10.0.0.1", "10.0.0.2", b"hi")], net.now).udp[0][0])
        assert writer.write(w, [ipv4_packet("10.0.0.1", "10.0.0.2", b"queued")]) == []
        buf = bytearray(datagram)
        index, before = b.index, state(b)
        args = (index.sessions, index.session_keypairs, b.allowed_ips.mirror, net.now, w, True)
        assert module.open_lone(buf, 0, len(buf), *args, writer) is None  # uncollected
        assert buf == datagram and state(b) == before  # nothing touched
        assert writer.flush() == []
        inline = module.TunWriter(depth=4, inline=8)
        try:
            got = module.open_lone(buf, 0, len(buf), *args, inline)
            assert got is not None and got[2] is None
            assert inline.counts() == (0, 1, 0)  # written by the caller, as write's
        finally:
            inline.close()
        assert state(b) != before
    finally:
        writer.close()
        os.close(r)
        os.close(w)


def test_an_inlining_writer_with_a_batch_uncollected_keeps_the_usual_way() -> None:
    """A writer that would write a lone batch itself (inline=1), with two packets queued
    on its thread (written or not: uncollected): the lone read does not pass them."""
    net, a, b = world(True)
    r, w = os.pipe()
    writer = module.TunWriter(depth=4, inline=1)
    try:
        datagram = bytes(a.send([ipv4_packet("10.0.0.1", "10.0.0.2", b"hi")], net.now).udp[0][0])
        two = [ipv4_packet("10.0.0.1", "10.0.0.2", tag) for tag in (b"q1", b"q2")]
        assert writer.write(w, two) == []  # more than inline: queued on the thread
        buf = bytearray(datagram)
        index, before = b.index, state(b)
        args = (index.sessions, index.session_keypairs, b.allowed_ips.mirror, net.now, w, True)
        assert module.open_lone(buf, 0, len(buf), *args, writer) is None
        assert buf == datagram and state(b) == before
    finally:
        writer.close()
        os.close(r)
        os.close(w)


def test_a_session_of_another_backend_is_declined_untouched() -> None:
    """The pure backend's Session under the index (a backend switched under a datapath):
    declined before anything is opened or zeroed, for the usual way to open it."""
    net, a, b = world(True)
    datagram = bytes(a.send([ipv4_packet("10.0.0.1", "10.0.0.2", b"hi")], net.now).udp[0][0])
    index = int.from_bytes(datagram[4:8], "little")
    sessions = {index: object()}
    buf = bytearray(datagram)
    r, w = os.pipe()
    try:
        args = (sessions, b.index.session_keypairs, b.allowed_ips.mirror, net.now, w, True, None)
        assert module.open_lone(buf, 0, len(buf), *args) is None
        assert buf == datagram
    finally:
        os.close(r)
        os.close(w)


def test_a_spent_counter_and_the_expiry_instant_as_the_usual_way() -> None:
    """A counter past REJECT_AFTER_MESSAGES is expired (not a bad tag), and so is a message
    at the session's expiry instant itself: as open_batch judges them."""
    worlds = [world(True), world(True)]
    sent = [bytes(a.send([ipv4_packet("10.0.0.1", "10.0.0.2", b"x")], net.now).udp[0][0])
            for net, a, _ in worlds]  # fmt: skip
    assert sent[0] == sent[1]
    (r1, w1), (r2, w2) = os.pipe(), os.pipe()
    try:
        (net, _, b1), (_, _, b2) = worlds
        spent = sent[0][:8] + (2**64 - 1).to_bytes(8, "little") + sent[0][16:]
        expected = usual(b1, spent, net.now, w1, True)
        assert expected[1] == {Drop.EXPIRED: 1}
        assert lone(b2, spent, net.now, w2, True) == expected
        peer = next(p for p in b1.peers.values() if p.endpoint == A_EP)
        assert peer.current is not None
        at = peer.current.session.expires  # the instant itself
        expected = usual(b1, sent[0], at, w1, True)
        assert expected[1] == {Drop.EXPIRED: 1}
        assert lone(b2, sent[0], at, w2, True) == expected
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_a_failed_write_comes_back_as_write_tuns_failures() -> None:
    worlds = [world(True), world(True), world(True)]
    datagram = sealed(worlds, ipv4_packet("10.0.0.1", "10.0.0.2", b"lost"))
    r, w = os.pipe()
    os.close(r)  # a write now fails: EPIPE (SIGPIPE is ignored by Python)
    try:
        (net, _, b1), *others = worlds
        out, received = Output(), {}  # type: ignore[var-annotated]
        b1.open_classified(memoryview(datagram), len(datagram), 0, A_EP, net.now, None, 1,
                           None, out, received)  # fmt: skip
        expected = module.write_tun(w, out.tun)
        assert expected[0][0] == errno.EPIPE
        for (_, _, b), vnet in zip(others, (True, False), strict=True):
            index, buf = b.index, bytearray(datagram)
            got = module.open_lone(buf, 0, len(buf), index.sessions, index.session_keypairs,
                                   b.allowed_ips.mirror, net.now, w, vnet, None)  # fmt: skip
            assert got is not None and got[0] is not None and got[2] is None
            # without the header: the packet alone, as Tun._write wrote it
            assert got[3] == (expected if vnet else [(errno.EPIPE, expected[0][1][10:])])
            assert state(b) == state(b1)
    finally:
        os.close(w)


def test_what_is_no_lone_data_message_is_declined_untouched() -> None:
    net, a, b = world(True)
    index = b.index
    datagram = bytes(a.send([ipv4_packet("10.0.0.1", "10.0.0.2", b"x")], net.now).udp[0][0])
    args = (index.sessions, index.session_keypairs)
    for buf, mirror in ((bytearray(datagram[:31]), b.allowed_ips.mirror),
                        (bytearray(b"\x01" + datagram[1:]), b.allowed_ips.mirror),
                        (bytearray(datagram), b.allowed_ips)):  # not the C mirror
        copy = bytes(buf)
        assert module.open_lone(buf, 0, len(buf), *args, mirror, net.now, 1, True, None) is None
        assert buf == copy
    with pytest.raises(ValueError):
        module.open_lone(bytearray(8), 4, 8, *args, b.allowed_ips.mirror, net.now, 1, True, None)


# Inside a namespace of its own: six tunnels (A -> B), the virtio header or not, a TUN
# writer thread or not, B's lone way on or off (`Datapath._lone_open`), the same datagrams
# (each a read of its own) through each; what B did must be the same with the lone way as
# without.
THROUGH_DATAPATHS = r"""
import os, select, socket, subprocess, sys, time
sys.path.insert(0, "{src}")
from wgpy.core.crypto import clamp
from wgpy.core.device import Device
from wgpy.io.datapath import Datapath, backend, native_datapath, native_intake, tun_offloads
from wgpy.io.tun import open_tun
from wgpy.io.udp import UdpSocket
from wgpy.sim import ipv4_packet, ipv6_packet

# the loop's own reads and writes unless a case asks (both default on from 3 threads)
os.environ["WGPY_UDP_READER"] = "0"
os.environ["WGPY_TUN_WRITER"] = "0"
chosen = backend()

tunnel_reader = [None]  # the last tunnel's B's reader thread, if it has one

def wait_readable(b):  # B's socket (or its reader's eventfd) has something, 1 s at most
    select.select(b.udp_fds(), [], [], 1.0)
    time.sleep(0.005)  # (and the rest of a case's datagrams, sent together)

def tunnel(k, vnet, lone):
    paths = []
    for name, v4, v6 in ((f"la{{k}}", f"10.{{80 + k}}.0.1", f"fd0{{k}}::1"),
                         (f"lb{{k}}", f"10.{{90 + k}}.0.1", f"fd1{{k}}::1")):
        device = Device(os.urandom, backend=chosen, classify=native_intake())
        device.set_private_key(clamp(os.urandom(32)))
        tun = open_tun(name, vnet, tun_offloads(device, vnet))
        for command in (["addr", "add", v4 + "/24", "dev", name],
                        ["addr", "add", v6 + "/64", "dev", name, "nodad"],
                        ["link", "set", name, "mtu", "1420", "up"]):
            subprocess.run(["ip", *command], check=True)
        device.mtu = 1420
        paths.append(Datapath(device, tun, UdpSocket(0)))
    a, b = paths
    tunnel_reader[0] = b._reader
    pa = a.device.add_peer(b.device.public_key)
    pb = b.device.add_peer(a.device.public_key)
    pa.endpoint, pb.endpoint = ("127.0.0.1", b.udp.port), ("127.0.0.1", a.udp.port)
    a.device.allowed_ips.insert(bytes([10, 90 + k, 0, 0]), 16, pa)
    b.device.allowed_ips.insert(bytes([10, 80 + k, 0, 0]), 16, pb)
    b.device.allowed_ips.insert(socket.inet_pton(socket.AF_INET6, f"fd0{{k}}::"), 64, pb)
    calls = []
    if lone is None:  # as it is
        pass
    elif lone:
        real = b._lone_open
        assert real is not None
        # (the reads it took, not the calls: one it declines goes the usual way unseen)
        b._lone_open = lambda *args: ((got := real(*args)) is not None and calls.append(1)) or got
    else:
        b._lone_open = None
    wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    wire.bind((f"lb{{k}}", 0))
    wire.setblocking(False)
    out = a.device.send([ipv4_packet(f"10.{{80 + k}}.0.1", f"10.{{90 + k}}.0.1", b"hs")],
                        time.monotonic())
    a.transmit(out)
    for step, path in ((b.on_udp, b), (a.on_udp, a), (b.on_udp, b)):  # B's last: confirmed
        wait_readable(path)
        step()
    assert pb.current is not None and pb.next is None
    return a, b, pa, pb, wire, calls

def seen(wire):
    got = []
    time.sleep(0.01)
    while True:
        try:
            data, addr = wire.recvfrom(65536)
        except BlockingIOError:
            return got
        if addr[2] != socket.PACKET_OUTGOING:  # what B wrote to its TUN, not replies
            got.append(anonymous(data))

def anonymous(packet):  # the tunnels' addresses differ: the rest must not
    span = (12, 20) if packet[0] >> 4 == 4 else (8, 40)
    return packet[: span[0]] + packet[span[1] :]

def facts(b, pb, wire, roamed=None):
    kp = pb.current
    where = "roamed" if pb.endpoint == roamed else pb.endpoint[0]  # (ports differ)
    window = hash(kp.session.window_state()) if kp is not None else None
    writer = b.tun.writer  # its counts: queued, written by the caller, waits
    return (dict(b.drops), pb.rx_bytes, where, b.udp.source(pb.endpoint), window,
            writer.counts() if writer is not None else None,
            sorted(t.value for t in pb.timers.deadlines), pb.timers.need_another_keepalive,
            seen(wire))

def run(k, vnet, lone):
    a, b, pa, pb, wire, calls = tunnel(k, vnet, lone)
    results = [facts(b, pb, wire)]  # the handshake's data, which confirmed B's session
    src, dst = f"10.{{80 + k}}.0.1", f"10.{{90 + k}}.0.1"
    seal = lambda packet: pa.current.sealer.seal([packet], 1420)[0]
    to_b = ("127.0.0.1", b.udp.port)
    good = seal(ipv4_packet(src, dst, b"ping" * 8, proto=17))
    cases = [
        [good], [good],  # then replayed
        [good[:-1] + bytes([good[-1] ^ 1])],  # a bad tag
        [seal(b"")],  # a keepalive
        [seal(b"\x45" + bytes(30))],  # a malformed inner packet
        [seal(ipv4_packet("10.99.0.1", dst, b"x", proto=17))],  # a source not allowed
        [seal(ipv6_packet(f"fd0{{k}}::7", f"fd1{{k}}::1", b"v6"))],
        [good[:4] + bytes([good[4] ^ 0xFF]) + good[5:]],  # an index nobody has
        [seal(ipv4_packet(src, dst, b"a")), seal(ipv4_packet(src, dst, b"b"))],  # two reads
        "roam",  # from another port: the endpoint moves, its source is learnt
        "remove",
        [seal(ipv4_packet(src, dst, b"gone"))],  # from a peer removed
    ]
    for datagrams in cases:
        if datagrams == "remove":
            b.device.remove_peer(a.device.public_key)
            continue
        if datagrams == "roam":
            other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            other.bind(("127.0.0.1", 0))
            other.sendto(seal(ipv4_packet(src, dst, b"roam")), to_b)
            wait_readable(b)
            b.on_udp()
            results.append(facts(b, pb, wire, other.getsockname()))
            other.close()
            continue
        pb.timers.deadlines.clear()  # each case's own timers seen
        pb.timers.need_another_keepalive = False
        for d in datagrams:
            a.udp.send(d, to_b)
        wait_readable(b)
        b.on_udp()
        results.append(facts(b, pb, wire))
    return results, len(calls)

if not (native_datapath() and native_intake()):  # the pure backend, no C intake: never
    assert tunnel(0, True, None)[1]._lone_open is None
    print("ok")
    sys.exit()
for k, vnet in ((0, True), (2, False), (4, True), (6, True)):
    if k == 4:  # the TUN's writes on a writer thread (where 2 crypto threads allow one)
        os.environ["WGPY_TUN_WRITER"] = "1"
    if k == 6:  # the UDP reads into a reader thread's slots (opened in place there too)
        os.environ["WGPY_TUN_WRITER"], os.environ["WGPY_UDP_READER"] = "0", "1"
    on, taken = run(k, vnet, True)
    assert (tunnel_reader[0] is not None) == (k == 6 and chosen.threads >= 2)
    assert (on[0][5] is not None) == (k == 4 and chosen.threads >= 2), on[0][5]
    assert on[10][2] == "roamed" and on[10][3] is not None, on[10]  # moved, source learnt
    off, untaken = run(k + 1, vnet, False)
    assert taken == 11 and untaken == 0, (taken, untaken)
    for i, (x, y) in enumerate(zip(on, off, strict=True)):
        assert x == y, (vnet, i, x, y)
print("ok")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace")
def test_a_datapaths_lone_way_does_what_its_usual_way_does() -> None:
    run_in_new_namespace("wgpy-lone", [["link", "set", "lo", "up"]], THROUGH_DATAPATHS)
