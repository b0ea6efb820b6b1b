"""A small SOCKS5 (RFC 1928) and HTTP CONNECT proxy, on asyncio in a thread of its own.

The listening sockets are handed in ready-made (`wgpy proxy` opens them in the caller's
network namespace before it unshares); the outgoing connections, and the name lookups of
domain-name requests, happen wherever this process lives: inside the tunnel's namespace.

SOCKS5: no authentication, CONNECT for IPv4, IPv6 and domain names. Anything else gets
the RFC's reply: command not supported (0x07), address type not supported (0x08); a
connection that fails gets connection refused (0x05), network (0x03) or host (0x04)
unreachable, or general failure (0x01).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass

from wgpy.rootless.serve import IDLE_TIMEOUT, Handler, Stream, connect, relay

log = logging.getLogger("wgpy.socks")

VERSION = 5
NO_AUTH, NO_ACCEPTABLE = 0x00, 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08
CONNECT_TIMEOUT = 15.0
REQUEST_TIMEOUT = 30.0


class Refused(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def reply_code(error: BaseException) -> int:
    """The SOCKS5 reply for a failed outgoing connection."""
    if isinstance(error, ConnectionRefusedError):
        return CONNECTION_REFUSED
    if isinstance(error, socket.gaierror | TimeoutError):
        return HOST_UNREACHABLE
    if isinstance(error, OSError):
        if error.errno == errno.ENETUNREACH:
            return NETWORK_UNREACHABLE
        if error.errno in (errno.EHOSTUNREACH, errno.ETIMEDOUT):
            return HOST_UNREACHABLE
        if error.errno == errno.ECONNREFUSED:
            return CONNECTION_REFUSED
    return GENERAL_FAILURE


def reply(code: int, bound: tuple[str, int] | None = None) -> bytes:
    host, port = bound or ("0.0.0.0", 0)
    addr = ipaddress.ip_address(host.split("%")[0])
    atyp = ATYP_IPV4 if addr.version == 4 else ATYP_IPV6
    return bytes([VERSION, code, 0, atyp]) + addr.packed + struct.pack(">H", port)


async def _read_request(reader: asyncio.StreamReader) -> tuple[int, int, str, int]:
    """(command, address type, host, port) of a SOCKS5 request."""
    ver, cmd, _, atyp = await reader.readexactly(4)
    if ver != VERSION:
        raise Refused(GENERAL_FAILURE)
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    elif atyp == ATYP_DOMAIN:
        (length,) = await reader.readexactly(1)
        host = (await reader.readexactly(length)).decode("idna")
    else:
        raise Refused(ADDRESS_TYPE_NOT_SUPPORTED)
    (port,) = struct.unpack(">H", await reader.readexactly(2))
    return cmd, atyp, host, port


@dataclass(frozen=True)
class Options:
    """What every proxy connection is served with."""

    idle_timeout: float = IDLE_TIMEOUT


async def _connect(host: str, port: int) -> Stream:
    return await connect(host, port, CONNECT_TIMEOUT)


def socks_handler(opts: Options) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle_socks(reader, writer, opts)

    return handle


def http_handler(opts: Options) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle_http(reader, writer, opts)

    return handle


async def handle_socks(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opts: Options
) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            ver, n = await reader.readexactly(2)
            methods = await reader.readexactly(n)
            if ver != VERSION:
                return
            if NO_AUTH not in methods:
                writer.write(bytes([VERSION, NO_ACCEPTABLE]))
                return
            writer.write(bytes([VERSION, NO_AUTH]))
            await writer.drain()
            try:
                cmd, _, host, port = await _read_request(reader)
                if cmd != CMD_CONNECT:
                    raise Refused(COMMAND_NOT_SUPPORTED)
            except (Refused, UnicodeError) as e:
                writer.write(reply(e.code if isinstance(e, Refused) else GENERAL_FAILURE))
                return
            try:
                remote = await _connect(host, port)
            except (OSError, TimeoutError) as e:
                log.info("SOCKS CONNECT %s:%d failed: %s", host, port, e)
                writer.write(reply(reply_code(e)))
                return
            writer.write(reply(SUCCEEDED, remote[1].get_extra_info("sockname")[:2]))
            await writer.drain()
        await relay((reader, writer), remote, opts.idle_timeout)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()


async def handle_http(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opts: Options
) -> None:
    """HTTP CONNECT only (what browsers and curl use for https through a proxy)."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = head.decode("latin-1").partition(" ")
            target = rest.split(" ", 1)[0]
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 501 Not Implemented\r\nConnection: close\r\n\r\n")
                return
            host, _, port = target.rpartition(":")
            try:
                remote = await _connect(host.strip("[]"), int(port))
            except (OSError, TimeoutError, ValueError) as e:
                writer.write(f"HTTP/1.1 502 Bad Gateway\r\n\r\n{e}\r\n".encode())
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        await relay((reader, writer), remote, opts.idle_timeout)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
            TimeoutError, OSError):  # fmt: skip
        pass
    finally:
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()
