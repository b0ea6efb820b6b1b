"""A UAPI socket for the rootless tunnel, so that `wg show` works on it.

`wg` looks for /var/run/wireguard/IFNAME.sock, a directory only root may write. Inside
our own mount namespace we may mount over it: a fresh tmpfs there (seen by our
namespace alone) holds `wg0.sock`, made by and for the user. So `wg show` works for the
command of `wgpy run`, and for `wgpy proxy` from
`nsenter -t PID -U -m -n --preserve-credentials wg show` (the user's own namespaces).

Read-only: `get` is answered (by the daemon's `render_get`, run in the interface's own
thread), `set` gets EPERM: the tunnel's config is the file it started from.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time

from wgpy.core.output import Output
from wgpy.daemon import uapi
from wgpy.embed.interface import Interface
from wgpy.io.uapi_path import SOCKET_DIR
from wgpy.rootless import userns
from wgpy.rootless.serve import Handler

log = logging.getLogger("wgpy.run")
MAX_REQUEST = 1 << 16  # a `get` is two lines; a `set` is refused anyway
MS_NOSUID, MS_NODEV = 0x2, 0x4


class ReadOnlyHost:
    """What `uapi.render_get` reads: the interface's device and port."""

    def __init__(self, iface: Interface) -> None:
        self.iface = iface
        self.device = iface.device
        self.fwmark = 0

    @property
    def listen_port(self) -> int:
        return self.iface.listen_port

    def set_listen_port(self, port: int) -> None:
        raise OSError(errno.EPERM, "read-only")

    def set_fwmark(self, mark: int) -> None:
        raise OSError(errno.EPERM, "read-only")

    def now(self) -> float:
        return time.monotonic()

    def transmit(self, out: Output) -> None:
        raise OSError(errno.EPERM, "read-only")


def listen(ifname: str, socket_dir: str = SOCKET_DIR) -> socket.socket | None:
    """Mount a tmpfs over `socket_dir` (in our mount namespace) and listen on
    IFNAME.sock there; None (and why, in the log) where that cannot be."""
    real = os.path.realpath(socket_dir)
    try:
        userns.mount("tmpfs", real, "tmpfs", MS_NOSUID | MS_NODEV)
    except OSError as e:  # no such directory on this system, or mounts refused
        log.info("no UAPI socket for `wg show`: %s", e)
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(os.path.join(real, f"{ifname}.sock"))
        sock.listen(16)
    except OSError as e:
        sock.close()
        log.info("no UAPI socket for `wg show`: %s", e)
        return None
    finally:
        os.umask(old)
    return sock


def uapi_handler(iface: Interface) -> Handler:
    host = ReadOnlyHost(iface)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError,
                                 asyncio.LimitOverrunError):  # fmt: skip
            while True:
                async with asyncio.timeout(10):
                    request = await reader.readuntil(b"\n\n")
                if request.startswith(b"get=1\n"):
                    answer = await asyncio.to_thread(iface.call, lambda: uapi.render_get(host))
                else:
                    answer = f"errno=-{errno.EPERM}\n\n"
                writer.write(answer.encode())
                await writer.drain()

    return handle
