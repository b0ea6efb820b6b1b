"""The UAPI socket: /var/run/wireguard/IFNAME.sock, its clients, and their requests.

The protocol itself (parsing, applying, answering) is in `uapi.py`; this file only moves
bytes between clients and `uapi.handle`.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable

from wgpy.daemon.uapi import SOCKET_DIR, Host, handle, socket_path

MAX_REQUEST = 64 * 1024 * 1024  # a 130k allowed-IPs setconf is ~4 MB


class Connection:
    """One client: bytes in, complete requests out. Several requests per connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def feed(self) -> list[list[str]] | None:
        """Read what is waiting; the complete requests, or None when the client is gone."""
        try:
            chunk = self.sock.recv(1 << 20)
        except BlockingIOError:
            return []
        except OSError:
            return None
        if not chunk or len(self.buffer) + len(chunk) > MAX_REQUEST:
            return None
        self.buffer += chunk
        requests = []
        while (end := self.buffer.find(b"\n\n")) >= 0:
            text = self.buffer[:end].decode("utf-8", "replace")
            del self.buffer[: end + 2]
            requests.append(text.split("\n"))
        return requests

    def reply(self, text: str) -> bool:
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(10)
            self.sock.sendall(text.encode())
            self.sock.setblocking(False)
            return True
        except OSError:
            return False


class UapiListener:
    """/var/run/wireguard/IFNAME.sock: made like wireguard-go's (dir 0755, socket 0600)."""

    def __init__(self, ifname: str, socket_dir: str = SOCKET_DIR) -> None:
        os.makedirs(socket_dir, mode=0o755, exist_ok=True)
        self.path = str(socket_path(ifname, socket_dir))
        _remove_stale(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.sock.bind(self.path)
        finally:
            os.umask(old)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self._ino = os.stat(self.path).st_ino

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Connection | None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return None
        conn.setblocking(False)
        return Connection(conn)

    def still_there(self) -> bool:
        """False once someone deleted or replaced our socket file: time to go."""
        try:
            return os.stat(self.path).st_ino == self._ino
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()
        if self.still_there():
            os.unlink(self.path)


def _remove_stale(path: str) -> None:
    """Replace a socket nobody answers on; refuse to steal a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running daemon")


def serve_connection(host: Host, conn: Connection, on_close: Callable[[], None]) -> None:
    """Handle what a readable client sent; close it when it is done or broken."""
    requests = conn.feed()
    if requests is None:
        on_close()
        return
    for request in requests:
        if not conn.reply(handle(host, request)):
            on_close()
            return
