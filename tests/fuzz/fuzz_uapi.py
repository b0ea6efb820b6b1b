"""Fuzz target: the UAPI protocol (`uapi.parse_set` and `uapi.handle`).

Input: the bytes a client sends for one request, decoded as the socket server does
(UTF-8 with replacement, split at newlines). Invariants: `parse_set` raises nothing but
UapiError; `handle` always answers a string ending in "errno=N\\n\\n", never with the
catch-all errno that stands for a bug; a request it refuses changes nothing (the device
reads back the same with `get=1`), and `get=1` still works afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import re
import sys

from tests.fuzz.common import fuzz, instrumented

with instrumented():
    from wgpy.core.crypto import clamp, public_key
    from wgpy.core.device import Device, Output
    from wgpy.daemon import uapi

ANSWER = re.compile(r"(?:.*\n)?errno=(-?[0-9]+)\n\n", re.DOTALL)
PRIVATE = clamp(bytes(range(32)))
PEER = public_key(clamp(bytes([7] * 32)))


class MemoryHost:
    """The daemon's side of the UAPI in memory; port 4242 is taken."""

    def __init__(self) -> None:
        self.device = Device(random.Random(5).randbytes)
        self.listen_port = 51820
        self.fwmark = 0
        self.sent = 0

    def set_listen_port(self, port: int) -> None:
        if port == 4242:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.listen_port = port

    def set_fwmark(self, mark: int) -> None:
        self.fwmark = mark

    def now(self) -> float:
        return 100.0

    def transmit(self, out: Output) -> None:
        self.sent += len(out.udp)


def configured_host() -> MemoryHost:
    host = MemoryHost()
    answer = uapi.handle(host, [
        "set=1", f"private_key={PRIVATE.hex()}", f"public_key={PEER.hex()}",
        "endpoint=192.0.2.1:51820", "allowed_ip=10.0.0.2/32", "allowed_ip=fd00::2/128",
        "persistent_keepalive_interval=25",
    ])  # fmt: skip
    assert answer == "errno=0\n\n"
    return host


def lines(data: bytes) -> list[str]:
    """One request as the socket server cuts it: up to the first empty line (a request
    without one is what the server would see once the client sends it)."""
    text = data.decode("utf-8", "replace").split("\n\n", 1)[0]
    return text.removesuffix("\n").split("\n")


def one_input(data: bytes) -> None:
    request = lines(data)
    with contextlib.suppress(uapi.UapiError):  # and nothing else
        uapi.parse_set(request[1:])
    host = configured_host()
    before = uapi.render_get(host)
    answer = uapi.handle(host, request)
    m = ANSWER.fullmatch(answer)
    assert m is not None, f"malformed answer {answer!r}"
    code = int(m.group(1))
    assert code != -uapi.IPC_ERROR_UNKNOWN, "handle failed unexpectedly (a bug)"
    if code != 0:
        assert uapi.render_get(host) == before, "a refused request changed the device"
    assert uapi.handle(host, ["get=1"]).endswith("errno=0\n\n")


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)  # every refused request logs an error
    fuzz(one_input, sys.argv)
