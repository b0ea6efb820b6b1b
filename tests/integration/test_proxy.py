"""`wgpy proxy` as nobody in the caller's namespace: its limits (a client cap below the
open-files limit, idle timeouts, a quiet log), and what it serves besides SOCKS5.

The beds are module-scoped (one per peer implementation), and each test starts its own
proxy process on them."""

from __future__ import annotations

import contextlib
import signal
import socket
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
        services: int = 1,
    ) -> None:  # fmt: skip
        limit = f"ulimit -n {nofile} && " if nofile else ""
        argv = bed.caller.argv(
            [*NOBODY, "sh", "-c", f'{limit}exec "$0" "$@"', str(upy), "-m", "wgpy", "proxy",
             "-c", str(bed.config), *args]
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


@pytest.mark.parametrize("bed", ["wireguard-go"], indirect=True)
def test_a_cap_below_the_fd_limit_refuses_extra_clients_quietly(
    bed: Bed, upy: Path, workdir: Path
) -> None:
    """Under a 128-descriptor limit, 100 idle clients: the proxy serves what fits
    (128 - 64 reserved, two each: 32), closes the rest at once, logs a line a second
    at most, and serves a new client as soon as the held ones leave."""
    ns = bed.caller.name
    port = free_port(ns)
    with proxy_process(bed, upy, workdir, "--socks", f"127.0.0.1:{port}", nofile=128) as p:
        start = time.monotonic()
        held, refused = hold(ns, port, 100)
        try:
            time.sleep(2)
            elapsed = time.monotonic() - start
            assert refused == 100 - 32, p.lines
            logged = p.lines[1:]
            assert 1 <= len(logged) <= elapsed + 2, logged[:5]
            assert "32 clients already" in logged[0]
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
    """One client takes every place and sits on them; another is refused until the idle
    ones time out, then served."""
    ns = bed.caller.name
    port = free_port(ns)
    args = ("--socks", f"127.0.0.1:{port}", "--max-clients", "8", "--idle-timeout", "2")
    with proxy_process(bed, upy, workdir, *args) as p:
        held, refused = hold(ns, port, 8)
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
