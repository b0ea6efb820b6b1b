"""SOCKS5 (RFC 1928), for `serve.Server`.

The listening sockets are handed in ready-made (`wgpy proxy` opens them in the caller's
network namespace before it unshares); the outgoing connections, and the name lookups of
domain-name requests, happen wherever this process lives: inside the tunnel's namespace.

SOCKS5: no authentication, or username/password (RFC 1929) when the listener has
credentials (then only that); CONNECT and UDP ASSOCIATE (`udp.py`) for IPv4, IPv6 and
domain names. Anything else gets the RFC's reply: command not supported (0x07), address
type not supported (0x08); a connection that fails gets connection refused (0x05),
network (0x03) or host (0x04) unreachable, or general failure (0x01).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass

from wgpy.rootless import udp
from wgpy.rootless.outside import Outside
from wgpy.rootless.serve import IDLE_TIMEOUT, Handler, Stream, connect, relay
from wgpy.rootless.spec import Credentials

log = logging.getLogger("wgpy.socks")

VERSION = 5
NO_AUTH, USER_PASSWORD, NO_ACCEPTABLE = 0x00, 0x02, 0xFF
AUTH_VERSION = 0x01  # RFC 1929's subnegotiation
CMD_CONNECT, CMD_UDP_ASSOCIATE = 0x01, 0x03
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
    """What every connection of one listener is served with."""

    idle_timeout: float = IDLE_TIMEOUT
    credentials: Credentials | None = None
    outside: Outside | None = None  # makes UDP relay sockets where the client is


async def _connect(host: str, port: int) -> Stream:
    return await connect(host, port, CONNECT_TIMEOUT)


def socks_handler(opts: Options) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle_socks(reader, writer, opts)

    return handle


def matches(creds: Credentials, username: bytes, password: bytes) -> bool:
    """Both compared in constant time, both always compared."""
    user_ok = hmac.compare_digest(creds.username.encode(), username)
    return hmac.compare_digest(creds.password.encode(), password) and user_ok


async def _negotiate(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, creds: Credentials | None
) -> bool:
    """The method selection, and RFC 1929's username/password when `creds` is set."""
    ver, n = await reader.readexactly(2)
    methods = await reader.readexactly(n)
    if ver != VERSION:
        return False
    wanted = NO_AUTH if creds is None else USER_PASSWORD
    if wanted not in methods:
        writer.write(bytes([VERSION, NO_ACCEPTABLE]))
        return False
    writer.write(bytes([VERSION, wanted]))
    if creds is None:
        return True
    ver, ulen = await reader.readexactly(2)
    username = await reader.readexactly(ulen)
    (plen,) = await reader.readexactly(1)
    password = await reader.readexactly(plen)
    ok = ver == AUTH_VERSION and matches(creds, username, password)
    writer.write(bytes([AUTH_VERSION, 0 if ok else 1]))
    if not ok:
        log.info("SOCKS5: a client gave a wrong username or password")
    return ok


async def handle_socks(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opts: Options
) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            if not await _negotiate(reader, writer, opts.credentials):
                return
            await writer.drain()
            try:
                cmd, _, host, port = await _read_request(reader)
                if cmd not in (CMD_CONNECT, CMD_UDP_ASSOCIATE) or (
                    cmd == CMD_UDP_ASSOCIATE and opts.outside is None
                ):
                    raise Refused(COMMAND_NOT_SUPPORTED)
            except (Refused, UnicodeError) as e:
                writer.write(reply(e.code if isinstance(e, Refused) else GENERAL_FAILURE))
                return
            assoc = None
            if cmd == CMD_UDP_ASSOCIATE:
                assert opts.outside is not None
                assoc = await udp.associate(writer, opts.outside, port)
                if assoc is None:
                    writer.write(reply(GENERAL_FAILURE))
                    return
                writer.write(reply(SUCCEEDED, assoc.bound))
            else:
                try:
                    remote = await _connect(host, port)
                except (OSError, TimeoutError) as e:
                    log.info("SOCKS CONNECT %s:%d failed: %s", host, port, e)
                    writer.write(reply(reply_code(e)))
                    return
                writer.write(reply(SUCCEEDED, remote[1].get_extra_info("sockname")[:2]))
            await writer.drain()
        if cmd == CMD_UDP_ASSOCIATE and assoc is not None:
            await assoc.serve(reader, opts.idle_timeout)
        else:
            await relay((reader, writer), remote, opts.idle_timeout)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()
