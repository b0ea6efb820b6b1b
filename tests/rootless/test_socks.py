"""The SOCKS5 / HTTP CONNECT server on loopback (no namespaces): every reply of RFC 1928
it gives, and the relaying both ways."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from wgpy.rootless import http, serve, socks
from wgpy.rootless.outside import Outside
from wgpy.rootless.spec import listen_address


def _listener(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(16)
    return s


@pytest.fixture
def echo() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 and ::1 (same port where possible)."""
    srv = _listener()
    port = srv.getsockname()[1]
    servers = [srv]
    try:
        six = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        six.bind(("::1", port))
        six.listen(16)
        servers.append(six)
    except OSError:
        pass

    def serve(s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    for s in servers:
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    yield port
    for s in servers:
        s.close()


@pytest.fixture
def proxy() -> Iterator[tuple[int, int]]:
    s, h = _listener(), _listener()
    opts = socks.Options()
    server = serve.Server(
        [
            serve.Service(s, socks.socks_handler(opts), "SOCKS5"),
            serve.Service(h, http.http_handler(opts), "HTTP"),
        ]
    )
    server.start()
    try:
        yield s.getsockname()[1], h.getsockname()[1]
    finally:
        server.stop()
        s.close()
        h.close()


def ask(port: int, request: bytes, methods: bytes = b"\x00") -> tuple[socket.socket, bytes]:
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(bytes([5, len(methods)]) + methods)
    choice = c.recv(2)
    if choice != b"\x05\x00":
        return c, choice
    c.sendall(request)
    head = c.recv(4)
    if len(head) == 4 and head[1] == 0:
        c.recv((4 if head[3] == 1 else 16) + 2)
    return c, head


def connect(atyp: int, addr: bytes, port: int, cmd: int = 1) -> bytes:
    return bytes([5, cmd, 0, atyp]) + addr + struct.pack(">H", port)


def test_connect_ipv4_ipv6_and_domain_relay_both_ways(proxy: tuple[int, int], echo: int) -> None:
    targets = [
        (1, socket.inet_aton("127.0.0.1")),
        (3, b"\x09localhost"),
    ]
    if socket.has_ipv6:
        targets.append((4, socket.inet_pton(socket.AF_INET6, "::1")))
    for atyp, addr in targets:
        c, head = ask(proxy[0], connect(atyp, addr, echo))
        with c:
            if atyp == 4 and head[1] != 0:
                continue  # no IPv6 loopback on this machine
            assert head[:2] == b"\x05\x00", (atyp, head)
            c.sendall(b"ping" * 1000)
            got = b""
            while len(got) < 4000:
                got += c.recv(65536)
            assert got == b"ping" * 1000


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (connect(1, socket.inet_aton("127.0.0.1"), 1, cmd=2), socks.COMMAND_NOT_SUPPORTED),
        (connect(1, socket.inet_aton("127.0.0.1"), 1, cmd=3), socks.COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x07" + bytes(6), socks.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x04\x01\x00\x01" + bytes(6), socks.GENERAL_FAILURE),
        (connect(3, bytes([15]) + b"no.such.invalid", 80), socks.HOST_UNREACHABLE),
    ],
)
def test_bad_requests_get_the_rfcs_replies(
    proxy: tuple[int, int], request_bytes: bytes, code: int
) -> None:
    c, head = ask(proxy[0], request_bytes)
    with c:
        assert head[:2] == bytes([5, code])


def test_refused_connection(proxy: tuple[int, int]) -> None:
    closed = _listener()
    port = closed.getsockname()[1]
    closed.close()
    c, head = ask(proxy[0], connect(1, socket.inet_aton("127.0.0.1"), port))
    with c:
        assert head[:2] == bytes([5, socks.CONNECTION_REFUSED])


def test_no_acceptable_method(proxy: tuple[int, int]) -> None:
    c, choice = ask(proxy[0], b"", methods=b"\x02\x01")
    with c:
        assert choice == b"\x05\xff"


def test_reply_codes_for_errors() -> None:
    import errno

    assert socks.reply_code(OSError(errno.ENETUNREACH, "x")) == socks.NETWORK_UNREACHABLE
    assert socks.reply_code(OSError(errno.EHOSTUNREACH, "x")) == socks.HOST_UNREACHABLE
    assert socks.reply_code(TimeoutError()) == socks.HOST_UNREACHABLE
    assert socks.reply_code(OSError(errno.EACCES, "x")) == socks.GENERAL_FAILURE


def test_http_connect(proxy: tuple[int, int], echo: int) -> None:
    with socket.create_connection(("127.0.0.1", proxy[1]), timeout=10) as c:
        c.sendall(f"CONNECT 127.0.0.1:{echo} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert c.recv(100).startswith(b"HTTP/1.1 200")
        c.sendall(b"hello")
        assert c.recv(5) == b"hello"
    with socket.create_connection(("127.0.0.1", proxy[1]), timeout=10) as c:
        c.sendall(b"GET https://example/ HTTP/1.1\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.1 400")


def test_listen_addresses() -> None:
    assert listen_address("[::1]:1080") == ("::1", 1080)
    assert listen_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert listen_address("localhost:8080") == ("localhost", 8080)
    for bad in ("1080", "127.0.0.1:99999", "::1:1080", "127.0.0.1:-1", "127.0.0.1:1e3"):
        with pytest.raises(ValueError):
            listen_address(bad)


@pytest.fixture
def udp_echo() -> Iterator[int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, src = s.recvfrom(65535)
            except OSError:
                return
            s.sendto(data.upper(), src)

    threading.Thread(target=serve, daemon=True).start()
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def udp_proxy() -> Iterator[int]:
    listener = _listener()
    opts = socks.Options(outside=Outside())  # never started: sockets made here
    server = serve.Server([serve.Service(listener, socks.socks_handler(opts), "SOCKS5")])
    server.start()
    try:
        yield listener.getsockname()[1]
    finally:
        server.stop()
        listener.close()


def test_udp_associate_relays_both_ways_for_its_client_only(udp_proxy: int, udp_echo: int) -> None:
    c, head = ask(udp_proxy, connect(1, bytes(4), 0, cmd=3))
    with c:
        assert head[:2] == b"\x05\x00"
    c = socket.create_connection(("127.0.0.1", udp_proxy), timeout=10)
    c.sendall(b"\x05\x01\x00")
    assert c.recv(2) == b"\x05\x00"
    c.sendall(connect(1, bytes(4), 0, cmd=3))
    head = c.recv(10)
    relay = (socket.inet_ntoa(head[4:8]), struct.unpack(">H", head[8:10])[0])
    with c, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        to = b"\0\0\0\x01" + socket.inet_aton("127.0.0.1") + struct.pack(">H", udp_echo)
        u.sendto(to + b"hello", relay)
        assert u.recv(100) == to + b"HELLO"
        u.sendto(b"\0\0\x01" + to[3:] + b"fragment", relay)  # FRAG 1: dropped
        by_name = b"\0\0\0\x03\x09localhost" + struct.pack(">H", udp_echo)
        u.sendto(by_name + b"named", relay)
        assert u.recv(100) == to + b"NAMED"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:  # not the client
            other.settimeout(0.5)
            other.sendto(to + b"stranger", relay)
            with pytest.raises(TimeoutError):
                other.recv(100)
