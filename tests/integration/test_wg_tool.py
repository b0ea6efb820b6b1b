"""The real `wg` tool against wgpy's UAPI socket: every command a user runs."""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgpy.demo.testbed import WGPY, Namespace, TunnelEnd, wg_keypair
from wgpy.io.uapi_path import socket_path
from wgpy.tools.uapi_client import set_config

HOLD_PORT = (
    "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
    "s.bind(('0.0.0.0',45000));print('ready',flush=True);sys.stdin.read()"
)


@pytest.fixture
def dev() -> Iterator[TunnelEnd]:
    ns = Namespace(f"wgpy-wgtool{os.getpid()}")
    end = TunnelEnd(ns, f"wgt{os.getpid() % 100000}", 1, WGPY)
    try:
        end.start()
        yield end
    finally:
        end.stop()
        ns.close()


def conf_file(text: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
        f.write(text)
        return f.name


def wg_file(dev: TunnelEnd, command: str, text: str) -> str:
    path = conf_file(text)
    try:
        return dev.wg(command, dev.ifname, path)
    finally:
        os.unlink(path)


def test_set_show_and_remove(dev: TunnelEnd) -> None:
    priv, pub = wg_keypair()
    _, p1 = wg_keypair()
    _, p2 = wg_keypair()
    _, psk = wg_keypair()
    path = conf_file(priv + "\n")
    psk_path = conf_file(psk + "\n")
    try:
        dev.wg("set", dev.ifname, "private-key", path, "listen-port", "0", "fwmark", "0x42")
        dev.wg("set", dev.ifname, "peer", p1, "preshared-key", psk_path,
               "endpoint", "10.9.9.9:1234", "persistent-keepalive", "25",
               "allowed-ips", "10.1.0.0/16,fd00::/64")  # fmt: skip
        dev.wg("set", dev.ifname, "peer", p2, "allowed-ips", "10.2.0.1/32")
    finally:
        os.unlink(path)
        os.unlink(psk_path)
    assert dev.wg("show", dev.ifname, "public-key").strip() == pub
    port = int(dev.wg("show", dev.ifname, "listen-port"))
    assert port > 0  # port 0 picked a free one, and it is reported
    assert dev.wg("show", dev.ifname, "fwmark").strip() == "0x42"
    dump = dev.wg("show", dev.ifname, "dump").splitlines()
    assert dump[0].split("\t") == [priv, pub, str(port), "0x42"]
    peer1 = next(line.split("\t") for line in dump if line.startswith(p1))
    assert peer1[1:4] == [psk, "10.9.9.9:1234", "10.1.0.0/16,fd00::/64"]
    assert peer1[-1] == "25"
    # replace_allowed_ips, an entry moving between peers, removal of one entry
    dev.wg("set", dev.ifname, "peer", p1, "allowed-ips", "10.3.0.0/24,10.2.0.1/32")
    ips = dev.wg("show", dev.ifname, "allowed-ips")
    assert f"{p1}\t10.3.0.0/24 10.2.0.1/32" in ips and f"{p2}\t(none)" in ips
    # this Debian's `wg` predates the +/- syntax: send the UAPI lines it would send
    pub1 = base64.b64decode(p1).hex()
    set_config(dev.ifname, f"public_key={pub1}\nallowed_ip=10.4.0.0/16\nallowed_ip=-10.3.0.0/24")
    assert f"{p1}\t10.2.0.1/32 10.4.0.0/16" in dev.wg("show", dev.ifname, "allowed-ips")
    dev.wg("set", dev.ifname, "peer", p2, "remove")
    assert p2 not in dev.wg("show", dev.ifname, "peers")
    # a bad request gets an error, and the device is as it was
    before = dev.wg("show", dev.ifname, "dump")
    holder = dev.ns.popen(
        sys.executable, "-c", HOLD_PORT, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        argv = dev.ns.argv(["wg", "set", dev.ifname, "listen-port", "45000"])
        bad = subprocess.run(argv, capture_output=True, text=True)
    finally:
        holder.kill()
        holder.wait()
    assert bad.returncode != 0 and "Address already in use" in bad.stderr
    assert dev.wg("show", dev.ifname, "dump") == before


def test_setconf_addconf_syncconf_showconf(dev: TunnelEnd) -> None:
    priv, _ = wg_keypair()
    _, p1 = wg_keypair()
    _, p2 = wg_keypair()
    _, p3 = wg_keypair()
    base = f"[Interface]\nPrivateKey = {priv}\nListenPort = 40001\n\n"
    wg_file(dev, "setconf", base + f"[Peer]\nPublicKey = {p1}\nAllowedIPs = 10.1.0.0/16\n")
    wg_file(dev, "addconf", f"[Peer]\nPublicKey = {p2}\nAllowedIPs = 10.2.0.0/16\n")
    assert set(dev.wg("show", dev.ifname, "peers").split()) == {p1, p2}
    shown = dev.wg("showconf", dev.ifname)
    assert f"PrivateKey = {priv}" in shown and "ListenPort = 40001" in shown
    assert f"PublicKey = {p2}\nAllowedIPs = 10.2.0.0/16" in shown
    # syncconf: p1 kept (changed), p2 removed, p3 added
    wg_file(dev, "syncconf", base + f"[Peer]\nPublicKey = {p1}\nAllowedIPs = 10.5.0.0/16\n"
            f"[Peer]\nPublicKey = {p3}\nAllowedIPs = 10.3.0.0/16\n")  # fmt: skip
    assert set(dev.wg("show", dev.ifname, "peers").split()) == {p1, p3}
    assert f"{p1}\t10.5.0.0/16" in dev.wg("show", dev.ifname, "allowed-ips")
    # setconf replaces everything
    wg_file(dev, "setconf", base)
    assert dev.wg("show", dev.ifname, "peers").strip() == ""


def test_130k_allowed_ips_round_trip(dev: TunnelEnd) -> None:
    priv, _ = wg_keypair()
    _, p1 = wg_keypair()
    nets = [str(ipaddress.IPv4Network(((10 << 24) + (i << 8), 24))) for i in range(65000)]
    nets += [str(ipaddress.IPv6Network(((0xFD << 120) + (i << 64), 64))) for i in range(65000)]
    text = f"[Interface]\nPrivateKey = {priv}\n[Peer]\nPublicKey = {p1}\nAllowedIPs = "
    started = time.monotonic()
    wg_file(dev, "setconf", text + ",".join(nets) + "\n")
    shown = dev.wg("show", dev.ifname, "allowed-ips").split("\t")[1].split()
    elapsed = time.monotonic() - started
    assert shown == nets
    assert elapsed < 30, elapsed  # "a few seconds" on an idle machine; bounded for CI


def test_many_clients_and_garbage(dev: TunnelEnd) -> None:
    """Malformed requests get an errno or a closed connection; the daemon serves on."""
    for payload in [b"get=1\nbogus=1\n\n", b"set=1\nlisten_port=x\n\n", b"\xff\xfe\n\n",
                    b"hello\n\n", b"set=1\npublic_key=zz\n\n", b"get=1\n"]:  # fmt: skip
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(socket_path(dev.ifname)))
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
            assert answer in (b"",) or answer.startswith(b"errno=-"), (payload, answer)
    for _ in range(50):
        dev.wg("show", dev.ifname)
    assert Path(socket_path(dev.ifname)).exists()
