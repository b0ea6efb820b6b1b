"""The datapath: moves batches between the TUN, the UDP socket and the protocol core.

Each readable event drains up to a batch of packets, hands them to the core in one call
and writes out what it returns: decrypted TCP segments coalesced into GSO super-packets
for the TUN, datagrams of one peer sent with UDP GSO.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time

from wgpy.core.device import Device, Output
from wgpy.io import offload
from wgpy.io.tun import Tun, TunGone
from wgpy.io.udp import UdpSocket

log = logging.getLogger("wgpy.datapath")
BATCH = 64  # reads per readable event before going back to the loop
UDP_BUF = 65536 + 4096  # one GRO read is at most 64 KiB


class Datapath:
    def __init__(self, device: Device, tun: Tun, udp: UdpSocket) -> None:
        self.device = device
        self.tun = tun
        self.udp = udp
        self._udp_buf = bytearray(UDP_BUF)
        self._tun_buf = bytearray(65536 + offload.VNET_HDR_LEN)
        self.coalesce_udp = True  # until the kernel refuses a USO write

    def on_udp(self) -> None:
        """Drain the socket. The datagrams of one GRO read go to the core together, as
        views into the receive buffer (no copies); what comes out is sent once at the end."""
        view = memoryview(self._udp_buf)
        recv_into, receive = self.udp.recv_into, self.device.receive
        out = Output()
        now = time.monotonic()
        for _ in range(BATCH):
            got = recv_into(view)
            if got is None:
                break
            n, seg, addr = got
            data = view[:n]
            step = seg if 0 < seg < n else n or 1  # no GRO: one datagram (an empty one: none)
            out.extend(receive([(data[i : i + step], addr) for i in range(0, n, step)], now))
        self.transmit(out)

    def on_tun(self) -> bool:
        """Drain the TUN into the core; False once the interface is gone."""
        view = memoryview(self._tun_buf)
        packets: list[bytes] = []
        skip = offload.VNET_HDR_LEN if self.tun.vnet_hdr else 0
        mtu = self.device.mtu
        read = self.tun.read_into
        try:
            for _ in range(BATCH):
                try:
                    n = read(view)
                except BlockingIOError:
                    break
                if skip and (view[0] or view[1]):  # a virtio header asking for work
                    packets += offload.split(view[:n], mtu)
                else:
                    packets.append(bytes(view[skip:n]))
        except TunGone:
            return False
        if packets:
            self.transmit(self.device.send(packets, time.monotonic()))
        return True

    def tick(self, now: float) -> None:
        self.transmit(self.device.tick(now))

    def transmit(self, out: Output) -> None:
        if out.tun:
            self._write_tun(out.tun)
        if out.udp:
            self._send_udp(out.udp)

    def _write_tun(self, packets: list[bytes]) -> None:
        bufs = offload.coalesce(packets, self.coalesce_udp) if self.tun.vnet_hdr else packets
        write = self.tun.write
        for buf in bufs:
            try:
                write(buf)
            except TunGone:
                return  # noticed and handled on the next read
            except OSError as e:
                self._refused(buf, e)

    def _refused(self, buf: bytes, error: OSError) -> None:
        """A write the kernel refused. A USO super-packet on a kernel without USO for TUN
        writes: stop making them and write its datagrams one by one. Anything else (the
        interface is down, say): drop that one write, as a NIC would."""
        if not (self.coalesce_udp and error.errno == errno.EINVAL and buf[1] == offload.GSO_UDP_L4):
            return
        self.coalesce_udp = False
        log.warning("the kernel refuses UDP GSO writes to the TUN (%s): writing datagrams", error)
        for packet in offload.split(buf, self.device.mtu):
            with contextlib.suppress(OSError):
                self.tun.write(offload.plain_header() + packet)

    def _send_udp(self, datagrams: list[tuple[bytes, tuple[str, int]]]) -> None:
        """Runs of datagrams to one endpoint with one size go out in one GSO send."""
        udp = self.udp
        i, n = 0, len(datagrams)
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            j = i + 1
            while j < n and datagrams[j][1] == addr and len(datagrams[j][0]) == size:
                j += 1
            # a shorter last datagram may join the run
            if j < n and datagrams[j][1] == addr and len(datagrams[j][0]) < size:
                j += 1
            if j - i == 1 or not udp.gso:
                for k in range(i, j):
                    udp.send(datagrams[k][0], addr)
            else:
                udp.send_segments(memoryview(b"".join(d for d, _ in datagrams[i:j])), size, addr)
            i = j
