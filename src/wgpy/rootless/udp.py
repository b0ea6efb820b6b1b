"""SOCKS5 UDP ASSOCIATE (RFC 1928, section 7).

The client asks over its TCP connection; we answer with the address of a relay socket
made on its side (by the `Outside` helper, bound to the address the client reached us
at). Datagrams it sends there carry a header naming their destination; they leave from
a socket inside the tunnel (one per address family), and what comes back is sent to the
client with the sender's address in the same header. Only datagrams from the client's
own address (and port, if it named one) are relayed; fragments (FRAG != 0) are dropped,
as the RFC allows. The association ends with its TCP connection, or after
`idle_timeout` seconds in which nothing moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct

from wgpy.rootless.outside import Outside
from wgpy.rootless.serve import preferred

log = logging.getLogger("wgpy.proxy")
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04
DATAGRAM = 65535
NAMES_KEPT = 64  # looked-up names per association


def parse_header(data: bytes) -> tuple[str, int, int, bytes] | None:
    """(host, port, address type, payload) of a client's datagram; None to drop it."""
    if len(data) < 4 or data[:3] != b"\0\0\0":  # RSV, and FRAG 0: no fragments
        return None
    atyp, rest = data[3], data[4:]
    if atyp == ATYP_IPV4 and len(rest) >= 6:
        host, rest = str(ipaddress.IPv4Address(rest[:4])), rest[4:]
    elif atyp == ATYP_IPV6 and len(rest) >= 18:
        host, rest = str(ipaddress.IPv6Address(rest[:16])), rest[16:]
    elif atyp == ATYP_DOMAIN and rest and len(rest) >= rest[0] + 3:
        try:
            host, rest = rest[1 : 1 + rest[0]].decode("idna"), rest[1 + rest[0] :]
        except UnicodeError:
            return None
    else:
        return None
    (port,) = struct.unpack(">H", rest[:2])
    return host, port, atyp, rest[2:]


def header(host: str, port: int) -> bytes:
    addr = ipaddress.ip_address(host.split("%")[0])
    atyp = ATYP_IPV4 if addr.version == 4 else ATYP_IPV6
    return b"\0\0\0" + bytes([atyp]) + addr.packed + struct.pack(">H", port)


def _plain(host: str) -> str:
    """'::ffff:127.0.0.1' -> '127.0.0.1': how a dual-stack socket names an IPv4 peer."""
    addr = ipaddress.ip_address(host.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)


class Association:
    def __init__(self, relay: socket.socket, client: tuple[str, int]) -> None:
        self.relay = relay
        self.client_host = _plain(client[0])
        self.client_port = client[1]  # 0: not known yet (the first datagram says)
        self.bound: tuple[str, int] = relay.getsockname()[:2]
        self.inside: dict[int, socket.socket] = {}
        self.names: dict[str, str] = {}
        self.last = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, control: asyncio.StreamReader, idle_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        loop.add_reader(self.relay.fileno(), self._from_client)
        try:
            while True:
                left = self.last + idle_timeout - loop.time()
                if left <= 0:
                    return
                try:
                    if not await asyncio.wait_for(control.read(256), left):
                        return  # the TCP connection ended: so does the association
                except TimeoutError:
                    continue
        finally:
            loop.remove_reader(self.relay.fileno())
            self.relay.close()
            for sock in self.inside.values():
                loop.remove_reader(sock.fileno())
                sock.close()
            for task in self._tasks:
                task.cancel()

    def _from_client(self) -> None:
        try:
            data, src = self.relay.recvfrom(DATAGRAM)
        except OSError:
            return
        if _plain(src[0]) != self.client_host or self.client_port not in (0, src[1]):
            return  # only the client that asked may use its relay
        self.client_port = src[1]
        parsed = parse_header(data)
        if parsed is None:
            return
        host, port, atyp, payload = parsed
        self.last = asyncio.get_running_loop().time()
        if atyp != ATYP_DOMAIN:
            self._send(host, port, payload)
        elif host in self.names:
            self._send(self.names[host], port, payload)
        else:
            task = asyncio.create_task(self._resolve_and_send(host, port, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _resolve_and_send(self, name: str, port: int, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            infos = preferred(await loop.getaddrinfo(name, port, type=socket.SOCK_DGRAM))
        except OSError as e:
            log.info("SOCKS5 UDP: cannot resolve %s: %s", name, e)
            return
        if len(self.names) >= NAMES_KEPT:
            self.names.clear()
        self.names[name] = str(infos[0][4][0])
        self._send(self.names[name], port, payload)

    def _send(self, host: str, port: int, payload: bytes) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.inside.get(family)
        try:
            if sock is None:
                sock = self.inside[family] = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                asyncio.get_running_loop().add_reader(sock.fileno(), self._from_inside, sock)
            sock.sendto(payload, (host, port))
        except OSError as e:  # as a router would: the datagram is lost
            log.debug("SOCKS5 UDP to %s:%d: %s", host, port, e)

    def _from_inside(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            data, src = sock.recvfrom(DATAGRAM)
            if self.client_port:
                self.last = asyncio.get_running_loop().time()
                self.relay.sendto(header(*src[:2]) + data, (self.client_host, self.client_port))


async def associate(
    control: asyncio.StreamWriter, outside: Outside, port: int
) -> Association | None:
    """A relay socket where the client can reach it, for the client of `control`."""
    local = _plain(control.get_extra_info("sockname")[0])
    peer = control.get_extra_info("peername")
    family = socket.AF_INET6 if ":" in local else socket.AF_INET
    try:
        relay = outside.socket(family, socket.SOCK_DGRAM)
    except OSError as e:
        log.error("SOCKS5 UDP: no relay socket: %s", e)
        return None
    try:
        relay.setblocking(False)
        relay.bind((local, 0))
    except OSError as e:
        relay.close()
        log.error("SOCKS5 UDP: cannot bind the relay socket: %s", e)
        return None
    return Association(relay, (peer[0], port))
