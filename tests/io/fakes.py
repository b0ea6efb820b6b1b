"""In-memory stand-ins for the kernel's side of the TUN and the UDP socket, in the style of
wireguard-go's tun/tuntest and conn/bindtest: channels, not mocks. Everything above the
system calls is the real code: `Tun.read_batch`/`write_batch` (splitting, coalescing, the
USO fallback), `UdpSocket.send_batch` (GSO runs), `gro_split`, `Datapath`, `Device`."""

from __future__ import annotations

import errno
from collections import deque

from wgpy.core.endpoint import Endpoint
from wgpy.io import offload
from wgpy.io.tun import Tun
from wgpy.io.udp import UdpSocket


class ChannelTun(Tun):
    """A TUN whose kernel side is two queues: `inbound` (what the host sends into the
    tunnel, read by us) and `written` (every buffer we wrote, virtio header included).
    `refuse_uso` plays a kernel without USO for TUN writes."""

    writes_fd = False  # its writes go to `_write`, never to a file descriptor

    def __init__(self, vnet_hdr: bool = True, refuse_uso: bool = False) -> None:
        self._fd = -1
        self.name = "fake0"
        self.vnet_hdr = vnet_hdr
        self.coalesce_udp = True
        self.refuse_uso = refuse_uso
        self.inbound: deque[bytes] = deque()
        self.reads: deque[bytes] = deque()  # whole reads, virtio header included (TSO)
        self.written: list[bytes] = []

    def read_into(self, buf: memoryview) -> int:
        if self.reads:
            data = self.reads.popleft()
            buf[: len(data)] = data
            return len(data)
        if not self.inbound:
            return -1
        packet = self.inbound.popleft()
        data = offload.plain_header() + packet if self.vnet_hdr else packet
        buf[: len(data)] = data
        return len(data)

    def _write(self, packet: bytes | memoryview) -> None:
        """write(2) on a TUN: the errors come back as the kernel's errno, through
        `Tun.write`'s own handling of them."""
        if self.refuse_uso and self.vnet_hdr and packet[1] == offload.GSO_UDP_L4:
            raise OSError(errno.EINVAL, "USO not supported")
        self.written.append(bytes(packet))

    def delivered(self, mtu: int = 1420) -> list[bytes]:
        """The IP packets the host would see: super-packets cut back by `offload.split`,
        as the kernel segments them."""
        if not self.vnet_hdr:
            return list(self.written)
        return [p for buf in self.written for p in offload.split(buf, mtu)]


class ChannelUdp(UdpSocket):
    """A UDP socket on an in-memory network: `sent` records every system call as
    (datagrams, endpoint); `net` delivers to other ChannelUdp sockets by endpoint, merging
    consecutive same-size datagrams of one sender into one read as UDP_GRO does."""

    def __init__(self, endpoint: Endpoint, net: dict[Endpoint, ChannelUdp]) -> None:
        self.endpoint = endpoint
        self.port = endpoint[1]
        self.gso = True
        self.gro = True
        self.net = net
        self.sent: list[tuple[list[bytes], Endpoint]] = []
        self.reads: deque[tuple[bytes, int, Endpoint]] = deque()  # (buffer, seg, source)
        self.last_info: bytes | None = None  # no packet info: no sticky sources here
        self.forgotten: list[Endpoint] = []  # forget_source calls (sticky source addresses)
        net[endpoint] = self

    def forget_source(self, endpoint: Endpoint) -> None:
        self.forgotten.append(endpoint)

    def send(self, data: bytes | memoryview, endpoint: Endpoint) -> None:
        self._deliver([bytes(data)], endpoint)

    def send_segments(self, buf: bytes | memoryview, size: int, endpoint: Endpoint) -> None:
        data = bytes(buf)
        self._deliver([data[i : i + size] for i in range(0, len(data), size)], endpoint)

    def _deliver(self, datagrams: list[bytes], endpoint: Endpoint) -> None:
        self.sent.append((datagrams, endpoint))
        peer = self.net.get(endpoint)
        if peer is None:
            return
        run: list[bytes] = []
        for d in [*datagrams, b""]:  # GRO: equal sizes, a shorter last one closes the run
            if run and (not d or len(d) > len(run[0]) or len(run[-1]) < len(run[0])):
                seg = len(run[0]) if len(run) > 1 else 0
                peer.reads.append((b"".join(run), seg, self.endpoint))
                run = []
            if d:
                run.append(d)

    def recv_into(self, buf: memoryview) -> tuple[int, int, Endpoint] | None:
        if not self.reads:
            return None
        data, seg, src = self.reads.popleft()
        buf[: len(data)] = data
        return len(data), seg, src

    def close(self) -> None:
        self.net.pop(self.endpoint, None)
