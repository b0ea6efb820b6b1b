"""Network namespaces and two-ended tunnels between them, for the demo, tests and benchmarks.

`Tunnel` builds the standard test bed: namespaces A and B joined by a veth pair (the
"outside" network, IPv4 and IPv6), a WireGuard interface in each (wgpy or wireguard-go,
started inside its namespace so its UDP socket lives there), configured with the real
`wg` tool through the UAPI socket, with "inside" addresses on the tunnel. Everything it
made is removed by `close()`, which also runs when setup fails half-way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from wgpy.io.uapi_path import socket_path

WGPY = [sys.executable, "-m", "wgpy"]
WIREGUARD_GO = ["wireguard-go"]


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name
        pyroute2_netns.create(name)
        with self.ipr() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        # no duplicate address detection: IPv6 addresses are usable at once
        for conf in ("all", "default"):
            self.run("sh", "-c", f"echo 0 > /proc/sys/net/ipv6/conf/{conf}/accept_dad")

    def ipr(self) -> IPRoute:
        return IPRoute(netns=self.name)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> str:
        done = subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} in {self.name}: {done.stderr.strip()}")
        return done.stdout

    def popen(self, *argv: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(argv), **kwargs)  # type: ignore[call-overload, no-any-return]

    def add_address(self, ifname: str, cidr: str) -> None:
        addr, _, prefix = cidr.partition("/")
        with self.ipr() as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=index, address=addr, prefixlen=int(prefix))

    def set_link(self, ifname: str, **attrs: object) -> None:
        with self.ipr() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], **attrs)

    def has_link(self, ifname: str) -> bool:
        with self.ipr() as ipr:
            return bool(ipr.link_lookup(ifname=ifname))

    def close(self) -> None:
        """Kill what still runs inside, then remove the namespace (and its interfaces)."""
        pids = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        with contextlib.suppress(OSError):
            pyroute2_netns.remove(self.name)


def veth(a: Namespace, b: Namespace, name_a: str, name_b: str, mtu: int = 1500) -> None:
    """A veth pair with one end in each namespace, both up."""
    with a.ipr() as ipr:
        ipr.link("add", ifname=name_a, kind="veth", peer={"ifname": name_b, "net_ns_fd": b.name})
        ipr.link("set", index=ipr.link_lookup(ifname=name_a)[0], mtu=mtu, state="up")
    b.set_link(name_b, mtu=mtu, state="up")


def wg_keypair() -> tuple[str, str]:
    """(private, public) in base64, made by the `wg` tool itself."""
    private = subprocess.run(
        ["wg", "genkey"], capture_output=True, text=True, check=True
    ).stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


def wait_for_socket(ifname: str, timeout: float = 10.0) -> Path:
    path = socket_path(ifname)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)
    return path


class TunnelEnd:
    """One end of a tunnel: a namespace, its WireGuard process and its addresses."""

    def __init__(self, ns: Namespace, ifname: str, index: int, implementation: list[str]):
        self.ns = ns
        self.ifname = ifname
        self.outer4 = f"10.200.0.{index}"
        self.outer6 = f"fd00::{index}"
        self.inner4 = f"10.201.0.{index}"
        self.inner6 = f"fd01::{index}"
        self.implementation = implementation
        self.process: subprocess.Popen[bytes] | None = None
        self.private_key, self.public_key = wg_keypair()
        self.port = 0
        self.log_path: Path | None = None  # the daemon's stderr, when start() was given one

    def start(self, env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        full_env = {**os.environ, "LOG_LEVEL": os.environ.get("LOG_LEVEL", "error"), **(env or {})}
        self.log_path = log_path
        with contextlib.ExitStack() as stack:
            stderr = stack.enter_context(open(log_path, "ab")) if log_path else None
            self.process = self.ns.popen(
                *self.implementation, "-f", self.ifname, env=full_env, stderr=stderr
            )
        try:
            wait_for_socket(self.ifname)
        except TimeoutError:
            self.stop()
            raise

    def wg(self, *args: str) -> str:
        return self.ns.run("wg", *args)

    def set_private_key(self, port: int) -> None:
        with tempfile.NamedTemporaryFile("w", delete=True) as f:
            f.write(self.private_key + "\n")
            f.flush()
            self.wg("set", self.ifname, "private-key", f.name, "listen-port", str(port))
        self.port = port

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.ifname).unlink()


class Tunnel:
    """Two namespaces, joined by veth, with a WireGuard tunnel between them."""

    def __init__(
        self,
        tag: str,
        left: list[str] = WGPY,
        right: list[str] = WGPY,
        mtu: int = 1420,
        env: dict[str, str] | None = None,
        log_dir: str | None = None,
    ) -> None:
        """`log_dir`: each daemon's stderr goes to LOG_DIR/IFNAME.log (`TunnelEnd.log_path`)."""
        suffix = f"{tag}{os.getpid() % 100000}"
        self.namespaces: list[Namespace] = []
        self.ends: list[TunnelEnd] = []
        try:
            for side, impl in (("a", left), ("b", right)):
                ns = Namespace(f"wgpy-{suffix}-{side}")
                self.namespaces.append(ns)
                self.ends.append(TunnelEnd(ns, f"wg{side}{suffix}"[:15], len(self.ends) + 1, impl))
            a, b = self.ends
            veth(a.ns, b.ns, f"va{suffix}"[:15], f"vb{suffix}"[:15])
            for end, dev in ((a, f"va{suffix}"[:15]), (b, f"vb{suffix}"[:15])):
                end.ns.add_address(dev, f"{end.outer4}/24")
                end.ns.add_address(dev, f"{end.outer6}/64")
            for end, port in ((a, 51820), (b, 51821)):
                end.start(env, Path(log_dir) / f"{end.ifname}.log" if log_dir else None)
                end.set_private_key(port)
                end.ns.add_address(end.ifname, f"{end.inner4}/24")
                end.ns.add_address(end.ifname, f"{end.inner6}/64")
                end.ns.set_link(end.ifname, mtu=mtu, state="up")
            self.connect(a, b)
            self.connect(b, a)
        except BaseException:
            self.close()
            raise

    @property
    def a(self) -> TunnelEnd:
        return self.ends[0]

    @property
    def b(self) -> TunnelEnd:
        return self.ends[1]

    def connect(self, here: TunnelEnd, there: TunnelEnd, *extra: str) -> None:
        here.wg(
            "set", here.ifname, "peer", there.public_key,
            "endpoint", f"{there.outer4}:{there.port}",
            "allowed-ips", f"{there.inner4}/32,{there.inner6}/128",
            *extra,
        )  # fmt: skip

    def close(self) -> None:
        for end in self.ends:
            end.stop()
        for ns in self.namespaces:
            ns.close()

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
