"""The proxy's server on loopback (no namespaces): the client cap, the quiet log, idle
timeouts, half-closes through a forward, plain HTTP and Basic auth, who holds a place."""

from __future__ import annotations

import base64
import http.server
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from wgpy.rootless import serve, socks
from wgpy.rootless.forward import forward_handler
from wgpy.rootless.http import http_handler
from wgpy.rootless.owners import Owners, _hex
from wgpy.rootless.spec import Credentials


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


@pytest.fixture
def summing() -> Iterator[int]:
    """Reads to the end, then answers how much it read: a half-close must come through."""
    srv = _listener()

    def one(c: socket.socket) -> None:
        with c:
            n = 0
            while data := c.recv(65536):
                n += len(data)
            c.sendall(b"got %d" % n)

    def serve_all() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(c,), daemon=True).start()

    threading.Thread(target=serve_all, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def running(handler: serve.Handler, max_clients: int = 64) -> tuple[serve.Server, int]:
    listener = _listener()
    server = serve.Server([serve.Service(listener, handler, "test")], max_clients)
    server.start()
    return server, listener.getsockname()[1]


def test_throttled_logs_once_a_second_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "wgpy.proxy")
    say = serve.Throttled(logging.ERROR, every=0.2)
    for _ in range(1000):
        say("refused")
    assert [r.getMessage() for r in caplog.records] == ["refused"]
    time.sleep(0.25)
    say("refused")
    assert caplog.records[-1].getMessage() == "refused (1000 times)"


def test_the_cap_closes_one_more_at_once_and_serves_again_when_one_leaves(summing: int) -> None:
    server, port = running(forward_handler(("127.0.0.1", summing), 60), max_clients=2)
    try:
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            assert extra.recv(10) == b""  # closed at once
        assert server.active == 2 and server.refused == 1
        held.pop().close()
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as again:
            again.sendall(b"x" * 10)
            again.shutdown(socket.SHUT_WR)
            assert again.recv(10) == b"got 10"
        held.pop().close()
    finally:
        server.stop()


def test_an_idle_relay_is_closed_and_a_busy_one_is_not(summing: int) -> None:
    server, port = running(forward_handler(("127.0.0.1", summing), 0.5))
    try:
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        busy = socket.create_connection(("127.0.0.1", port), timeout=5)
        for _ in range(8):  # 1.2 s of one byte every 0.15 s
            busy.sendall(b"x")
            time.sleep(0.15)
        assert idle.recv(10) == b""
        busy.shutdown(socket.SHUT_WR)
        assert busy.recv(10) == b"got 8"
        idle.close()
        busy.close()
    finally:
        server.stop()


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"path={self.path} host={self.headers['Host']} " \
               f"auth={self.headers.get('Proxy-Authorization')}".encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_plain_http_with_basic_auth() -> None:
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    opts = socks.Options(credentials=Credentials("alice", "pw"))
    server, port = running(http_handler(opts))
    url = f"http://127.0.0.1:{web.server_port}/a?b=c"

    def ask(auth: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + auth + b"\r\n")
            answer = b""
            while chunk := c.recv(65536):
                answer += chunk
        return answer

    try:
        good = b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:pw") + b"\r\n"
        answer = ask(good)
        assert answer.startswith(b"HTTP/1.0 200")
        assert answer.endswith(b"path=/a?b=c host=127.0.0.1 auth=None")  # not passed on
        assert ask(b"").startswith(b"HTTP/1.1 407")
        assert ask(b"Proxy-Authorization: Basic !!!\r\n").startswith(b"HTTP/1.1 407")
    finally:
        server.stop()
        web.shutdown()


def test_owners_finds_the_uid_and_count_of_local_clients() -> None:
    srv = _listener()
    clients = [socket.create_connection(srv.getsockname(), timeout=5) for _ in range(3)]
    conn, peer = srv.accept()
    owners = Owners()
    try:
        assert owners.held(peer, conn.getsockname()) == (os.getuid(), 3)
        assert owners.held(("192.0.2.9", 4000), conn.getsockname()) == (None, 0)
    finally:
        owners.close()
        conn.close()
        for c in clients:
            c.close()
        srv.close()
    assert _hex(("127.0.0.1", 1080)) == ("0100007F:0438", "tcp")
    assert _hex(("::ffff:127.0.0.1", 1080)) == ("0100007F:0438", "tcp")
    assert _hex(("::1", 80)) == ("00000000000000000000000001000000:0050", "tcp6")
