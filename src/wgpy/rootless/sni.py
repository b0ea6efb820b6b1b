"""The SNI proxy (wireproxy's `[SNI]`): TLS routed by the name its client asks for.

A client's first TLS records are read until its ClientHello is whole (the hello may span
records); the server_name extension (RFC 6066 section 3) names the host, which is
connected to on port 443 from inside the tunnel, the name resolved as the proxy resolves
names (the tunnel's DNS). The records read are sent on first, then both ways are relayed.
TLS is not terminated: the client and the server talk to each other, certificates and
all, and the proxy never holds a key. Port 443 whatever port the proxy listens on, as
wireproxy does.

The reading is bounded, for clients that are not friendly: HELLO_TIMEOUT seconds for the
whole hello (wireproxy's), at most MAX_RECORDS records of at most 2^14 bytes each (TLS's
own limit), each read whole before it is parsed, so a client trickling bytes costs one
parse per record. Anything else (not TLS, not a ClientHello, no host name in it, a name
that is not a host name) closes the connection with a line in the log.
"""

from __future__ import annotations

import asyncio
import logging
import re

from wgpy.rootless.serve import Handler, connect, relay

log = logging.getLogger("wgpy.proxy")

HELLO_TIMEOUT = 5.0  # seconds, as wireproxy gives a client
CONNECT_TIMEOUT = 15.0
TARGET_PORT = 443  # wireproxy's, whatever the listening port
RECORD_HEADER = 5  # type, version (2), length (2)
MAX_RECORD = 1 << 14  # TLSPlaintext.length's limit (RFC 8446 section 5.1)
MAX_RECORDS = 4  # a hello of up to 64 KiB; one of today's is 0.5 to 2 KiB, in one record
HANDSHAKE, CLIENT_HELLO, SERVER_NAME, HOST_NAME = 22, 1, 0, 0
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


class BadHello(ValueError):
    """What a client sent is not a ClientHello naming a host."""


class _Cursor:
    """Reads through `data`, each read checked against its end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise BadHello("the ClientHello ends inside a field")
        self.at += n
        return self.data[self.at - n : self.at]

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> _Cursor:
        """A field preceded by its length in `length_size` bytes."""
        return _Cursor(self.take(self.number(length_size)))

    def done(self) -> bool:
        return self.at == len(self.data)


def record_length(header: bytes) -> int:
    """The length of the handshake record whose 5-byte header this is."""
    kind, major, length = header[0], header[1], int.from_bytes(header[3:5], "big")
    if kind != HANDSHAKE or major != 3:
        raise BadHello("not a TLS handshake record")
    if not 0 < length <= MAX_RECORD:
        raise BadHello(f"a TLS record of {length} bytes")
    return length


def hello_name(raw: bytes) -> str | None:
    """The host name a client's first bytes ask for: None while its ClientHello is not
    whole yet, "" when it is and names none; BadHello when it is not a ClientHello (or
    would be too long)."""
    message = bytearray()
    at = records = 0
    while at + RECORD_HEADER <= len(raw):
        end = at + RECORD_HEADER + record_length(raw[at : at + RECORD_HEADER])
        records += 1
        if end > len(raw):
            return None
        message += raw[at + RECORD_HEADER : end]
        at = end
        if len(message) >= 4:
            if message[0] != CLIENT_HELLO:
                raise BadHello("not a ClientHello")
            whole = 4 + int.from_bytes(message[1:4], "big")
            if whole > MAX_RECORDS * MAX_RECORD:
                raise BadHello(f"a ClientHello of {whole} bytes")
            if len(message) >= whole:
                return server_name(bytes(message[4:whole]))
        if records == MAX_RECORDS:
            raise BadHello(f"no whole ClientHello in {MAX_RECORDS} records")
    if raw[at:] and raw[at] != HANDSHAKE:
        raise BadHello("not a TLS handshake record")  # at once, for a plain HTTP client
    return None


def server_name(hello: bytes) -> str:
    """The host_name of the server_name extension in a ClientHello's body, or ""."""
    body = _Cursor(hello)
    body.take(2 + 32)  # legacy_version, random
    for length_size in (1, 2, 1):  # legacy_session_id, cipher_suites, compression_methods
        body.vector(length_size)
    if body.done():
        return ""  # no extensions at all (TLS 1.0 clients may send none)
    extensions = body.vector(2)
    while not extensions.done():
        kind, data = extensions.number(2), extensions.vector(2)
        if kind != SERVER_NAME:
            continue
        names = data.vector(2)
        while not names.done():
            name_type, name = names.number(1), names.vector(2)
            if name_type == HOST_NAME:
                return host_name(name.data)
        return ""
    return ""


def host_name(raw: bytes) -> str:
    """A DNS host name as SNI carries it (ASCII, no trailing dot), lowercased."""
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise BadHello("a server name that is not ASCII") from None
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise BadHello(f"{name[:64]!r} is not a host name")
    return name


async def read_hello(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """(the bytes read, the host name) of a client's ClientHello, read record by record."""
    raw = b""
    while True:
        header = await reader.readexactly(RECORD_HEADER)
        raw += header + await reader.readexactly(record_length(header))
        name = hello_name(raw)  # BadHello after MAX_RECORDS records
        if name is not None:
            return raw, name


def sni_handler(idle_timeout: float) -> Handler:
    """Each client relayed to port 443 of the host its ClientHello names."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                raw, name = await read_hello(reader)
            if not name:
                raise BadHello("no server name in it")
        except (BadHello, asyncio.IncompleteReadError, OSError, TimeoutError) as e:
            log.info("SNI proxy: a client's ClientHello: %s", str(e) or "not in time")
            return
        try:
            remote = await connect(name, TARGET_PORT, CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            log.info("SNI proxy: %s:%d failed: %s", name, TARGET_PORT, e)
            return
        remote[1].write(raw)
        await relay((reader, writer), remote, idle_timeout)

    return handle
