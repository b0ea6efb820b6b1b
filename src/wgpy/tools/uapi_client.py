"""The client side of the UAPI: talk to any userspace WireGuard's socket, render `wg show`."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from wgpy.core.crypto import encode_key
from wgpy.io.uapi_path import SOCKET_DIR, socket_path


class UapiClientError(Exception):
    pass


def interfaces() -> list[str]:
    """The names of the interfaces whose daemons listen in the UAPI directory."""
    return sorted(p.stem for p in Path(SOCKET_DIR).glob("*.sock"))


def request(ifname: str, text: str, timeout: float = 10.0) -> list[str]:
    """Send one request; the answer's key=value lines. Raises on a non-zero errno."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path(ifname)))
        except OSError as e:
            raise UapiClientError(f"cannot reach {ifname}: {e.strerror}") from e
        sock.sendall(text.encode())
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    lines = data.decode().rstrip("\n").split("\n")
    if not lines or not lines[-1].startswith("errno="):
        raise UapiClientError(f"{ifname}: truncated answer")
    code = int(lines[-1][6:])
    if code:
        raise UapiClientError(f"{ifname}: the daemon answered errno={code}")
    return lines[:-1]


def set_config(ifname: str, body: str) -> None:
    request(ifname, "set=1\n" + body.rstrip("\n") + "\n\n")


@dataclass
class PeerStatus:
    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)  # no keys in logs
    endpoint: str | None = None
    allowed_ips: list[str] = field(default_factory=list)
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0


@dataclass
class DeviceStatus:
    name: str
    private_key: bytes | None = field(default=None, repr=False)  # no keys in logs
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerStatus] = field(default_factory=list)


def get(ifname: str) -> DeviceStatus:
    dev = DeviceStatus(ifname)
    peer: PeerStatus | None = None
    for line in request(ifname, "get=1\n\n"):
        key, _, value = line.partition("=")
        if key == "public_key":
            peer = PeerStatus(bytes.fromhex(value))
            dev.peers.append(peer)
        elif peer is None:
            if key == "private_key":
                dev.private_key = bytes.fromhex(value)
            elif key in ("listen_port", "fwmark"):
                setattr(dev, key, int(value))
        elif key == "preshared_key":
            peer.preshared_key = bytes.fromhex(value) if value != "0" * 64 else None
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "allowed_ip":
            peer.allowed_ips.append(value)
        elif key == "last_handshake_time_sec":
            peer.last_handshake += int(value)
        elif key == "last_handshake_time_nsec":
            peer.last_handshake += int(value) / 1e9
        elif key in ("rx_bytes", "tx_bytes"):
            setattr(peer, key, int(value))
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = int(value)
    return dev


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _ago(seconds: float) -> str:
    s = int(seconds)
    parts = [(s // 3600, "hour"), (s // 60 % 60, "minute"), (s % 60, "second")]
    words = [f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts if n]
    return (", ".join(words) or "0 seconds") + " ago"


def render(dev: DeviceStatus, public_key: bytes | None, now: float | None = None) -> str:
    """The device as `wg show` prints it (without colours)."""
    now = time.time() if now is None else now
    lines = [f"interface: {dev.name}"]
    if public_key is not None:
        lines += [f"  public key: {encode_key(public_key)}", "  private key: (hidden)"]
    if dev.listen_port:
        lines.append(f"  listening port: {dev.listen_port}")
    if dev.fwmark:
        lines.append(f"  fwmark: 0x{dev.fwmark:x}")
    for p in sorted(dev.peers, key=lambda p: -p.last_handshake):
        lines += ["", f"peer: {encode_key(p.public_key)}"]
        if p.preshared_key:
            lines.append("  preshared key: (hidden)")
        if p.endpoint:
            lines.append(f"  endpoint: {p.endpoint}")
        lines.append(f"  allowed ips: {', '.join(p.allowed_ips) or '(none)'}")
        if p.last_handshake:
            lines.append(f"  latest handshake: {_ago(now - p.last_handshake)}")
        if p.rx_bytes or p.tx_bytes:
            lines.append(f"  transfer: {_bytes(p.rx_bytes)} received, {_bytes(p.tx_bytes)} sent")
        if p.persistent_keepalive:
            lines.append(f"  persistent keepalive: every {p.persistent_keepalive} seconds")
    return "\n".join(lines)
