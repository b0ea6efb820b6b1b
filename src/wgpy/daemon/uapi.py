"""The cross-platform userspace API (UAPI) that the `wg` tool speaks over a unix socket.

A request is `get=1` or `set=1` followed by `key=value` lines and an empty line; the
answer ends with `errno=N` (0, or a negative errno) and an empty line. A `set` is parsed
and checked completely before anything is applied, so a bad request changes nothing.

Every step here is also written as a generator that yields every `STEP` lines or entries
of work (`handle_steps`), so that the daemon's one loop thread can run a 130,000-line
`set` or `get` a few milliseconds at a time with the datapath served in between (see
`uapi_server`). `handle` runs the same steps to the end in one go. While the steps of one
request run, no other request does (the server runs one at a time, like wireguard-go's
IPC lock), so the configuration a `get` lists cannot change under it; only the live
counters, handshake times and roaming endpoints do, and each peer's are read at once,
as wireguard-go reads them peer by peer. Like wireguard-go's, a `set` is applied
progressively: between slices the datapath may see it partly applied.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from wgpy.core.allowedips import format_cidr, parse_cidr
from wgpy.core.crypto import clamp, hide_keys
from wgpy.core.device import Device
from wgpy.core.endpoint import Endpoint, format_endpoint, parse_address_endpoint
from wgpy.core.output import Output
from wgpy.core.peer import Peer

STEP = 128  # lines (or allowed IPs) of work between two yields: well under a millisecond
log = logging.getLogger("wgpy.uapi")
R = TypeVar("R")
Steps = Generator[None, None, R]


def run(steps: Steps[R]) -> R:
    """Run a sliced operation to its end; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


class UapiError(Exception):
    """A refused request: an errno for the client and a message for the log. The message
    names the line and key; values are quoted only with `hide_keys` (a key pasted into
    the wrong field or a line without its "=" must not reach the log)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(hide_keys(message))
        self.code = code


class Host(Protocol):
    """What the daemon offers the UAPI besides the core device."""

    device: Device
    fwmark: int

    @property
    def listen_port(self) -> int: ...

    def set_listen_port(self, port: int) -> None: ...  # raises OSError when in use
    def set_fwmark(self, mark: int) -> None: ...
    def now(self) -> float: ...
    def transmit(self, out: Output) -> None: ...


# ---- parsing -------------------------------------------------------------------------


_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_DIGITS = re.compile(r"[0-9]{1,10}")  # ASCII only: str.isdigit() also takes "²"


def _key(value: str) -> bytes:
    if not _HEX_KEY.fullmatch(value):  # bytes.fromhex alone would skip spaces
        raise UapiError(errno.EINVAL, "a key is 64 hex digits")
    return bytes.fromhex(value)


def _uint(value: str, limit: int, what: str) -> int:
    if not _DIGITS.fullmatch(value) or int(value) > limit:
        raise UapiError(errno.EINVAL, f"invalid {what}: {value!r}")
    return int(value)


def _true(value: str, what: str) -> bool:
    if value != "true":
        raise UapiError(errno.EINVAL, f"{what} takes only 'true'")
    return True


def parse_endpoint(value: str) -> Endpoint:
    try:
        return parse_address_endpoint(value)
    except ValueError:
        raise UapiError(errno.EINVAL, f"invalid endpoint: {value!r}") from None


@dataclass
class PeerChange:
    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None = field(default=None, repr=False)  # no keys in logs
    endpoint: Endpoint | None = None
    keepalive: int | None = None
    replace_allowed_ips: bool = False
    allowed_ips: list[tuple[bool, bytes, int]] = field(default_factory=list)  # (add?, addr, cidr)


@dataclass
class SetRequest:
    private_key: bytes | None = field(default=None, repr=False)  # no keys in logs
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: list[PeerChange] = field(default_factory=list)


IPC_ERROR_UNKNOWN = 55  # wireguard-go's answer to an unexpected failure

_DEVICE_KEYS = {"private_key", "listen_port", "fwmark", "replace_peers"}


def parse_set(lines: Iterable[str]) -> SetRequest:
    return run(parse_set_steps(lines))


def parse_set_steps(lines: Iterable[str]) -> Steps[SetRequest]:
    req = SetRequest()
    peer: PeerChange | None = None
    for number, line in enumerate(lines, 1):
        if number % STEP == 0:
            yield
        try:
            peer = _parse_line(req, peer, line)
        except UapiError as e:  # line 1 is the request's set=1
            raise UapiError(e.code, f"line {number + 1}: {e}") from None
    return req


def _parse_line(req: SetRequest, peer: PeerChange | None, line: str) -> PeerChange | None:
    """One line of a set into `req`; the peer that the lines after it are about."""
    key, sep, value = line.removesuffix("\r").partition("=")
    if not sep:  # the line is not quoted: it may be a key whose "=" went missing
        raise UapiError(errno.EPROTO, "not a key=value line")
    if key == "public_key":
        peer = PeerChange(_key(value))
        req.peers.append(peer)
    elif peer is None and key in _DEVICE_KEYS:
        _parse_device_key(req, key, value)
    elif peer is not None:
        _parse_peer_key(peer, key, value)
    else:
        raise UapiError(errno.EINVAL, f"invalid UAPI device key: {key!r}")
    return peer


def _parse_device_key(req: SetRequest, key: str, value: str) -> None:
    if key == "private_key":
        key_bytes = _key(value)  # stored clamped, as wireguard-go does (and shows in a get)
        req.private_key = clamp(key_bytes) if any(key_bytes) else key_bytes
    elif key == "listen_port":
        req.listen_port = _uint(value, 65535, "listen_port")
    elif key == "fwmark":
        req.fwmark = _uint(value, 2**32 - 1, "fwmark")
    else:
        req.replace_peers = _true(value, key)


def _parse_peer_key(peer: PeerChange, key: str, value: str) -> None:
    if key == "remove":
        peer.remove = _true(value, key)
    elif key == "update_only":
        peer.update_only = _true(value, key)
    elif key == "preshared_key":
        peer.preshared_key = _key(value)
    elif key == "endpoint":
        peer.endpoint = parse_endpoint(value)
    elif key == "persistent_keepalive_interval":
        peer.keepalive = _uint(value, 65535, key)
    elif key == "replace_allowed_ips":
        peer.replace_allowed_ips = _true(value, key)
    elif key == "allowed_ip":
        add = not value.startswith("-")
        try:
            addr, cidr = parse_cidr(value if add else value[1:])
        except ValueError as e:
            raise UapiError(errno.EINVAL, f"invalid allowed_ip: {e}") from None
        peer.allowed_ips.append((add, addr, cidr))
    elif key == "protocol_version":
        if value != "1":
            raise UapiError(errno.EINVAL, f"unsupported protocol_version {value!r}")
    else:
        raise UapiError(errno.EINVAL, f"invalid UAPI peer key: {key!r}")


# ---- applying ------------------------------------------------------------------------


def apply_set_steps(host: Host, req: SetRequest) -> Steps[None]:
    """Apply a checked request. Only the socket changes can still fail, so they go first,
    the mark undone if the port then fails: an error leaves everything as it was.
    (wireguard-go answers EADDRINUSE for either, as here.)"""
    dev = host.device
    old_mark = host.fwmark
    try:
        if req.fwmark is not None and req.fwmark != old_mark:
            host.set_fwmark(req.fwmark)
        if req.listen_port is not None and req.listen_port != host.listen_port:
            host.set_listen_port(req.listen_port)
    except OSError as e:
        if host.fwmark != old_mark:
            with contextlib.suppress(OSError):
                host.set_fwmark(old_mark)
        raise UapiError(errno.EADDRINUSE, f"cannot set up the socket: {e}") from None
    if req.private_key is not None:
        dev.set_private_key(req.private_key)
    if req.replace_peers:
        for pub in list(dev.peers):
            yield from _remove_peer(dev, pub)
    for change in req.peers:
        yield from _apply_peer(host, dev, change)


def _drain(dev: Device, peer: Peer) -> Steps[None]:
    """Remove a peer's allowed IPs a slice at a time (what `remove_value` does at once)."""
    for number, (addr, cidr) in enumerate(dev.allowed_ips.iter_entries(peer), 1):
        dev.allowed_ips.remove(addr, cidr, peer)
        if number % STEP == 0:
            yield


def _remove_peer(dev: Device, public_key: bytes) -> Steps[None]:
    peer = dev.peers.get(public_key)
    if peer is not None:
        yield from _drain(dev, peer)
        dev.remove_peer(public_key)
    yield


def _apply_peer(host: Host, dev: Device, change: PeerChange) -> Steps[None]:
    if change.remove:
        yield from _remove_peer(dev, change.public_key)
        return
    if change.update_only and change.public_key not in dev.peers:
        return
    peer = dev.add_peer(change.public_key)
    yield
    if peer is None:
        return  # our own public key: ignored, as by wireguard-go
    if change.preshared_key is not None:
        peer.preshared_key = change.preshared_key
    if change.endpoint is not None:
        peer.endpoint = change.endpoint
    if change.replace_allowed_ips:
        yield from _replace_allowed_ips(dev, peer, change.allowed_ips)
    else:
        for number, (add, addr, cidr) in enumerate(change.allowed_ips, 1):
            if add:
                dev.allowed_ips.insert(addr, cidr, peer)
            else:
                dev.allowed_ips.remove(addr, cidr, peer)
            if number % STEP == 0:
                yield
    if change.keepalive is not None:
        host.transmit(dev.set_persistent_keepalive(peer, change.keepalive, host.now()))


EntryKey = tuple[int, int, int]


def _entry_key(addr: bytes, cidr: int) -> EntryKey:
    """What names an allowed-IPs entry: the address length, the prefix and its bits."""
    return len(addr), cidr, int.from_bytes(addr, "big") >> (len(addr) * 8 - cidr)


def _replace_allowed_ips(
    dev: Device, peer: Peer, changes: list[tuple[bool, bytes, int]]
) -> Steps[None]:
    """`replace_allowed_ips=true` and the changes after it, ending as removing all of the
    peer's entries first would, but with no moment when the entries the request keeps
    are gone (applied in slices, a big peer would lose its routes for the length of
    the request): a kept entry is removed and added back in one step, which also puts
    it in the request's order, and only the entries the request does not name at all
    are removed, at the end."""
    table = dev.allowed_ips
    old: dict[EntryKey, tuple[bytes, int]] = {}
    for number, (addr, cidr) in enumerate(table.iter_entries(peer), 1):
        old[_entry_key(addr, cidr)] = (addr, cidr)
        if number % STEP == 0:
            yield
    named: set[EntryKey] = set()
    for number, (add, addr, cidr) in enumerate(changes, 1):
        key = _entry_key(addr, cidr)
        if add:
            if key in old and key not in named:
                table.remove(addr, cidr, peer)
            table.insert(addr, cidr, peer)
        else:
            table.remove(addr, cidr, peer)
        named.add(key)
        if number % STEP == 0:
            yield
    for number, (key, (addr, cidr)) in enumerate(old.items(), 1):
        if key not in named:
            table.remove(addr, cidr, peer)
        if number % STEP == 0:
            yield


# ---- get -----------------------------------------------------------------------------


def render_get(host: Host) -> str:
    return run(render_get_steps(host))


def render_get_steps(host: Host) -> Steps[str]:
    dev = host.device
    done: list[str] = []  # joined a slice at a time: no long join at the end
    lines = []
    if dev.private_key is not None:
        lines.append(f"private_key={dev.private_key.hex()}")
    lines.append(f"listen_port={host.listen_port}")
    if host.fwmark:
        lines.append(f"fwmark={host.fwmark}")
    for peer in list(dev.peers.values()):
        lines.append(f"public_key={peer.public_key.hex()}")
        lines.append(f"preshared_key={peer.preshared_key.hex()}")
        lines.append("protocol_version=1")
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        sec, nsec = 0, 0
        if peer.last_handshake is not None:
            sec = int(peer.last_handshake)
            nsec = int((peer.last_handshake - sec) * 1e9)
        lines.append(f"last_handshake_time_sec={sec}")
        lines.append(f"last_handshake_time_nsec={nsec}")
        lines.append(f"tx_bytes={peer.tx_bytes}")
        lines.append(f"rx_bytes={peer.rx_bytes}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        for number, (addr, cidr) in enumerate(dev.allowed_ips.iter_entries(peer), 1):
            lines.append(f"allowed_ip={format_cidr(addr, cidr)}")
            if number % STEP == 0:
                done.append("\n".join(lines) + "\n")
                lines.clear()
                yield
        yield
    lines.append("errno=0")
    done.append("\n".join(lines) + "\n\n")
    return "".join(done)


def split_lines(request: bytes, piece: int = 1 << 16) -> Iterator[str]:
    """`request.decode("utf-8", "replace").split("\\n")`, decoded a piece at a time."""
    start = 0
    while True:
        cut = request.find(b"\n", start + piece)
        if cut < 0:
            yield from request[start:].decode("utf-8", "replace").split("\n")
            return
        yield from request[start:cut].decode("utf-8", "replace").split("\n")
        start = cut + 1


def handle(host: Host, request: list[str]) -> str:
    """Answer one request (its lines, without the final empty line)."""
    return run(handle_steps(host, iter(request)))


# what a log line may call a request: its first line only when it is one of these (an
# unknown first line may be a key line sent without its set=1)
_OPERATIONS = {op: op for op in ("get=1", "set=1", "wgpy_status=1")}


def handle_steps(host: Host, request: Iterator[str]) -> Steps[str]:
    """`handle`, a slice at a time: yields every `STEP` lines or entries of work."""
    op = next(request, "")
    try:
        if op == "get=1":
            if next(request, None) is not None:
                raise UapiError(errno.EINVAL, "get takes no keys")
            return (yield from render_get_steps(host))
        if op == "set=1":
            req = yield from parse_set_steps(request)
            yield from apply_set_steps(host, req)
            return "errno=0\n\n"
        status = getattr(host, "wgpy_status", None)
        if op == "wgpy_status=1" and status is not None:
            # wgpy's own request (`wgpy show --json`): one line of JSON; `wg` never sends it
            if next(request, None) is not None:
                raise UapiError(errno.EINVAL, "wgpy_status takes no keys")
            return f"{status()}\nerrno=0\n\n"
        raise UapiError(errno.EPROTO, "unknown operation (not get=1 or set=1)")
    except UapiError as e:
        log.error("UAPI %s failed: %s", _OPERATIONS.get(op, "request"), e)
        return f"errno=-{e.code}\n\n"
    except Exception:  # a bug must cost one request, never the running tunnel
        log.exception("UAPI %s failed unexpectedly", _OPERATIONS.get(op, "request"))
        return f"errno=-{IPC_ERROR_UNKNOWN}\n\n"
