"""The daemon's life: background start, exit on SIGTERM and on `ip link del`, netns moves,
roaming endpoints and the allowed-IPs source filter, all with real interfaces."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.integration.conftest import eventually
from wgpy.core.native import load
from wgpy.demo.testbed import WGPY, Namespace, Tunnel, wait_for_socket
from wgpy.io.uapi_path import socket_path


def pids_of(ifname: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"wgpy.* {ifname}$"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_daemonizes_and_exits_on_sigterm() -> None:
    ns = Namespace(f"wgpy-life{os.getpid()}")
    ifname = f"wgl{os.getpid() % 100000}"
    try:
        # without -f: the command returns once the daemon serves, like wireguard-go
        started = subprocess.run(ns.argv([*WGPY, ifname]), timeout=20, capture_output=True)
        assert started.returncode == 0, started.stderr
        wait_for_socket(ifname, 5)
        assert ns.has_link(ifname)
        # srwx------, exactly what wireguard-go makes (umask 077): no one else may connect
        assert os.stat(socket_path(ifname)).st_mode & 0o777 == 0o700
        assert os.stat(socket_path(ifname).parent).st_mode & 0o777 == 0o755
        pids = pids_of(ifname)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGTERM)
        eventually(lambda: not socket_path(ifname).exists(), 5, "the socket to go")
        eventually(lambda: not pids_of(ifname), 5, "the process to exit")
        eventually(lambda: not ns.has_link(ifname), 5, "the interface to go")
    finally:
        for pid in pids_of(ifname):
            os.kill(pid, signal.SIGKILL)
        ns.close()
        socket_path(ifname).unlink(missing_ok=True)


def test_a_sigterm_as_soon_as_the_socket_appears_still_cleans_up() -> None:
    """The stop signals are caught from before the interface and the socket are made: a
    SIGTERM during start-up ends the daemon through its cleanup, not the default action
    (which left the socket file behind). Tried a few times: the window is milliseconds."""
    ns = Namespace(f"wgpy-early{os.getpid()}")
    ifname = f"wge{os.getpid() % 100000}"
    path = socket_path(ifname)
    process: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(5):
            process = subprocess.Popen(ns.argv([*WGPY, "-f", ifname]), stderr=subprocess.PIPE)
            deadline = time.monotonic() + 20
            while not path.exists() and time.monotonic() < deadline and process.poll() is None:
                pass  # no sleep: the signal must land inside the start-up window
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0, process.stderr.read() if process.stderr else ""
            assert not path.exists()
            assert not ns.has_link(ifname)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5)
        ns.close()
        path.unlink(missing_ok=True)


def test_exits_when_the_interface_is_deleted(make_tunnel: Callable[..., Tunnel]) -> None:
    t = make_tunnel("del")
    process = t.a.process
    assert process is not None
    t.a.ns.run("ip", "link", "del", t.a.ifname)
    assert process.wait(5) == 0
    assert not socket_path(t.a.ifname).exists()


def test_exits_when_the_interface_is_deleted_under_traffic(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    """Pings keep coming from b while a's interface goes: a's UDP reads that bring data
    read the TUN after them (io/datapath.py on_udp) and find it gone, as the loop's own
    TUN read does; the daemon still exits."""
    t = make_tunnel("delt")
    process = t.a.process
    assert process is not None
    t.b.ns.run("ping", "-c", "1", "-W", "3", t.a.inner4, timeout=20)
    flood = t.b.ns.popen("ping", "-i", "0.002", "-w", "10", t.a.inner4,
                         stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(0.3)
        t.a.ns.run("ip", "link", "del", t.a.ifname)
        assert process.wait(5) == 0
        assert not socket_path(t.a.ifname).exists()
    finally:
        flood.kill()
        flood.wait(5)


def test_exits_when_the_socket_is_removed(make_tunnel: Callable[..., Tunnel]) -> None:
    t = make_tunnel("sock")
    process = t.a.process
    assert process is not None
    socket_path(t.a.ifname).unlink()
    assert process.wait(5) == 0
    eventually(lambda: not t.a.ns.has_link(t.a.ifname), 5, "the interface to go")


def test_keeps_working_after_moving_the_interface(make_tunnel: Callable[..., Tunnel]) -> None:
    """The UDP socket stays in namespace A; the interface moves to a third namespace."""
    t = make_tunnel("mv")
    a, b = t.a, t.b
    third = Namespace(f"wgpy-mv{os.getpid()}-c")
    t.namespaces.append(third)  # removed with the tunnel
    a.ns.run("ip", "link", "set", a.ifname, "netns", third.name)
    third.add_address(a.ifname, f"{a.inner4}/24")
    third.set_link(a.ifname, state="up", mtu=1380)
    third.run("ping", "-c", "2", "-i", "0.2", "-W", "3", b.inner4, timeout=20)
    b.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "3", a.inner4, timeout=20)
    assert a.process is not None and a.process.poll() is None
    third.run("ip", "link", "del", a.ifname)
    assert a.process.wait(5) == 0


@pytest.mark.parametrize("reader", [False, True], ids=["loop-reads", "reader-thread"])
def test_roaming_endpoint_follows(make_tunnel: Callable[..., Tunnel], reader: bool) -> None:
    """With `reader`, a's UDP reads get their thread (WGPY_UDP_READER=1 on 3 crypto
    threads, not the default on 2 cores): a burst through it, then the port change swaps
    its reader (the old one's thread joined), one reader thread before and after."""
    if reader and (load() is None or os.environ.get("WGPY_NATIVE", "1") == "0"):
        pytest.skip("the reader thread is the native datapath's (not built, or WGPY_NATIVE=0)")
    env = {"WGPY_UDP_READER": "1", "WGPY_THREADS": "3"} if reader else None
    t = make_tunnel("roamr" if reader else "roam", env=env)
    a, b = t.a, t.b
    a.ns.run("ping", "-c", "1", "-W", "3", b.inner4, timeout=20)
    if reader:
        assert a.process is not None
        eventually(lambda: reader_threads(a.process.pid) == 1, 5, "a's reader thread")
        # 32 echoes in flight: replies queue at a's socket, 2 reads or more arm the thread
        before = reader_switches(a.process.pid)
        a.ns.run("ping", "-f", "-l", "32", "-c", "2000", "-w", "10", b.inner4, timeout=20)
        assert reader_switches(a.process.pid) > before, "the reader thread never woke"
    assert b.wg("show", b.ifname, "endpoints").split()[1] == f"{a.outer4}:51820"
    # a moves: a new outside address and a new listen port
    veth = next(line.split(":")[1].strip().split("@")[0]
                for line in a.ns.run("ip", "-o", "link").splitlines() if "va" in line)  # fmt: skip
    a.ns.run("ip", "addr", "del", f"{a.outer4}/24", "dev", veth)
    a.ns.add_address(veth, "10.200.0.9/24")
    a.wg("set", a.ifname, "listen-port", "51999")
    a.ns.run("ping", "-c", "1", "-W", "3", b.inner4, timeout=20)
    assert b.wg("show", b.ifname, "endpoints").split()[1] == "10.200.0.9:51999"
    b.ns.run("ping", "-c", "1", "-W", "3", a.inner4, timeout=20)
    if reader:
        assert a.process is not None
        eventually(lambda: reader_threads(a.process.pid) == 1, 5, "the new socket's reader")
        a.ns.run("ping", "-f", "-l", "32", "-c", "2000", "-w", "10", b.inner4, timeout=20)
        assert reader_threads(a.process.pid) == 1 and a.process.poll() is None


def reader_switches(pid: int) -> int:
    """How often process `pid`'s reader thread went to sleep: only an armed thread wakes
    (a drain's read of 2 or more), so it grows only when the thread read."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/comm") as f:
            if f.read().strip() != "wgpy-udpread":
                continue
        with open(f"/proc/{pid}/task/{task}/status") as f:
            return next(int(line.split()[1]) for line in f
                        if line.startswith("voluntary_ctxt_switches"))  # fmt: skip
    raise AssertionError(f"no reader thread in {pid}")


def reader_threads(pid: int) -> int:
    """The UDP reader threads (src/native/reader.c, by name) of process `pid`."""
    count = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/comm") as f:
            count += f.read().strip() == "wgpy-udpread"
    return count


def test_source_filter_drops_packets_from_addresses_the_peer_does_not_own(
    make_tunnel: Callable[..., Tunnel],
) -> None:
    t = make_tunnel("src")
    a, b = t.a, t.b
    a.ns.run("ping", "-c", "1", "-W", "3", b.inner4, timeout=20)
    a.ns.add_address(a.ifname, "10.201.0.77/32")  # not in b's allowed IPs for a
    rx_before = int(b.wg("show", b.ifname, "transfer").split()[1])
    spoofed = subprocess.run(
        a.ns.argv(["ping", "-c", "2", "-i", "0.2", "-W", "1", "-I", "10.201.0.77", b.inner4]),
        capture_output=True, timeout=20,
    )  # fmt: skip
    assert spoofed.returncode != 0  # no answer: b dropped what it decrypted
    time.sleep(0.2)
    assert int(b.wg("show", b.ifname, "transfer").split()[1]) > rx_before  # it did arrive
    # the same address becomes a's: now it passes
    b.wg("set", b.ifname, "peer", a.public_key, "allowed-ips", f"{a.inner4}/32,10.201.0.77/32")
    a.ns.run("ping", "-c", "1", "-W", "3", "-I", "10.201.0.77", b.inner4, timeout=20)


def test_mtu_changes_are_honoured() -> None:
    ns = Namespace(f"wgpy-mtu{os.getpid()}")
    ifname = f"wgm{os.getpid() % 100000}"
    env = {**os.environ, "LOG_LEVEL": "verbose"}
    daemon = ns.popen(*WGPY, "-f", ifname, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(ifname, 10)
        ns.set_link(ifname, mtu=1280)
        assert daemon.stderr is not None
        deadline = time.monotonic() + 10
        seen = ""
        while "MTU is now 1280" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([daemon.stderr], [], [], left)[0]:
                raise AssertionError(f"the daemon did not notice the new MTU: {seen!r}")
            seen += daemon.stderr.readline()
    finally:
        daemon.terminate()
        daemon.wait(10)
        ns.close()
        socket_path(ifname).unlink(missing_ok=True)
