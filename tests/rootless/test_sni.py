"""The SNI proxy's ClientHello reader: real hellos (OpenSSL's, through Python's ssl), the
same cut into records, and any bytes at all: a name, "not yet", or BadHello, never
anything else, and never more than MAX_RECORDS records read."""

from __future__ import annotations

import asyncio
import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgpy.rootless import sni
from wgpy.rootless.sni import BadHello, hello_name


def openssl_hello(name: str | None) -> bytes:
    """The first flight of a TLS client asking for `name` (no SNI for None)."""
    context = ssl.create_default_context()
    if name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def records(message: bytes, size: int) -> bytes:
    """A handshake message cut into handshake records of `size` bytes."""
    out = b""
    for at in range(0, len(message), size):
        part = message[at : at + size]
        out += struct.pack(">BHH", 22, 0x0301, len(part)) + part
    return out


def hello(extensions: bytes, with_extensions: bool = True) -> bytes:
    """A ClientHello handshake message with these extensions."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    if with_extensions:
        body += struct.pack(">H", len(extensions)) + extensions
    return b"\x01" + len(body).to_bytes(3, "big") + body


def sni_extension(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(struct.pack(">BH", kind, len(n)) + n for kind, n in names)
    data = struct.pack(">H", len(entries)) + entries
    return struct.pack(">HH", 0, len(data)) + data


def test_an_openssl_hello_gives_its_name_and_nothing_before_it_is_whole() -> None:
    raw = openssl_hello("Tunnel.Test")
    assert hello_name(raw) == "tunnel.test"
    assert all(hello_name(raw[:n]) is None for n in range(len(raw)))
    assert hello_name(openssl_hello(None)) == ""
    message = raw[5:]  # one record, as OpenSSL sends it
    for size in (1000, 300):  # the same hello over 2 to 4 records
        assert hello_name(records(message, size)) == "tunnel.test"


def test_names_come_from_the_first_host_name_entry() -> None:
    ext = b"\x00\x0a\x00\x00" + sni_extension((7, b"other"), (0, b"a.example"), (0, b"b"))
    assert hello_name(records(hello(ext), 500)) == "a.example"
    assert hello_name(records(hello(b""), 500)) == ""  # extensions, none of them SNI
    assert hello_name(records(hello(b"", with_extensions=False), 500)) == ""


@pytest.mark.parametrize(
    "name",
    [b"", b"a..b", b"-a.example", b"a-.example", b"a.example.", b"x" * 64 + b".example",
     ("a" * 60 + ".") .encode() * 5, b"caf\xc3\xa9.example", b"a b", b"a:443", b"::1",
     b"a\x00b"],
)  # fmt: skip
def test_a_name_that_is_not_a_host_name_is_refused(name: bytes) -> None:
    with pytest.raises(BadHello):
        hello_name(records(hello(sni_extension((0, name))), 16384))


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "not a TLS handshake record"),  # at its first byte
        (b"G", "not a TLS handshake record"),
        (b"\x16\x03\x01\x40\x01" + bytes(0x4001), "a TLS record of 16385 bytes"),
        (b"\x16\x03\x01\x00\x00", "a TLS record of 0 bytes"),
        (b"\x16\x02\x00\x00\x04\x01\x00\x00\x00", "not a TLS handshake record"),  # SSL 2
        (records(b"\x02\x00\x00\x00", 4), "not a ClientHello"),
        (records(b"\x01\x01\x00\x01", 4), "a ClientHello of 65541 bytes"),
        (records(b"\x01\x00\x0f\xff" + bytes(40), 10), "no whole ClientHello in 4 records"),
        (records(b"\x01\x00\x00\x10" + bytes(16), 20), "ends inside a field"),
    ],
)
def test_what_is_not_a_client_hello_is_refused_at_once(raw: bytes, why: str) -> None:
    with pytest.raises(BadHello, match=why):
        hello_name(raw)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_name_none_or_bad_hello(raw: bytes) -> None:
    with_header = records(b"\x01" + raw, 200)
    for data in (raw, with_header, b"\x16\x03\x03" + raw):
        try:
            name = hello_name(data)
        except BadHello:
            continue
        assert name is None or isinstance(name, str)


REAL = openssl_hello("tunnel.test")


@settings(max_examples=400, deadline=None)
@given(st.integers(0, len(REAL) - 1), st.integers(0, 255), st.integers(1, len(REAL)))
def test_a_corrupted_real_hello_never_breaks_the_reader(at: int, value: int, cut: int) -> None:
    raw = REAL[:at] + bytes([value]) + REAL[at + 1 : cut]
    try:
        name = hello_name(raw)
    except BadHello:
        return
    assert name is None or isinstance(name, str)


@given(st.lists(st.from_regex(r"[a-z0-9]([a-z0-9_-]{0,20}[a-z0-9])?", fullmatch=True),
                min_size=1, max_size=6), st.integers(1, 400))  # fmt: skip
def test_any_host_name_comes_back_whatever_the_records(labels: list[str], size: int) -> None:
    name = ".".join(labels)
    message = hello(sni_extension((0, name.encode())))
    if len(message) <= size * sni.MAX_RECORDS:
        assert hello_name(records(message, size)) == name


def test_read_hello_reads_whole_records_and_stops_at_the_bound() -> None:
    async def read(data: bytes, eof: bool = True) -> tuple[bytes, str]:
        reader = asyncio.StreamReader()
        reader.feed_data(data + b"\x17\x03\x03")  # the bytes after the hello stay unread
        if eof:
            reader.feed_eof()
        return await sni.read_hello(reader)

    raw = openssl_hello("tunnel.test")
    assert asyncio.run(read(raw)) == (raw, "tunnel.test")
    with pytest.raises(BadHello, match="in 4 records"):
        asyncio.run(read(records(b"\x01\x00\xff\xf0" + bytes(60000), 16384)))
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(read(raw[:100]))
