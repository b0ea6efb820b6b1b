"""WireGuard's four message formats (whitepaper 5.4).

Every message starts with a little-endian u32 type whose upper three bytes are reserved
zeros, so reading the first four bytes as one u32 checks type and reserved bytes at once.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_DATA = 4

INITIATION_LEN = 148
RESPONSE_LEN = 92
COOKIE_REPLY_LEN = 64
DATA_HEADER_LEN = 16
DATA_MIN_LEN = DATA_HEADER_LEN + 16  # header + Poly1305 tag (a keepalive)

TYPE = struct.Struct("<I")
# type, sender, ephemeral, encrypted static, encrypted timestamp, mac1, mac2
INITIATION = struct.Struct("<II32s48s28s16s16s")
# type, sender, receiver, ephemeral, encrypted nothing, mac1, mac2
RESPONSE = struct.Struct("<III32s16s16s16s")
# type, receiver, nonce, encrypted cookie
COOKIE_REPLY = struct.Struct("<II24s32s")
# type, receiver, counter
DATA_HEADER = struct.Struct("<IIQ")

assert INITIATION.size == INITIATION_LEN
assert RESPONSE.size == RESPONSE_LEN
assert COOKIE_REPLY.size == COOKIE_REPLY_LEN


class InitiationMessage(NamedTuple):
    sender: int
    ephemeral: bytes
    static: bytes
    timestamp: bytes
    mac1: bytes
    mac2: bytes


class ResponseMessage(NamedTuple):
    sender: int
    receiver: int
    ephemeral: bytes
    empty: bytes
    mac1: bytes
    mac2: bytes


class CookieReply(NamedTuple):
    receiver: int
    nonce: bytes
    cookie: bytes


def message_type(data: bytes | memoryview) -> int:
    """The message type if `data` has the exact size of that type, else 0."""
    n = len(data)
    if n < 4:
        return 0
    t: int = TYPE.unpack_from(data)[0]
    if t == MSG_DATA:
        return t if n >= DATA_MIN_LEN else 0
    if (
        (t == MSG_INITIATION and n == INITIATION_LEN)
        or (t == MSG_RESPONSE and n == RESPONSE_LEN)
        or (t == MSG_COOKIE_REPLY and n == COOKIE_REPLY_LEN)
    ):
        return t
    return 0


def parse_initiation(data: bytes) -> InitiationMessage:
    return InitiationMessage(*INITIATION.unpack(data)[1:])


def parse_response(data: bytes) -> ResponseMessage:
    return ResponseMessage(*RESPONSE.unpack(data)[1:])


def parse_cookie_reply(data: bytes) -> CookieReply:
    return CookieReply(*COOKIE_REPLY.unpack(data)[1:])


def pack_cookie_reply(m: CookieReply) -> bytes:
    return COOKIE_REPLY.pack(MSG_COOKIE_REPLY, *m)


def split_read(buf: memoryview, n: int, seg: int) -> list[memoryview]:
    """The datagrams of a read of `n` bytes into `buf`: `seg` bytes each (the last may be
    shorter) when GRO merged them, else the read is one datagram; an empty read is none."""
    if not n:
        return []
    view = buf[:n]  # the buffer is larger than the read: never slice past it
    step = seg if 0 < seg < n else n
    return [view[i : i + step] for i in range(0, n, step)]
