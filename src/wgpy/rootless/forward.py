"""Fixed forwards: TCP into the tunnel (`--forward`), TCP out of it (`--expose`), and UDP
into it (`--udp-forward`).

A TCP forward relays like the proxy does (both ways, half-closes passed on, idle ones
closed). An exposed port listens on the tunnel's addresses and connects on this side
through sockets the `Outside` helper makes. A UDP forward keeps one socket inside the
tunnel per client address, connected to the target, so that the answers find their
way back; a client silent for `timeout` seconds (60 unless set) loses its socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from wgpy.rootless.outside import Outside
from wgpy.rootless.serve import Handler, Throttled, connect, preferred, relay
from wgpy.rootless.spec import UDP_TIMEOUT

log = logging.getLogger("wgpy.proxy")
CONNECT_TIMEOUT = 15.0
UDP_CLIENTS = 1024
DATAGRAM = 65535


def forward_handler(target: tuple[str, int], idle_timeout: float) -> Handler:
    """Each client connected to `target`, from inside the tunnel."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            remote = await connect(*target, CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.info("forward to %s:%d failed: %s", *target, e)
            return
        await relay((reader, writer), remote, idle_timeout)

    return handle


async def stdio_tunnel(
    target: tuple[str, int], idle_timeout: float, end: Callable[[int], None]
) -> None:
    """Standard input to `target` (inside the tunnel), its answers to standard output;
    then `end(status)` ends the whole proxy, as ssh expects of a ProxyCommand."""
    loop = asyncio.get_running_loop()
    status = 1
    try:
        remote = await connect(*target, CONNECT_TIMEOUT)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), sys.stdout
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        await relay((reader, writer), remote, idle_timeout)
        status = 0
    except (OSError, TimeoutError, ValueError) as e:
        log.error("standard input and output to %s:%d: %s", *target, e)
    finally:
        end(status)


def resolve_outside(target: tuple[str, int]) -> list[tuple[int, tuple[str, int]]]:
    """(family, address) of a target on this side, looked up before leaving it."""
    infos = socket.getaddrinfo(*target, type=socket.SOCK_STREAM)
    return [(int(family), (str(addr[0]), int(addr[1]))) for family, _, _, _, addr in infos]


def expose_handler(
    addresses: list[tuple[int, tuple[str, int]]], outside: Outside, idle_timeout: float
) -> Handler:
    """Each client (from the tunnel) connected to the first of `addresses` that answers,
    on this side."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        for family, address in addresses:
            try:
                sock = outside.socket(family)
            except OSError as e:  # the helper is gone: nothing on this side is reachable
                log.error("exposed port: no socket on this side: %s", e)
                return
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, address), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as e:
                sock.close()
                log.info("exposed port: connecting to %s:%d failed: %s", *address, e)
                continue
            remote = await asyncio.open_connection(sock=sock)
            await relay((reader, writer), remote, idle_timeout)
            return

    return handle


@dataclass
class _UdpClient:
    sock: socket.socket  # inside the tunnel, connected to the target
    last: float


class UdpForward:
    """Datagrams from clients at `sock` (on this side) to `target` (in the tunnel), and
    the answers back to each client."""

    def __init__(
        self, sock: socket.socket, target: tuple[str, int], timeout: float = UDP_TIMEOUT
    ) -> None:
        self.sock = sock
        self.target = target
        self.timeout = timeout
        self.clients: dict[tuple[str, int], _UdpClient] = {}
        self._full = Throttled(logging.ERROR)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        try:
            infos = preferred(await loop.getaddrinfo(*self.target, type=socket.SOCK_DGRAM))
        except OSError as e:
            log.error("UDP forward: cannot resolve %s: %s", self.target[0], e)
            return
        family, address = infos[0][0], infos[0][4]
        reaper = asyncio.create_task(self._reap())
        try:
            while True:
                data, source = await loop.sock_recvfrom(self.sock, DATAGRAM)
                client = self.clients.get(source) or self._new(source, family, address)
                if client is not None:
                    with contextlib.suppress(OSError):  # as a router would: dropped
                        client.sock.send(data)
                        client.last = time.monotonic()
        finally:
            reaper.cancel()
            for source in list(self.clients):
                self._drop(source)

    def _new(
        self, source: tuple[str, int], family: int, address: tuple[object, ...]
    ) -> _UdpClient | None:
        if len(self.clients) >= UDP_CLIENTS:
            self._full(f"UDP forward: {UDP_CLIENTS} clients already; dropping a datagram")
            return None
        inner = socket.socket(family, socket.SOCK_DGRAM)
        inner.setblocking(False)
        try:
            inner.connect(address)
        except OSError as e:
            inner.close()
            log.info("UDP forward to %s:%d: %s", *self.target, e)
            return None
        client = self.clients[source] = _UdpClient(inner, time.monotonic())
        asyncio.get_running_loop().add_reader(inner.fileno(), self._answer, client, source)
        return client

    def _answer(self, client: _UdpClient, source: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError ends the batch
            while True:
                data = client.sock.recv(DATAGRAM)
                client.last = time.monotonic()
                self.sock.sendto(data, source)

    def _drop(self, source: tuple[str, int]) -> None:
        client = self.clients.pop(source)
        asyncio.get_running_loop().remove_reader(client.sock.fileno())
        client.sock.close()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(self.timeout / 4, 3600))
            now = time.monotonic()
            for source, client in list(self.clients.items()):
                if now - client.last > self.timeout:
                    self._drop(source)
