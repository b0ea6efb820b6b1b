"""The UDP socket: dual stack, GSO sends, GRO receives, and the fallback when GSO is refused."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest

from tests.namespaces import run_in_new_namespace
from wgpy.io.udp import UdpSocket

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace")


def drain(sock: UdpSocket, want: int, timeout: float = 5.0) -> list[tuple[bytes, int]]:
    """(datagram, GRO segment size) of everything that arrives, split as the datapath does."""
    buf = memoryview(bytearray(70000))
    got: list[tuple[bytes, int]] = []
    deadline = time.monotonic() + timeout
    while sum(len(d) for d, _ in got) < want and time.monotonic() < deadline:
        r = sock.recv_into(buf)
        if r is None:
            time.sleep(0.005)
            continue
        n, seg, _ = r
        step = seg or n
        got += [(bytes(buf[i : min(i + step, n)]), seg) for i in range(0, n, step)]
    return got


def test_gso_send_and_gro_receive_on_loopback() -> None:
    a, b = UdpSocket(), UdpSocket()
    try:
        data = b"".join(bytes([i]) * 1400 for i in range(20)) + b"tail"
        a.send_segments(data, 1400, ("127.0.0.1", b.port))
        got = drain(b, len(data))
        assert [d for d, _ in got] == [data[i : i + 1400] for i in range(0, len(data), 1400)]
        assert a.gso and b.gro and any(seg == 1400 for _, seg in got)  # came as one GRO read
        a.send(b"v6", ("::1", b.port))
        assert drain(b, 2)[0][0] == b"v6"
    finally:
        a.close()
        b.close()


SO_NO_CHECK = 11


def test_gso_refused_falls_back_for_good() -> None:
    """A socket without UDP checksums can't use GSO (the kernel answers EINVAL): the
    socket switches GSO off, says so once, and the datagrams still arrive."""
    a, b = UdpSocket(), UdpSocket()
    try:
        a._sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        data = b"".join(bytes([i]) * 1000 for i in range(10))
        a.send_segments(data, 1000, ("127.0.0.1", b.port))
        assert not a.gso
        assert [d for d, _ in drain(b, len(data))] == [
            data[i : i + 1000] for i in range(0, len(data), 1000)
        ]
    finally:
        a.close()
        b.close()


FALLBACK = """
import sys, time
sys.path.insert(0, {src!r})
from tests.io.test_udp import drain
from wgpy.io.udp import UdpSocket
a, b = UdpSocket(), UdpSocket()
data = b"".join(bytes([i]) * 1400 for i in range(10))
a.send_segments(data, 1400, ("127.0.0.1", b.port))  # 1400 > lo's MTU of 1280: EMSGSIZE
got = drain(b, len(data))
assert a.gso, "a path MTU below the segment size is no reason to give GSO up"
assert [d for d, _ in got] == [data[i : i + 1400] for i in range(0, len(data), 1400)], got
print("ok")
"""


@needs_root
def test_segments_above_the_path_mtu_go_one_by_one() -> None:
    """In a namespace whose loopback MTU is below the segment size, the kernel refuses
    that one GSO send (EMSGSIZE): those datagrams go out one by one, IP-fragmented."""
    run_in_new_namespace("wgpy-gso", [["link", "set", "lo", "mtu", "1280", "up"]], FALLBACK,
                         timeout=30)  # fmt: skip


LINK_LOCAL = """
import socket, sys
sys.path.insert(0, {src!r})
from wgpy.io.udp import UdpSocket
theirs = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
theirs.bind(("::", 0))
theirs.settimeout(2)
port = theirs.getsockname()[1]
kinds = ["python"]
try:
    import wgpy._native as native
    kinds += ["native", "sender"]
except ImportError:
    pass
for kind in kinds:
    ours = UdpSocket()
    if kind != "python":
        ours.use_native(native.send_runs, native.UdpSender() if kind == "sender" else None)
    ours.send_runs([(kind.encode(), len(kind), ("fe80::b%va", port)),
                    (b"a" * 100 + b"b" * 100, 100, ("fe80::b%va", port))])
    got = [theirs.recvfrom(200)[0] for _ in range(3)]
    assert got == [kind.encode(), b"a" * 100, b"b" * 100], (kind, got)
    ours.close()
print("ok")
"""


@needs_root
def test_a_link_local_endpoint_keeps_its_scope() -> None:
    """An IPv6 link-local endpoint with its %scope (as `wg set ... endpoint
    [fe80::b%va]:port` gives it, and as a read from one reports it): the datagrams go out
    of that interface. Python's (host, port) sockaddr drops the scope (scope id 0), and
    they went nowhere; the Python sends and the native ones alike."""
    setup = [["link", "add", "va", "type", "veth", "peer", "name", "vb"],
             ["link", "set", "va", "up"], ["link", "set", "vb", "up"],
             ["addr", "add", "fe80::a/64", "dev", "va", "nodad"],
             ["addr", "add", "fe80::b/64", "dev", "vb", "nodad"]]  # fmt: skip
    run_in_new_namespace("wgpy-ll", setup, LINK_LOCAL)


def test_an_address_needs_no_resolver_and_a_failed_destination_is_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The C sends' destination of an address is made as Python's own sends make it, with
    no resolver (getaddrinfo opens files: with no descriptor left, a daemon sent nothing,
    its first handshake included); one that cannot be made now is asked again next time,
    not remembered as none (it never sent again)."""

    def no_descriptor(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket, "getaddrinfo", no_descriptor)
    udp = UdpSocket()
    try:
        assert udp._dest(("127.0.0.1", 9)) is not None
        assert udp._dest(("::1", 9)) is not None
        assert udp._dest(("vpn.example.invalid", 9)) is None
        assert ("vpn.example.invalid", 9) not in udp._dests
    finally:
        udp.close()
