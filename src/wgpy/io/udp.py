"""The UDP socket: one port for IPv4 and IPv6, with GSO sends and GRO receives.

Endpoints are (host, port) with IPv4 hosts as plain dotted quads, whatever the socket's
family; an IPv4-mapped IPv6 address never leaks out. `UDP_SEGMENT` (GSO) sends a run of
equal-size datagrams in one `sendmsg`; `UDP_GRO` returns a run of datagrams in one
`recvmsg`, with the segment size in a control message. Where the kernel refuses either,
this socket falls back for good, with one log line.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Iterator

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

Endpoint = tuple[str, int]
_U16 = struct.Struct("=H")
_INT = struct.Struct("=i")
_CMSG_SPACE = socket.CMSG_SPACE(_INT.size)
_GSO_REFUSED = {errno.EIO, errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP}


class UdpSocket:
    def __init__(self, port: int = 0, fwmark: int = 0, offload: bool = True) -> None:
        self._sock, self._v6 = _bind(port)
        self.port: int = self._sock.getsockname()[1]
        self.gso = offload
        self.gro = offload and _try_setsockopt(self._sock, SOL_UDP, UDP_GRO, 1)
        buffers = ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF))
        for force, plain in buffers:  # FORCE passes the sysctl cap where we may (root)
            if not _try_setsockopt(self._sock, socket.SOL_SOCKET, force, BUFFER_BYTES):
                _try_setsockopt(self._sock, socket.SOL_SOCKET, plain, BUFFER_BYTES)
        self._peer_addrs: dict[Endpoint, tuple[str, int]] = {}
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
        self._sock.close()

    def _sockaddr(self, endpoint: Endpoint) -> tuple[str, int]:
        addr = self._peer_addrs.get(endpoint)
        if addr is None:
            host, port = endpoint
            if self._v6 and ":" not in host:
                host = "::ffff:" + host
            addr = self._peer_addrs[endpoint] = (host, port)
            if len(self._peer_addrs) > 4096:  # roaming peers: don't grow without bound
                self._peer_addrs.clear()
        return addr

    def send(self, data: bytes | memoryview, endpoint: Endpoint) -> None:
        # unreachable, no route, buffer full: UDP may drop, and WireGuard copes
        with contextlib.suppress(OSError):
            self._sock.sendto(data, self._sockaddr(endpoint))

    def send_segments(self, buf: bytes | memoryview, size: int, endpoint: Endpoint) -> None:
        """Send `buf` as datagrams of `size` bytes (the last may be shorter)."""
        view = memoryview(buf)
        step = size * max(1, min(MAX_GSO_SEGMENTS, MAX_GSO_BYTES // size))
        addr = self._sockaddr(endpoint)
        for start in range(0, len(view), step):
            chunk = view[start : start + step]
            if self.gso and len(chunk) > size:
                try:
                    cmsg = [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))]
                    self._sock.sendmsg([chunk], cmsg, 0, addr)
                    continue
                except OSError as e:
                    if e.errno in _GSO_REFUSED:  # the kernel can't here: stop asking
                        self.gso = False
                        log.warning("UDP GSO refused (%s); sending datagrams one by one", e)
                    elif e.errno != errno.EMSGSIZE:  # EMSGSIZE: segments above the path
                        continue  # MTU, sent below one by one (IP fragments them); else drop
            for i in range(0, len(chunk), size):
                self.send(chunk[i : i + size], endpoint)

    def send_batch(self, datagrams: list[tuple[bytes, Endpoint]]) -> None:
        """Send datagrams in order; each run to one endpoint of one size (a shorter last
        may join it) goes out in one GSO send (wireguard-go conn/bind_std.go does the same
        coalescing in its Send)."""
        for start, end, size, endpoint in gso_runs(datagrams):
            if end - start == 1 or not self.gso:
                for k in range(start, end):
                    self.send(datagrams[k][0], endpoint)
            else:
                joined = b"".join([d for d, _ in datagrams[start:end]])
                self.send_segments(memoryview(joined), size, endpoint)

    def recv_into(self, buf: memoryview) -> tuple[int, int, Endpoint] | None:
        """(bytes, GRO segment size or 0, source) of one read, or None when nothing waits."""
        try:
            n, ancillary, _, addr = self._sock.recvmsg_into([buf], _CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return None  # e.g. an ICMP error queued on the socket: nothing to read
        seg = 0
        for level, kind, data in ancillary:
            if level == SOL_UDP and kind == UDP_GRO:
                seg = _INT.unpack_from(data)[0] if len(data) >= 4 else _U16.unpack_from(data)[0]
        host = addr[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return n, seg, (host, addr[1])


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

