"""The HTTP proxy, for `serve.Server`: CONNECT (what browsers and curl use for https),
and plain `GET http://host/path` requests (any method).

A plain request is sent on with its path alone, without the proxy's own headers
(Proxy-Authorization, Proxy-Connection) and with `Connection: close`: one request per
connection to the server, whose answer is relayed as it comes and ends the client's
connection too. That keeps the proxy from parsing answers, at the price of a new
connection for each request (browsers open several anyway).

With credentials, every request needs `Proxy-Authorization: Basic ...` (RFC 7617);
without it, or with a wrong one, the answer is 407 with `Proxy-Authenticate`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import urllib.parse

from wgpy.rootless.serve import Handler, connect, relay
from wgpy.rootless.socks import CONNECT_TIMEOUT, REQUEST_TIMEOUT, Options, matches
from wgpy.rootless.spec import Credentials

log = logging.getLogger("wgpy.proxy")
CLOSE = "Connection: close\r\n\r\n"
HOP_BY_HOP = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}
DENIED = (b"HTTP/1.1 407 Proxy Authentication Required\r\n"
          b'Proxy-Authenticate: Basic realm="wgpy"\r\nContent-Length: 0\r\n'
          b"Connection: close\r\n\r\n")  # fmt: skip


class BadRequest(Exception):
    pass


def parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    """(method, target, version, headers) of a request's head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(f"bad request line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        if line:
            name, colon, value = line.partition(":")
            if not colon:
                raise BadRequest(f"bad header line {line!r}")
            headers.append((name.strip(), value.strip()))
    return parts[0], parts[1], parts[2], headers


def authorized(creds: Credentials | None, headers: list[tuple[str, str]]) -> bool:
    if creds is None:
        return True
    for name, value in headers:
        scheme, _, token = value.partition(" ")
        if name.lower() == "proxy-authorization" and scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(token.strip(), validate=True).partition(b":")
            except binascii.Error:
                return False
            return matches(creds, user, password)
    return False


def split_target(target: str, default_port: int) -> tuple[str, int]:
    """'host:port', '[v6]:port' (or no port) -> (host, port)."""
    parsed = urllib.parse.urlsplit("//" + target)
    if not parsed.hostname:
        raise BadRequest(f"no host in {target!r}")
    return parsed.hostname, parsed.port or default_port


def origin_request(
    method: str, url: str, version: str, headers: list[tuple[str, str]]
) -> tuple[str, int, bytes]:
    """(host, port, the request as the server should see it) of an absolute-URL request."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "http" or not parsed.hostname:
        raise BadRequest(f"only http:// URLs (or CONNECT), not {url!r}")
    path = parsed.path or "/"
    if parsed.query:
        path += "?" + parsed.query
    kept = [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP]
    if not any(n.lower() == "host" for n, _ in kept):
        kept.insert(0, ("Host", parsed.netloc.rpartition("@")[2]))
    lines = [f"{method} {path} {version}", *(f"{n}: {v}" for n, v in kept), "Connection: close"]
    return parsed.hostname, parsed.port or 80, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def http_handler(opts: Options) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle_http(reader, writer, opts)

    return handle


async def handle_http(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opts: Options
) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            method, target, version, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            if not authorized(opts.credentials, headers):
                writer.write(DENIED)
                return
            if method == "CONNECT":
                host, port = split_target(target, 443)
                first = b""
            else:
                host, port, first = origin_request(method, target, version, headers)
            try:
                remote = await connect(host, port, CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as e:
                log.info("HTTP proxy: %s:%d failed: %s", host, port, e)
                writer.write(f"HTTP/1.1 502 Bad Gateway\r\n{CLOSE}{e}\r\n".encode())
                return
            if first:
                remote[1].write(first)
            else:
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        await relay((reader, writer), remote, opts.idle_timeout)
    except (BadRequest, ValueError) as e:
        writer.write(f"HTTP/1.1 400 Bad Request\r\n{CLOSE}{e}\r\n".encode())
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
            TimeoutError, OSError):  # fmt: skip
        pass
    finally:
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()
