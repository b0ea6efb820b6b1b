"""The data path's two backends behind one contract: the native module (wgpy._native, C
over OpenSSL) or pure Python (this module), chosen once, when the `Device` is made.

Both give the same calls, and the pure ones are the reference the native ones are tested
against, byte for byte (tests/native):

- `Sealer(key, receiver_index, counter=0)`: `.seal(packets, mtu) -> list[bytes]`,
  `.seal_runs(items, mtu) -> list[(buf, size)] | None` (what the device sends: see
  `Sealer.seal_runs`), `.counter`, `.expire()`, `.wipe()`. A sealer owns its session's
  send counter and reserves the counters of a batch inside the call, under its lock, so
  two threads sealing for one session never use a nonce twice.
- `Session(key, expires)`: a receiving key and its replay window; `.expires`, `.wipe()`,
  `.window_state()`.
- `open_batch(buf, nbytes, seg, sessions, now) -> (runs, per_session, others, drops)`:
  one UDP (GRO) read opened: see `open_batch` below. A run's packets are a `Packets`
  (core/output.py) that goes to the TUN as it is: the native backend decrypts a read
  into one buffer and hands back per run a `Spans` (that buffer and a packed (offset,
  length) table), which its `coalesce` reads in place, so no Python object is made per
  packet from the socket to the TUN; the pure one hands back the list of the bytes its
  AEAD made (joining them into one buffer would cost a copy and a table per packet
  that nothing on the pure path needs).
- `route(items, table) -> (groups, bad)`: packets read from the TUN grouped by the peer
  that owns their destination (`table`: the allowed IPs, or the native `Routes` that
  mirrors them, `Backend.routes`); `segments(sp)`: a super-packet (core/ip.py) cut into
  its packets.
- `x25519(jobs) -> list[tuple]`: the X25519 exchanges of a batch of handshakes (see
  `x25519` below); the native one spreads them over the crypto threads.
- `screen(private, public, messages) -> list`: a batch of initiations taken as far as
  the initiator's static key (see `screen` below); the native one on the crypto threads.

The core starts no threads and so needs no lock of its own: the lock is the caller's to
give (`lock`, a factory of context managers, as `rand` is for randomness); the default,
`nullcontext`, is for single-threaded use (tests, the simulator).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgpy.core import noise
from wgpy.core.constants import REJECT_AFTER_MESSAGES
from wgpy.core.crypto import InvalidTag, PrivateKey, is_zero
from wgpy.core.ip import (
    IPV4_DST,
    IPV4_SRC,
    IPV4_TOTAL_LEN,
    IPV6_DST,
    IPV6_PAYLOAD_LEN,
    IPV6_SRC,
    SuperPacket,
    segments,
)
from wgpy.core.messages import DATA_HEADER, DATA_MIN_LEN, MSG_DATA
from wgpy.core.replay import WORDS, ReplayWindow


class Packets(Protocol):
    """A run of opened packets on its way to the TUN, as `open_batch` hands it over: the
    native backend's `Spans` (the packets stay in the one buffer they were decrypted into;
    a packed (offset, length) table says where, and the native `coalesce` reads them
    there: no Python object per packet) or the pure one's list of bytes. Both count and
    iterate alike (iterating a `Spans` copies: tests, simulator)."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[bytes]: ...


_NONCE = struct.Struct("<4xQ")  # ChaCha20-Poly1305 nonce: 4 zero bytes, LE counter
_NOT_DATA = (0, 0, 0)  # (type, index, counter) of anything too short to be data
_HANDSHAKE_SIZES = {1: 148, 2: 92, 3: 64}  # initiation, response, cookie reply
_V4_LEN, _V6_LEN = IPV4_TOTAL_LEN, IPV6_PAYLOAD_LEN
LockFactory = Callable[[], AbstractContextManager[Any]]
Packet = bytes | bytearray | memoryview
Item = Packet | SuperPacket  # what the device stages and seals: a packet, or one to cut


class SealerLike(Protocol):
    """What both backends' sealers do (wgpy._native.Sealer and `Sealer` here)."""

    @property
    def counter(self) -> int: ...
    def seal(self, packets: Sequence[Packet], mtu: int) -> list[bytes]: ...
    def seal_runs(self, items: Sequence[Item], mtu: int) -> list[tuple[bytes, int]] | None: ...
    def expire(self) -> None: ...
    def wipe(self) -> None: ...


def padded_length(length: int, mtu: int) -> int:
    """Plaintext length after padding to 16 bytes, never past the MTU (wireguard-go rule)."""
    last = length % mtu if length > mtu and mtu else length
    padded = (last + 15) & ~15
    if mtu and padded > mtu:
        padded = mtu
    return length + padded - last


class Sealer:
    """The pure-Python sealer: a sending key, the peer's receiver index and the counter."""

    __slots__ = ("_aead", "_index", "_lock", "counter")

    def __init__(
        self,
        key: bytes,
        receiver_index: int,
        counter: int = 0,
        lock: AbstractContextManager[Any] | None = None,
    ) -> None:
        if not 0 <= receiver_index <= 0xFFFFFFFF or not 0 <= counter <= REJECT_AFTER_MESSAGES:
            raise ValueError("receiver_index is a u32, counter <= 2**64 - 2**13 - 1")
        self._aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(key)
        self._index = receiver_index
        self._lock = lock if lock is not None else nullcontext()
        self.counter = counter  # the next nonce; written only under the lock

    def seal(self, packets: Sequence[Packet], mtu: int) -> list[bytes]:
        """A data message per packet with the next counters; [] if they would pass
        REJECT_AFTER_MESSAGES (the session is spent). The hot loop of sending."""
        n = len(packets)
        if mtu < 0:
            raise ValueError("mtu >= 0")
        with self._lock:
            aead, counter = self._aead, self.counter
            if aead is None:
                raise ValueError("the key is wiped")
            if n > REJECT_AFTER_MESSAGES - counter:
                return []
            self.counter = counter + n
        seal, header, index = aead.encrypt, DATA_HEADER.pack, self._index
        out = []
        for packet in packets:
            length = len(packet)
            pad = -length % 16
            if length + pad > mtu:
                pad = padded_length(length, mtu) - length
            plain = bytes(packet) + bytes(pad) if pad else packet
            out.append(header(MSG_DATA, index, counter) + seal(_NONCE.pack(counter), plain, None))
            counter += 1
        return out

    def seal_runs(self, items: Sequence[Item], mtu: int) -> list[tuple[bytes, int]] | None:
        """Seal packets and super-packets (each cut into its segments first; one that
        cannot be cut makes nothing) into what UDP GSO sends: runs of (datagrams back to
        back, size), every datagram of a run `size` bytes but the last, which may be
        shorter; the counters and bytes those of `seal` on the packets cut out, in order.
        None if the counters would pass REJECT_AFTER_MESSAGES (nothing sealed)."""
        packets: Sequence[Packet] = items  # type: ignore[assignment]
        if SuperPacket in map(type, items):
            packets = [q for p in items for q in _cut(p)]
        sealed = self.seal(packets, mtu)
        if len(sealed) < len(packets):
            return None
        if len(sealed) == 1:  # a lone packet (a ping): no loop to run
            return [(sealed[0], len(sealed[0]))]
        return gso_runs(sealed)

    def expire(self) -> None:
        with self._lock:
            self.counter = REJECT_AFTER_MESSAGES

    def wipe(self) -> None:
        """Drop the key (Python cannot zero it: dropping the reference is what it can do)."""
        with self._lock:
            self._aead = None


def _cut(item: Item) -> Sequence[Packet]:
    return segments(item) if isinstance(item, SuperPacket) else (item,)


def gso_runs(datagrams: list[bytes]) -> list[tuple[bytes, int]]:
    """Consecutive datagrams of one size (a shorter last one may join) joined: (buf, size),
    what one UDP GSO send carries (wireguard-go conn/bind_std.go groups its sends so)."""
    runs = []
    i, n = 0, len(datagrams)
    while i < n:
        size = len(datagrams[i])
        j = i + 1
        while j < n and len(datagrams[j]) == size:
            j += 1
        if j < n and len(datagrams[j]) < size:
            j += 1
        runs.append((datagrams[i] if j == i + 1 else b"".join(datagrams[i:j]), size))
        i = j
    return runs


_UNSEEN = object()  # a destination not looked up yet in this batch


class Table(Protocol):
    """What `route` looks destinations up in: core/allowedips.py's AllowedIPs."""

    def lookup(self, addr: bytes) -> Any: ...


def route(items: Sequence[Item], table: Table) -> tuple[list[tuple[Any, list[Item]]], list[Item]]:
    """(groups, bad): packets (and super-packets) grouped by the owner of their inner
    destination in `table` (None: no route), groups in the order of their first packet,
    packets in order within a group; `bad`: what is not an IP packet. Each destination is
    looked up once."""
    groups: dict[Any, list[Item]] = {}
    owners: dict[bytes, Any] = {}  # destination -> owner, for this batch
    bad: list[Item] = []
    lookup = table.lookup
    for item in items:
        # core/ip.py destination, inline: a call per packet costs here
        p: Packet = item if item.__class__ is not SuperPacket else item[0]  # type: ignore[assignment]
        version = p[0] >> 4 if p else 0
        if version == 4 and len(p) >= 20:
            dst = bytes(p[IPV4_DST])
        elif version == 6 and len(p) >= 40:
            dst = bytes(p[IPV6_DST])
        else:
            bad.append(item)
            continue
        owner = owners.get(dst, _UNSEEN)  # not try/except: a raise costs ~0.4 us
        if owner is _UNSEEN:
            owner = owners[dst] = lookup(dst)
        group = groups.get(owner)
        if group is None:
            groups[owner] = [item]
        else:
            group.append(item)
    return list(groups.items()), bad


class Session:
    """The pure-Python receiving session: the key and the replay window."""

    __slots__ = ("_aead", "expires", "replay")

    def __init__(self, key: bytes, expires: float) -> None:
        self._aead: ChaCha20Poly1305 | None = ChaCha20Poly1305(key)
        self.expires = expires  # packets drop when now >= expires
        self.replay = ReplayWindow()

    def wipe(self) -> None:
        """Forget the key; all later packets drop (as expired)."""
        self._aead = None
        self.expires = float("-inf")

    def window_state(self) -> tuple[int, bytes]:
        """(top, the 128 window words as 8 bytes little-endian each), as C gives it."""
        words = self.replay.words
        return self.replay.top, b"".join(w.to_bytes(8, "little") for w in words[:WORDS])


Runs = list[tuple[Any, bytes, Packets]]
Opened = tuple[Runs, list[tuple[Any, int, bool]], list[tuple[int, int]], dict[str, int]]


def _count(drops: dict[str, int], why: str) -> None:
    drops[why] = drops.get(why, 0) + 1


def _not_data(data: memoryview, off: int, others: list[tuple[int, int]],
              drops: dict[str, int]) -> None:  # fmt: skip
    """A datagram that is no data message: handshake-shaped ones are handed back (as C's
    is_handshake), the rest drop."""
    kind = int.from_bytes(data[:4], "little") if len(data) >= 4 else 0
    if _HANDSHAKE_SIZES.get(kind) == len(data):
        others.append((off, len(data)))
    else:
        _count(drops, "bad_size" if len(data) < 4 or 1 <= kind <= 4 else "unknown_type")


def open_batch(buf: Packet, nbytes: int, seg: int, sessions: dict[int, Session],
               now: float) -> Opened:  # fmt: skip
    """Open one UDP (GRO) read: `buf[:nbytes]` in datagrams of `seg` bytes (the last may
    be shorter; seg <= 0 or >= nbytes: one datagram, an empty one if nbytes is 0). The hot
    loop of receiving: per packet only what must be. What it returns: `OPEN_RESULT`."""
    if not 0 <= nbytes <= len(buf):
        raise ValueError("need 0 <= nbytes <= len(buf)")
    view = memoryview(buf)[:nbytes]
    step = seg if 0 < seg < nbytes else nbytes or 1
    runs: Runs = []
    per: dict[Session, list[Any]] = {}  # session -> [bytes, any data?], first-seen order
    others: list[tuple[int, int]] = []
    drops: dict[str, int] = {}
    unpack, nonce = DATA_HEADER.unpack_from, _NONCE.pack
    run_session, run_src, run = None, b"", []
    got_for, got = None, [0, False]
    for off in range(0, nbytes or 1, step):  # nbytes 0: one empty datagram (bad_size)
        n = step if off + step <= nbytes else nbytes - off
        # the type is a little-endian u32: 4 means "data" with the three reserved zeros
        kind, index, counter = unpack(view, off) if n >= DATA_MIN_LEN else _NOT_DATA
        if kind != MSG_DATA:
            _not_data(view[off : off + n], off, others, drops)
            continue
        s = sessions.get(index)
        if s is None or counter >= REJECT_AFTER_MESSAGES or now >= s.expires or not s._aead:
            _count(drops, "unknown_index" if s is None else "expired")
            continue
        try:
            plain = s._aead.decrypt(nonce(counter), view[off + 16 : off + n], None)
        except InvalidTag:
            _count(drops, "bad_tag")
            continue
        if not s.replay.accept(counter):  # the window moves only after the tag verified
            _count(drops, "replayed")
            continue
        if s is not got_for:  # the session's tally, looked up once per run of it
            got_for, got = s, per.get(s) or per.setdefault(s, [0, False])
        got[0] += n
        if not plain:
            continue  # a keepalive
        got[1] = True
        # the inner source address and true length, for the allowed-IPs source filter
        length, version = len(plain), plain[0] >> 4
        if version == 4 and length >= 20:
            addr, length = plain[IPV4_SRC], (plain[_V4_LEN] << 8) | plain[_V4_LEN + 1]
            length = length if length >= 20 else n  # < 20: refused just below (n > len)
        elif version == 6 and length >= 40:
            addr, length = plain[IPV6_SRC], 40 + ((plain[_V6_LEN] << 8) | plain[_V6_LEN + 1])
        else:
            addr, length = b"", n  # refused just below (n > len(plain))
        if length > len(plain):
            _count(drops, "bad_inner")
            continue
        packet = plain if length == len(plain) else plain[:length]
        if s is run_session and addr == run_src:
            run.append(packet)
        else:
            run_session, run_src, run = s, addr, [packet]
            runs.append((s, addr, run))
    return runs, [(s, got[0], got[1]) for s, got in per.items()], others, drops


OPEN_RESULT = """open_batch's answer, on both backends: (runs, per_session, others, drops).
runs: [(session, inner source address, packets)] for consecutive accepted packets of one
session and source (the caller checks the source against the allowed IPs once per run);
packets: a `Packets` (above: native, a `Spans` over the call's one buffer; pure,
a list of bytes), for `Output.tun` as it is;
per_session: [(session, bytes, any data?)] for sessions with authenticated messages, in
first-seen order; others: [(offset, length)] of handshake-shaped datagrams; drops: reason
(core.output.Drop's values) -> count, only the reasons that dropped something (on both
backends: an empty dict when nothing was dropped)."""


# an X25519 job: (private key, its public key if known, the peers' public keys), all 32
# bytes; its answer: (the public key, then per peer the shared secret or None). The
# native one raises MemoryError where a crypto thread could not make an exchange's key or
# context, OSError where a private key would not load (no memory): no verdict, nothing
# answered; core/exchanges.py then leaves the batch to the loop thread.
X25519Job = tuple[bytes, bytes | None, tuple[bytes, ...]]
X25519Batch = Callable[[tuple[X25519Job, ...]], list[tuple[bytes | None, ...]]]


def _exchange(key: X25519PrivateKey, peer: bytes) -> bytes | None:
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError:  # OpenSSL refuses an all-zero result
        return None
    return None if is_zero(shared) else shared


def x25519(jobs: tuple[X25519Job, ...]) -> list[tuple[bytes | None, ...]]:
    """Per job (private, public or None, peers): (public, then per peer the shared secret,
    or None where the result is all zeros: a low-order point, refused as crypto.dh refuses
    it). A known public key is taken as given (loading a key costs an X25519 otherwise).
    The reference the native `x25519` is held to; it runs them one after the other."""
    out: list[tuple[bytes | None, ...]] = []
    for private, public, peers in jobs:
        for key in (private, *peers, *(() if public is None else (public,))):
            if not isinstance(key, bytes) or len(key) != 32:
                raise ValueError("keys are 32 bytes")
        loaded = X25519PrivateKey.from_private_bytes(private)
        if public is None:
            public = loaded.public_key().public_bytes_raw()
        out.append((public, *(_exchange(loaded, peer) for peer in peers)))
    return out


# what screening an initiation finds: (the initiator's static key, Noise's ck and h after
# it), or None where it is refused. The native screen raises MemoryError where a crypto
# thread could not work a message out (its contexts, a key: no memory), OSError where our
# key would not load or hash: no verdict on any message, nothing answered;
# core/exchanges.py then leaves those initiations unscreened.
Screened = tuple[bytes, bytes, bytes] | None
Screen = Callable[[bytes, bytes, tuple[bytes, ...]], list[Screened]]
_INITIATION_LEN = _HANDSHAKE_SIZES[1]
_EPHEMERAL, _SEALED_STATIC = slice(8, 40), slice(40, 88)


def screen(private: bytes, public: bytes, messages: tuple[bytes, ...]) -> list[Screened]:
    """Per initiation (148 bytes; the rest of it is not looked at), Noise_IKpsk2's message
    1 as far as the initiator's static key, with our `private` key and its `public` one
    (taken as given): (that static key, ck, h), the state `noise.consume_initiation_static`
    leaves, or None where it raises: DH(private, the ephemeral) is all zeros, or the
    static's tag does not verify. The reference the native `screen` is held to."""
    if len(private) != 32 or len(public) != 32:
        raise ValueError("keys are 32 bytes")
    if any(len(m) != _INITIATION_LEN for m in messages):
        raise ValueError("an initiation is 148 bytes")
    key = PrivateKey(private)
    key.learn_public(public)
    return [_screen_one(key, public, bytes(m)) for m in messages]


def _screen_one(key: PrivateKey, public: bytes, message: bytes) -> Screened:
    sym = noise.SymmetricState(public)
    try:
        initiator = noise.consume_initiation_static(
            sym, key, message[_EPHEMERAL], message[_SEALED_STATIC]
        )
    except (InvalidTag, ValueError):
        return None
    return initiator, sym.ck, sym.h


class Backend:
    """Where the per-packet work runs: `native` (the extension module) or pure Python.
    Every caller gets its sessions, sealers, open and offloads from here.

    `lock` makes the locks of the pure path's sealers; pass `threading.Lock` wherever
    more than one thread may seal (io/datapath.py `backend()` does)."""

    def __init__(
        self,
        native: ModuleType | None = None,
        lock: LockFactory = nullcontext,
        threads: int = 1,
        *,
        spare_only: bool = True,
    ) -> None:
        self.native = native
        # a batch wakes only as many workers as the CPUs had to spare lately (the native
        # `set_spread`): on cores that are all busy a wake-up costs more than it brings
        self.spare_only = spare_only
        self.name = "native" if native is not None else "python"
        self.threads = threads if native is not None else 1  # that seal and open
        self._lock = lock
        self.open_batch: Callable[..., Opened] = native.open_batch if native else open_batch
        self.segments: Callable[[SuperPacket], list[bytes]] = (
            native.segments if native else segments
        )
        self.route: Callable[..., tuple[list[tuple[Any, list[Item]]], list[Item]]] = (
            native.route if native else route
        )
        # the native `route` looks up in a Routes, which the allowed IPs keep a mirror of
        self.routes: Callable[[], Any] | None = native.Routes if native else None
        # The handshakes' X25519 in batches, on the crypto threads. None on the pure path
        # and on one thread, where the device works each out where it is needed through
        # `cryptography`: its OpenSSL (4.0 in its wheel) is ~10% quicker at X25519 than
        # the system's libcrypto (3.0) that the extension links, so C pays only where
        # the exchanges can run side by side.
        self.x25519: X25519Batch | None = native.x25519 if native and self.threads > 1 else None
        # Initiations screened in batches up to their static key (device.py `_work_off`):
        # a stranger's is dropped with no Noise arithmetic in Python, a peer's goes on
        # from the state the screen reached. Where the threads share the work only: on
        # one thread the system libcrypto's slower X25519 costs what the screen saves
        # (bench/core.py --junk: 47-49 us of the loop's thread a junk initiation either
        # way; a peer's handshake ~5% dearer with it).
        self.screen: Screen | None = native.screen if native and self.threads > 1 else None

    def start_workers(self) -> None:
        """Start the native crypto workers (`threads` - 1 of them; none on the pure path)."""
        if self.native is not None:
            self.native.set_threads(self.threads - 1)
            self.native.set_spread(self.spare_only)

    def sealer(self, key: bytes, receiver_index: int) -> SealerLike:
        if self.native is not None:
            sealer: SealerLike = self.native.Sealer(key, receiver_index)
            return sealer
        return Sealer(key, receiver_index, lock=self._lock())

    def session(self, key: bytes, expires: float) -> Any:
        """A receiving session (this backend's `Session`)."""
        return (self.native.Session if self.native is not None else Session)(key, expires)
