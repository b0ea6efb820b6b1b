"""The handshake intake in C (src/native/classify.c) against the Python one (core/intake.py
and core/ratelimit.py): two devices from the same seed and key, one classifying in C, fed
the same reads (valid and invalid mac1, with and without mac2, valid mac2 for the cookie
the device handed out, responses, cookie replies, data, bad sizes and types; IPv4 and IPv6
sources, several in one /64; GRO-packed runs or one by one; a clock that stands or jumps;
load forced or not; the queue worked off or left to fill). Everything must be the same:
drops by reason, cookie replies byte for byte, events, the queue, the load deadline, the
number of sources the buckets hold."""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgpy.core import intake
from wgpy.core.cookie import CookieGenerator
from wgpy.core.crypto import clamp, mac
from wgpy.core.device import Device, Output
from wgpy.core.events import CookieSent, ProtocolEvent
from wgpy.core.intake import HANDSHAKE_QUEUE
from wgpy.core.messages import INITIATION_LEN, RESPONSE_LEN
from wgpy.core.output import Drop
from wgpy.core.ratelimit import MAX_SOURCES
from wgpy.io.udp import IP_PKTINFO

pytestmark = pytest.mark.skipif(not intake.available(), reason="wgpy._classify is not built")

KEY = clamp(bytes(range(1, 33)))
SOURCES = [("192.0.2.1", 51820), ("192.0.2.1", 4000), ("192.0.2.7", 1), ("2001:db8::1", 9),
           ("2001:db8::2", 9), ("2001:db8:0:1::1", 7), ("fe80::1%lo", 5)]  # fmt: skip


KNOWN = [SOURCES[1], SOURCES[4]]  # peers' endpoints: replies to them are never shed


def pair(has_key: bool = True, spare: tuple[float, int] | None = None) -> tuple[Device, Device]:
    """`spare`: the rate and burst of replies strangers get while shedding, if not the
    device's (ratelimit.py SHED_REPLIES, SHED_BURST)."""
    devices = []
    for classify in (False, True):
        rng = random.Random(5)
        with pytest.MonkeyPatch.context() as patch:
            if spare is not None:
                patch.setattr(intake, "SHED_REPLIES", spare[0])
                patch.setattr(intake, "SHED_BURST", spare[1])
            device = Device(rng.randbytes, classify=classify)
        if has_key:
            device.set_private_key(KEY)
        for endpoint in KNOWN:
            peer = device.add_peer(clamp(rng.randbytes(32)))
            assert peer is not None
            peer.endpoint = endpoint
        devices.append(device)
    return devices[0], devices[1]


# what a datagram is; built against the device once it exists
SHAPES = st.sampled_from(
    ["init", "init_mac2", "init_cookie", "resp", "resp_cookie", "bad_mac1", "cookie_reply",
     "data", "short", "long", "unknown"]
)  # fmt: skip


def build(shape: str, device: Device, src: tuple[str, int], rng: random.Random) -> bytes:
    """One datagram of a shape, made for `device` (its mac1 key, its cookie secret)."""
    if shape in ("short", "long", "unknown", "data", "cookie_reply"):
        size = {"short": rng.randrange(0, 148), "long": 149, "unknown": 148, "data": 48,
                "cookie_reply": 64}[shape]  # fmt: skip
        kind = {"short": rng.randrange(0, 6), "long": 1, "unknown": rng.choice([0, 5, 257]),
                "data": 4, "cookie_reply": 3}[shape]  # fmt: skip
        head = kind.to_bytes(4, "little")
        return (head + rng.randbytes(max(0, size - 4)))[:size]
    size = RESPONSE_LEN if shape.startswith("resp") else INITIATION_LEN
    msg = bytearray((1 if size == INITIATION_LEN else 2).to_bytes(4, "little"))
    msg += rng.randbytes(size - 36) + bytes(32)
    assert device.public_key is not None
    CookieGenerator(device.public_key).add_macs(msg, 0.0)
    if shape == "bad_mac1":
        msg[-32] ^= 1
    elif shape == "init_mac2":
        msg[-16:] = rng.randbytes(16)  # a mac2 from no cookie of ours
    elif shape.endswith("_cookie"):
        secret, _ = device.cookie_checker.secret
        if secret:
            from ipaddress import ip_address

            host = ip_address(src[0]).packed + src[1].to_bytes(2, "big")
            msg[-16:] = mac(mac(secret, host), bytes(msg[:-16]))
    return bytes(msg)


READS = st.lists(
    st.tuples(
        st.integers(0, len(SOURCES) - 1),  # source
        st.lists(SHAPES, min_size=1, max_size=6),  # the datagrams, GRO-packed if one size
        st.sampled_from([0.0, 0.0, 0.001, 0.02, 0.3, 1.5, 130.0]),  # clock step before it
        st.sampled_from([0, 0, 0, 16, 64]),  # handshakes worked off after it
        st.booleans(),  # as one read (receive_read) or as a list (receive)
        st.integers(1, 24),  # how many times the read comes
    ),
    min_size=1,
    max_size=25,
)


def cookies_told(events: list[ProtocolEvent]) -> Counter[object]:
    """Cookie replies told, by source: the C intake tells a read's replies as one event."""
    told: Counter[object] = Counter()
    for e in events:
        if isinstance(e, CookieSent):
            told[e.source] += e.count
    return told


def same(a: Output, b: Output) -> None:
    assert a.drops == b.drops
    assert a.udp == b.udp
    assert [e for e in a.events if not isinstance(e, CookieSent)] == [
        e for e in b.events if not isinstance(e, CookieSent)
    ]
    assert cookies_told(a.events) == cookies_told(b.events)
    assert a.tun_packets() == b.tun_packets()


def check_state(py: Device, c: Device) -> None:
    assert list(py.intake.queue) == list(c.intake.queue)
    assert py.intake.load.until == c.intake.load.until
    assert c.intake.classifier is not None
    limiters = py.intake.rate_limiter, py.intake.cookie_limiter
    assert tuple(map(len, limiters)) == c.intake.classifier.sources()


@settings(max_examples=40, deadline=None)
@given(READS, st.integers(0, 2**32), st.booleans(), st.booleans(), st.booleans())
def test_same_verdicts_and_counts(
    reads: list, seed: int, forced: bool, has_key: bool, shed: bool
) -> None:
    py, c = pair(has_key, spare=(2.0, 3))  # spent by a few strangers: refusals compared
    rng = random.Random(seed)
    now = 1000.0
    for i, (source, shapes, step, budget, as_read, repeat) in enumerate(reads):
        now += step
        src = SOURCES[source]
        for device in (py, c):
            device.intake.load.forced = forced and i % 3 == 0
            device.intake.shedding = shed and i % 2 == 0  # the socket overflowed
        for _ in range(repeat):
            if not has_key:
                datagrams = [os.urandom(148)]
                datagrams[0] = b"\x01\0\0\0" + datagrams[0][4:]
            else:
                state = rng.getstate()
                datagrams = [build(s, py, src, rng) for s in shapes]
                rng.setstate(state)  # the C device gets the same bytes
                assert datagrams == [build(s, c, src, rng) for s in shapes]
            sizes = {len(d) for d in datagrams}
            if as_read and len(sizes) == 1 and datagrams[0]:
                buf = memoryview(b"".join(datagrams))
                seg = len(datagrams[0]) if len(datagrams) > 1 else 0
                outs = [d.receive_read(buf, len(buf), seg, src, now, budget) for d in (py, c)]
            else:
                outs = [d.receive([(x, src) for x in datagrams], now, budget) for d in (py, c)]
            same(*outs)
            check_state(py, c)


@pytest.mark.parametrize("kind", [5, 2, 0])  # unknown_type, bad_size, unknown_type
def test_junk_in_a_gro_read_with_data_is_counted_once(kind: int) -> None:
    """A GRO read of a data message and junk of its size (hypothesis found it, seed 1493):
    the C intake counts the junk, and the open that follows does not count it again, as
    the Python intake's open counts it once."""
    py, c = pair()
    src = SOURCES[0]
    data, junk = b"\x04\0\0\0" + bytes(range(44)), kind.to_bytes(4, "little") + bytes(44)
    buf = memoryview(data + junk)
    outs = [d.receive_read(buf, len(buf), 48, src, 1000.0, 0) for d in (py, c)]
    same(*outs)
    assert sum(outs[1].drops.values()) == 2  # the junk, and the data message's unknown index
    out: Output = Output()  # the datapath's way with the C intake: the drain judged the junk
    assert not c.open_classified(buf, len(buf), 48, src, 1000.0, None, 1, None, out, {})
    assert dict(out.drops) == {Drop.UNKNOWN_INDEX: 1}


def test_bucket_table_bound_and_collect() -> None:
    """Past MAX_SOURCES sources the tables forget what is full again, or all (responses:
    worked off without Diffie-Hellman, so the queue never holds the load up)."""
    py, c = pair()
    assert py.public_key is not None
    gen = CookieGenerator(py.public_key)
    msg = bytearray(b"\x02\0\0\0" + bytes(RESPONSE_LEN - 4))
    gen.add_macs(msg, 0.0)
    now = 50.0
    for i in range(MAX_SOURCES + 300):
        src = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1)
        if i % 2000 == 0:
            now += 0.5  # some buckets full again by the time the table is full
        outs = [d.receive_read(memoryview(msg), len(msg), 0, src, now, 64) for d in (py, c)]
        same(*outs)
    check_state(py, c)
    assert len(py.intake.rate_limiter) < MAX_SOURCES


def test_flood_from_one_source_is_refused_in_c() -> None:
    """A GRO read of 64 valid initiations from one source: 50 taken (the burst), the rest
    answered with cookies, as in Python; a bad mac1 in the same shape: all refused, counted."""
    py, c = pair()
    assert py.public_key is not None
    gen = CookieGenerator(py.public_key)
    msgs = []
    for i in range(64):
        msg = bytearray(b"\x01\0\0\0" + i.to_bytes(4, "little") + bytes(INITIATION_LEN - 8))
        gen.add_macs(msg, 0.0)
        msgs.append(bytes(msg))
    buf = memoryview(b"".join(msgs))
    outs = [d.receive_read(buf, len(buf), INITIATION_LEN, SOURCES[0], 10.0, 0) for d in (py, c)]
    same(*outs)
    assert c.queued_handshakes == 50 and len(outs[1].udp) == 14
    junk = memoryview(b"".join(b"\x01\0\0\0" + bytes(INITIATION_LEN - 4) for _ in range(64)))
    outs = [d.receive_read(junk, len(junk), INITIATION_LEN, SOURCES[0], 10.0, 0) for d in (py, c)]
    same(*outs)
    assert outs[1].drops == {Drop.BAD_MAC1: 64}
    assert HANDSHAKE_QUEUE > 50


def test_mac_matches_python() -> None:
    """Known answers: libcrypto's BLAKE2SMAC with a 16-byte output is core.crypto.mac."""
    from wgpy import _classify

    assert _classify.mac(bytes(32), b"abc").hex() == mac(bytes(32), b"abc").hex()
    for n in (0, 1, 63, 64, 65, 116, 132, 1000):
        key, data = os.urandom(32), os.urandom(n)
        assert _classify.mac(key, data) == mac(key, data)


def test_drain_reads_the_socket_as_receive_read_would() -> None:
    """`Classifier.drain` on a real socket (recvmmsg, replies sent with sendmmsg) against
    the Python intake fed the same datagrams read by read: the same drops, queue and load,
    and each sender receives, byte for byte, the cookie replies the Python device made."""
    import socket

    py, c = pair()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)  # 300 fit in it
        rx.bind(("127.0.0.1", 0))
        for s in senders:
            s.bind(("127.0.0.1", 0))
            s.settimeout(2)
        rng = random.Random(7)
        shapes = ["init", "init", "resp", "bad_mac1", "short", "unknown", "data", "init_mac2"]
        sent = []
        for i in range(300):  # runs of 40 from each: 50 within the rate, then cookie replies
            s = senders[i // 40 % 3]  # (in a row to one address: one GSO send in C)
            src = s.getsockname()
            datagram = build(rng.choice(shapes), py, src, rng) or b"\x01"
            s.sendto(datagram, rx.getsockname())
            sent.append((datagram, src))
        expected = Output()
        for datagram, src in sent:
            expected.extend(py.receive_read(memoryview(datagram), len(datagram), 0, src, 10.0, 0))
        got = Output()
        buf = bytearray(2048 * 64)
        reads = c_sent = 0
        assert c.intake.classifier is not None
        while reads < len(sent):
            until, queued, forced, state = c.intake.state(10.0)
            kept, n, until, drops, made, counter = c.intake.classifier.drain(
                rx.fileno(), buf, 2048, 64, 10.0, until, queued, forced, state
            )
            c.intake.done(until, drops, state is not None, counter, got)
            c_sent += made
            view = memoryview(buf)
            for offset, size, seg, src, _, passed, ndata in kept:
                got.extend(c.receive_classified(view[offset : offset + size], size, seg, src,
                                                10.0, passed, ndata))  # fmt: skip
            for datagram, dst in got.udp:  # replies the Python part made (Datapath.transmit)
                rx.sendto(datagram, dst)
            got.udp.clear()
            assert n > 0
            reads += n
        assert got.drops == expected.drops
        assert c_sent > 0, "no reply made and sent in C"
        assert list(c.intake.queue) == list(py.intake.queue)
        assert c.intake.load.until == py.intake.load.until
        for s in senders:
            want = [d for d, dst in expected.udp if dst == s.getsockname()]
            assert want, "no cookie replies to compare"
            assert [s.recv(100) for _ in want] == want
    finally:
        rx.close()
        for s in senders:
            s.close()


def test_drains_of_any_size_give_each_read_its_own_source_and_packet_info() -> None:
    """The drain keeps its message headers from call to call and hands a run of reads
    from one source the same (host, port) and packet info objects: drains of changing
    sizes, into two buffers in turn, of data messages from three senders (two on one
    port) to two local addresses, the packet info on in some rounds and off in others (a
    read without it leaves no room for one in its header: the next must get it back);
    each kept read is exactly the datagram sent, from its sender, to its address."""
    import socket

    _, c = pair()
    classifier = c.intake.classifier
    assert classifier is not None
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        rx.bind(("0.0.0.0", 0))
        port = rx.getsockname()[1]
        senders[0].bind(("127.0.0.1", 0))
        senders[1].bind(("127.0.0.3", senders[0].getsockname()[1]))  # the same port
        senders[2].bind(("127.0.0.1", 0))
        rng = random.Random(3)
        buffers = [bytearray(2048 * 64), bytearray(2048 * 64)]
        for round_ in range(80):
            info_on = round_ % 3 != 1
            rx.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, int(info_on))
            sent = []
            for _ in range(rng.choice((1, 1, 2, 5, 63, 64, 70))):
                s, dst = rng.choice(senders), rng.choice(("127.0.0.1", "127.0.0.2"))
                datagram = b"\x04\0\0\0" + os.urandom(rng.randrange(28, 200))
                s.sendto(datagram, (dst, port))
                sent.append((datagram, s.getsockname(), dst if info_on else None))
            got = []
            while len(got) < len(sent):
                buf = buffers[round_ // 4 % 2]  # a new buffer: set up anew
                kept, n, *_ = classifier.drain(rx.fileno(), buf, 2048, rng.choice((1, 8, 64)),
                                               10.0, 0.0, 0, False, None)  # fmt: skip
                assert n > 0
                got += [(bytes(buf[off : off + size]), src,
                         None if info is None else socket.inet_ntoa(info[8:12]))
                        for off, size, _, src, info, _, _ in kept]  # fmt: skip
            assert got == sent
    finally:
        rx.close()
        for s in senders:
            s.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700), st.integers(0, 300), st.integers(0, 700), st.booleans())
def test_any_read_any_cut(raw: bytes, seg: int, n: int, handshake_head: bool) -> None:
    """Arbitrary bytes cut at any segment size, part of the buffer or all of it (with a
    handshake type in front, or not): the C intake and the Python one agree."""
    py, c = pair()
    data = (b"\x01\0\0\0" if handshake_head else b"") + raw
    n = min(n, len(data))
    outs = [d.receive_read(memoryview(data), n, seg, SOURCES[3], 5.0, 0) for d in (py, c)]
    same(*outs)
    check_state(py, c)


SOURCE_CHECK = """
import random, socket, subprocess, sys
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
sys.path.insert(0, {src!r})
from wgpy.core.cookie import CookieGenerator
from wgpy.core.crypto import clamp
from wgpy.core.device import Device
from wgpy.core.output import Output
d = Device(random.Random(1).randbytes, classify=True)
d.set_private_key(clamp(bytes(range(1, 33))))
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO
rx.bind(("0.0.0.0", 0))  # in a network namespace of its own: loopback only
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.bind(("127.0.0.9", 0))
tx.settimeout(2)
msg = bytearray(b"\\x01\\0\\0\\0" + bytes(144))
CookieGenerator(d.public_key).add_macs(msg, 0.0)
buf = bytearray(2048 * 64)

def drain(count):
    for _ in range(count):
        tx.sendto(msg, ("127.0.0.2", rx.getsockname()[1]))
    out = Output()
    until, queued, forced, state = d.intake.state(1.0)
    kept, got, until, drops, sent, counter = d.intake.classifier.drain(
        rx.fileno(), buf, 2048, 64, 1.0, until, queued, forced, state)
    d.intake.done(until, drops, state is not None, counter, out)
    assert got == count, got
    view = memoryview(buf)
    for offset, n, seg, src, info, passed, ndata in kept:
        out.extend(d.receive_classified(view[offset:offset + n], n, seg, src, 1.0, passed,
                                        ndata, info))
    for datagram, dst in out.udp:
        rx.sendto(datagram, dst)
    return sent + len(out.udp)

assert drain(51) == 1  # 50 within the rate; the first reply draws the nonce prefix
tx.recvfrom(100)
assert drain(3) == 3  # made and sent in C, as one GSO send
print(sorted({{tx.recvfrom(100)[1][0] for _ in range(3)}}))
"""


def test_cookie_replies_leave_from_the_address_the_flood_came_to() -> None:
    """In a network namespace of its own, messages to 127.0.0.2 on a socket bound to
    every address: the cookie replies made in C come from 127.0.0.2 (the packet info of
    the read), as a sticky source would (io/udp.py), not from whatever the kernel picks."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare for a network namespace")
    src = str(Path(__file__).resolve().parents[2] / "src")
    run = subprocess.run(["unshare", "-n", sys.executable, "-c", SOURCE_CHECK.format(src=src)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['127.0.0.2']"


def test_shedding_spares_the_peers_endpoints_and_a_few_strangers() -> None:
    """While the socket overflows, a message owed a cookie reply gets one if it came from a
    peer's endpoint, or while the device's bucket of replies to strangers lasts (else it
    is dropped as reply_shed), on both intakes; the endpoints are read again once a
    second, so a peer that roams is spared from then."""
    py, c = pair(spare=(1.0, 1))
    assert py.public_key is not None
    gen = CookieGenerator(py.public_key)
    rng = random.Random(2)
    stranger = ("192.0.2.1", 4001)  # the peer's address, another port
    now = 1000.0
    for device in (py, c):
        device.intake.load.forced = True
        device.intake.shedding = True
    mapped = ("::ffff:" + KNOWN[0][0], KNOWN[0][1])  # the peer's address, as IPv6 writes it
    sent = ((KNOWN[0], True), (stranger, True), (stranger, False), (KNOWN[1], True),
            (mapped, True))  # fmt: skip
    for src, replied in sent:  # the stranger's first: the bucket's one token
        msg = bytearray(b"\x01\0\0\0" + rng.randbytes(INITIATION_LEN - 36) + bytes(32))
        gen.add_macs(msg, now)
        outs = [d.receive([(bytes(msg), src)], now, 0) for d in (py, c)]
        same(*outs)
        assert len(outs[0].udp) == replied
        assert outs[0].drops[Drop.REPLY_SHED] == (not replied)
    for device in (py, c):  # the peer roams to the stranger's address
        peer = next(p for p in device.peers.values() if p.endpoint == KNOWN[0])
        peer.endpoint = stranger
    msg = bytearray(b"\x01\0\0\0" + rng.randbytes(INITIATION_LEN - 36) + bytes(32))
    gen.add_macs(msg, now)
    for at, replied in ((now + 0.5, False), (now + 1.0, True)):
        outs = [d.receive([(bytes(msg), stranger)], at, 0) for d in (py, c)]
        same(*outs)
        assert len(outs[0].udp) == replied


def test_tick_reads_the_endpoints_before_a_datagram_must() -> None:
    """The peers' endpoints (for shedding) are read again on the tick a little before a
    datagram would have to (a second after the last time): a ping after a second idle
    does not pay that O(peers) read on its way in (~15 µs with cold caches, one peer)."""
    stranger = ("192.0.2.1", 4001)
    for device in pair():
        now = 1000.0
        device.intake.known(now)
        peer = next(p for p in device.peers.values() if p.endpoint == KNOWN[0])
        peer.endpoint = stranger  # roams
        device.tick(now + 0.5)
        assert intake._known_key(stranger) not in device.intake.known(now + 0.5)  # not yet
        device.tick(now + 0.95)
        assert intake._known_key(stranger) in device.intake.known(now + 0.95)


def test_strangers_get_their_replies_while_shedding_within_the_bucket() -> None:
    """Shedding spares the peers' endpoints, and strangers still get SHED_REPLIES a
    second: a peer that roamed, or one with no endpoint yet, is not locked out by a flood
    that overflows the socket in bursts (one burst a second kept the device shedding)."""
    py, c = pair()
    assert py.public_key is not None
    gen = CookieGenerator(py.public_key)
    rng = random.Random(4)
    now = 1000.0
    for device in (py, c):
        device.intake.load.forced = True
        device.intake.shedding = True
    msgs = []
    for _ in range(20):
        msg = bytearray(b"\x01\0\0\0" + rng.randbytes(INITIATION_LEN - 36) + bytes(32))
        gen.add_macs(msg, now)
        msgs.append((bytes(msg), ("198.51.100.9", 4001)))
    outs = [d.receive(msgs, now, 0) for d in (py, c)]
    same(*outs)
    assert len(outs[0].udp) == 20 and outs[0].drops[Drop.REPLY_SHED] == 0
