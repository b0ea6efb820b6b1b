"""A Linux TUN interface (IFF_TUN | IFF_NO_PI, optionally IFF_VNET_HDR).

With `vnet_hdr`, every read and write carries a 10-byte virtio_net_hdr: that is what
lets `write_batch` hand the kernel a train of TCP segments as one GSO super-packet (the
coalescing is the TUN's own business, as in wireguard-go's tun_linux.go). TUNSETOFFLOAD
says which offloads the kernel may hand us on reads: with the native datapath, TSO (one
read of up to 64 KiB instead of ~45, kept whole as a super-packet that C's sealer cuts
into segments); without it none, since cutting costs a checksum per segment that pure
Python pays dearly for (docs/design.md, "The datapath").
GSO writes work either way.

The interface may be moved to another network namespace after start-up; the file
descriptor stays valid, so nothing here looks the interface up by name in our namespace:
the MTU is read through a socket made inside whatever namespace the device is in now.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Protocol

from wgpy.core.backend import Item
from wgpy.core.output import ToTun
from wgpy.io import offload

log = logging.getLogger("wgpy.tun")

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
TSO = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6  # what offloaded reads ask for
TUNGETIFF = 0x800454D2
TUNGETDEVNETNS = 0x54E3
SIOCGIFMTU = 0x8921
SIOCGIFINDEX = 0x8933
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
CLONE_NEWNET = 0x40000000

_IFREQ = struct.Struct("16sH22x")  # name, flags (or a short/int field), padding to 40
_IFREQ_INT = struct.Struct("16si20x")
PACKET_MAX = 65536  # the longest read after the virtio header (the TUN's GSO_MAX_SIZE)
# Errors a TUN read/write gives once its interface was deleted underneath it.
_GONE = {errno.EBADFD, errno.ENODEV, errno.EINVAL, errno.EBADF}


def read_nowait(fd: int, buf: memoryview) -> int:
    """Bytes read from the non-blocking `fd` into `buf`, or -1 when nothing waits."""
    try:
        return os.readv(fd, [buf])
    except BlockingIOError:
        return -1


class TunGone(Exception):
    """The interface behind this TUN descriptor no longer exists."""


class Writer(Protocol):
    """The writer stage of the receive direction (the native `TunWriter`): write_tun's
    writes made on a thread of its own, in order, from a bounded queue. `write` returns
    the failed writes of batches written since the last call (not necessarily its own)."""

    def write(self, fd: int, packets: list[ToTun], udp: bool) -> list[tuple[int, bytes]]: ...
    def flush(self) -> list[tuple[int, bytes]]: ...
    def close(self) -> None: ...


class Tun:
    # how decrypted packets become writes: offload.coalesce, or the native one (the same,
    # byte for byte, reading the native open's Spans in place), which the Datapath sets
    # when the device has the native module
    coalesce: Callable[[Iterable[ToTun], bool], list[bytes]] = staticmethod(offload.coalesce)
    split: Callable[[memoryview, int], list[bytes]] = staticmethod(offload.split)
    # one read, -1 when nothing waits; the native one raises no BlockingIOError on the way
    # (docs/design.md, "Latency")
    read_nowait: Callable[[int, memoryview], int] = staticmethod(read_nowait)
    # with the native module (the Datapath sets it where `writes_fd`): coalesce and write
    # in C, each write a writev from where the packets lie (the native open's Spans: no
    # copy) without the GIL; it hands back [(errno, write)] of the writes that failed
    write_coalesced: Callable[[int, list[ToTun], bool], list[tuple[int, bytes]]] | None = None
    # with the native module (the Datapath sets it where `reads_fd`): a read's virtio header
    # into a buffer and its packet into bytes of its own, so that no read is copied to be kept
    read_packet: Callable[[int, bytearray, int], bytes | None] | None = None
    writes_fd = True  # its writes are write(2)s on `fileno()` (the channel fakes': not)
    writer: Writer | None = None  # `use_writer`: the writes on a thread of their own

    def __init__(self, fd: int, name: str, vnet_hdr: bool) -> None:
        self._fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.coalesce_udp = True  # until the kernel refuses a USO write
        self._header = bytearray(offload.VNET_HDR_LEN)  # each read's virtio header (read_packet)
        self._ns_inode = 0
        self._ctl: socket.socket | None = None  # a socket in the device's namespace
        self.ifindex = self._ifreq_int(SIOCGIFINDEX)

    @classmethod
    def create(cls, name: str, vnet_hdr: bool = False, offloads: int = 0) -> Tun:
        """A new TUN interface; `offloads` (TSO or 0) for reads, with the virtio header."""
        if not 0 < len(name.encode()) < 16 or "/" in name:
            raise ValueError(f"bad interface name {name!r}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
            got = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
            actual = _IFREQ.unpack(got)[0].rstrip(b"\0").decode()
            if vnet_hdr:
                fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)  # see the module's docstring
            return cls(fd, actual, vnet_hdr)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int) -> Tun:
        """A TUN a parent opened and handed over (wireguard-go's WG_TUN_FD): its name and
        virtio header are read from the descriptor."""
        got = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
        raw_name, flags = _IFREQ.unpack(got)
        if flags & (IFF_TUN | IFF_NO_PI) != IFF_TUN | IFF_NO_PI:
            raise OSError(f"TUN fd {fd} must be opened with IFF_TUN | IFF_NO_PI")
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        vnet_hdr = bool(flags & IFF_VNET_HDR)
        if vnet_hdr:
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)  # whole packets on reads, as create() asks
        return cls(fd, raw_name.rstrip(b"\0").decode(), vnet_hdr)

    def fileno(self) -> int:
        return self._fd

    def read_into(self, buf: memoryview) -> int:
        """One packet (with its virtio header if vnet_hdr), or -1 when none waits."""
        try:
            return self.read_nowait(self._fd, buf)
        except OSError as e:
            if e.errno in _GONE:
                raise TunGone(self.name) from e
            raise

    def read_batch(self, buf: memoryview, limit: int, mtu: int) -> tuple[list[Item], int]:
        """The packets waiting to be read, and how many: plain IP packets (a read whose
        virtio header asks for a checksum is finished here), and each TSO read whole, as
        a super-packet (offload.super_packet) that the sealer cuts, so that nothing here
        is done per segment. Reading stops once `limit` packets are in (a TSO read brings
        up to ~45 at once)."""
        if self.read_packet is not None and self.vnet_hdr:
            return self.read_packets(limit, mtu)
        items: list[Item] = []
        count = 0
        skip = offload.VNET_HDR_LEN if self.vnet_hdr else 0
        while count < limit:
            n = self.read_into(buf)
            if n < 0:
                break
            if not skip or not (buf[0] or buf[1]):  # flags or gso_type: work for us
                items.append(bytes(buf[skip:n]))
                count += 1
            elif buf[1] and (whole := offload.super_packet(buf[:n], mtu)) is not None:
                items.append(whole)
                count += whole.nsegments
            else:
                got = self.split(buf[:n], mtu)
                items += got
                count += len(got)
        return items, count

    def reads_fd(self) -> bool:
        """Whether reads are read(2)s of `fileno()` (not a test's channel: `read_into`)."""
        return type(self).read_into is Tun.read_into

    def read_packets(self, limit: int, mtu: int) -> tuple[list[Item], int]:
        """`read_batch` with `read_packet` (and a virtio header; the datapath calls it
        directly then, a call fewer a read): the same items, each read kept where the kernel
        wrote it (a TSO read's 64 KiB are not copied out of a reused buffer), a checksum
        left to finish finished in C (a TCP ACK: no `split`)."""
        read, fd, header = self.read_packet, self._fd, self._header
        assert read is not None
        items: list[Item] = []
        count = 0
        while count < limit:
            try:
                packet = read(fd, header, PACKET_MAX)
            except OSError as e:
                if e.errno in _GONE:
                    raise TunGone(self.name) from e
                raise
            if packet is None:
                break
            if not (header[0] or header[1]):  # flags or gso_type: work for us
                items.append(packet)
                count += 1
            elif header[1] and (whole := offload.super_packet_of(header, packet, mtu)) is not None:
                items.append(whole)
                count += whole.nsegments
            else:
                got = self.split(memoryview(bytes(header) + packet), mtu)
                items += got
                count += len(got)
        return items, count

    def write_batch(self, items: list[ToTun], mtu: int) -> None:
        """Deliver decrypted packets (`Output.tun`: packets, and runs of them as the
        backend's open_batch made them); with the virtio header, segments of one TCP flow
        (and same-size datagrams of one UDP flow) go as one GSO super-packet. A refused
        write is dropped, as a NIC would drop it. Raises TunGone."""
        if self.vnet_hdr and self.write_coalesced is not None:
            failed = self.write_coalesced(self._fd, items, self.coalesce_udp)
            if failed:  # a call fewer on a ping's way, where nothing failed
                self.failed_writes(failed, mtu)
            return
        if self.vnet_hdr:
            bufs = self.coalesce(items, self.coalesce_udp)
        else:  # a write per packet: a run's packets become bytes one by one here
            bufs = offload.packets_of(items)
        for buf in bufs:
            try:
                self._write(buf)
            except OSError as e:
                self._failed(buf, e, mtu)

    def use_writer(self, writer: Writer) -> None:
        """Hand the writes to `writer`'s thread (`write_batch` queues them there); their
        failures come back on a later `write_batch` or `collect`, handled as ever."""
        self.writer = writer
        self.write_coalesced = writer.write

    def collect(self, mtu: int) -> None:
        """Handle the failures of writes the writer has made since the last call (a USO
        refusal, the interface gone), without waiting for more traffic. Raises TunGone."""
        if self.writer is not None and self.write_coalesced is not None:
            self.failed_writes(self.write_coalesced(self._fd, [], self.coalesce_udp), mtu)

    def failed_writes(self, failed: list[tuple[int, bytes]], mtu: int) -> None:
        """Handle writes that failed ([(errno, write)]: write_tun's, the writer's, or a lone
        read's made in C by the datapath, `native.open_lone`). Raises TunGone."""
        for err, buf in failed:
            self._failed(buf, OSError(err, os.strerror(err)), mtu)

    def _failed(self, buf: bytes, error: OSError, mtu: int) -> None:
        """A write the kernel refused: a USO one where USO is not there (`_refused`), the
        interface gone (TunGone), or anything else (say, the link is down): dropped."""
        if self._refused(buf, error, mtu):
            return
        if error.errno in _GONE:
            raise TunGone(self.name) from error

    def _refused(self, buf: bytes, error: OSError, mtu: int) -> bool:
        """A USO super-packet on a kernel without USO for TUN writes (EINVAL: before Linux
        6.2, which `write` alone would take for a vanished interface): stop making them
        and write its datagrams one by one (True)."""
        if not (self.vnet_hdr and error.errno == errno.EINVAL and buf[1] == offload.GSO_UDP_L4):
            return False
        if self.coalesce_udp:  # once; the batch's later USO writes come here too
            log.warning("the kernel refuses USO writes to the TUN (%s): datagrams now", error)
        self.coalesce_udp = False
        for packet in offload.split(buf, mtu):
            with contextlib.suppress(OSError, TunGone):
                self.write(offload.plain_header() + packet)
        return True

    def write(self, packet: bytes | memoryview) -> None:
        try:
            self._write(packet)
        except OSError as e:
            if e.errno in _GONE:
                raise TunGone(self.name) from e
            raise

    def _write(self, packet: bytes | memoryview) -> None:
        """The write(2) itself (a channel in tests/io/fakes.py, errors and all)."""
        os.write(self._fd, packet)

    def current_name(self) -> str:
        """The name now (TUNGETIFF asks the descriptor, wherever the device lives)."""
        got = fcntl.ioctl(self._fd, TUNGETIFF, bytes(_IFREQ.size))
        return bytes(_IFREQ.unpack(got)[0]).rstrip(b"\0").decode()

    def mtu(self) -> int:
        try:
            return self._ifreq_int(SIOCGIFMTU)
        except OSError as e:
            if e.errno in _GONE:
                raise TunGone(self.name) from e
            raise

    def close(self) -> None:
        if self.writer is not None:  # what it queued goes out before the descriptor goes
            self.writer.close()
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _ifreq_int(self, request: int) -> int:
        name = self.current_name()
        got = fcntl.ioctl(self._control_socket(), request, _IFREQ_INT.pack(name.encode(), 0))
        return int(_IFREQ_INT.unpack(got)[1])

    def _control_socket(self) -> socket.socket:
        """A datagram socket in the device's current namespace, made anew if it moved.
        TUNGETDEVNETNS needs CAP_NET_ADMIN: a daemon without it (handed its TUN by a
        privileged parent) asks in its own namespace, where the parent made the device."""
        try:
            ns_fd = fcntl.ioctl(self._fd, TUNGETDEVNETNS)
        except PermissionError:
            if self._ctl is None:
                self._ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            return self._ctl
        try:
            inode = os.fstat(ns_fd).st_ino
            if self._ctl is None or inode != self._ns_inode:
                if self._ctl is not None:
                    self._ctl.close()
                self._ctl = _socket_in_namespace(ns_fd)
                self._ns_inode = inode
        finally:
            os.close(ns_fd)
        return self._ctl


def open_tun(name: str, vnet_hdr: bool, offloads: int = 0) -> Tun:
    """A new TUN, with the virtio header and read offloads if wanted and the kernel allows
    them, else without (no coalesced writes then)."""
    if vnet_hdr:
        try:
            return Tun.create(name, vnet_hdr=True, offloads=offloads)
        except OSError as e:
            log.warning("TUN without virtio header (%s): no coalesced writes", e)
    return Tun.create(name, vnet_hdr=False)


def _setns(fd: int) -> None:
    # os.setns arrives only in Python 3.12
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _socket_in_namespace(ns_fd: int) -> socket.socket:
    """Enter the namespace just long enough to create a socket; sockets stay where made."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(own).st_ino == os.fstat(ns_fd).st_ino:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        _setns(ns_fd)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        finally:
            _setns(own)
    finally:
        os.close(own)
