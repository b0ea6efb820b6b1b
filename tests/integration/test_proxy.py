"""`wgpy proxy` as nobody in the caller's namespace: its limits (a client cap below the
open-files limit, idle timeouts, a quiet log), and what it serves besides SOCKS5.

The beds are module-scoped (one per peer implementation), and each test starts its own
proxy process on them."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.rootless_bed import (
    CALLER_INNER,
    NAME,
    NOBODY,
    PAGE,
    PEER_INNER,
    PEER_OUTER,
    SRC,
    Bed,
    connect_domain,
    connect_ipv4,
    free_port,
    in_namespace,
    socks_connect,
)

CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}


@pytest.fixture(scope="module", params=["wireguard-go", "wgpy"])
def bed(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Bed]:
    b = Bed("p" + request.param[0], request.param, workdir)
    try:
        yield b
    finally:
        b.close()


class ProxyProcess:
    """`wgpy proxy ARGS` as nobody in the bed's caller namespace, under `ulimit -n`;
    its stderr collected line by line."""

    def __init__(
        self, bed: Bed, upy: Path, workdir: Path, *args: str, nofile: int | None = None,
        services: int = 1, config: Path | None = None,
    ) -> None:  # fmt: skip
        limit = f"ulimit -n {nofile} && " if nofile else ""
        argv = bed.caller.argv(
            [*NOBODY, "sh", "-c", f'{limit}exec "$0" "$@"', str(upy), "-m", "wgpy", "proxy",
             "-c", str(config or bed.config), *args]
        )  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stderr=subprocess.PIPE, text=True, cwd=workdir,
            env={**CLEAN_ENV, "HOME": str(workdir)},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 20
        while sum(" on " in line for line in self.lines) < services:  # where each serves
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the proxy did not start: {self.lines}")
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self._reader.join(5)


@contextlib.contextmanager
def proxy_process(*args: object, **kw: object) -> Iterator[ProxyProcess]:
    p = ProxyProcess(*args, **kw)  # type: ignore[arg-type]
    try:
        yield p
    finally:
        p.stop()


def fetch_via_socks(ns: str, port: int) -> bytes:
    s, head = socks_connect(ns, port, connect_domain(NAME, 8000))
    with s:
        assert head == b"\x05\x00\x00\x01", head
        s.sendall(f"GET / HTTP/1.0\r\nHost: {NAME}\r\n\r\n".encode())
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    return body


def hold(ns: str, port: int, count: int) -> tuple[list[socket.socket], int]:
    """Open `count` relayed connections to the peer's web server and leave them idle;
    (the sockets, how many the proxy refused)."""
    held, refused = [], 0
    for _ in range(count):
        with in_namespace(ns):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.settimeout(1)  # a refused one is closed at once; one left waiting counts too
        held.append(s)
        try:
            s.sendall(b"\x05\x01\x00")
            if s.recv(2) != b"\x05\x00":
                refused += 1
                continue
        except (ConnectionError, TimeoutError):
            refused += 1
            continue
        s.settimeout(10)  # the first goes through a handshake
        s.sendall(connect_ipv4(PEER_INNER, 8000))
        assert s.recv(10)[:2] == b"\x05\x00"
    return held, refused


# ---- limits (issue 22, item 4) -------------------------------------------------------


FETCH = """
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
s.sendall(b"\\x05\\x01\\x00")
assert s.recv(2) == b"\\x05\\x00"
s.sendall(b"\\x05\\x01\\x00\\x01" + socket.inet_aton(sys.argv[2]) + struct.pack(">H", 8000))
assert s.recv(10)[:2] == b"\\x05\\x00"
s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
body = b""
while chunk := s.recv(65536):
    body += chunk
print(body.decode().splitlines()[-1])
"""


def fetch_as_nobody(bed: Bed, upy: Path, port: int) -> str:
    argv = bed.caller.argv([*NOBODY, str(upy), "-c", FETCH, str(port), PEER_INNER])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("bed", ["wireguard-go"], indirect=True)
def test_one_user_cannot_exhaust_the_proxy_nor_flood_its_log(
    bed: Bed, upy: Path, workdir: Path
) -> None:
    """Under a 128-descriptor limit the proxy has 32 places ((128 - 64 reserved) / 2 per
    client). One user (root here) opens 100 idle connections: it gets half the places,
    the rest are closed at once with a log line a second at most, and another user
    (nobody) is still served meanwhile."""
    ns = bed.caller.name
    port = free_port(ns)
    with proxy_process(bed, upy, workdir, "--socks", f"127.0.0.1:{port}", nofile=128) as p:
        start = time.monotonic()
        held, refused = hold(ns, port, 100)
        try:
            assert refused == 100 - 16, p.lines
            assert fetch_as_nobody(bed, upy, port) == PAGE.strip()
            time.sleep(1)
            elapsed = time.monotonic() - start
            logged = p.lines[1:]
            assert 1 <= len(logged) <= elapsed + 2, logged[:5]
            assert "uid 0 holds 16 of 32 places" in logged[0]
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while True:  # the held ones leave as their ends close
            try:
                body = fetch_via_socks(ns, port)
                break
            except (AssertionError, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert body.endswith(PAGE.encode())


@pytest.mark.parametrize("bed", ["wireguard-go"], indirect=True)
def test_idle_connections_time_out_and_free_their_places(
    bed: Bed, upy: Path, workdir: Path
) -> None:
    """One user takes all the places it may (half) and sits on them; its next connection
    is refused until the idle ones time out, then served."""
    ns = bed.caller.name
    port = free_port(ns)
    args = ("--socks", f"127.0.0.1:{port}", "--max-clients", "8", "--idle-timeout", "2")
    with proxy_process(bed, upy, workdir, *args) as p:
        held, refused = hold(ns, port, 4)
        try:
            assert refused == 0
            _, refused = hold(ns, port, 1)
            assert refused == 1
            time.sleep(2.5)
            for s in held:  # each was closed by the proxy
                s.settimeout(1)
                assert s.recv(100) == b""
            assert fetch_via_socks(ns, port).endswith(PAGE.encode())
        finally:
            for s in held:
                s.close()
        assert len(p.lines) <= 3, p.lines


@pytest.mark.parametrize("bed", ["wireguard-go"], indirect=True)
def test_a_listener_off_loopback_is_warned_about(bed: Bed, upy: Path, workdir: Path) -> None:
    port = free_port(bed.caller.name)
    with proxy_process(bed, upy, workdir, "--socks", f"0.0.0.0:{port}") as p:
        pass
    assert any("warning: 0.0.0.0" in line and "not a loopback" in line for line in p.lines)
    with proxy_process(bed, upy, workdir, "--socks", f"127.0.0.1:{port}") as p:
        pass
    assert not any("warning" in line for line in p.lines)


# ---- forwards, UDP, the wireproxy file, auth (issue 20) -------------------------------

SUMMING = r"""
import socket, sys, threading
def serve(c):
    with c:
        n = 0
        while data := c.recv(65536):
            n += len(data)
        c.sendall(b"got %d" % n)  # after our side's end: the half-close came through
s = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=64)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
SUM_PORT = 7001


@pytest.fixture(scope="module")
def servers(bed: Bed) -> Iterator[int]:
    """A summing server on the peer's tunnel address (port 7001) and one on the caller's
    loopback (the port yielded); a 4 MB file on the peer's web server."""
    (bed.workdir / "www" / "big.bin").write_bytes(bytes(4 << 20))
    port = free_port(bed.caller.name)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        bed.peer.popen(sys.executable, "-c", SUMMING, PEER_INNER, str(SUM_PORT), **quiet),
        bed.caller.popen(sys.executable, "-c", SUMMING, "127.0.0.1", str(port), **quiet),
    ]
    try:
        for ns, at in ((bed.peer, f"{PEER_INNER}:{SUM_PORT}"), (bed.caller, f"127.0.0.1:{port}")):
            deadline = time.monotonic() + 10
            while at not in ns.run("ss", "-ltn", check=False):
                assert time.monotonic() < deadline, f"the summing server at {at} did not start"
                time.sleep(0.05)
        yield port
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


def summed(ns: str, address: tuple[str, int], size: int) -> bytes:
    """Send `size` bytes, half-close, read the answer."""
    with in_namespace(ns):
        s = socket.create_connection(address, timeout=15)
    with s:
        s.sendall(bytes(size))
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(100):
            answer += chunk
    return answer


def test_tcp_forwards_both_ways_keep_half_closes_and_run_side_by_side(
    bed: Bed, upy: Path, workdir: Path, servers: int
) -> None:
    ns = bed.caller.name
    fwd, page = free_port(ns), free_port(ns)
    args = ("--forward", f"127.0.0.1:{fwd}={PEER_INNER}:{SUM_PORT}",
            "--forward", f"127.0.0.1:{page}={PEER_INNER}:8000",
            "--expose", f"9000=127.0.0.1:{servers}")  # fmt: skip
    with proxy_process(bed, upy, workdir, *args, services=3) as p:
        assert summed(ns, ("127.0.0.1", fwd), 100_000) == b"got 100000"
        with in_namespace(ns):
            s = socket.create_connection(("127.0.0.1", page), timeout=15)
        with s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            body = b""
            while chunk := s.recv(65536):
                body += chunk
        assert body.endswith(PAGE.encode())
        # from the peer's side of the tunnel to a server on this side: --expose
        assert summed(bed.peer.name, (CALLER_INNER, 9000), 300_000) == b"got 300000"
        results: list[bytes] = []
        threads = [
            threading.Thread(
                target=lambda i=i: results.append(
                    summed(ns, ("127.0.0.1", fwd), 1000 * i) if i % 2 else
                    summed(bed.peer.name, (CALLER_INNER, 9000), 1000 * i)
                )
            )
            for i in range(1, 25)
        ]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == sorted(b"got %d" % (1000 * i) for i in range(1, 25))
    assert p.proc.returncode == 0 and not any("rror" in line for line in p.lines), p.lines


def dns_query(name: str, qid: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\x01\0\x01"


def answered_address(reply: bytes) -> str:
    assert reply[:2] == b"\x12\x34" and reply[7] == 1, reply  # our id, one answer
    return socket.inet_ntoa(reply[-4:])


def test_udp_forward_and_socks5_udp_associate_carry_dns(bed: Bed, upy: Path, workdir: Path) -> None:
    """An application that speaks only UDP (a DNS query) through --udp-forward, and one
    through SOCKS5 UDP ASSOCIATE, to the peer's DNS responder inside the tunnel."""
    ns = bed.caller.name
    udp_port, socks_port = free_port(ns), free_port(ns)
    args = ("--udp-forward", f"127.0.0.1:{udp_port}={PEER_INNER}:53",
            "--socks", f"127.0.0.1:{socks_port}")  # fmt: skip
    with proxy_process(bed, upy, workdir, *args, services=2):
        with in_namespace(ns):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with u:
            u.settimeout(10)
            u.sendto(dns_query(NAME), ("127.0.0.1", udp_port))
            assert answered_address(u.recv(512)) == PEER_INNER
        control, relay = udp_associate(ns, socks_port)
        with in_namespace(ns):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with control, u:
            u.settimeout(10)
            to = b"\0\0\0\x01" + socket.inet_aton(PEER_INNER) + struct.pack(">H", 53)
            u.sendto(to + dns_query(NAME), relay)
            reply = u.recv(512)
            assert reply[:10] == to  # the header names who answered
            assert answered_address(reply[10:]) == PEER_INNER
            by_name = b"\0\0\0\x03" + bytes([len(NAME)]) + NAME.encode()  # a name: looked up
            u.sendto(by_name + b"\0\x35" + dns_query(NAME), relay)  # inside the tunnel
            assert answered_address(u.recv(512)[10:]) == PEER_INNER


def udp_associate(ns: str, port: int) -> tuple[socket.socket, tuple[str, int]]:
    """A SOCKS5 UDP ASSOCIATE; (the control connection, the relay's address)."""
    with in_namespace(ns):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(bytes([5, 3, 0, 1, 0, 0, 0, 0, 0, 0]))
    head = s.recv(10)
    assert head[:4] == b"\x05\x00\x00\x01", head
    return s, (socket.inet_ntoa(head[4:8]), struct.unpack(">H", head[8:10])[0])


WIREPROXY_SAMPLE = """\
# laid out as the sample in wireproxy's README
[Interface]
Address = {address}/32 # The subnet should be /32 and /128 for IPv4 and v6 respectively
# MTU = 1420 (optional)
PrivateKey = {private}
DNS = {dns}
CheckAlive = {dns}
CheckAliveInterval = 1

[Peer]
PublicKey = {public}
# PresharedKey = UItQuvLsyh50ucXHfjF0bbR4IIpVBd74lwKc8uIPXXs= (optional)
Endpoint = {endpoint}
PersistentKeepalive = 25

[TCPClientTunnel]
BindAddress = 127.0.0.1:{forward}
Target = {name}:8000

[TCPServerTunnel]
ListenPort = 9001
Target = 127.0.0.1:{exposed}

[Socks5]
BindAddress = 127.0.0.1:{socks}
Username = alice
Password = s3cret

[http]
BindAddress = 127.0.0.1:{http}
Username = alice
Password = s3cret

[UDPProxyTunnel]
BindAddress = 127.0.0.1:{udp}
Target = {dns}:53
InactivityTimeout = 30
"""


def http_get(ns: str, port: int, request: bytes, address: str = "127.0.0.1") -> bytes:
    with in_namespace(ns):
        s = socket.create_connection((address, port), timeout=15)
    with s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def socks_login(ns: str, port: int, user: bytes, password: bytes) -> tuple[socket.socket, bytes]:
    with in_namespace(ns):
        s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(b"\x05\x01\x02")
    assert s.recv(2) == b"\x05\x02"
    s.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
    return s, s.recv(2)


@pytest.mark.parametrize("bed", ["wgpy"], indirect=True)
def test_a_wireproxy_sample_config_runs_unchanged_with_its_auth(
    bed: Bed, upy: Path, workdir: Path, servers: int
) -> None:
    ns = bed.caller.name
    ports = {k: free_port(ns) for k in ("forward", "socks", "http", "udp", "info")}
    conf = workdir / "wireproxy.conf"
    conf.write_text(WIREPROXY_SAMPLE.format(
        address=CALLER_INNER, private=bed.private, dns=PEER_INNER, public=bed.peer_public,
        endpoint=f"{PEER_OUTER}:51820", name=NAME, exposed=servers,
        **{k: v for k, v in ports.items() if k != "info"}))  # fmt: skip
    conf.chmod(0o644)
    argv = bed.caller.argv([*NOBODY, str(upy), "-m", "wgpy", "proxy", "-n", "-c", str(conf)])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0 and "configuration OK" in done.stdout, done.stderr
    info = ("-i", f"127.0.0.1:{ports['info']}")
    with proxy_process(bed, upy, workdir, *info, services=6, config=conf):
        with in_namespace(ns):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with u:
            u.settimeout(10)
            u.sendto(dns_query(NAME), ("127.0.0.1", ports["udp"]))
            assert answered_address(u.recv(512)) == PEER_INNER
        got = http_get(ns, ports["forward"], f"GET / HTTP/1.0\r\nHost: {NAME}\r\n\r\n".encode())
        assert got.endswith(PAGE.encode())
        assert summed(bed.peer.name, (CALLER_INNER, 9001), 5000) == b"got 5000"
        s, status = socks_login(ns, ports["socks"], b"alice", b"s3cret")
        with s:
            assert status == b"\x01\x00"
            s.sendall(connect_domain(NAME, 8000))
            assert s.recv(10)[:2] == b"\x05\x00"
        s, status = socks_login(ns, ports["socks"], b"alice", b"wrong")
        with s:
            assert status == b"\x01\x01" and s.recv(10) == b""
        s, head = socks_connect(ns, ports["socks"], b"", methods=b"\x00")  # no auth offered
        with s:
            assert head == b"\x05\xff"
        plain = f"GET http://{NAME}:8000/ HTTP/1.1\r\nHost: {NAME}:8000\r\n".encode()
        good = b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:s3cret") + b"\r\n"
        bad = b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:nope") + b"\r\n"
        answer = http_get(ns, ports["http"], plain + good + b"\r\n")
        assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(PAGE.encode()), answer
        for wrong in (b"", bad):
            answer = http_get(ns, ports["http"], plain + wrong + b"\r\n")
            assert answer.startswith(b"HTTP/1.1 407") and b"Proxy-Authenticate: Basic" in answer
        connect = f"CONNECT {PEER_INNER}:8000 HTTP/1.1\r\n".encode() + good + b"\r\n"
        with in_namespace(ns):
            s = socket.create_connection(("127.0.0.1", ports["http"]), timeout=15)
        with s:
            s.sendall(connect)
            assert s.recv(100).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert s.recv(12).startswith(b"HTTP/1.0 200")
        deadline = time.monotonic() + 10  # CheckAlive: the peer answers its pings
        asked = b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
        while not (ready := http_get(ns, ports["info"], asked))\
                .startswith(b"HTTP/1.1 200"):  # fmt: skip
            assert time.monotonic() < deadline, ready
            time.sleep(0.3)
        assert json.loads(ready.partition(b"\r\n\r\n")[2])[PEER_INNER] > time.time() - 5


@pytest.mark.parametrize("bed", ["wireguard-go"], indirect=True)
def test_a_slow_or_vanishing_client_costs_the_others_nothing(
    bed: Bed, upy: Path, workdir: Path, servers: int
) -> None:
    """One client downloads 4 MB and never reads; another vanishes mid-greeting with a
    reset; a third opens a connection and says nothing. A fourth is served at once."""
    ns = bed.caller.name
    port = free_port(ns)
    with proxy_process(bed, upy, workdir, "--socks", f"127.0.0.1:{port}"):
        slow, head = socks_connect(ns, port, connect_domain(NAME, 8000))
        assert head[:2] == b"\x05\x00"
        slow.sendall(f"GET /big.bin HTTP/1.0\r\nHost: {NAME}\r\n\r\n".encode())
        with in_namespace(ns):
            gone = socket.create_connection(("127.0.0.1", port), timeout=5)
            mute = socket.create_connection(("127.0.0.1", port), timeout=5)
        gone.sendall(b"\x05")
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.close()  # a reset
        try:
            time.sleep(1)  # the slow one's buffers fill
            start = time.monotonic()
            for _ in range(5):
                assert fetch_via_socks(ns, port).endswith(PAGE.encode())
            assert time.monotonic() - start < 3
        finally:
            slow.close()
            mute.close()


@pytest.mark.parametrize("bed", ["wireguard-go"], indirect=True)
def test_daemon_mode_returns_once_serving(bed: Bed, upy: Path, workdir: Path) -> None:
    ns = bed.caller.name
    port = free_port(ns)
    argv = bed.caller.argv([*NOBODY, str(upy), "-m", "wgpy", "proxy", "-d", "-c",
                            str(bed.config), "--socks", f"127.0.0.1:{port}"])  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                          env={**CLEAN_ENV, "HOME": str(workdir)}, cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"SOCKS5 proxy on 127.0.0.1:{port}" in done.stderr
    pid = int(done.stdout.split()[-1])
    try:
        assert fetch_via_socks(ns, port).endswith(PAGE.encode())
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and "Z" not in Path(f"/proc/{pid}/stat").read_text():
            assert time.monotonic() < deadline, "the daemon did not stop"
            time.sleep(0.1)
    bad = subprocess.run([*argv[:-2], "--socks", "127.0.0.1:1"], capture_output=True,
                         text=True, timeout=30, check=False)  # fmt: skip
    assert bad.returncode == 1 and "cannot listen" in bad.stderr  # the child's error, passed on


@pytest.mark.parametrize("bed", ["wgpy"], indirect=True)
def test_info_serves_readyz_and_metrics(bed: Bed, upy: Path, workdir: Path) -> None:
    ns = bed.caller.name
    socks, info = free_port(ns), free_port(ns)
    args = ("--socks", f"127.0.0.1:{socks}", "--info", f"127.0.0.1:{info}")
    with proxy_process(bed, upy, workdir, *args, services=2):
        assert fetch_via_socks(ns, socks).endswith(PAGE.encode())  # a handshake, traffic
        answer = http_get(ns, info, b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"application/json" in head
        assert json.loads(body)[bed.peer_public] > time.time() - 60
        answer = http_get(ns, info, f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{info}\r\n\r\n"
                          .encode())  # fmt: skip
        sent = [line for line in answer.decode().splitlines()
                if line.startswith("wireguard_sent_bytes_total{")]  # fmt: skip
        assert len(sent) == 1 and bed.peer_public in sent[0] and int(sent[0].split()[-1]) > 0
        assert b"\nwgpy_proxy_clients " in answer
        if shutil.which("curl"):  # as a person or a scraper asks, by address
            assert "\nwgpy_proxy_clients " in bed.caller.run(
                "curl", "-sSf", "--max-time", "10", f"http://127.0.0.1:{info}/metrics"
            )
        assert http_get(ns, info, b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n").startswith(
            b"HTTP/1.1 404"
        )
        for refused in (b"Host: evil.example", b"Host: 127.0.0.1.evil.example:80", b"Host: ",
                        b"Host: 127.0.0.1\r\nHost: evil.example", b"X-No-Host: 1"):  # fmt: skip
            answer = http_get(ns, info, b"GET /metrics HTTP/1.1\r\n" + refused + b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 421 Misdirected Request\r\n"), (refused, answer)
            assert answer.endswith(b"\r\n\r\nunknown Host header: ask by address or localhost\n")
    args += ("--check-alive", PEER_INNER, "--check-alive", "10.232.0.99",
             "--check-alive-interval", "1")  # fmt: skip
    with proxy_process(bed, upy, workdir, *args, services=2):  # one address never answers
        time.sleep(2)
        answer = http_get(ns, info, b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        pongs = json.loads(body)
        assert pongs["10.232.0.99"] == 0 and pongs[PEER_INNER] > time.time() - 5


def loopback_name() -> tuple[str, str] | None:
    """A name besides localhost that /etc/hosts gives a loopback IPv4 address (often the
    machine's own name: Debian writes "127.0.1.1 HOSTNAME"), and that address."""
    for line in Path("/etc/hosts").read_text().splitlines():
        fields = line.partition("#")[0].split()
        if fields and fields[0].startswith("127.") and ipaddress.ip_address(fields[0]).is_loopback:
            names = [n for n in fields[1:] if n != "localhost"]
            if names:
                return names[0], fields[0]
    return None


@pytest.mark.parametrize("bed", ["wgpy"], indirect=True)
def test_info_answers_to_the_name_it_listens_on(bed: Bed, upy: Path, workdir: Path) -> None:
    """`--info NAME:PORT`: a request for NAME is answered; one for another name is not."""
    found = loopback_name()
    if found is None:
        pytest.skip("/etc/hosts names no loopback address but localhost")
    name, address = found
    ns, info = bed.caller.name, free_port(bed.caller.name)
    with proxy_process(bed, upy, workdir, "--info", f"{name}:{info}"):
        for host, status in ((name, 200), (name.upper(), 200), (f"x{name}", 421)):
            asked = f"GET /readyz HTTP/1.1\r\nHost: {host}:{info}\r\n\r\n".encode()
            answer = http_get(ns, info, asked, address)
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (host, answer)


LIBRARY_INFO = """
import socket, sys, wgpy
name, address = sys.argv[1:3]
with wgpy.Proxy(sys.argv[3], socks=None, info=name + ":0") as proxy:
    port = proxy.info_address[1]
    for host in (name, "x" + name):
        s = socket.create_connection((address, port), timeout=15)
        s.sendall(f"GET /readyz HTTP/1.1\\r\\nHost: {host}:{port}\\r\\n\\r\\n".encode())
        print(s.makefile("rb").readline().split()[1].decode())
        s.close()
"""


@pytest.mark.parametrize("bed", ["wgpy"], indirect=True)
def test_the_library_info_answers_to_the_name_it_listens_on(bed: Bed, workdir: Path) -> None:
    """wgpy.Proxy(info="NAME:PORT") opens the socket and hands it to `wgpy proxy`: the
    name goes with it, so a request for NAME is answered (it was refused with 421: the
    child knew only the socket), one for another name is not."""
    found = loopback_name()
    if found is None:
        pytest.skip("/etc/hosts names no loopback address but localhost")
    argv = bed.caller.argv([sys.executable, "-c", LIBRARY_INFO, *found, str(bed.config)])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          cwd=workdir, env={**CLEAN_ENV, "PYTHONPATH": str(SRC)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["200", "421"], done.stdout


@pytest.mark.parametrize("bed", ["wireguard-go"], indirect=True)
def test_mtu_unset_comes_from_the_route_to_the_endpoint(bed: Bed, upy: Path, workdir: Path) -> None:
    """As wg-quick: the way to the endpoint has MTU 1400, so the tunnel gets 1320."""
    links = bed.caller.run("ip", "-o", "link").splitlines()
    veth = next(line.split(":")[1].strip().split("@")[0] for line in links if ": rc" in line)
    bed.caller.run("ip", "link", "set", "dev", veth, "mtu", "1400")
    try:
        argv = bed.caller.argv([*NOBODY, str(upy), "-m", "wgpy", "run", "-c", str(bed.config),
                                "--", "ip", "-o", "link", "show", "wg0"])  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                              env={**CLEAN_ENV, "HOME": str(workdir)}, cwd=workdir)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert " mtu 1320 " in done.stdout, done.stdout
    finally:
        bed.caller.run("ip", "link", "set", "dev", veth, "mtu", "1500")


@pytest.mark.parametrize("bed", ["wireguard-go"], indirect=True)
def test_wg_show_works_on_a_rootless_tunnel(bed: Bed, upy: Path, workdir: Path) -> None:
    """The command of `wgpy run` runs `wg show`; for `wgpy proxy`, nsenter gets there."""
    script = (f"ping -c 1 -W 5 {PEER_INNER} >/dev/null; wg show wg0; "
              f"wg set wg0 listen-port 1 2>&1; ls -l /var/run/wireguard")  # fmt: skip
    argv = bed.caller.argv([*NOBODY, str(upy), "-m", "wgpy", "run", "-c", str(bed.config),
                            "--", "sh", "-c", script])  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False,
                          env={**CLEAN_ENV, "HOME": str(workdir)}, cwd=workdir)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"peer: {bed.peer_public}" in done.stdout and "latest handshake" in done.stdout
    assert "Operation not permitted" in done.stdout  # read-only
    assert "srwx------ 1 nobody" in done.stdout  # the user's own socket
    port = free_port(bed.caller.name)
    with proxy_process(bed, upy, workdir, "--socks", f"127.0.0.1:{port}") as p:
        show = [*NOBODY, "nsenter", "-t", str(p.proc.pid), "-U", "-m", "-n",
                "--preserve-credentials", "wg", "show", "wg0", "public-key"]  # fmt: skip
        out = subprocess.run(show, capture_output=True, text=True, timeout=10, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == bed.public


@pytest.mark.parametrize("bed", ["wgpy"], indirect=True)
def test_stdio_tunnel_is_an_ssh_proxycommand(
    bed: Bed, upy: Path, workdir: Path, servers: int
) -> None:
    """Standard input to a server in the tunnel, its answer on standard output, then
    exit 0 quietly; a target that refuses (ECONNREFUSED) makes it exit 1 and say why."""

    def stdio(target: str) -> subprocess.CompletedProcess[bytes]:
        argv = bed.caller.argv([*NOBODY, str(upy), "-m", "wgpy", "proxy", "-c",
                                str(bed.config), "--stdio", target])  # fmt: skip
        return subprocess.run(argv, input=bytes(70_000), capture_output=True, timeout=30,
                              check=False, env={**CLEAN_ENV, "HOME": str(workdir)})  # fmt: skip

    done = stdio(f"{PEER_INNER}:{SUM_PORT}")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"got 70000", b"")
    done = stdio(f"{PEER_INNER}:7999")
    assert done.returncode == 1 and b"[Errno 111] Connect call failed" in done.stderr
