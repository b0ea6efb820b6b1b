"""wireguard-go's process conventions: `--version`, WG_PROCESS_FOREGROUND, and a privileged
parent that hands the daemon its TUN and UAPI socket (WG_TUN_FD, WG_UAPI_FD)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgpy import __version__
from wgpy.demo.testbed import WGPY, WIREGUARD_GO, Namespace, TunnelEnd, veth, wait_for_socket
from wgpy.io.uapi_path import socket_path

from .conftest import eventually

PID = os.getpid() % 100000

# The privileged parent, run inside the namespace: it opens the TUN (with the virtio header
# the daemon likes) and binds and listens on the UAPI socket, then becomes the daemon with
# every capability dropped, handing both over by number. The daemon is told a wrong name:
# with WG_TUN_FD the name is the TUN's own.
PARENT = """
import fcntl, os, socket, struct, sys
name = sys.argv[1]
tun = os.open("/dev/net/tun", os.O_RDWR)
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR, TUNSETIFF = 0x0001, 0x1000, 0x4000, 0x400454CA
fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH22x", name.encode(),
                                         IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
os.makedirs("/var/run/wireguard", mode=0o755, exist_ok=True)
uapi = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
os.umask(0o077)
uapi.bind(f"/var/run/wireguard/{name}.sock")
uapi.listen(16)
os.set_inheritable(tun, True)
os.set_inheritable(uapi.fileno(), True)
env = {**os.environ, "WG_TUN_FD": str(tun), "WG_UAPI_FD": str(uapi.fileno()),
       "WG_PROCESS_FOREGROUND": "1"}
os.execvpe("setpriv", ["setpriv", "--bounding-set=-all", "--inh-caps=-all",
                       "--ambient-caps=-all", "--no-new-privs",
                       sys.executable, "-m", "wgpy", "not-this-name"], env)
"""


def is_the_daemon(pid: int) -> bool:
    """Whether process `pid` runs `python -m wgpy` now (not the parent, not setpriv)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return argv[1:3] == [b"-m", b"wgpy"]


@pytest.fixture
def pair() -> Iterator[tuple[Namespace, Namespace]]:
    a = Namespace(f"wgpy-p{PID}-a")
    b = Namespace(f"wgpy-p{PID}-b")
    try:
        veth(a, b, f"pa{PID}", f"pb{PID}")
        a.add_address(f"pa{PID}", "10.200.0.1/24")
        b.add_address(f"pb{PID}", "10.200.0.2/24")
        yield a, b
    finally:
        a.close()
        b.close()
        for name in (f"wpa{PID}", f"wpb{PID}"):
            socket_path(name).unlink(missing_ok=True)


def test_version_is_wireguard_go_style() -> None:
    ours = subprocess.run([*WGPY, "--version"], capture_output=True, text=True, timeout=30)
    assert ours.returncode == 0
    assert ours.stdout.splitlines()[0] == f"wgpy v{__version__}"
    theirs = subprocess.run(["wireguard-go", "--version"], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
    pattern = r"\S+ v[0-9][^ ]*"
    assert re.fullmatch(pattern, theirs.stdout.splitlines()[0])
    assert re.fullmatch(pattern, ours.stdout.splitlines()[0])


def test_foreground_from_the_environment(pair: tuple[Namespace, Namespace]) -> None:
    a, _ = pair
    name = f"wpa{PID}"
    env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
    process = a.popen(*WGPY, name, env=env)
    try:
        wait_for_socket(name)
        assert process.poll() is None  # still here: it is the daemon
        process.terminate()
        assert process.wait(10) == 0
        eventually(lambda: not a.has_link(name), what="the interface to go")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    # without it, `wgpy NAME` returns once its detached daemon serves
    env = {k: v for k, v in os.environ.items() if k != "WG_PROCESS_FOREGROUND"}
    done = subprocess.run(a.argv([*WGPY, name]), timeout=30, env=env)
    assert done.returncode == 0 and socket_path(name).exists() and a.has_link(name)
    a.run("ip", "link", "delete", name)
    eventually(lambda: not socket_path(name).exists(), what="the daemon to go")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_handed_tun_and_uapi_socket_serve_a_tunnel_without_privileges(
    pair: tuple[Namespace, Namespace], tmp_path: Path
) -> None:
    a, b = pair
    ours = TunnelEnd(a, f"wpa{PID}", 1, WGPY)
    theirs = TunnelEnd(b, f"wpb{PID}", 2, WIREGUARD_GO)
    log = (tmp_path / "daemon.log").open("w")
    ours.process = a.popen(sys.executable, "-c", PARENT, ours.ifname, stdout=log, stderr=log,
                           env={**os.environ, "LOG_LEVEL": "error"})  # fmt: skip
    try:
        theirs.start()
        eventually(lambda: a.has_link(ours.ifname), what="the parent's TUN")
        wait_for_socket(ours.ifname)
        pid = ours.process.pid
        # the socket is the parent's, bound before it execs setpriv, which execs the
        # daemon: the capabilities to read are the daemon's, once the pid is the daemon
        eventually(lambda: is_the_daemon(pid), what="setpriv to exec the daemon")
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"CapEff:\s+0+\n", status), status  # no privileges at all
        for node, port in ((ours, 51820), (theirs, 51821)):
            node.set_private_key(port)  # through `wg set`, i.e. the handed UAPI socket
            node.ns.add_address(node.ifname, f"{node.inner4}/24")
            node.ns.set_link(node.ifname, state="up", mtu=1420)
        for here, there in ((ours, theirs), (theirs, ours)):
            endpoint = f"{there.outer4}:{there.port}"
            here.wg("set", here.ifname, "peer", there.public_key, "endpoint", endpoint,
                    "allowed-ips", f"{there.inner4}/32")  # fmt: skip
        a.run("ping", "-c", "2", "-i", "0.2", "-W", "3", theirs.inner4, timeout=20)
        assert "latest handshake" in a.run("wg", "show", ours.ifname)
        assert not socket_path("not-this-name").exists()
        # the handed socket goes with the daemon, which goes with its socket file
        socket_path(ours.ifname).unlink()
        assert ours.process.wait(10) == 0
    finally:
        ours.stop()
        theirs.stop()
        log.close()
        print((tmp_path / "daemon.log").read_text())
