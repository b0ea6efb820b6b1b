"""The WireGuard device: peers, cryptokey routing, handshakes, sessions and timers.

Sans-I/O and batch-shaped: `receive` takes datagrams that arrived, `send` takes IP
packets read from the TUN, `tick` runs the timers; each returns an `Output` holding the
IP packets to deliver and the datagrams to send. Time (`now`, monotonic seconds) and
randomness (`rand(n) -> n bytes`) come from the caller.

Everything a packet can do to state happens only after it authenticated: bad sizes,
types, indices, macs, tags, counters and timestamps are dropped without a word.
"""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Callable, Iterable

from wgpy.core import noise
from wgpy.core.allowedips import AllowedIPs
from wgpy.core.constants import (
    DEFAULT_MTU,
    INITIATION_MIN_INTERVAL,
    KEEPALIVE_TIMEOUT,
    MAX_HANDSHAKE_ATTEMPTS,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MS,
    ZERO_KEYS_AFTER,
)
from wgpy.core.cookie import CookieChecker
from wgpy.core.crypto import InvalidTag, PrivateKey, dh, is_zero, tai64n
from wgpy.core.messages import (
    DATA_HEADER,
    DATA_MIN_LEN,
    INITIATION,
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE,
    message_type,
    parse_cookie_reply,
    parse_initiation,
    parse_response,
)
from wgpy.core.peer import Endpoint, HandshakeState, Keypair, Peer
from wgpy.core.timers import Timer

_NO_MAC = bytes(16)  # mac1/mac2 placeholders, filled in by add_macs
_NOT_DATA = (0, 0, 0)  # (type, index, counter) of anything too short to be data
_NONCE = struct.Struct("<4xQ")  # ChaCha20-Poly1305 nonce: 4 zero bytes, LE counter
# This many handshake messages within one window put the device under load for a second
# (wireguard-go: its handshake queue an eighth full). Counted across calls, since the
# datapath hands over one GRO read at a time and handshakes from many sources never merge.
UNDER_LOAD_HANDSHAKES = 64
UNDER_LOAD_WINDOW = 0.125
UNDER_LOAD_HOLD = 1.0


class _Received:
    """What one batch brought for one session: the last source, bytes, and any data."""

    __slots__ = ("data", "nbytes", "src")

    def __init__(self) -> None:
        self.src: Endpoint = ("", 0)
        self.nbytes = 0
        self.data = False


class Output:
    """What a call produced: IP packets for the TUN, datagrams for the UDP socket."""

    __slots__ = ("tun", "udp")

    def __init__(self) -> None:
        self.tun: list[bytes] = []
        self.udp: list[tuple[bytes, Endpoint]] = []

    def extend(self, other: Output) -> None:
        self.tun += other.tun
        self.udp += other.udp


def padded_length(length: int, mtu: int) -> int:
    """Plaintext length after padding to 16 bytes, never past the MTU (wireguard-go rule)."""
    last = length % mtu if length > mtu and mtu else length
    padded = (last + 15) & ~15
    if mtu and padded > mtu:
        padded = mtu
    return length + padded - last


def inner_destination(packet: bytes | memoryview) -> bytes | None:
    n = len(packet)
    if n >= 20 and packet[0] >> 4 == 4:
        return bytes(packet[16:20])
    if n >= 40 and packet[0] >> 4 == 6:
        return bytes(packet[24:40])
    return None


class Device:
    def __init__(self, rand: Callable[[int], bytes], wall_offset: float = 0.0) -> None:
        self.rand = rand
        self._timer_rng = random.Random(rand(16))
        self.wall_offset = wall_offset  # wall-clock time = now + wall_offset
        self.private_key: bytes | None = None
        self._static: PrivateKey | None = None  # the same key, loaded for X25519
        self.public_key: bytes | None = None
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self.mtu = DEFAULT_MTU
        self.cookie_checker = CookieChecker(rand)
        self.under_load = False  # set by the caller, or by a flood of handshakes
        self._load_until = float("-inf")
        self._handshakes_seen = 0  # handshake messages since _window_start
        self._window_start = float("-inf")
        self._handshakes: dict[int, Peer] = {}  # our handshake index -> peer
        self._keypairs: dict[int, Keypair] = {}  # our session index -> keypair

    # ---- configuration -------------------------------------------------------------

    def set_private_key(self, key: bytes | None) -> None:
        if key is not None and is_zero(key):
            key = None
        if key == self.private_key:
            return
        self.private_key = key
        self._static = PrivateKey(key) if key else None
        self.public_key = self._static.public if self._static else None
        self.cookie_checker.set_public_key(self.public_key)
        if self.public_key in self.peers:
            self.remove_peer(self.public_key)
        for peer in self.peers.values():
            self._precompute(peer)
            self._expire_sessions(peer)

    def add_peer(self, public_key: bytes) -> Peer | None:
        """The peer with that key, created if new; None for our own key (ignored)."""
        if public_key == self.public_key:
            return None
        peer = self.peers.get(public_key)
        if peer is None:
            peer = self.peers[public_key] = Peer(public_key, self._jitter)
            self._precompute(peer)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is not None:
            self.allowed_ips.remove_value(peer)
            self._zero_keys(peer)
            peer.timers.clear()

    def set_persistent_keepalive(self, peer: Peer, interval: int, now: float) -> Output:
        """Switching it on sends a keepalive at once, as wireguard-go does."""
        out = Output()
        was, peer.persistent_keepalive = peer.persistent_keepalive, interval
        if interval and not was:
            self._send_keepalive(peer, now, out)
        return out

    def _precompute(self, peer: Peer) -> None:
        peer.static_static = None
        if self._static:
            # A low-order public key raises: such a peer can never complete a handshake.
            with contextlib.suppress(ValueError):
                peer.static_static = dh(self._static, peer.public_key)

    def _expire_sessions(self, peer: Peer) -> None:
        """After a key change: no more sending on old sessions, no half-done handshake."""
        self._clear_handshake(peer)
        for kp in (peer.current, peer.next):
            if kp is not None:
                kp.send_counter = REJECT_AFTER_MESSAGES

    # ---- the datapath --------------------------------------------------------------

    def receive(
        self, datagrams: Iterable[tuple[bytes | memoryview, Endpoint]], now: float
    ) -> Output:
        """Handle a batch of datagrams. Data messages take the fast path below: per packet
        only what must be (decrypt, replay check, source filter); the per-peer bookkeeping
        (endpoint, counters, timers) is done once per session per batch, since every
        packet of a batch arrives at the same `now`."""
        out = Output()
        handshakes = 0
        keypairs = self._keypairs
        tun = out.tun
        batch: dict[Keypair, _Received] = {}
        owners: dict[bytes, Peer | None] = {}  # inner source address -> owner, this batch
        lookup = self.allowed_ips.lookup
        unpack = DATA_HEADER.unpack_from
        for data, src in datagrams:
            # the type is a little-endian u32: 4 means "data" with the three reserved zeros
            kind, index, counter = unpack(data) if len(data) >= DATA_MIN_LEN else _NOT_DATA
            if kind != MSG_DATA:
                handshakes += self._receive_handshake(bytes(data), src, now, out)
                continue
            kp = keypairs.get(index)
            if (
                kp is None
                or counter >= REJECT_AFTER_MESSAGES
                or now - kp.created >= REJECT_AFTER_TIME
            ):
                continue
            try:
                plain = kp.recv.decrypt(_NONCE.pack(counter), memoryview(data)[16:], None)
            except InvalidTag:
                continue
            if not kp.replay.accept(counter):
                continue
            got = batch.get(kp)
            if got is None:
                got = batch[kp] = _Received()
            got.src = src
            got.nbytes += len(data)
            if not plain:
                continue  # a keepalive
            got.data = True
            # the inner source address and true length, for the allowed-IPs source filter
            n = len(plain)
            version = plain[0] >> 4
            if version == 4 and n >= 20:
                addr, length = plain[12:16], (plain[2] << 8) | plain[3]
                if length < 20:
                    continue
            elif version == 6 and n >= 40:
                addr, length = plain[8:24], 40 + ((plain[4] << 8) | plain[5])
            else:
                continue
            if length > n:
                continue
            try:
                owner = owners[addr]
            except KeyError:
                owner = owners[addr] = lookup(addr)
            if owner is kp.peer:
                tun.append(plain if length == n else plain[:length])
        for kp, got in batch.items():
            self._account_received(kp, got, now, out)
        if handshakes:
            self._count_handshakes(handshakes, now)
        return out

    def _receive_handshake(self, data: bytes, src: Endpoint, now: float, out: Output) -> int:
        kind = message_type(data)
        if kind == MSG_INITIATION:
            self._receive_initiation(data, src, now, out)
        elif kind == MSG_RESPONSE:
            self._receive_response(data, src, now, out)
        elif kind == MSG_COOKIE_REPLY:
            self._receive_cookie_reply(data, now)
        else:
            return 0
        return 1

    def send(self, packets: Iterable[bytes], now: float) -> Output:
        out = Output()
        touched: dict[Peer, None] = {}
        lookup = self.allowed_ips.lookup
        routes: dict[bytes, Peer | None] = {}  # destination -> peer, for this batch
        for packet in packets:
            dst = inner_destination(packet)
            if dst is None:
                continue
            try:
                peer = routes[dst]
            except KeyError:
                peer = routes[dst] = lookup(dst)
            if peer is not None:
                peer.staged.append(packet)
                touched[peer] = None
        for peer in touched:
            self._send_staged(peer, now, out)
        return out

    def tick(self, now: float) -> Output:
        out = Output()
        for peer in list(self.peers.values()):
            if not peer.timers.deadlines:
                continue
            for timer in peer.timers.due(now):
                self._on_timer(peer, timer, now, out)
        return out

    def next_deadline(self) -> float | None:
        return min(
            (d for p in self.peers.values() if (d := p.timers.next_deadline()) is not None),
            default=None,
        )

    def _count_handshakes(self, n: int, now: float) -> None:
        if now - self._window_start > UNDER_LOAD_WINDOW:
            self._window_start, self._handshakes_seen = now, 0
        self._handshakes_seen += n
        if self._handshakes_seen >= UNDER_LOAD_HANDSHAKES:
            self._load_until = now + UNDER_LOAD_HOLD

    def is_under_load(self, now: float) -> bool:
        return self.under_load or now < self._load_until

    # ---- data messages -------------------------------------------------------------

    def _account_received(self, kp: Keypair, got: _Received, now: float, out: Output) -> None:
        """What authenticated data messages of one session do to their peer."""
        peer = kp.peer
        peer.endpoint = got.src  # roaming: only authenticated packets move the endpoint
        peer.rx_bytes += got.nbytes
        if kp is peer.next:
            self._confirm_next(peer, now, out)
        self._keep_key_fresh_receiving(peer, now, out)
        peer.timers.authenticated_traversal(now, peer.persistent_keepalive)
        peer.timers.authenticated_received()
        if got.data:
            peer.timers.data_received(now)

    def _send_staged(self, peer: Peer, now: float, out: Output) -> None:
        kp = peer.current
        if kp is None or not kp.can_send(now):
            self._initiate(peer, now, False, out)
            return
        endpoint = peer.endpoint
        if endpoint is None:
            peer.staged.clear()
            return
        staged = peer.staged
        if kp.send_counter + len(staged) > REJECT_AFTER_MESSAGES:
            self._initiate(peer, now, False, out)  # the session's counter is spent
            return
        nbytes, sent_data = self._seal_all(kp, staged, self.mtu, endpoint, out.udp)
        staged.clear()
        peer.tx_bytes += nbytes
        peer.timers.authenticated_traversal(now, peer.persistent_keepalive)
        peer.timers.authenticated_sent()
        if sent_data:
            peer.timers.data_sent(now)
        if kp.send_counter > REKEY_AFTER_MESSAGES or (
            kp.initiator and now - kp.created > REKEY_AFTER_TIME
        ):
            self._initiate(peer, now, False, out)

    @staticmethod
    def _seal_all(
        kp: Keypair,
        packets: Iterable[bytes],
        mtu: int,
        endpoint: Endpoint,
        udp: list[tuple[bytes, Endpoint]],
    ) -> tuple[int, bool]:
        """Encrypt `packets` into data messages appended to `udp`: (bytes, any data?).
        The hot loop of sending: one AEAD call per packet and nothing else it can avoid."""
        seal = kp.send.encrypt
        index = kp.remote_index
        counter = kp.send_counter
        nbytes, sent_data = 0, False
        for packet in packets:
            length = len(packet)
            pad = -length % 16
            if length + pad > mtu:
                pad = padded_length(length, mtu) - length
            header = DATA_HEADER.pack(MSG_DATA, index, counter)
            plain = packet + bytes(pad) if pad else packet
            datagram = header + seal(_NONCE.pack(counter), plain, None)
            counter += 1
            udp.append((datagram, endpoint))
            nbytes += len(datagram)
            sent_data = sent_data or length > 0
        kp.send_counter = counter
        return nbytes, sent_data

    @classmethod
    def _seal(cls, kp: Keypair, packet: bytes, mtu: int) -> bytes:
        """One data message (for tests that forge traffic on a given session)."""
        udp: list[tuple[bytes, Endpoint]] = []
        cls._seal_all(kp, [packet], mtu, ("", 0), udp)
        return udp[0][0]

    def _send_keepalive(self, peer: Peer, now: float, out: Output) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now, out)

    def _keep_key_fresh_receiving(self, peer: Peer, now: float, out: Output) -> None:
        kp = peer.current
        if (
            kp is not None
            and kp.initiator
            and not peer.timers.sent_last_minute_handshake
            and now - kp.created > REKEY_ON_RECEIVE_AGE
        ):
            peer.timers.sent_last_minute_handshake = True
            self._initiate(peer, now, False, out)

    # ---- handshake messages --------------------------------------------------------

    def _initiate(self, peer: Peer, now: float, retry: bool, out: Output) -> None:
        if not retry:
            peer.timers.handshake_attempts = 0
        hs = peer.handshake
        if now - hs.last_sent_initiation < REKEY_TIMEOUT:
            return
        if self._static is None or peer.static_static is None:
            return
        hs.last_sent_initiation = now
        self._clear_handshake(peer)
        sym = noise.SymmetricState(peer.public_key)
        e_priv = PrivateKey(self.rand(32))
        e_pub, enc_static, enc_time = noise.create_initiation(
            sym,
            self._static,
            peer.public_key,
            peer.static_static,
            e_priv,
            tai64n(now + self.wall_offset),
        )
        index = self._new_index()
        self._handshakes[index] = peer
        hs.state, hs.sym, hs.e_priv, hs.local_index = (
            HandshakeState.INITIATION_SENT,
            sym,
            e_priv,
            index,
        )
        msg = bytearray(
            INITIATION.pack(
                MSG_INITIATION,
                index,
                e_pub,
                enc_static,
                enc_time,
                _NO_MAC,
                _NO_MAC,
            )
        )
        peer.cookies.add_macs(msg, now)
        peer.timers.authenticated_traversal(now, peer.persistent_keepalive)
        self._emit(peer, bytes(msg), out)
        peer.timers.handshake_initiated(now)

    def _emit(self, peer: Peer, datagram: bytes, out: Output) -> None:
        if peer.endpoint is not None:
            out.udp.append((datagram, peer.endpoint))
            peer.tx_bytes += len(datagram)

    def _check_macs(self, data: bytes, sender: int, src: Endpoint, now: float, out: Output) -> bool:
        """mac1 always; under load, mac2 too, answering a missing one with a cookie."""
        if not self.cookie_checker.check_mac1(data):
            return False
        if self.is_under_load(now) and not self.cookie_checker.check_mac2(data, src, now):
            out.udp.append((self.cookie_checker.make_reply(data, sender, src, now), src))
            return False
        return True

    def _receive_initiation(self, data: bytes, src: Endpoint, now: float, out: Output) -> None:
        msg = parse_initiation(data)
        if self._static is None or not self._check_macs(data, msg.sender, src, now, out):
            return
        sym = noise.SymmetricState(self.public_key or b"")
        try:
            initiator = noise.consume_initiation_static(
                sym, self._static, msg.ephemeral, msg.static
            )
            peer = self.peers.get(initiator)
            if peer is None or peer.static_static is None:
                return
            timestamp = noise.consume_initiation_payload(sym, peer.static_static, msg.timestamp)
        except (InvalidTag, ValueError):
            return
        hs = peer.handshake
        if timestamp <= hs.latest_timestamp:
            return  # a replay, or an older initiation
        if now - hs.last_initiation_consumed < INITIATION_MIN_INTERVAL:
            return  # flood
        hs.latest_timestamp, hs.last_initiation_consumed = timestamp, now
        self._clear_handshake(peer)
        peer.endpoint = src
        peer.rx_bytes += len(data)
        peer.timers.authenticated_traversal(now, peer.persistent_keepalive)
        peer.timers.authenticated_received()
        self._respond(peer, sym, msg.ephemeral, msg.sender, now, out)

    def _respond(
        self,
        peer: Peer,
        sym: noise.SymmetricState,
        remote_e: bytes,
        remote_index: int,
        now: float,
        out: Output,
    ) -> None:
        e_priv = PrivateKey(self.rand(32))
        try:
            e_pub, enc_empty = noise.create_response(
                sym, e_priv, remote_e, peer.public_key, peer.preshared_key
            )
        except ValueError:
            return  # a low-order ephemeral from the initiator
        index = self._new_index()
        msg = bytearray(
            RESPONSE.pack(
                MSG_RESPONSE,
                index,
                remote_index,
                e_pub,
                enc_empty,
                _NO_MAC,
                _NO_MAC,
            )
        )
        peer.cookies.add_macs(msg, now)
        kp = Keypair(peer, sym.split(initiator=False), False, index, remote_index, now)
        self._keypairs[index] = kp
        self._drop_keypair(peer.next)
        self._drop_keypair(peer.previous)
        peer.next, peer.previous = kp, None
        peer.timers.session_derived(now)
        peer.timers.authenticated_traversal(now, peer.persistent_keepalive)
        peer.timers.authenticated_sent()
        self._emit(peer, bytes(msg), out)

    def _receive_response(self, data: bytes, src: Endpoint, now: float, out: Output) -> None:
        msg = parse_response(data)
        peer = self._handshakes.get(msg.receiver)
        if peer is None or self._static is None:
            return
        hs = peer.handshake
        if hs.state is not HandshakeState.INITIATION_SENT or hs.sym is None or hs.e_priv is None:
            return
        if not self._check_macs(data, msg.sender, src, now, out):
            return
        sym = hs.sym.copy()
        try:
            noise.consume_response(
                sym, hs.e_priv, self._static, msg.ephemeral, peer.preshared_key, msg.empty
            )
        except (InvalidTag, ValueError):
            return
        index = msg.receiver
        self._clear_handshake(peer)
        kp = Keypair(peer, sym.split(initiator=True), True, index, msg.sender, now)
        self._keypairs[index] = kp
        self._drop_keypair(peer.previous)
        if peer.next is not None:
            peer.previous, peer.next = peer.next, None
            self._drop_keypair(peer.current)
        else:
            peer.previous = peer.current
        peer.current = kp
        peer.endpoint = src
        peer.rx_bytes += len(data)
        timers = peer.timers
        timers.authenticated_traversal(now, peer.persistent_keepalive)
        timers.authenticated_received()
        timers.session_derived(now)
        timers.handshake_complete()
        peer.last_handshake = now + self.wall_offset
        self._send_keepalive(peer, now, out)  # confirms the session to the responder

    def _confirm_next(self, peer: Peer, now: float, out: Output) -> None:
        """The initiator used the session we offered: it becomes current."""
        self._drop_keypair(peer.previous)
        peer.previous, peer.current, peer.next = peer.current, peer.next, None
        peer.timers.handshake_complete()
        peer.last_handshake = now + self.wall_offset
        if peer.staged:
            self._send_staged(peer, now, out)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        msg = parse_cookie_reply(data)
        peer = self._handshakes.get(msg.receiver)
        if peer is None:
            kp = self._keypairs.get(msg.receiver)
            peer = kp.peer if kp is not None else None
        if peer is not None:
            peer.cookies.consume_reply(msg, now)

    # ---- timers --------------------------------------------------------------------

    def _jitter(self) -> float:
        # Timer jitter needs no secrecy (wireguard-go uses a fast PRNG too): a generator
        # seeded once from `rand` spares a getrandom() per batch of sent packets.
        return self._timer_rng.randrange(REKEY_TIMEOUT_JITTER_MS) / 1000

    def _on_timer(self, peer: Peer, timer: Timer, now: float, out: Output) -> None:
        timers = peer.timers
        if timer is Timer.RETRANSMIT_HANDSHAKE:
            if timers.handshake_attempts > MAX_HANDSHAKE_ATTEMPTS:
                # Give up: forget queued packets, keys go in 3 x REJECT_AFTER_TIME.
                timers.stop(Timer.SEND_KEEPALIVE)
                peer.staged.clear()
                if not timers.pending(Timer.ZERO_KEYS):
                    timers.deadlines[Timer.ZERO_KEYS] = now + ZERO_KEYS_AFTER
                return
            timers.handshake_attempts += 1
            self._initiate(peer, now, True, out)
        elif timer is Timer.SEND_KEEPALIVE:
            self._send_keepalive(peer, now, out)
            if timers.need_another_keepalive:
                timers.need_another_keepalive = False
                timers.deadlines[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
        elif timer is Timer.NEW_HANDSHAKE:
            self._initiate(peer, now, False, out)
        elif timer is Timer.ZERO_KEYS:
            self._zero_keys(peer)
        elif timer is Timer.PERSISTENT_KEEPALIVE and peer.persistent_keepalive:
            self._send_keepalive(peer, now, out)

    # ---- indices and key material --------------------------------------------------

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self.rand(4), "little")
            if index not in self._handshakes and index not in self._keypairs:
                return index

    def _clear_handshake(self, peer: Peer) -> None:
        hs = peer.handshake
        if hs.local_index is not None:
            self._handshakes.pop(hs.local_index, None)
            hs.local_index = None
        hs.clear()

    def _drop_keypair(self, kp: Keypair | None) -> None:
        if kp is not None:
            self._keypairs.pop(kp.local_index, None)

    def _zero_keys(self, peer: Peer) -> None:
        """Forget every session and the handshake (Python cannot wipe the bytes themselves;
        dropping the last reference is what it can do)."""
        for kp in peer.keypairs():
            self._drop_keypair(kp)
        peer.current = peer.previous = peer.next = None
        self._clear_handshake(peer)
