"""The test bed for `wgpy run` / `wgpy proxy` / the library: a peer and a caller.

Namespace "peer" holds a WireGuard peer (wgpy or wireguard-go) with, behind it on its
tunnel address, an HTTP server and a one-record DNS responder. Namespace "caller" is the
caller's network (the unprivileged `wgpy run` starts there, so its UDP socket lives
there), joined to the peer by veth. `unprivileged_python` builds, once per session, an
interpreter that `nobody` can run: a venv outside /root made from /usr/bin/python3, with
cryptography, pyroute2 and a copy of this worktree's package.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from wgpy.demo.testbed import Namespace, veth, wait_for_socket, wg_keypair
from wgpy.io.tun import _setns

SRC = Path(__file__).resolve().parents[2] / "src"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
PEER_OUTER, CALLER_OUTER = "10.231.0.2", "10.231.0.1"
PEER_INNER, CALLER_INNER = "10.232.0.1", "10.232.0.2"
PEER_INNER6, CALLER_INNER6 = "fd32::1", "fd32::2"
NAME = "tunnel.test"
PAGE = "hello through the tunnel\n"

DNS_RESPONDER = r"""
import socket, struct, sys
name, answer = sys.argv[2].encode(), socket.inet_aton(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, src = s.recvfrom(512)
    qid, flags = struct.unpack(">HH", q[:4])
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1 : i + 1 + q[i]]); i += q[i] + 1
    question = q[12 : i + 5]
    qtype = struct.unpack(">H", q[i + 1 : i + 3])[0]
    known = b".".join(labels).lower() == name
    ans = b""
    if known and qtype == 1:
        ans = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + answer
    rcode = 0 if known else 3
    head = struct.pack(">HHHHHH", qid, 0x8180 | rcode, 1, 1 if ans else 0, 0, 0)
    s.sendto(head + question + ans, src)
"""


def unprivileged_python(workdir: Path) -> Path:
    """A venv `nobody` can run, outside /root, with the project and its dependencies."""
    base = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    venv = workdir / "venv"
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    missing = subprocess.run(
        [str(py), "-c", "import cryptography, pyroute2"], capture_output=True, check=False
    )
    if missing.returncode != 0:
        subprocess.run(
            [
                str(py),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "cryptography>=42",
                "pyroute2>=0.7",
            ],
            check=True,
            timeout=300,
        )
    shutil.copytree(SRC / "wgpy", Path(site) / "wgpy", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [workdir, *workdir.rglob("*")]:
        with contextlib.suppress(OSError):
            mode = path.stat().st_mode
            path.chmod(mode | 0o044 | (0o011 if path.is_dir() or mode & 0o100 else 0))
    return py


class Bed:
    def __init__(self, tag: str, implementation: str, workdir: Path) -> None:
        suffix = f"{tag}{os.getpid() % 100000}"
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.namespaces: list[Namespace] = []
        try:
            self.peer = self._ns(f"wgpyrl-{suffix}-p")
            self.caller = self._ns(f"wgpyrl-{suffix}-c")
            veth(self.caller, self.peer, f"rc{suffix}"[:15], f"rp{suffix}"[:15])
            self.caller.add_address(f"rc{suffix}"[:15], f"{CALLER_OUTER}/24")
            self.peer.add_address(f"rp{suffix}"[:15], f"{PEER_OUTER}/24")
            self.peer_private, self.peer_public = wg_keypair()
            self.private, self.public = wg_keypair()
            self.ifname = f"wp{suffix}"[:15]
            self._start_peer(implementation)
            self._serve()
            self.config = workdir / f"client-{suffix}.conf"
            self.config.write_text(self.client_config())
            self.config.chmod(0o644)
        except BaseException:
            self.close()
            raise

    def _ns(self, name: str) -> Namespace:
        ns = Namespace(name)
        self.namespaces.append(ns)
        return ns

    def _start_peer(self, implementation: str) -> None:
        argv = [sys.executable, "-m", "wgpy"] if implementation == "wgpy" else ["wireguard-go"]
        env = {**os.environ, "LOG_LEVEL": "error", "PYTHONPATH": str(SRC)}
        self.procs.append(
            self.peer.popen(
                *argv,
                "-f",
                self.ifname,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_for_socket(self.ifname)
        key = self.workdir / f"{self.ifname}.key"
        key.write_text(self.peer_private + "\n")
        self.peer.run(
            "wg",
            "set",
            self.ifname,
            "private-key",
            str(key),
            "listen-port",
            "51820",
            "peer",
            self.public,
            "allowed-ips",
            f"{CALLER_INNER}/32,{CALLER_INNER6}/128",
        )
        self.peer.add_address(self.ifname, f"{PEER_INNER}/24")
        self.peer.add_address(self.ifname, f"{PEER_INNER6}/64")
        self.peer.set_link(self.ifname, mtu=1420, state="up")

    def _serve(self) -> None:
        www = self.workdir / "www"
        www.mkdir(exist_ok=True)
        (www / "index.html").write_text(PAGE)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        self.procs.append(
            self.peer.popen(
                sys.executable,
                "-m",
                "http.server",
                "-d",
                str(www),
                "-b",
                PEER_INNER,
                "8000",
                **quiet,
            )
        )
        self.procs.append(
            self.peer.popen(
                sys.executable, "-c", DNS_RESPONDER, PEER_INNER, NAME, PEER_INNER, **quiet
            )
        )
        deadline = time.monotonic() + 10
        while "8000" not in self.peer.run("ss", "-ltn", check=False) or ":53 " not in self.peer.run(
            "ss", "-lun", check=False
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("the peer's servers did not start")
            time.sleep(0.05)

    def client_config(self, allowed: str = "0.0.0.0/0, ::/0") -> str:
        return (
            f"[Interface]\nPrivateKey = {self.private}\n"
            f"Address = {CALLER_INNER}/24, {CALLER_INNER6}/64\n"
            f"DNS = {PEER_INNER}\n\n[Peer]\nPublicKey = {self.peer_public}\n"
            f"Endpoint = {PEER_OUTER}:51820\nAllowedIPs = {allowed}\nPersistentKeepalive = 25\n"
        )

    def snapshot(self) -> dict[str, str]:
        """What a run must leave as it found: the caller's links, addresses, routes and
        processes, and the files a run might leave in /tmp."""
        ns = self.caller
        return {
            "links": ns.run("ip", "-o", "link"),
            "addrs": ns.run("ip", "-o", "addr"),
            "routes": ns.run("ip", "route") + ns.run("ip", "-6", "route"),
            "pids": subprocess.run(
                ["ip", "netns", "pids", ns.name], capture_output=True, text=True, check=False
            ).stdout,
            "tmp": " ".join(
                sorted(p.name for p in Path(tempfile.gettempdir()).glob("wgpy-resolv-*"))
            ),
            "resolv": Path("/etc/resolv.conf").read_text(),
        }

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for ns in self.namespaces:
            ns.close()
        with contextlib.suppress(FileNotFoundError):
            from wgpy.io.uapi_path import socket_path

            socket_path(self.ifname).unlink()


# ---- talking to a proxy in the caller's namespace ----------------------------------


@contextlib.contextmanager
def in_namespace(name: str) -> Iterator[None]:
    """Make sockets inside network namespace `name` (they stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(own)
        os.close(own)
        os.close(target)


def socks_connect(
    ns: str, port: int, request: bytes, methods: bytes = b"\x00"
) -> tuple[socket.socket, bytes]:
    """Greeting and one request; (the socket, the reply's first bytes)."""
    with in_namespace(ns):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(bytes([5, len(methods)]) + methods)
    choice = s.recv(2)
    if choice != b"\x05\x00":
        return s, choice
    s.sendall(request)
    head = _recv_exactly(s, 4)
    if head[1] == 0:  # the bound address follows
        _recv_exactly(s, (4 if head[3] == 1 else 16) + 2)
    return s, head


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def connect_domain(name: str, port: int) -> bytes:
    return b"\x05\x01\x00\x03" + bytes([len(name)]) + name.encode() + struct.pack(">H", port)


def connect_ipv4(ip: str, port: int, cmd: int = 1) -> bytes:
    return bytes([5, cmd, 0, 1]) + socket.inet_aton(ip) + struct.pack(">H", port)


def free_port(ns: str) -> int:
    with in_namespace(ns):
        s = socket.socket()
    with s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
