"""The datapath in process: two real Devices and Datapaths over in-memory channels
(tests/io/fakes.py), and the pieces the kernel tests cannot pin down: GRO slicing, GSO
run grouping, the USO fallback."""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import random
import threading
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.io.fakes import ChannelTun, ChannelUdp
from tests.io.test_offload import V4, V6, flow, udp
from wgpy.core import native
from wgpy.core.backend import Backend
from wgpy.core.crypto import clamp
from wgpy.core.device import Device
from wgpy.core.events import EventKind, ProtocolEvent
from wgpy.core.ip import SuperPacket
from wgpy.core.messages import split_read as gro_split
from wgpy.core.output import Drop
from wgpy.io import offload
from wgpy.io.datapath import Datapath
from wgpy.io.tun import Tun
from wgpy.io.udp import UdpSocket, gso_runs

A_EP = ("192.0.2.1", 51820)
B_EP = ("192.0.2.2", 51821)


NATIVE = native.load()


@pytest.fixture(autouse=True, params=["python", "native"])
def datapath_kind(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both datapaths (native only where it was built)."""
    if request.param == "native" and NATIVE is None:
        pytest.skip("wgpy._native is not built")
    Site.native = NATIVE if request.param == "native" else None
    return str(request.param)


class Site:
    native: ModuleType | None = None

    def __init__(self, ep: tuple[str, int], net: dict[tuple[str, int], ChannelUdp],
                 seed: int, refuse_uso: bool = False) -> None:  # fmt: skip
        rng = random.Random(seed)
        self.device = Device(rng.randbytes, backend=Backend(self.native, threading.Lock))
        self.device.set_private_key(clamp(rng.randbytes(32)))
        self.tun = ChannelTun(refuse_uso=refuse_uso)
        self.udp = ChannelUdp(ep, net)
        self.events: list[ProtocolEvent] = []
        self.datapath = Datapath(self.device, self.tun, self.udp, self.events.extend)


def pair(refuse_uso: bool = False) -> tuple[Site, Site]:
    net: dict[tuple[str, int], ChannelUdp] = {}
    a, b = Site(A_EP, net, 1), Site(B_EP, net, 2, refuse_uso)
    for here, there, ep, nets in ((a, b, B_EP, ("10.0.0.2/32", "fd00::2/128")),
                                  (b, a, A_EP, ("10.0.0.1/32", "fd00::1/128"))):  # fmt: skip
        assert there.device.public_key is not None
        peer = here.device.add_peer(there.device.public_key)
        assert peer is not None
        peer.endpoint = ep
        for cidr in nets:
            n = ipaddress.ip_network(cidr)
            here.device.allowed_ips.insert(n.network_address.packed, n.prefixlen, peer)
    return a, b


def carry(a: Site, b: Site, packets: list[bytes]) -> None:
    """The host at A sends `packets` into the tunnel; run both datapaths until quiet."""
    a.tun.inbound.extend(packets)
    for _ in range(20):
        a.datapath.on_tun()
        b.datapath.on_udp()
        a.datapath.on_udp()
        b.datapath.on_tun()
        if not (a.tun.inbound or a.tun.reads or a.udp.reads or b.udp.reads):
            return
    raise AssertionError("the datapaths did not settle")


def test_a_tcp_stream_crosses_as_gso_sends_and_one_super_packet_write() -> None:
    a, b = pair()
    carry(a, b, flow(1, 100))  # handshake first; the staged packet follows it
    assert b.tun.delivered() == flow(1, 100)
    kinds = [e.kind for e in a.events]
    assert EventKind.INITIATION_SENT in kinds and EventKind.HANDSHAKE_COMPLETED in kinds
    b.tun.written.clear()
    a.udp.sent.clear()
    stream = flow(40, 1360, seq=5000)
    carry(a, b, stream)
    assert b.tun.delivered() == stream
    assert len(b.tun.written) == 1  # 40 segments, one TUN write
    datagrams, _ = a.udp.sent[0]
    assert len(a.udp.sent) == 1 and len(datagrams) == 40  # one GSO send


def test_an_answer_to_what_a_read_wrote_goes_out_in_the_same_turn() -> None:
    """What the packets a read wrote to the TUN caused there (B's host answering a ping
    before the write returns) is read and sent by the same `on_udp`, not a loop turn later."""
    a, b = pair()
    carry(a, b, flow(1, 100))  # the handshake
    b.udp.sent.clear()
    b.tun.written.clear()
    request, reply = udp(b"ping"), udp(b"pong", addrs=(V4[1], V4[0]))
    a.tun.inbound.append(request)
    a.datapath.on_tun()
    b.tun.inbound.append(reply)  # the host's answer, there once the request is written
    b.datapath.on_udp()
    assert b.tun.delivered() == [request]
    assert len(b.udp.sent) == 1 and not b.tun.inbound  # the reply sealed and sent
    a.datapath.on_udp()
    assert a.tun.delivered()[-1:] == [reply]


def test_a_full_udp_drain_leaves_the_tun_to_the_loop() -> None:
    """Under load both ways, a round of the loop reads one TUN batch, not two: on_udp reads
    the TUN after it only where its drain was not full (review)."""
    a, b = pair()
    carry(a, b, [udp(b"hs")])
    a.tun.inbound.extend(udp(b"a%d" % i) for i in range(400))
    a.datapath.on_tun()
    a.datapath.on_tun()
    b.tun.inbound.extend(udp(b"b%d" % i, addrs=(V4[1], V4[0])) for i in range(400))
    before = len(b.tun.inbound)
    b.datapath.on_tun()
    b.datapath.on_udp()  # one round of the loop
    assert before - len(b.tun.inbound) <= 64


def test_a_tso_read_stays_whole_until_sealed_and_goes_out_in_gso_sends() -> None:
    """A TSO read (what the kernel hands a TUN with TUNSETOFFLOAD) is one super-packet from
    the read to the sealer, whichever backend: the peer's host gets exactly the segments
    `split` cuts, the sender makes one GSO send per 64 KiB, and the batch counts them."""
    a, b = pair()
    carry(a, b, flow(1, 100))
    for addrs, n in ((V4, 44), (V6, 30)):
        b.tun.written.clear()
        a.udp.sent.clear()
        (read,) = offload.coalesce(flow(n, 1380, seq=9000, addrs=addrs))
        assert read[1] in (offload.GSO_TCPV4, offload.GSO_TCPV6)
        a.tun.reads.append(read)
        packets = a.datapath.tun_batches.packets
        carry(a, b, [])
        assert a.datapath.tun_batches.packets - packets == n
        assert b.tun.delivered() == offload.split(read, 1420) == flow(n, 1380, addrs, 9000)
        ((datagrams, _),) = a.udp.sent  # under 64 KiB sealed: one GSO send
        assert len(datagrams) == n and len(set(map(len, datagrams))) == 1


def test_read_batch_keeps_a_tso_read_whole() -> None:
    tun = ChannelTun()
    (read,) = offload.coalesce(flow(10, 1000))
    tun.reads += [read, read[:20]]  # a super-packet, then one too short to cut
    tun.inbound.append(flow(1, 10)[0])
    items, count = tun.read_batch(memoryview(bytearray(70000)), 64, 1420)
    assert count == 11 and len(items) == 2
    whole, plain = items
    assert isinstance(whole, SuperPacket) and whole.nsegments == 10
    assert whole.packet == read[offload.VNET_HDR_LEN :] and plain == flow(1, 10)[0]


def test_ipv6_and_udp_flows_and_a_source_the_peer_does_not_own() -> None:
    a, b = pair()
    carry(a, b, flow(1, 10))
    b.tun.written.clear()
    datagrams = [udp(bytes([i]) * 700, ip_id=i) for i in range(10)]
    v6 = flow(5, 1000, addrs=V6)
    spoofed = flow(1, 10, addrs=(bytes([10, 9, 9, 9]), V4[1]))
    carry(a, b, [*datagrams, *v6, *spoofed])
    assert b.tun.delivered() == [*datagrams, *v6]
    assert len(b.tun.written) == 2  # one USO write, one TCPv6 super-packet
    assert b.datapath.drops == {Drop.SOURCE_NOT_ALLOWED: 1}


def test_a_kernel_refusing_uso_gets_datagrams_one_by_one_from_then_on() -> None:
    a, b = pair(refuse_uso=True)
    carry(a, b, flow(1, 10))
    datagrams = [udp(bytes([i]) * 500, ip_id=i) for i in range(6)]
    carry(a, b, datagrams)
    assert not b.tun.coalesce_udp
    assert b.tun.delivered()[-6:] == datagrams
    b.tun.written.clear()
    carry(a, b, [udp(bytes([9]) * 500, ip_id=50 + i) for i in range(4)])
    assert len(b.tun.written) == 4 and all(w[1] == offload.GSO_NONE for w in b.tun.written)


def test_a_kernel_refusing_uso_loses_no_flow_of_the_batch_that_found_out() -> None:
    """Two UDP flows in the batch that meets the refusal: both super-packets come back
    as datagrams (the refusal is EINVAL, which `Tun.write` also reads as a vanished
    interface: that once lost the whole batch and kept making USO writes)."""
    a, b = pair(refuse_uso=True)
    carry(a, b, flow(1, 10))
    v4 = [udp(bytes([i]) * 500, ip_id=i) for i in range(5)]
    v6 = [udp(bytes([i]) * 300, addrs=V6) for i in range(4)]
    carry(a, b, [*v4, *v6])
    assert sorted(b.tun.delivered()[-9:]) == sorted([*v4, *v6])
    assert not b.tun.coalesce_udp


def test_the_native_datapath_makes_a_real_tuns_writes_in_c() -> None:
    """A TUN that writes a descriptor gets its writes made in C (write_tun: writev from
    the buffers the reads were opened into, without the GIL); the channel fakes, which
    have no descriptor, keep the Python loop, as the pure datapath does everywhere."""
    site = Site(A_EP, {}, 3)
    assert site.tun.write_coalesced is None
    tun = Tun.__new__(Tun)  # a TUN as open_tun makes one, short of its descriptor
    tun.vnet_hdr = True
    Datapath(site.device, tun, site.udp)
    assert tun.write_coalesced is (None if Site.native is None else Site.native.write_tun)
    assert tun.writer is None  # one crypto thread: no writer thread either


def test_with_more_crypto_threads_the_tun_writes_get_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the native backend with 3 crypto threads or more (a core for it), a TUN with the
    virtio header hands its writes to a writer thread (src/native/writer.c), which its
    close stops; WGPY_TUN_WRITER=1 asks for one on 2 threads, =0 never; without the
    header, or on one thread, the loop's thread writes."""
    cases = [("", 3, True, True), ("", 2, True, False), ("1", 2, True, True),
             ("1", 1, True, False), ("0", 4, True, False), ("", 4, False, False)]  # fmt: skip
    for env, threads, vnet_hdr, threaded in cases:
        monkeypatch.setenv("WGPY_TUN_WRITER", env)
        backend = Backend(Site.native, threading.Lock, threads)
        device = Device(random.Random(1).randbytes, backend=backend)
        tun = Tun.__new__(Tun)
        tun.vnet_hdr, tun._fd, tun._ctl = vnet_hdr, -1, None
        Datapath(device, tun, ChannelUdp(A_EP, {}))
        assert (tun.writer is not None) is (threaded and Site.native is not None)
        if tun.writer is not None:
            assert tun.write_coalesced == tun.writer.write
        tun.close()


def test_the_udp_sends_go_through_c_and_get_a_thread_from_2_crypto_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the native backend a real UdpSocket's sends are made in C (src/native/send.c),
    on a sender thread with 2 crypto threads or more; WGPY_UDP_SENDER=0 never; one thread
    never. A test's channel (a subclass with sends of its own) keeps them; a new socket
    (the daemon's port change) gets the same."""
    cases = [("", 3, True), ("", 2, True), ("1", 2, True), ("1", 1, False), ("", 1, False),
             ("0", 4, False)]  # fmt: skip
    for env, threads, threaded in cases:
        monkeypatch.setenv("WGPY_UDP_SENDER", env)
        backend = Backend(Site.native, threading.Lock, threads)
        device = Device(random.Random(1).randbytes, backend=backend)
        first, second = UdpSocket(), UdpSocket()
        try:
            path = Datapath(device, ChannelTun(), first)
            path.use_udp(second)
            for udp in (first, second):
                assert (udp._send_native is not None) is (Site.native is not None)
                assert (udp.sender is not None) is (threaded and Site.native is not None)
                # and a lone packet's hop in one C call (UdpSocket.seal_send)
                assert (udp._seal_send is not None) is (Site.native is not None)
            assert path._lone_send is (Site.native is not None)
        finally:
            first.close()
            second.close()
        assert first._seal_send is None  # closed: its descriptor's number is not sent on
    channel = Site(A_EP, {}, 3)
    assert channel.udp._send_native is None and channel.udp._seal_send is None
    assert channel.datapath._lone_send is False


def test_a_sender_thread_that_cannot_start_leaves_the_loop_sending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where no thread can be had (pthread_create: EAGAIN), the socket still gets its sends
    made in C, by the loop's thread: a port change never leaves it unserved (review)."""

    def no_thread() -> None:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    if Site.native is None:
        pytest.skip("the sender thread is the native module's")
    monkeypatch.setattr(Site.native, "UdpSender", no_thread)
    monkeypatch.setenv("WGPY_UDP_SENDER", "1")
    device = Device(random.Random(1).randbytes, backend=Backend(Site.native, threading.Lock, 2))
    first, second = UdpSocket(), UdpSocket()
    try:
        path = Datapath(device, ChannelTun(), first)
        path.use_udp(second)
        for udp in (first, second):
            assert udp.sender is None and udp._send_native is Site.native.send_runs
    finally:
        first.close()
        second.close()


def test_handshakes_wait_for_the_data_of_the_same_turn() -> None:
    a, b = pair()
    carry(a, b, flow(1, 10))
    junk_initiation = bytes([1, 0, 0, 0]) + bytes(144)
    b.udp.reads.extend([(junk_initiation, 0, ("203.0.113.1", 1))] * 3)
    carry(a, b, flow(3, 100, seq=9000))
    assert b.datapath.drops[Drop.BAD_MAC1] == 3
    assert b.tun.delivered()[-3:] == flow(3, 100, seq=9000)


# ---- GRO slicing and GSO runs --------------------------------------------------------


def test_gro_split_edges() -> None:
    view = memoryview(bytes(range(10)))
    assert gro_split(view, 0, 0) == [] and gro_split(view, 0, 4) == []
    assert [bytes(v) for v in gro_split(view, 10, 0)] == [bytes(range(10))]
    assert [bytes(v) for v in gro_split(view, 10, 10)] == [bytes(range(10))]
    assert [bytes(v) for v in gro_split(view, 10, 12)] == [bytes(range(10))]
    assert [len(v) for v in gro_split(view, 10, 4)] == [4, 4, 2]
    assert [len(v) for v in gro_split(view, 8, 4)] == [4, 4]
    assert [len(v) for v in gro_split(view, 7, 1)] == [1] * 7
    # a read fills only the start of the (larger) receive buffer: the last datagram ends
    # where the read ended, not a whole segment further
    assert [bytes(v) for v in gro_split(view, 7, 3)] == [b"\0\1\2", b"\3\4\5", b"\6"]


@given(st.binary(max_size=3000), st.integers(-5, 3100))
def test_gro_split_covers_the_read_in_order(data: bytes, seg: int) -> None:
    parts = gro_split(memoryview(data + b"stale bytes past the read"), len(data), seg)
    assert b"".join(parts) == data
    if parts:
        sizes = {len(p) for p in parts[:-1]}
        assert len(sizes) <= 1 and all(len(parts[-1]) <= s for s in sizes)


@given(st.lists(st.tuples(st.sampled_from([100, 200, 300]), st.sampled_from([A_EP, B_EP])),
                max_size=40))  # fmt: skip
@settings(max_examples=200)
def test_gso_runs_are_what_one_send_can_carry(spec: list[tuple[int, tuple[str, int]]]) -> None:
    datagrams = [(bytes(size), ep) for size, ep in spec]
    runs = list(gso_runs(datagrams))
    assert [i for s, e, _, _ in runs for i in range(s, e)] == list(range(len(datagrams)))
    for start, end, size, ep in runs:
        run = datagrams[start:end]
        assert all(e == ep for _, e in run) and len(run[0][0]) == size
        assert all(len(d) == size for d, _ in run[:-1]) and len(run[-1][0]) <= size
    # maximal: a run never ends where the next datagram could have joined it
    for (_, e1, size, ep), (s2, _, _, _) in itertools.pairwise(runs):
        nxt, nxt_ep = datagrams[s2]
        last = datagrams[e1 - 1][0]
        assert not (nxt_ep == ep and len(last) == size and len(nxt) <= size)


@pytest.mark.parametrize("sizes", [[1400] * 5, [1400] * 4 + [600], [600, 1400]])
def test_send_batch_groups_runs(sizes: list[int]) -> None:
    net: dict[tuple[str, int], ChannelUdp] = {}
    sock = ChannelUdp(A_EP, net)
    sock.send_batch([(bytes(n), B_EP) for n in sizes])
    assert [[len(d) for d in ds] for ds, _ in sock.sent] == (
        [sizes] if sizes[0] >= sizes[-1] else [[s] for s in sizes]
    )


def test_native_datapath_is_backends_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """`native_datapath()` (what ../shared/devkit/bench.sh asks before it measures) says
    what `backend()` chooses: native where built, pure with WGPY_NATIVE=0."""
    from wgpy.io.datapath import backend, native_datapath

    wanted = NATIVE is not None and os.environ.get("WGPY_NATIVE", "1") != "0"
    assert native_datapath() == (backend(start=False).native is not None) == wanted
    monkeypatch.setenv("WGPY_NATIVE", "0")
    assert not native_datapath() and backend(start=False).native is None
