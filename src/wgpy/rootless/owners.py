"""Who holds the proxy's places: so that one local user cannot take them all.

A client on this machine connects from a socket of its own, which the kernel lists in
the caller's /proc/net/tcp (or tcp6) with its owner's uid. Those files are opened before
the proxy leaves the caller's network namespace (an open /proc/net file keeps showing
the namespace it was opened in), and read again when the places run short: a user who
already holds half of a listener's places gets no more from it, so another user can
still get in. A client from another machine has no socket here and no share: listen
on loopback (the proxy warns otherwise).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os

ESTABLISHED = "01"
READ = 1 << 16


def _hex(address: tuple[str, int]) -> tuple[str, str]:
    """('127.0.0.1', 1080) -> ('0100007F:0438', 'tcp'): how /proc/net/tcp writes it."""
    addr = ipaddress.ip_address(address[0].split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    packed = addr.packed  # each 32-bit word as the kernel prints it: in host order
    words = "".join(packed[i : i + 4][::-1].hex() for i in range(0, len(packed), 4))
    return f"{words.upper()}:{address[1]:04X}", "tcp" if addr.version == 4 else "tcp6"


class Owners:
    def __init__(self) -> None:
        """Open the caller's socket tables; call before unsharing."""
        self.fds: dict[str, int] = {}
        for name in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):  # no IPv6, or no /proc: addresses only
                self.fds[name] = os.open(f"/proc/self/net/{name}", os.O_RDONLY | os.O_CLOEXEC)

    def _read(self, name: str) -> str:
        fd = self.fds.get(name)
        if fd is None:
            return ""
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, READ):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii", "replace")

    def held(self, client: tuple[str, int], server: tuple[str, int]) -> tuple[int | None, int]:
        """(the uid of `client`, how many connections to `server` that uid has), or
        (None, 0) for a client that is not on this machine."""
        ours, name = _hex(server)
        theirs, _ = _hex(client)
        uids: dict[str, int] = {}
        owner = None
        for line in self._read(name).splitlines()[1:]:
            fields = line.split()
            if len(fields) < 8 or fields[2] != ours or fields[3] != ESTABLISHED:
                continue
            uids[fields[7]] = uids.get(fields[7], 0) + 1
            if fields[1] == theirs:
                owner = fields[7]
        if owner is None:
            return None, 0
        return int(owner), uids[owner]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
