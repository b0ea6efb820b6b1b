"""Traffic through real tunnels: wgpy <-> wgpy and wgpy <-> wireguard-go."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable

import pytest

from wgpy.demo.testbed import WGPY, WIREGUARD_GO, Tunnel, TunnelEnd

PAIRS = {
    "wgpy-wgpy": (WGPY, WGPY),
    "wgpy-wgpy-no-offload": (WGPY, WGPY),  # WGPY_OFFLOAD=0: no virtio header, GSO or GRO
    "wgpy-wggo": (WGPY, WIREGUARD_GO),
    "wggo-wgpy": (WIREGUARD_GO, WGPY),
}

# Sends N random bytes, deterministic from a seed, so both sides can hash them.
SENDER = (
    "import random,socket,sys;r=random.Random(7);n={n};"
    "c=socket.create_connection(('{addr}',7001),timeout=20)\n"
    "while n>0:\n b=r.randbytes(min(n,1<<16));c.sendall(b);n-=len(b)\n"
    "c.close()"
)
RECEIVER = (
    "import hashlib,socket;f=socket.AF_INET6 if ':' in '{addr}' else socket.AF_INET;"
    "s=socket.create_server(('{addr}',7001),family=f);s.settimeout(20);print('ready',flush=True);"
    "c,_=s.accept();c.settimeout(20);h=hashlib.sha256();t=0\n"
    "while (b:=c.recv(1<<16)):\n h.update(b);t+=len(b)\n"
    "print(t,h.hexdigest())"
)


def ping(src: TunnelEnd, addr: str) -> None:
    src.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "3", addr, timeout=20)


def transfer(src: TunnelEnd, dst: TunnelEnd, addr: str, n: int) -> None:
    rx = dst.ns.popen(
        sys.executable, "-c", RECEIVER.format(addr=addr), stdout=subprocess.PIPE, text=True
    )
    try:
        assert rx.stdout is not None and rx.stdout.readline() == "ready\n"
        src.ns.run(sys.executable, "-c", SENDER.format(addr=addr, n=n), timeout=60)
        out, _ = rx.communicate(timeout=30)
    finally:
        rx.kill()
        rx.wait()
    r = __import__("random").Random(7)
    h = hashlib.sha256()
    left = n
    while left > 0:
        b = r.randbytes(min(left, 1 << 16))
        h.update(b)
        left -= len(b)
    assert out.split() == [str(n), h.hexdigest()]


def counters(end: TunnelEnd) -> tuple[int, int, int]:
    """(latest handshake, rx, tx) from `wg show dump` for the only peer."""
    fields = end.wg("show", end.ifname, "dump").splitlines()[1].split("\t")
    return int(fields[4]), int(fields[5]), int(fields[6])


@pytest.mark.parametrize("outer", ["ipv4", "ipv6"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_ping_transfer_and_counters(
    make_tunnel: Callable[..., Tunnel], pair: str, outer: str
) -> None:
    env = {"WGPY_OFFLOAD": "0"} if pair.endswith("no-offload") else None
    t = make_tunnel("t", *PAIRS[pair], env=env)
    a, b = t.a, t.b
    if outer == "ipv6":
        for here, there in ((a, b), (b, a)):
            here.wg("set", here.ifname, "peer", there.public_key,
                    "endpoint", f"[{there.outer6}]:{there.port}")  # fmt: skip
    ping(a, b.inner4)
    ping(b, a.inner4)
    ping(a, b.inner6)
    ping(b, a.inner6)
    transfer(a, b, b.inner4, 20_000_000)  # large enough for full GSO/GRO batches
    transfer(b, a, a.inner6, 4_000_000)
    for end in (a, b):
        assert counters(end)[0] > 0  # a handshake happened
    endpoint = a.wg("show", a.ifname, "endpoints").split()[1]
    assert endpoint == (f"[{b.outer6}]:{b.port}" if outer == "ipv6" else f"{b.outer4}:{b.port}")

    # Each side received at least the 4 MB of payload and never more than the other sent
    # (UDP may drop under load: a slower receiver's socket overflows and TCP resends).
    _, a_rx, a_tx = counters(a)
    _, b_rx, b_tx = counters(b)
    for sent, got in ((a_tx, b_rx), (b_tx, a_rx)):
        assert 4_000_000 < got <= sent, (a_rx, a_tx, b_rx, b_tx)


UDP_RECEIVER = (
    "import hashlib,socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
    "s.setsockopt(socket.SOL_SOCKET,socket.SO_RCVBUF,4<<20);s.bind(('{addr}',7002));"
    "s.settimeout(3);print('ready',flush=True);got=[]\n"
    "try:\n while True: got.append(s.recv(2000))\nexcept TimeoutError: pass\n"
    "print(len(got),hashlib.sha256(b''.join(sorted(got))).hexdigest())"
)
UDP_SENDER = (
    "import socket,time;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "for i in range(300):\n s.sendto(i.to_bytes(2,'big')*500,('{addr}',7002))\n"
    " if i % {burst} == {burst} - 1: time.sleep(0.005)"
)


@pytest.mark.parametrize(("pair", "burst"), [("wgpy-wgpy", 300), ("wgpy-wggo", 20)])
def test_udp_burst_arrives_whole(make_tunnel: Callable[..., Tunnel], pair: str, burst: int) -> None:
    """Same-size datagrams: sent with UDP GSO, written to the TUN as USO super-packets.
    (Debian's wireguard-go drops from a 300-datagram burst in its own socket: pace it.)"""
    t = make_tunnel("u", *PAIRS[pair])
    a, b = t.a, t.b
    ping(a, b.inner4)
    rx = b.ns.popen(sys.executable, "-c", UDP_RECEIVER.format(addr=b.inner4),
                    stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert rx.stdout is not None and rx.stdout.readline() == "ready\n"
        a.ns.run(sys.executable, "-c", UDP_SENDER.format(addr=b.inner4, burst=burst))
        out, _ = rx.communicate(timeout=30)
    finally:
        rx.kill()
        rx.wait()
    want = hashlib.sha256(b"".join(sorted(i.to_bytes(2, "big") * 500 for i in range(300))))
    assert out.split() == ["300", want.hexdigest()]
