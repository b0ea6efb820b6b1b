"""wireproxy's CheckAlive: ping addresses through the tunnel, for `/readyz`.

Every `interval` seconds each address gets an ICMP echo request from an unprivileged
ping socket (SOCK_DGRAM; the kernel fills in the identifier and checksum); the time of
its last reply is kept. Ping sockets need the process's group in the namespace's
`net.ipv4.ping_group_range`; in our own network namespace we may set it (we hold
CAP_NET_ADMIN there), for our group only. `/readyz` is ready while every address
answered within `interval` + 2 seconds, as wireproxy's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time

log = logging.getLogger("wgpy.proxy")
LEEWAY = 2.0  # seconds, as wireproxy
ECHO: dict[int, tuple[int, int]] = {socket.AF_INET: (8, 0), socket.AF_INET6: (128, 129)}


def allow_ping(path: str = "/proc/sys/net/ipv4/ping_group_range") -> None:
    """Let our group open ping sockets in this (our own) network namespace."""
    gid = os.getegid()
    with open(path, "w") as f:
        f.write(f"{gid} {gid}\n")


class Alive:
    def __init__(self, addresses: list[str], interval: float) -> None:
        self.interval = interval
        self.last = dict.fromkeys(addresses, 0.0)  # Unix time of the last reply; 0: never
        self._sockets: dict[int, socket.socket] = {}

    def ready(self, now: float) -> bool:
        return all(now - t <= self.interval + LEEWAY for t in self.last.values())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            allow_ping()
        except OSError as e:
            log.error("CheckAlive: cannot allow ping sockets here: %s", e)
        try:
            seq = 0
            while True:
                seq = (seq + 1) & 0xFFFF
                for address in self.last:
                    self._ping(loop, address, seq)
                await asyncio.sleep(self.interval)
        finally:
            for sock in self._sockets.values():
                loop.remove_reader(sock.fileno())
                sock.close()

    def _ping(self, loop: asyncio.AbstractEventLoop, address: str, seq: int) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = self._sockets.get(family)
        try:
            if sock is None:
                proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
                sock = self._sockets[family] = socket.socket(family, socket.SOCK_DGRAM, proto)
                sock.setblocking(False)
                loop.add_reader(sock.fileno(), self._pong, sock, family)
            sock.sendto(struct.pack(">BBHHH", ECHO[family][0], 0, 0, 0, seq), (address, 0))
        except OSError as e:  # no route, no permission: it stays unanswered
            log.debug("CheckAlive: ping %s: %s", address, e)

    def _pong(self, sock: socket.socket, family: int) -> None:
        with contextlib.suppress(OSError):
            data, source = sock.recvfrom(2048)
            if data[:1] == bytes([ECHO[family][1]]) and source[0] in self.last:
                self.last[source[0]] = time.time()
