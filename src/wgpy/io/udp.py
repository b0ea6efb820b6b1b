"""The UDP socket: one port for IPv4 and IPv6, with GSO sends and GRO receives.

Endpoints are (host, port) with IPv4 hosts as plain dotted quads, whatever the socket's
family; an IPv4-mapped IPv6 address never leaks out; a link-local IPv6 host keeps its
%scope, and sends to it carry that scope id. `UDP_SEGMENT` (GSO) sends a run of
equal-size datagrams in one `sendmsg`; `UDP_GRO` returns a run of datagrams in one
`recvmsg`, with the segment size in a control message. Where the kernel refuses either,
this socket falls back for good, with one log line.

Sticky source addresses: a reply leaves from the local address its endpoint's packets
arrived at (what Linux's WireGuard and wireguard-go do), not whatever address the kernel
would pick for the route; a peer configured with our second address then hears back from
that address. Each read brings the local address in a packet-info control message (on the
dual-stack socket `IPV6_PKTINFO`, for IPv4 too, as an IPv4-mapped address); the socket
keeps it per endpoint and puts it on every send to that endpoint as the same control
message. It is forgotten when a send from it fails (the address is gone: the send is
retried at once without it) and when the caller says so (`forget_source`, on a
handshake retry). Only the address is pinned: the interface index goes along for IPv6
link-local addresses only, so the kernel still routes by destination.

As in Linux and wireguard-go, only an authenticated datagram sets the source: the socket
keeps each read's packet info in `last_info`, and the caller (the datapath) passes it to
`learn_source` once that datagram proved authentic, a handshake message's when the core
worked it off. A spoofed datagram, which anyone who knows a peer's address and port can
send to another of our addresses, moves nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, Protocol

from wgpy.core.endpoint import Endpoint
from wgpy.core.output import Run

log = logging.getLogger("wgpy.udp")

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_MARK = 36
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
BUFFER_BYTES = 8 << 20
MAX_GSO_BYTES = 65000  # below the 64 KiB an IP datagram can carry, with headers
MAX_GSO_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS

_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")
_GSO_REFUSED = {errno.EIO, errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP}
IP_PKTINFO = 8  # struct in_pktinfo {int ifindex; in_addr spec_dst, addr}: 12 bytes
IPV6_PKTINFO = 50  # struct in6_pktinfo {in6_addr addr; unsigned ifindex}: 20 bytes
IPV6_RECVPKTINFO = 49
_CMSG_SPACE = socket.CMSG_SPACE(_INT.size) + socket.CMSG_SPACE(20)
# a send from a remembered source failed because the source (or its interface) is gone:
# IPv4 answers ENETUNREACH, IPv6 EINVAL
_SOURCE_GONE = {errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH, errno.ENODEV, errno.ENXIO}
MAX_SOURCES = 4096  # remembered endpoints; the oldest goes first
Cmsg = tuple[int, int, bytes]
# an endpoint's destination made ready for C (`use_native`): its sockaddr, and the packet
# info of its sticky source (the data of the source's control message) or None; None for
# an endpoint that is no address (its datagrams are dropped, as the reference's are)
Dest = tuple[bytes, bytes | None] | None
# what C's sends found: (endpoint, errno, the packet info of its source that failed as
# gone), or (None, errno, None): GSO refused
Learnt = list[tuple[Endpoint | None, int, bytes | None]]
MakeDest = Callable[[Endpoint], Dest]
SendNative = Callable[[int, Iterable[Run], dict[Endpoint, Dest], MakeDest, bool], Learnt]
# the native seal_send, its socket's arguments given (`use_native`): packet, routes, now,
# mtu, unsettled -> findings, or None where the packet's way is not the lone one
SealSend = Callable[[object, object, float, int, list[Any]], Learnt | None]
SockAddr = tuple[str, int] | tuple[str, int, int, int]  # (host, port[, flowinfo, scope id])
_SOCKADDR_IN = struct.Struct("=H2s4s8x")  # family (host order), port (network), address
_SOCKADDR_IN6 = struct.Struct("=H2sI16sI")  # ... flowinfo, address, scope id


class Sender(Protocol):
    """The sender stage of the send direction (the native `UdpSender`): send_runs's sends
    made on a thread of their own, in order, from a bounded queue. `send` returns what
    the batches sent since the last call found (not necessarily its own)."""

    def send(
        self, fd: int, runs: Iterable[Run], dests: dict[Endpoint, Dest], dest: MakeDest,
        gso: bool,
    ) -> Learnt: ...  # fmt: skip
    def flush(self) -> Learnt: ...
    def close(self) -> None: ...


class UdpSocket:
    # with the native module (`use_native`, which the Datapath calls): send_runs in C
    _send_native: SendNative | None = None
    _seal_send: SealSend | None = None
    sender: Sender | None = None  # `use_native`: the sends on a thread of their own

    def __init__(self, port: int = 0, fwmark: int = 0, offload: bool = True) -> None:
        self._sock, self._v6 = _bind(port)
        self.port: int = self._sock.getsockname()[1]
        self.gso = offload
        self.gro = offload and _try_setsockopt(self._sock, SOL_UDP, UDP_GRO, 1)
        buffers = ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF))
        for force, plain in buffers:  # FORCE passes the sysctl cap where we may (root)
            if not _try_setsockopt(self._sock, socket.SOL_SOCKET, force, BUFFER_BYTES):
                _try_setsockopt(self._sock, socket.SOL_SOCKET, plain, BUFFER_BYTES)
        self._peer_addrs: dict[Endpoint, SockAddr] = {}
        # sticky sources: endpoint -> the packet info its last read came with, and that
        # packet info -> the control message a send from it carries
        self._sources: dict[Endpoint, bytes] = {}
        self.last_info: bytes | None = None
        self._source_cmsgs: dict[bytes, Cmsg] = {}
        self._dests: dict[Endpoint, Dest] = {}  # for the native sends; see `Dest`
        if self._v6:
            self._pktinfo = (socket.IPPROTO_IPV6, IPV6_PKTINFO)
            self.sticky = _try_setsockopt(self._sock, socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            self._pktinfo = (socket.IPPROTO_IP, IP_PKTINFO)
            self.sticky = _try_setsockopt(self._sock, socket.IPPROTO_IP, IP_PKTINFO, 1)
        if fwmark:
            try:
                self.set_fwmark(fwmark)
            except OSError:
                self._sock.close()
                raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def set_fwmark(self, mark: int) -> None:
        self._sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)

    def close(self) -> None:
        self._seal_send = None  # (it holds the descriptor's number: never sent on after)
        if self.sender is not None:  # what it queued goes out before the socket goes
            self.sender.close()
        self._sock.close()

    def sends_are_its_own(self) -> bool:
        """Whether sends go to the socket itself (not a subclass's): then C may make them
        (`use_native`)."""
        own = UdpSocket
        cls = type(self)
        return cls.send is own.send and cls.send_segments is own.send_segments and (
            cls.send_runs is own.send_runs
        )

    def use_native(self, send_runs: SendNative, sender: Sender | None = None,
                   seal_send: Callable[..., Learnt | None] | None = None) -> None:  # fmt: skip
        """Make `send_runs`'s sends in C (the native `send_runs`, or `sender`'s thread),
        byte for byte and errno for errno as the Python code below, which stays the
        reference: C gets each endpoint's destination ready made (`_dest`) and hands back
        what the socket must learn (`_learn`). `seal_send` (the native one) with them:
        `UdpSocket.seal_send`."""
        self._send_native = send_runs if sender is None else sender.send
        self.sender = sender
        self._seal_send = None if seal_send is None else partial(
            seal_send, self._sock.fileno(), self._dests, self._dest, sender
        )

    def seal_send(self, packet: object, routes: object, now: float, mtu: int,
                  unsettled: list[Any]) -> bool:  # fmt: skip
        """A lone packet read from the TUN routed, sealed and sent in one C call (after
        `use_native`; io/datapath.py `_send_lone`): core/device.py `Device.seal_one`'s
        way, its sealed message appended to `unsettled` as seal_one does. False, nothing
        changed, where the packet's way is not that one (or no native module)."""
        native = self._seal_send
        learnt = None if native is None else native(packet, routes, now, mtu, unsettled)
        if learnt is None:
            return False
        if learnt:
            self._learn(learnt)
        return True

    def collect(self) -> None:
        """Learn what the sender's late batches found (a source gone, GSO refused),
        without waiting for more traffic."""
        if self.sender is not None:
            self._learn(self.sender.send(self._sock.fileno(), [], self._dests, self._dest,
                                         self.gso))  # fmt: skip

    def _dest(self, endpoint: Endpoint) -> Dest:
        """`endpoint`'s destination for C, remembered until its source changes."""
        dests = self._dests
        if len(dests) >= MAX_SOURCES:  # roaming peers: don't grow without bound
            dests.clear()
        addr = self._packed(endpoint)
        if addr is None:  # not remembered: asked again on the next send (a name may resolve)
            return None
        cmsg = self._source_cmsg(endpoint)
        dest = dests[endpoint] = (addr, None if cmsg is None else cmsg[2])
        return dest

    def _packed(self, endpoint: Endpoint) -> bytes | None:
        """The sockaddr Python's socket module makes of `_sockaddr(endpoint)`, or None
        where it would fail."""
        addr = self._sockaddr(endpoint)
        host, port, scope = addr[0], addr[1], addr[3] if len(addr) == 4 else 0
        family = socket.AF_INET6 if self._v6 else socket.AF_INET
        try:  # an address, as Python's own sends parse it: no file opened (no descriptor
            packed = socket.inet_pton(family, host.partition("%")[0])  # left: still sent)
        except OSError:  # a name (only the library's API gives one): resolved
            try:
                found = str(socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)[0][4][0])
                packed = socket.inet_pton(family, found.partition("%")[0])
            except (OSError, UnicodeError):
                return None
        number = port.to_bytes(2, "big")
        if self._v6:
            return _SOCKADDR_IN6.pack(family, number, 0, packed, scope)
        return _SOCKADDR_IN.pack(family, number, packed)

    def _learn(self, learnt: Learnt) -> None:
        """Apply what C's sends found, as the Python sends do when they find it."""
        for endpoint, err, info in learnt:
            e = OSError(err, os.strerror(err))
            if endpoint is not None:
                cmsg = self._source_cmsg(endpoint)
                if cmsg is not None and cmsg[2] == info:  # (not one learnt since: a thread's
                    self._source_failed(endpoint, e)  # findings come back a call later)
            elif self.gso:
                self.gso = False
                log.warning("UDP GSO refused (%s); sending datagrams one by one", e)

    def _sockaddr(self, endpoint: Endpoint) -> SockAddr:
        addr = self._peer_addrs.get(endpoint)
        if addr is None:
            host, port = endpoint
            if self._v6 and ":" not in host:
                host = "::ffff:" + host
            # a link-local host's %scope: Python's (host, port) drops it (scope id 0, and
            # the kernel refuses or misroutes the send); a 4-tuple carries it
            addr = (host, port) if "%" not in host else _scoped(host, port)
            self._peer_addrs[endpoint] = addr
            if len(self._peer_addrs) > 4096:  # roaming peers: don't grow without bound
                self._peer_addrs.clear()
        return addr

    def source(self, endpoint: Endpoint) -> str | None:
        """The local address sends to `endpoint` leave from, if one is remembered."""
        info = self._sources.get(endpoint)
        if info is None:
            return None
        if self._v6:
            host = socket.inet_ntop(socket.AF_INET6, info[:16])
            return host[7:] if host.startswith("::ffff:") and "." in host else host
        return socket.inet_ntop(socket.AF_INET, info[4:8])

    def forget_source(self, endpoint: Endpoint) -> None:
        """Let the kernel pick the source for `endpoint` again, until its next packet."""
        self._sources.pop(endpoint, None)
        self._dests.pop(endpoint, None)

    def _source_cmsg(self, endpoint: Endpoint) -> Cmsg | None:
        info = self._sources.get(endpoint)
        if info is None:
            return None
        cmsg = self._source_cmsgs.get(info)
        if cmsg is None:
            cmsg = self._source_cmsgs[info] = self._make_source_cmsg(info)
            if len(self._source_cmsgs) > MAX_SOURCES:  # local addresses are few; but bound it
                self._source_cmsgs.clear()
        return cmsg

    def _make_source_cmsg(self, info: bytes) -> Cmsg:
        level, kind = self._pktinfo
        if self._v6:  # in6_pktinfo: the address, and the interface for link-local only
            link_local = info[0] == 0xFE and info[1] & 0xC0 == 0x80
            return level, kind, info if link_local else info[:16] + bytes(4)
        return level, kind, bytes(4) + info[4:8] + bytes(4)  # in_pktinfo: spec_dst only

    def learn_source(self, endpoint: Endpoint, info: bytes) -> None:
        """Send to `endpoint` from the address its last authentic packet came to (`info`:
        the packet info of that read, `last_info`). Only authenticated packets may move
        it, as only they move a peer's endpoint: anyone can spoof a source."""
        sources = self._sources
        if sources.get(endpoint) == info:
            return
        sources[endpoint] = info
        self._dests.pop(endpoint, None)
        if len(sources) > MAX_SOURCES:  # a flood of sources: the oldest entry goes
            oldest = next(iter(sources))
            del sources[oldest]
            self._dests.pop(oldest, None)

    def send(self, data: bytes | memoryview, endpoint: Endpoint) -> None:
        # unreachable, no route, buffer full: UDP may drop, and WireGuard copes. (try, not
        # contextlib.suppress: its three Python frames cost a lone packet ~15 us cold)
        addr = self._sockaddr(endpoint)
        cmsg = self._source_cmsg(endpoint)
        if cmsg is not None:
            try:
                self._sock.sendmsg([data], [cmsg], 0, addr)
                return
            except OSError as e:
                if e.errno not in _SOURCE_GONE:
                    return
                self._source_failed(endpoint, e)
        try:  # noqa: SIM105
            self._sock.sendto(data, addr)
        except OSError:
            pass

    def _source_failed(self, endpoint: Endpoint, e: OSError) -> None:
        log.debug("sending to %s from %s failed (%s): the kernel picks", endpoint,
                  self.source(endpoint), e.strerror)  # fmt: skip
        self._sources.pop(endpoint, None)
        self._dests.pop(endpoint, None)

    def send_segments(self, buf: bytes | memoryview, size: int, endpoint: Endpoint) -> None:
        """Send `buf` as datagrams of `size` bytes (the last may be shorter)."""
        view = memoryview(buf)
        step = size * max(1, min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // size))
        addr = self._sockaddr(endpoint)
        for start in range(0, len(view), step):
            chunk = view[start : start + step]
            if self.gso and len(chunk) > size and not self._send_gso(chunk, size, endpoint, addr):
                continue  # sent, or dropped as UDP may (unreachable, buffer full)
            for i in range(0, len(chunk), size):
                self.send(chunk[i : i + size], endpoint)

    def _send_gso(
        self, chunk: memoryview, size: int, endpoint: Endpoint, addr: SockAddr
    ) -> bool:
        """One GSO send; True when its datagrams must go one by one instead."""
        segment = (SOL_UDP, UDP_SEGMENT, _U16.pack(size))
        source = self._source_cmsg(endpoint)
        while True:
            try:
                cmsg = [segment] if source is None else [segment, source]
                self._sock.sendmsg([chunk], cmsg, 0, addr)
                return False
            except OSError as e:
                if source is not None and e.errno in _SOURCE_GONE:
                    self._source_failed(endpoint, e)  # once more, from the kernel's choice
                    source = None
                    continue
                if e.errno in _GSO_REFUSED:  # the kernel can't here: stop asking
                    self.gso = False
                    log.warning("UDP GSO refused (%s); sending datagrams one by one", e)
                    return True
                # EMSGSIZE: segments above the path MTU, sent one by one (IP fragments
                # them); anything else: dropped
                return e.errno == errno.EMSGSIZE

    def send_batch(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        """Send datagrams in order; each run to one endpoint of one size (a shorter last
        may join it) goes out in one GSO send (wireguard-go conn/bind_std.go does the same
        coalescing in its Send)."""
        if len(datagrams) == 1:  # a lone packet (a ping): no generator to start and run
            self.send(*datagrams[0])
            return
        for start, end, size, endpoint in gso_runs(datagrams):
            if end - start == 1 or not self.gso:
                for k in range(start, end):
                    self.send(datagrams[k][0], endpoint)
            else:
                joined = b"".join([d for d, _ in datagrams[start:end]])
                self.send_segments(memoryview(joined), size, endpoint)

    def send_runs(self, runs: Iterable[Run]) -> None:
        """Send what the core sealed (core/output.py `Datagrams.runs`): each run of
        datagrams of one size (but a shorter last) in one GSO send, or more where it
        passes 64 segments or 64 KiB. With `use_native`, all of it in one C call."""
        native = self._send_native
        if native is not None:
            learnt = native(self._sock.fileno(), runs, self._dests, self._dest, self.gso)
            if learnt:
                self._learn(learnt)
            return
        for buf, size, endpoint in runs:
            if len(buf) <= size:
                self.send(buf, endpoint)
            else:
                self.send_segments(buf, size, endpoint)

    def reads_are_its_own(self) -> bool:
        """Whether reads come from the socket itself (not a subclass's): then the C intake
        may read it directly (io/datapath.py `Datapath.on_udp`)."""
        return type(self).recv_into is UdpSocket.recv_into

    def recv_into(self, buf: memoryview) -> tuple[int, int, Endpoint] | None:
        """(bytes, GRO segment size or 0, source) of one read, or None when nothing waits."""
        try:
            n, ancillary, _, addr = self._sock.recvmsg_into([buf], _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return None  # e.g. an ICMP error queued on the socket: nothing to read
        seg = 0
        info = None
        pk_level, pk_kind = self._pktinfo
        for level, kind, data in ancillary:  # one or two: the packet info, a GRO size
            if level == SOL_UDP and kind == UDP_GRO:
                seg = _INT.unpack_from(data)[0] if len(data) >= 4 else _U16.unpack_from(data)[0]
            elif kind == pk_kind and level == pk_level:
                info = data
        host = addr[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        self.last_info = info  # learnt by the caller once the read proved authentic
        return n, seg, (host, addr[1])


def _scoped(host: str, port: int) -> SockAddr:
    """(address, port, 0, scope id) of an IPv6 host with a %scope, or (host, port) where
    that is no interface here (the send then fails, as any to a bad address)."""
    try:
        found = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_DGRAM, 0,
                                   socket.AI_NUMERICHOST)[0][4]  # fmt: skip
    except (OSError, UnicodeError):
        return host, port
    return (str(found[0]), port, 0, int(found[3])) if len(found) == 4 else (host, port)


def _bind(port: int) -> tuple[socket.socket, bool]:
    """A dual-stack socket where IPv6 exists, else IPv4 only."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        _bind_or_close(sock, ("0.0.0.0", port))
        return sock, False
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    _bind_or_close(sock, ("::", port))
    return sock, True


def _bind_or_close(sock: socket.socket, addr: tuple[str, int]) -> None:
    try:
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise


def _try_setsockopt(sock: socket.socket, level: int, option: int, value: int) -> bool:
    try:
        sock.setsockopt(level, option, value)
        return True
    except OSError:
        return False


def gso_runs(datagrams: list[tuple[bytes, Endpoint]]) -> Iterator[tuple[int, int, int, Endpoint]]:
    """(start, end, size, endpoint) of each run of consecutive datagrams to one endpoint
    that share a size, a shorter last one included: what one GSO send can carry."""
    i, n = 0, len(datagrams)
    while i < n:
        data, endpoint = datagrams[i]
        size = len(data)
        j = i + 1
        while j < n and datagrams[j][1] == endpoint and len(datagrams[j][0]) == size:
            j += 1
        if j < n and datagrams[j][1] == endpoint and len(datagrams[j][0]) < size:
            j += 1
        yield i, j, size, endpoint
        i = j

