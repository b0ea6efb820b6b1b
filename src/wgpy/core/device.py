"""The WireGuard device: peers, cryptokey routing, sessions and timers, orchestrated.

Sans-I/O and batch-shaped: `receive` takes datagrams that arrived, `send` takes IP
packets read from the TUN, `tick` runs the timers; each returns an `Output` holding the
IP packets to deliver, the datagrams to send, what happened (events) and what was refused
(drops by reason). Time (`now`, monotonic seconds) and randomness (`rand(n) -> n bytes`)
come from the caller.

Everything a packet can do to state happens only after it authenticated. Handshake
messages go through the intake (intake.py: mac1, rate limits, cookies) into a bounded
queue and are worked off after the data messages of the same batch (see ratelimit.py), 16
at a time, their Diffie-Hellman work in one backend call per phase (`_work_off`,
exchanges.py); the messages themselves are built and checked in handshake.py, the
sessions they make are rotated in sessions.py, the indices kept in indextable.py, and
data messages sealed and opened in data.py.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType
from typing import Any

from wgpy.core import data, handshake, icmp, sessions
from wgpy.core.allowedips import AllowedIPs
from wgpy.core.backend import Backend, Item, Packet
from wgpy.core.constants import (
    DEFAULT_MTU,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MS,
)
from wgpy.core.cookie import CookieChecker
from wgpy.core.crypto import PrivateKey, dh, is_zero
from wgpy.core.endpoint import Endpoint
from wgpy.core.events import (
    CookieReceived,
    EndpointChanged,
    HandshakeCompleted,
    HandshakeGaveUp,
    HandshakeRetry,
    InitiationReceived,
    InitiationSent,
    KeepaliveSent,
    KeypairCreated,
    KeysZeroed,
    ResponseReceived,
    ResponseSent,
)
from wgpy.core.exchanges import Exchanges
from wgpy.core.indextable import IndexTable
from wgpy.core.intake import KNOWN_EARLY, Entry, HandshakeIntake
from wgpy.core.ip import SuperPacket
from wgpy.core.messages import MSG_INITIATION, parse_cookie_reply, parse_response
from wgpy.core.output import Drop, Output
from wgpy.core.peer import HandshakeState, Keypair, Peer
from wgpy.core.timers import Timer
from wgpy.core.tokenbucket import TokenBucket

__all__ = ["Device", "Output"]

HANDSHAKE_BUDGET = 64  # handshakes worked off per call, unless the caller says otherwise
HANDSHAKE_BATCH = 16  # messages whose X25519 work goes to the backend in one call
_RESP_RECEIVER, _RESP_EPHEMERAL = slice(8, 12), slice(12, 44)  # a response's
# an initiation consumed and waiting for its answer: (its Output, what it said, our index
# for the session, our ephemeral key)
_Answer = tuple[Output, handshake.ConsumedInitiation, int, PrivateKey]
# data messages sealed for a peer, not yet settled: (peer, session, bytes, any data?)
Sent = tuple[Peer, Keypair, int, bool]
Runs = list[tuple[bytes, int]]  # sealed: datagrams of `size` bytes back to back, and size


def as_reads(
    datagrams: Iterable[tuple[bytes | memoryview, Endpoint]],
) -> Iterator[tuple[bytes | memoryview, int, int, Endpoint]]:
    """Datagrams as the reads GRO would have made of them: (buf, n, seg, source), runs of
    one source with equal sizes (the last may be shorter) joined, for one open call."""
    group: list[bytes | memoryview] = []
    source: Endpoint | None = None
    for d, src in datagrams:
        if group and (src != source or len(d) > len(group[0]) or len(group[-1]) < len(group[0])):
            yield _joined(group, source)
            group = []
        group.append(d)
        source = src
    if group:
        yield _joined(group, source)


def _joined(
    group: list[bytes | memoryview], src: Endpoint | None
) -> tuple[bytes | memoryview, int, int, Endpoint]:
    assert src is not None
    read = group[0] if len(group) == 1 else b"".join(group)
    return read, len(read), len(group[0]), src


class Device:
    def __init__(
        self,
        rand: Callable[[int], bytes],
        wall_offset: float = 0.0,
        backend: Backend | None = None,
        *,
        classify: bool = False,
    ) -> None:
        """`backend`: where data messages are opened and sealed (core/backend.py), by
        default the pure-Python one for a single thread. `classify`: the handshake intake
        in C (core/intake.py; the extension must be there)."""
        self.rand = rand
        self.backend = backend or Backend()
        seed = rand(16)
        self._timer_rng = random.Random(seed)
        self.wall_offset = wall_offset  # wall-clock time = now + wall_offset
        self.private_key: bytes | None = None
        self._static: PrivateKey | None = None  # the same key, loaded for X25519
        self.public_key: bytes | None = None
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self.mtu = DEFAULT_MTU
        self.cookie_checker = CookieChecker(rand)
        self.index = IndexTable(rand)
        # mac1, rate limits and cookies before any Diffie-Hellman, and the queue after
        self.intake = HandshakeIntake(self.cookie_checker, self._receive_cookie_reply, seed,
                                      self._endpoints, classify=classify)  # fmt: skip
        # ICMP unreachable for what cannot be sent (icmp.py); None: send none
        self.icmp_limit: TokenBucket | None = TokenBucket(icmp.RATE, icmp.BURST)
        # Called with each handshake's raw ephemeral private key as it is made (the
        # daemon's --keylog, for Wireshark); None, the default: the key goes nowhere.
        self.keylog: Callable[[Peer, bytes], None] | None = None
        # the backend's batch calls (screen, x25519) that raised, their work then done on
        # this thread (core/exchanges.py): a crypto thread's OpenSSL out of memory. The
        # daemon warns the first time.
        self.crypto_fallbacks = 0
        # what `send(settle=False)` and `seal_one` sealed and has not yet done to its peers
        # (`settle`); the native seal_send (io/udp.py) appends a lone packet's here too
        self.unsettled: list[Sent] = []

    @property
    def native(self) -> ModuleType | None:
        """The extension module if the backend is the native one."""
        return self.backend.native

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
        self.intake.key_changed()
        if self.public_key in self.peers:
            self.remove_peer(self.public_key)
        for peer in self.peers.values():
            self._precompute(peer)
            sessions.expire(self.index, peer)

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
            sessions.zero_keys(self.index, peer)
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

    def _endpoints(self) -> Iterator[Endpoint | None]:
        return (peer.endpoint for peer in self.peers.values())

    # ---- the batch API -------------------------------------------------------------

    def receive(
        self,
        datagrams: Iterable[tuple[bytes | memoryview, Endpoint]],
        now: float,
        handshake_budget: int = HANDSHAKE_BUDGET,
        tag: object = None,
    ) -> Output:
        """Handle a batch of datagrams: data messages opened (data.py), the bookkeeping
        (endpoint, counters, timers) done once per session, handshake messages queued; up
        to `handshake_budget` queued ones are worked off at the end (a caller that reads
        many batches per turn passes 0 and calls `process_handshakes` once). `tag` comes
        back as the `tag` of the handshake events these datagrams cause, whenever they are
        worked off (the datapath's: the local address they came to)."""
        out = Output()
        received: dict[Keypair, data.Received] = {}
        others: list[data.Datagram] = []
        for read, n, seg, src in as_reads(datagrams):
            self._open(read, n, seg, src, now, out, received, others)
        return self._opened(received, others, now, handshake_budget, out, tag)

    def receive_read(
        self,
        buf: memoryview,
        n: int,
        seg: int,
        src: Endpoint,
        now: float,
        handshake_budget: int = HANDSHAKE_BUDGET,
        tag: object = None,
    ) -> Output:
        """One read from the UDP socket: `n` bytes in `buf` from `src`, datagrams of `seg`
        bytes if GRO merged them (see `split_read`), opened all in one call."""
        if self.intake.classifier is not None:
            return self._receive_classified(buf, n, seg, src, now, handshake_budget, tag)
        out = Output()
        received: dict[Keypair, data.Received] = {}
        others: list[data.Datagram] = []
        self._open(buf, n, seg, src, now, out, received, others)
        return self._opened(received, others, now, handshake_budget, out, tag)

    def _receive_classified(self, buf: memoryview, n: int, seg: int, src: Endpoint, now: float,
                            handshake_budget: int, tag: object) -> Output:  # fmt: skip
        """`receive_read` with the intake in C: the handshake messages of the read are
        taken (or refused) first, and the open path runs only if data messages came."""
        out = Output()
        ndata = self.intake.classify(buf, n, seg, src, now, out, tag)
        return self._classified_data(buf, n, seg, src, now, ndata, handshake_budget, out, tag)

    def receive_classified(self, buf: memoryview, n: int, seg: int, src: Endpoint, now: float,
                           passed: list[tuple[int, int]] | None, ndata: int,
                           tag: object = None) -> Output:  # fmt: skip
        """A read the C intake drained from the socket itself and found something in:
        `passed` and `ndata` as `Classifier.drain` gives them; the handshakes that passed
        are taken, the data messages opened, the sessions accounted for."""
        out = Output()
        received: dict[Keypair, data.Received] = {}
        self.open_classified(buf, n, seg, src, now, passed, ndata, tag, out, received)
        self.account(received, now, out)
        return out

    def open_classified(self, buf: memoryview, n: int, seg: int, src: Endpoint, now: float,
                        passed: list[tuple[int, int]] | None, ndata: int, tag: object,
                        out: Output, received: dict[Keypair, data.Received]) -> bool:  # fmt: skip
        """`receive_classified` but for the accounting, which the caller does once for
        all the reads of a drain (`account`: they share one `now`, as a batch does). True
        if a data message of this read authenticated (io/datapath.py learns its source)."""
        if passed:
            self.intake.take(buf, passed, src, None, now, out, tag)
        if not ndata:
            return False
        mirror = self.allowed_ips.mirror
        table = mirror if type(mirror) is self.backend.routes else self._table()
        return data.open_read(self.backend.open_batch, buf, n, seg, src, self.index,
                              table.lookup, now, out, received, [], True)  # fmt: skip

    def account(self, received: dict[Keypair, data.Received], now: float, out: Output) -> None:
        """What the opened data messages did to their peers, once per session (here, not a
        call per session: less work on a lone packet's hop, docs/design.md "Latency")."""
        for kp, got in received.items():
            out.authentic = True
            peer = kp.peer
            if peer.endpoint != got.src:  # roaming: only authenticated packets move it
                self._set_endpoint(peer, got.src, out)
            peer.rx_bytes += got.nbytes
            if kp is peer.next:
                self._confirm_next(peer, now, out)
            self._keep_key_fresh_receiving(peer, now, out)
            peer.timers.data_message_received(now, peer.persistent_keepalive, got.data)

    def _classified_data(self, buf: memoryview, n: int, seg: int, src: Endpoint, now: float,
                         ndata: int, handshake_budget: int, out: Output,
                         tag: object) -> Output:  # fmt: skip
        received: dict[Keypair, data.Received] = {}
        if ndata:
            taken: list[data.Datagram] = []  # the classifier took these already
            self._open(buf, n, seg, src, now, out, received, taken, judged=True)
        return self._opened(received, [], now, handshake_budget, out, tag)

    def _open(self, read: bytes | memoryview, n: int, seg: int, src: Endpoint, now: float,
              out: Output, received: dict[Keypair, data.Received],
              others: list[data.Datagram], judged: bool = False) -> bool:  # fmt: skip
        # the inner sources against the allowed IPs: in C where the backend keeps their mirror
        table = self._table()
        return data.open_read(self.backend.open_batch, read, n, seg, src, self.index,
                              table.lookup, now, out, received, others, judged)  # fmt: skip

    def _opened(self, received: dict[Keypair, data.Received], others: list[data.Datagram],
                now: float, handshake_budget: int, out: Output, tag: object) -> Output:  # fmt: skip
        """What a batch does once opened: sessions' bookkeeping, then handshakes queued."""
        self.account(received, now, out)
        keyed = self._static is not None
        for message, src in others:
            self.intake.offer(message, src, now, out, tag, keyed)
        if self.intake.queue and handshake_budget:
            self._process_handshakes(now, handshake_budget, out)
        return out

    def process_handshakes(self, now: float, budget: int = HANDSHAKE_BUDGET) -> Output:
        """Work off up to `budget` queued handshake messages."""
        out = Output()
        self._process_handshakes(now, budget, out)
        return out

    def send(self, packets: Sequence[Item], now: float, *, settle: bool = True) -> Output:
        """IP packets read from the TUN (and super-packets: core/ip.py), routed to their
        peers by inner destination (the backend's `route`: in C on the native one, with
        no Python per packet), and sealed, or staged until a session is up.
        `settle=False` leaves what the sealed messages do to their peers (byte counts,
        timers, a rekey they call for) to `settle`, which the caller makes once it has sent
        them: the datapath puts a lone packet on the wire first (its latency)."""
        out = Output()
        backend = self.backend
        table = self._table()
        groups, bad = backend.route(packets, table)
        if bad:
            self._refuse(Drop.BAD_INNER, bad, now, out)
        later = None if settle else self.unsettled
        for peer, group in groups:
            if peer is None:
                self._refuse(Drop.NO_ROUTE, group, now, out)
            elif peer.endpoint is None:  # Linux wg_xmit: no endpoint, no staging
                self._refuse(Drop.NO_ENDPOINT, group, now, out)
            else:
                peer.staged += group
                self._send_staged(peer, now, out, later)
        return out

    def seal_one(self, packet: Packet, now: float) -> tuple[Runs, Endpoint] | None:
        """`send(packet, now, settle=False)` where a lone packet takes the common way: a
        route to a peer with an endpoint, a session that can send, nothing staged before
        it. Its sealed runs and where they go, for the caller to send and then `settle`;
        None, with nothing changed, where the way is not that (`send` then takes it: a
        session spent in between is found spent there too). A ping's hop: about half
        the Python calls of `send` (io/datapath.py on_tun; docs/design.md, "Latency").
        The native seal_send makes these tests itself (src/native/send.c lone_way): a
        change here is one there too."""
        mirror = self.allowed_ips.mirror
        table = mirror if type(mirror) is self.backend.routes else self._table()
        groups, bad = self.backend.route((packet,), table)
        if bad:
            return None
        peer = groups[0][0]
        if peer is None or peer.staged or peer.endpoint is None:
            return None
        kp = peer.current
        if kp is None or not kp.can_send(now):
            return None
        runs = kp.sealer.seal_runs((packet,), self.mtu)
        if runs is None:
            return None
        self.unsettled.append((peer, kp, len(runs[0][0]), True))
        return runs, peer.endpoint

    def settle(self, now: float) -> Output:
        """What the messages `send(settle=False)` sealed do to their peers (a rekey
        initiation may come out)."""
        out = Output()
        unsettled, self.unsettled = self.unsettled, []  # taken first: never settled twice
        for peer, kp, nbytes, sent_data in unsettled:
            self._sent(peer, kp, nbytes, sent_data, now, out)
        return out

    def publish_routes(self) -> None:
        """Make the backend's copy of the allowed IPs now (the native one's C mirror), not
        at the first packet routed or opened: the datapath's lone ways in C (seal_send,
        open_lone) need it from the first data message, the one that confirms a session."""
        self._table()

    def _table(self) -> Any:
        """What destinations and inner sources are looked up in: the allowed IPs, or on
        the native backend the C mirror they keep of themselves, for its `route` and
        open (made at the first use: tests and benchmarks may change the backend after
        building the device). `seal_one` and `open_classified` test for the mirror
        themselves first: a call fewer on a lone packet's hop."""
        make = self.backend.routes
        if make is None:
            return self.allowed_ips
        mirror = self.allowed_ips.mirror
        if type(mirror) is not make:
            mirror = make()
            self.allowed_ips.publish(mirror)
        return mirror

    def _refuse(self, why: Drop, items: Iterable[Item], now: float, out: Output) -> None:
        """Packets that cannot go (not IP, no route, a peer without an endpoint), counted
        as packets (a super-packet as its segments); an ICMP error for each IP one."""
        for item in items:
            packet = item.packet if isinstance(item, SuperPacket) else item
            out.drops[why] += item.nsegments if isinstance(item, SuperPacket) else 1
            if why is not Drop.BAD_INNER:
                self._unreachable(packet, now, out)

    def tick(self, now: float) -> Output:
        out = Output()
        for peer in list(self.peers.values()):
            if not peer.timers.deadlines:
                continue
            for timer in peer.timers.due(now):
                self._on_timer(peer, timer, now, out)
        if self.intake.queue:
            self._process_handshakes(now, HANDSHAKE_BUDGET, out)
        self.intake.known(now, KNOWN_EARLY)  # here, not on a datagram's way in
        return out

    def is_under_load(self, now: float) -> bool:
        return self.intake.load.under_load(now)

    @property
    def queued_handshakes(self) -> int:
        return len(self.intake.queue)

    def _unreachable(self, packet: Packet, now: float, out: Output) -> None:
        """An ICMP error back into the TUN for a packet that cannot go (rate-limited)."""
        limit = self.icmp_limit
        if limit is not None and packet:
            reply = icmp.unreachable(packet)
            if reply is not None and limit.allow(now):
                out.tun.append(reply)

    # ---- data messages -------------------------------------------------------------

    def _send_staged(self, peer: Peer, now: float, out: Output,
                     later: list[Sent] | None = None) -> None:  # fmt: skip
        kp = peer.current
        if kp is None or not kp.can_send(now):
            self._wait(peer)
            self._initiate(peer, now, out)
            return
        endpoint = peer.endpoint
        staged = peer.staged
        if endpoint is None:
            self._refuse(Drop.NO_ENDPOINT, staged, now, out)
            staged.clear()
            return
        sent = data.seal(kp, staged, self.mtu, endpoint, out.udp)
        if sent is None:
            self._wait(peer)
            self._initiate(peer, now, out)  # the session's counter is spent
            return
        staged.clear()
        if later is None:
            self._sent(peer, kp, *sent, now, out)
        else:
            later.append((peer, kp, *sent))

    def _sent(self, peer: Peer, kp: Keypair, nbytes: int, sent_data: bool, now: float,
              out: Output) -> None:  # fmt: skip
        """What data messages sealed in session `kp` do to their peer."""
        peer.tx_bytes += nbytes
        peer.timers.data_message_sent(now, peer.persistent_keepalive, sent_data)
        if kp.sealer.counter > REKEY_AFTER_MESSAGES or (  # (not send_counter: a call)
            kp.initiator and now - kp.created > REKEY_AFTER_TIME
        ):
            self._initiate(peer, now, out)

    def _wait(self, peer: Peer) -> None:
        """Staged packets wait for a session as packets: a super-packet is cut now, so that
        the staged queue holds (and drops beyond) MAX_STAGED_PACKETS packets, as Linux's."""
        staged = peer.staged
        if SuperPacket in map(type, staged):
            items = list(staged)
            staged.clear()
            cut = self.backend.segments
            for item in items:
                if isinstance(item, SuperPacket):
                    staged += cut(item)
                else:
                    staged.append(item)

    def _send_keepalive(self, peer: Peer, now: float, out: Output) -> None:
        if not peer.staged:
            kp = peer.current
            if kp is not None and kp.can_send(now) and peer.endpoint is not None:
                out.events.append(KeepaliveSent(peer))
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
            self._initiate(peer, now, out)

    def _set_endpoint(self, peer: Peer, src: Endpoint, out: Output) -> None:
        if peer.endpoint != src:
            peer.endpoint = src
            out.events.append(EndpointChanged(peer, src))

    # ---- handshake messages --------------------------------------------------------

    def _process_handshakes(self, now: float, budget: int, out: Output) -> None:
        """Work off up to `budget` queued messages, HANDSHAKE_BATCH at a time. A message
        admitted without a cookie while the device was not under load, and worked off
        once it is, gets a cookie reply instead of the Diffie-Hellman work (Linux and
        wireguard-go check load when they work a message off, too)."""
        queue = self.intake.queue
        under_load = self.intake.load.under_load(now)
        budget = min(budget, len(queue))
        while budget > 0:
            n = min(budget, HANDSHAKE_BATCH)
            self._work_off([queue.popleft() for _ in range(n)], under_load, now, out)
            budget -= n

    def _work_off(self, entries: list[Entry], under_load: bool, now: float, out: Output) -> None:
        """A batch of queued messages, in phases so that the X25519 work of the whole
        batch goes to the backend at once (exchanges.py; on the crypto threads with the
        native one): (1) the exchanges the messages need before anything is known about
        them; (2) each message, in queue order, as far as it goes without more (a
        response to the end, an initiation up to its answer's ephemeral key); (3) the
        answers' exchanges; (4) the answers, in order. Each message writes into its own
        `Output`, joined in queue order: events, datagrams and drops come out as if the
        messages had been worked off one by one (what a later message reads of the
        state, an earlier one has already written in phase 2: the peer's replay and
        flood state, its half-done handshake)."""
        ex = Exchanges(self.backend.x25519, self.backend.screen)
        self._want_first(entries, under_load, ex)
        ex.run()
        outs = [out] if len(entries) == 1 else [Output() for _ in entries]
        answers: list[_Answer] = []
        taken: set[int] = set()
        for (message, src, kind, cookie, tag), item in zip(entries, outs, strict=True):
            if under_load and not cookie:
                self.intake.send_cookie(message, src, now, item)
            elif kind == MSG_INITIATION:
                answer = self._receive_initiation(message, src, now, item, tag, ex, taken)
                if answer is not None:
                    answers.append(answer)
                    taken.add(answer[2])
                    ex.want(answer[3], answer[1].ephemeral)
                    ex.want(answer[3], answer[1].peer.public_key)
            else:
                self._receive_response(message, src, now, item, tag, ex)
        ex.run()
        for answer in answers:
            self._answer(*answer, now, ex)
        self.crypto_fallbacks += ex.failed
        if len(entries) > 1:
            for item in outs:
                out.extend(item)

    def _want_first(self, entries: list[Entry], under_load: bool, ex: Exchanges) -> None:
        """Phase 1: every initiation screened up to its static key (with DH(our static,
        its ephemeral)) or that DH alone; of every response to a pending initiation of
        ours, its two exchanges."""
        static = self._static
        if static is None or (self.backend.x25519 is None and self.backend.screen is None):
            return  # the pure path works each exchange out where it is needed
        for message, _, kind, cookie, _ in entries:
            if under_load and not cookie:
                continue
            if kind == MSG_INITIATION:
                ex.want_initiation(static, message)
                continue
            receiver = int.from_bytes(message[_RESP_RECEIVER], "little")
            peer = self.index.handshakes.get(receiver)
            hs = peer.handshake if peer is not None else None
            if hs is not None and hs.state is HandshakeState.INITIATION_SENT and hs.e_priv:
                ephemeral = message[_RESP_EPHEMERAL]
                ex.want(hs.e_priv, ephemeral)
                ex.want(static, ephemeral)

    def _initiate(self, peer: Peer, now: float, out: Output, *, retry: bool = False) -> None:
        if not retry:
            peer.timers.handshake_attempts = 0
        hs = peer.handshake
        if now - hs.last_sent_handshake < REKEY_TIMEOUT:
            return
        if self._static is None or peer.static_static is None:
            return
        hs.last_sent_handshake = now
        msg = sessions.initiate(self._static, peer, self.index, self._ephemeral,
                                now + self.wall_offset, now)  # fmt: skip
        peer.timers.authenticated_traversal(now, peer.persistent_keepalive)
        peer.timers.handshake_sent()
        out.events.append(InitiationSent(peer, peer.timers.handshake_attempts))
        self._emit(peer, msg, out)
        peer.timers.handshake_initiated(now)

    def _ephemeral(self, peer: Peer) -> PrivateKey:
        raw = self.rand(32)
        if self.keylog is not None:
            self.keylog(peer, raw)
        return PrivateKey(raw)

    def _emit(self, peer: Peer, datagram: bytes, out: Output) -> None:
        if peer.endpoint is not None:
            out.udp.append((datagram, peer.endpoint))
            peer.tx_bytes += len(datagram)

    def _receive_initiation(
        self, data: bytes, src: Endpoint, now: float, out: Output, tag: object,
        ex: Exchanges, taken: set[int],
    ) -> _Answer | None:  # fmt: skip
        """An initiation up to the arithmetic of its answer (`_answer` does the rest). One
        the backend screened goes on from where it got (a stranger's or a forgery is
        refused with no Noise arithmetic in Python)."""
        if self._static is None or self.public_key is None:
            out.drops[Drop.NO_PRIVATE_KEY] += 1
            return None
        if data in ex.screened:
            init = handshake.consume_screened(data, ex.screened[data], self.peers, now)
        else:
            init = handshake.consume_initiation(self._static, self.public_key, data,
                                                self.peers, now, ex.dh)  # fmt: skip
        if isinstance(init, Drop):
            out.drops[init] += 1
            return None
        peer = init.peer
        out.events.append(InitiationReceived(peer, tag))
        self._set_endpoint(peer, src, out)
        peer.rx_bytes += len(data)
        peer.timers.authenticated_traversal(now, peer.persistent_keepalive)
        peer.timers.authenticated_received()
        local, e_priv = sessions.prepare_response(init, self.index, self._ephemeral, taken)
        return out, init, local, e_priv

    def _answer(self, out: Output, init: handshake.ConsumedInitiation, local: int,
                e_priv: PrivateKey, now: float, ex: Exchanges) -> None:  # fmt: skip
        peer = init.peer
        made = sessions.finish_response(init, local, e_priv, self.index, self.backend, now,
                                        ex.dh)  # fmt: skip
        if made is None:
            out.drops[Drop.BAD_HANDSHAKE] += 1  # a low-order ephemeral from the initiator
            return
        msg, kp = made
        # A response counts as a handshake sent: no crossing initiation of our own for
        # REKEY_TIMEOUT (wireguard-go SendHandshakeResponse sets lastSentHandshake).
        peer.handshake.last_sent_handshake = now
        peer.timers.session_derived(now)
        peer.timers.authenticated_traversal(now, peer.persistent_keepalive)
        peer.timers.handshake_sent()
        out.events.append(KeypairCreated(peer, kp.local_index))
        out.events.append(ResponseSent(peer))
        self._emit(peer, msg, out)

    def _receive_response(
        self, data: bytes, src: Endpoint, now: float, out: Output, tag: object, ex: Exchanges
    ) -> None:
        msg = parse_response(data)
        peer = self.index.handshakes.get(msg.receiver)
        if peer is None:
            out.drops[Drop.UNKNOWN_INDEX] += 1
            return
        if self._static is None:
            out.drops[Drop.NO_PRIVATE_KEY] += 1
            return
        kp = sessions.complete(self._static, peer, msg, self.index, self.backend, now, ex.dh)
        if isinstance(kp, Drop):
            out.drops[kp] += 1
            return
        out.events.append(ResponseReceived(peer, tag))
        out.events.append(KeypairCreated(peer, kp.local_index))
        self._set_endpoint(peer, src, out)
        peer.rx_bytes += len(data)
        timers = peer.timers
        timers.authenticated_traversal(now, peer.persistent_keepalive)
        timers.authenticated_received()
        timers.session_derived(now)
        self._handshake_complete(peer, now, out)
        self._send_keepalive(peer, now, out)  # confirms the session to the responder

    def _confirm_next(self, peer: Peer, now: float, out: Output) -> None:
        """The initiator used the session we offered: it becomes current."""
        sessions.confirm_next(self.index, peer)
        self._handshake_complete(peer, now, out)
        if peer.staged:
            self._send_staged(peer, now, out)

    def _handshake_complete(self, peer: Peer, now: float, out: Output) -> None:
        peer.timers.handshake_complete()
        peer.last_handshake = now + self.wall_offset
        out.events.append(HandshakeCompleted(peer))

    def _receive_cookie_reply(self, data: bytes, now: float, out: Output) -> None:
        msg = parse_cookie_reply(data)
        peer = self.index.peer_of(msg.receiver)
        if peer is None:
            out.drops[Drop.UNKNOWN_INDEX] += 1
        elif not peer.cookies.consume_reply(msg, now):
            out.drops[Drop.BAD_HANDSHAKE] += 1
        else:
            out.events.append(CookieReceived(peer))

    # ---- timers --------------------------------------------------------------------

    def _jitter(self) -> float:
        # Timer jitter needs no secrecy (wireguard-go uses a fast PRNG too): a generator
        # seeded once from `rand` spares a getrandom() per batch of sent packets.
        # random() is one C call; randrange() two Python frames, on every packet sent
        return int(self._timer_rng.random() * REKEY_TIMEOUT_JITTER_MS) / 1000

    def _on_timer(self, peer: Peer, timer: Timer, now: float, out: Output) -> None:
        timers = peer.timers
        if timer is Timer.RETRANSMIT_HANDSHAKE:
            if timers.expired_retransmit_handshake(now):
                out.events.append(HandshakeRetry(peer, "no response"))
                self._initiate(peer, now, out, retry=True)
            else:  # given up: queued packets go now, keys in 3 x REJECT_AFTER_TIME
                peer.staged.clear()
                out.events.append(HandshakeGaveUp(peer, timers.handshake_attempts + 1))
        elif timer is Timer.SEND_KEEPALIVE:
            self._send_keepalive(peer, now, out)
            timers.expired_send_keepalive(now)
        elif timer is Timer.NEW_HANDSHAKE:
            out.events.append(HandshakeRetry(peer, "no data back"))
            self._initiate(peer, now, out)
        elif timer is Timer.ZERO_KEYS:
            sessions.zero_keys(self.index, peer)
            peer.staged.clear()  # wireguard-go ZeroAndFlushAll
            out.events.append(KeysZeroed(peer))
        elif timer is Timer.PERSISTENT_KEEPALIVE and peer.persistent_keepalive:
            self._send_keepalive(peer, now, out)
