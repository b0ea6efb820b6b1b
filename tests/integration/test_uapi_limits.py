"""The control plane never stalls or kills the datapath: slow, greedy and oversized UAPI
clients, a 100,000-line `set`, and a daemon out of file descriptors."""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.conftest import eventually
from wgpy.demo.testbed import WGPY, Namespace, Tunnel, TunnelEnd
from wgpy.io.uapi_path import socket_path
from wgpy.tools import uapi_client

PEER = "77" * 32


def big_set(count: int) -> str:
    nets = (f"allowed_ip=10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(count))
    return f"public_key={PEER}\n" + "\n".join(nets)


def connect(ifname: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(socket_path(ifname)))
    return s


def pings(node: TunnelEnd, addr: str, count: int, interval: str) -> subprocess.Popen[str]:
    argv = node.ns.argv(["ping", "-c", str(count), "-i", interval, "-W", "1", addr])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def rtts(ping: subprocess.Popen[str]) -> list[float]:
    out, _ = ping.communicate(timeout=30)
    return [float(x) for x in re.findall(r"time=([0-9.]+) ms", out)]


def status(pid: int, key: str) -> int:
    """A /proc/PID/status figure, in kB."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1])


@pytest.fixture
def tunnel(make_tunnel: Callable[..., Tunnel]) -> Tunnel:
    t = make_tunnel("lim")
    t.a.ns.run("ping", "-c", "1", "-W", "3", t.b.inner4)
    return t


def test_a_big_set_and_a_client_that_never_reads_do_not_stall_the_tunnel(
    tunnel: Tunnel,
) -> None:
    a, b = tunnel.a, tunnel.b
    ping = pings(a, b.inner4, 300, "0.01")
    try:
        time.sleep(0.2)
        started = time.monotonic()
        uapi_client.set_config(a.ifname, big_set(100_000))
        took = time.monotonic() - started
    finally:
        during_set = rtts(ping)
    # was one stall as long as the whole set (~1.5-2 s here); now 2 ms slices
    assert len(during_set) >= 290 and max(during_set) < 500, (took, sorted(during_set)[-5:])
    lazy = connect(a.ifname)
    try:
        lazy.sendall(b"get=1\n\n")  # a ~2.6 MB answer, never read: was a 10 s stall
        time.sleep(0.3)
        ping = pings(a, b.inner4, 50, "0.02")
        started = time.monotonic()
        assert b.public_key in a.wg("show", a.ifname)  # another client, served at once
        assert time.monotonic() - started < 3
        assert len(rtts(ping)) >= 48
    finally:
        lazy.close()


def test_oversized_requests_are_cut_off_and_memory_stays_bounded() -> None:
    """Four clients each send 40 MB without the blank line that ends a request: each is
    answered EMSGSIZE at the 32 MiB cap and closed; the daemon's memory stays bounded
    (it kept all of it, and searched it all again on every read: minutes of CPU)."""
    ns = Namespace(f"wgpy-big{os.getpid()}")
    node = TunnelEnd(ns, f"wgbig{os.getpid() % 100000}", 1, WGPY)
    try:
        node.start()
        assert node.process is not None
        pid = node.process.pid
        before = status(pid, "VmRSS")
        answers: list[bytes] = []

        def greedy() -> None:
            block = b"allowed_ip=10.0.0.0/8\n"[:-1] * 4096  # never two newlines in a row
            answer = b""
            with connect(node.ifname, timeout=20) as s:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(b"set=1\n")
                    for _ in range(40 * (1 << 20) // len(block)):
                        s.sendall(block)
                    s.shutdown(socket.SHUT_WR)
                while chunk := s.recv(4096):
                    answer += chunk
            answers.append(answer)

        threads = [threading.Thread(target=greedy) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answers == [f"errno=-{errno.EMSGSIZE}\n\n".encode()] * 4
        peak = status(pid, "VmHWM") - before
        assert peak < 4 * 32 * 1024 * 1.6, f"peak grew by {peak} kB"  # 4 buffers at the cap
        assert node.wg("show", node.ifname, "listen-port").strip().isdigit()
    finally:
        node.stop()
        ns.close()


@pytest.fixture
def starved(make_tunnel: Callable[..., Tunnel]) -> Iterator[Tunnel]:
    """A tunnel whose left daemon may open 64 files (a soft limit of 32 it must raise)."""
    yield make_tunnel("fd", left=["prlimit", "--nofile=32:64", *WGPY])


def test_running_out_of_descriptors_never_kills_the_daemon(starved: Tunnel) -> None:
    a, b = starved.a, starved.b
    assert a.process is not None
    with open(f"/proc/{a.process.pid}/limits") as f:
        limits = next(line for line in f if line.startswith("Max open files")).split()
    assert limits[3:5] == ["64", "64"]  # the soft limit raised to the hard one
    held = []
    try:
        for _ in range(150):  # more than the daemon has descriptors for
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # the backlog is full
                s.connect(str(socket_path(a.ifname)))
            held.append(s)
        time.sleep(1.5)  # a housekeeping tick (it needs a descriptor) goes by
        assert a.process.poll() is None
        # a first handshake and traffic, with no descriptor left
        a.ns.run("ping", "-c", "3", "-i", "0.2", "-W", "3", b.inner4, timeout=20)
        assert a.process.poll() is None
    finally:
        for s in held:
            s.close()

    def shows() -> bool:
        try:
            return b.public_key in a.wg("show", a.ifname)
        except RuntimeError:
            return False

    eventually(shows, timeout=5, what="wg show after the descriptors came back")
    assert "latest handshake" in a.wg("show", a.ifname)


def test_replacing_a_big_peers_allowed_ips_never_drops_its_traffic(tunnel: Tunnel) -> None:
    """`wg syncconf` sends replace_allowed_ips with the full list: the routes it keeps
    stay in place while the request is applied slice by slice."""
    a, b = tunnel.a, tunnel.b
    key = base64.b64decode(b.public_key).hex()
    others = "\n".join(
        f"allowed_ip=10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(60_000)
    )
    body = f"public_key={key}\nreplace_allowed_ips=true\n{others}\nallowed_ip={b.inner4}/32"
    uapi_client.set_config(a.ifname, body)
    ping = pings(a, b.inner4, 150, "0.01")
    try:
        time.sleep(0.2)
        uapi_client.set_config(a.ifname, body)  # the same list again, the kept route last
    finally:
        got = rtts(ping)
    assert len(got) == 150, f"{150 - len(got)} pings lost"
