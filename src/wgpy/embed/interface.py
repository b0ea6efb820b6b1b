"""`Interface`: a WireGuard interface served from a background thread of this process.

The thread runs the io `Loop` over the TUN and the UDP socket, as the daemon does. Every
change and every read of state from other threads goes through `call`, which queues a
function for the loop thread and wakes it through an eventfd: the core is only ever
touched by one thread. Events from the core reach callbacks (in the loop thread: keep
them short), blocking waiters (`wait_for`) and async iterators (`events()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from wgpy.core.crypto import clamp, decode_key, encode_key
from wgpy.core.device import Device
from wgpy.core.endpoint import Endpoint, parse_address_endpoint
from wgpy.core.events import (
    CookieSent,
    EndpointChanged,
    EventKind,
    HandshakeGaveUp,
    HandshakeRetry,
    InitiationSent,
    KeypairCreated,
    ProtocolEvent,
)
from wgpy.core.output import Drop, Output
from wgpy.embed import netconf
from wgpy.io.datapath import Datapath, backend, native_intake, tun_offloads
from wgpy.io.loop import Loop
from wgpy.io.tun import Tun, open_tun
from wgpy.io.udp import UdpSocket
from wgpy.tools import config as wgconfig
from wgpy.tools.config import Config

log = logging.getLogger("wgpy.interface")
T = TypeVar("T")
HISTORY = 1024  # events kept for wait_for


@dataclass(frozen=True)
class Event:
    """Something the protocol did: `kind`, the peer's public key (base64) or None, the
    kind's detail (`detail_of`), when (time.monotonic()), and how many times: a flood's
    cookie replies that the C intake sent in one drain are one event (`count` of them,
    `detail` None). The core's events (core/events.py) hold the peer itself, which
    belongs to the loop thread: this one holds only values, safe in any thread."""

    kind: EventKind
    peer: str | None
    detail: object
    time: float
    count: int = 1


def detail_of(event: ProtocolEvent) -> object:
    """The one field an event kind has beyond its peer: the attempt number of an
    initiation (0: the first), the index of a new keypair, the new endpoint, the source
    a cookie went to, why a handshake is retried, how many attempts were given up on;
    None for the others."""
    match event:
        case InitiationSent(attempt=n) | KeypairCreated(index=n) | HandshakeGaveUp(attempts=n):
            return n
        case EndpointChanged(endpoint=endpoint) | CookieSent(source=endpoint):
            return endpoint
        case HandshakeRetry(reason=reason):
            return reason
    return None


def public_event(event: ProtocolEvent, now: float) -> Event:
    """The library's value-only copy of a core event, made at `now`."""
    peer = encode_key(event.peer.public_key) if event.peer is not None else None
    count = event.count if isinstance(event, CookieSent) else 1
    return Event(event.kind, peer, detail_of(event), now, count)


@dataclass(frozen=True)
class PeerState:
    """A snapshot of one peer, as `wg show` reports it."""

    public_key: str
    endpoint: Endpoint | None
    allowed_ips: list[str]
    last_handshake: float | None  # wall-clock seconds, None before the first
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int
    has_session: bool = field(default=False)


def load_config(source: Config | str | os.PathLike[str]) -> Config:
    """A Config as is; a path (str or Path) to a wg-quick file; or the text of one."""
    if isinstance(source, Config):
        return source
    if isinstance(source, str) and "\n" in source:
        return wgconfig.parse(source)
    path = os.fspath(source)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise wgconfig.ConfigError(path, 0, "file", str(e)) from None
    return wgconfig.parse(text, path)


def key_bytes(key: str | bytes) -> bytes:
    return decode_key(key) if isinstance(key, str) else bytes(key)


def _cidr(net: str | wgconfig.IPNetwork) -> wgconfig.IPNetwork:
    return ipaddress.ip_network(net, strict=False) if isinstance(net, str) else net


class Interface:
    """A TUN interface named `name`, configured from a wg-quick `Config` (or a path or
    text), served by a background thread. Needs CAP_NET_ADMIN: root, or inside a user
    namespace of our own. Use it as a context manager (`with` or `async with`), or call
    `open()` and `close()`.

    Construction resolves the peers' endpoints and opens the UDP socket (in the current
    network namespace); `open()` creates the TUN, gives it the config's addresses, MTU
    and routes (unless `configure_network=False`), and starts the thread.
    """

    def __init__(
        self,
        config: Config | str | os.PathLike[str],
        name: str = "wgpy0",
        *,
        configure_network: bool = True,
        on_event: Callable[[Event], None] | None = None,
        offload: bool = True,
    ) -> None:
        self.config = load_config(config)
        self.name = name
        self.configure_network = configure_network
        self.offload = offload
        self._callbacks: list[Callable[[Event], None]] = [on_event] if on_event else []
        self._endpoints = [
            _resolve(self.config, p) if p.endpoint else None for p in self.config.peers
        ]
        self.udp = UdpSocket(self.config.interface.listen_port or 0, offload=offload)
        self.device = Device(os.urandom, wall_offset=time.time() - time.monotonic(),
                             backend=backend(start=False), classify=native_intake())  # fmt: skip
        self.tun: Tun | None = None
        self._datapath: Datapath | None = None
        self._loop: Loop | None = None
        self._thread: threading.Thread | None = None
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._history: deque[tuple[int, Event]] = deque(maxlen=HISTORY)
        self._seq = 0
        self._cond = threading.Condition()
        self._closed = False
        self._release_in_thread = False
        self._async_queues: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event | None]]] = []

    # ---- life ----------------------------------------------------------------------

    @property
    def listen_port(self) -> int:
        return self.udp.port

    @property
    def public_key(self) -> str:
        assert self.device.public_key is not None
        return encode_key(self.device.public_key)

    def open(self) -> Interface:
        if self._thread is not None:
            return self
        # the crypto workers start with the interface, not before: wgpy run and wgpy
        # proxy make an Interface, then unshare, which a threaded process cannot do
        self.device.backend.start_workers()
        self.tun = open_tun(self.name, self.offload, tun_offloads(self.device, self.offload))
        try:
            self.name = self.tun.name
            mtu = self.config.interface.mtu or 1420
            if self.configure_network:
                netconf.configure(self.tun.ifindex, self.config, mtu, loopback=True)
            self.device.mtu = self.tun.mtu() or mtu
            self._datapath = Datapath(self.device, self.tun, self.udp, self._on_events)
            self._loop = Loop(self._tick)
            self._loop.add_reader(self.tun.fileno(), self._on_tun)
            for fd in self._datapath.udp_fds():  # the socket, its reader thread's eventfd
                self._loop.add_reader(fd, self._datapath.on_udp)
            self._loop.add_reader(self._wake, self._run_calls)
            self._apply_config()
        except BaseException:  # nothing of this open left: not its reader thread either
            if self._loop is not None:
                self._loop.close()
            if self._datapath is not None:
                self._datapath.close()
            self.tun.close()
            self.tun, self._datapath, self._loop = None, None, None
            raise
        self._thread = threading.Thread(target=self._serve, name=f"wgpy-{self.name}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread; close the TUN (the interface goes with it) and the socket.
        From an event callback (the loop thread), the closing ends that loop turn."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None and self._loop is not None:
            if threading.current_thread() is self._thread:
                self._loop.stop()
                self._release_in_thread = True
                return
            loop = self._loop

            def stop() -> None:
                loop.stop()

            with contextlib.suppress(RuntimeError):
                self.call(stop)
            self._thread.join(5)
        self._release()

    def _release(self) -> None:
        if self._loop is not None:
            self._loop.close()
        if self.tun is not None:
            self.tun.close()
        if self._datapath is not None:
            self._datapath.close()  # its reader thread joined before the socket goes
        self.udp.close()
        os.close(self._wake)
        for aloop, q in self._async_queues:
            with contextlib.suppress(RuntimeError):
                aloop.call_soon_threadsafe(q.put_nowait, None)
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> Interface:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Interface:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- calling into the loop thread ------------------------------------------------

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run `fn` in the loop thread (directly if not open yet, or from that thread)."""
        if self._thread is None or threading.current_thread() is self._thread:
            return fn()
        if not self._thread.is_alive():
            raise RuntimeError(f"interface {self.name} is not running")
        fut: Future[T] = Future()
        self._calls.put((fn, fut))
        os.eventfd_write(self._wake, 1)
        return fut.result(timeout)

    def _run_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wake)
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # the caller gets the error, the loop goes on
                fut.set_exception(e)

    def _serve(self) -> None:
        assert self._loop is not None
        try:
            self._loop.run()
        finally:
            while True:  # whoever still waits learns the loop is gone
                try:
                    _, fut = self._calls.get_nowait()
                except queue.Empty:
                    break
                fut.set_exception(RuntimeError(f"interface {self.name} stopped"))
            if self._release_in_thread:
                self._release()

    def _tick(self) -> None:
        assert self._datapath is not None
        self._datapath.tick(time.monotonic())

    def _on_tun(self) -> None:
        assert self._datapath is not None and self._loop is not None
        if not self._datapath.on_tun():
            log.info("interface %s is gone", self.name)
            self._loop.stop()

    def _transmit(self, out: Output) -> None:
        if self._datapath is not None:
            self._datapath.transmit(out)

    # ---- configuration -----------------------------------------------------------------

    def _apply_config(self) -> None:
        iface = self.config.interface
        if iface.private_key is None:
            raise ValueError("the config has no PrivateKey")
        self.device.set_private_key(clamp(iface.private_key))
        for peer_cfg, endpoint in zip(self.config.peers, self._endpoints, strict=True):
            self._set_peer(
                peer_cfg.public_key,
                endpoint,
                [str(n) for n in peer_cfg.allowed_ips],
                peer_cfg.preshared_key,
                peer_cfg.persistent_keepalive,
                replace_allowed_ips=True,
            )

    def _set_peer(
        self,
        public_key: bytes,
        endpoint: Endpoint | None,
        allowed_ips: Iterable[str | wgconfig.IPNetwork] | None,
        preshared_key: bytes | None,
        persistent_keepalive: int | None,
        replace_allowed_ips: bool,
    ) -> None:
        dev = self.device
        peer = dev.add_peer(public_key)
        if peer is None:
            raise ValueError("that is this interface's own public key")
        if preshared_key is not None:
            peer.preshared_key = preshared_key
        if endpoint is not None:
            peer.endpoint = endpoint
        if allowed_ips is not None:
            if replace_allowed_ips:
                dev.allowed_ips.remove_value(peer)
            for net in map(_cidr, allowed_ips):
                dev.allowed_ips.insert(net.network_address.packed, net.prefixlen, peer)
        if persistent_keepalive is not None:
            now = time.monotonic()
            self._transmit(dev.set_persistent_keepalive(peer, persistent_keepalive, now))

    def set_peer(
        self,
        public_key: str | bytes,
        *,
        endpoint: str | Endpoint | None = None,
        allowed_ips: Iterable[str | wgconfig.IPNetwork] | None = None,
        preshared_key: str | bytes | None = None,
        persistent_keepalive: int | None = None,
        replace_allowed_ips: bool = True,
    ) -> None:
        """Add a peer or change one, as `wg set`: only what is given changes. Routes for
        new allowed IPs are the caller's business (or use a covering Address prefix)."""
        pub = key_bytes(public_key)
        ep: Endpoint | None = None
        if isinstance(endpoint, str):
            ep = parse_address_endpoint(wgconfig.resolve_endpoint(endpoint))
        elif endpoint is not None:
            ep = (str(endpoint[0]), int(endpoint[1]))
        psk = key_bytes(preshared_key) if preshared_key is not None else None
        nets = list(allowed_ips) if allowed_ips is not None else None
        self.call(
            lambda: self._set_peer(pub, ep, nets, psk, persistent_keepalive, replace_allowed_ips)
        )

    def remove_peer(self, public_key: str | bytes) -> None:
        pub = key_bytes(public_key)
        self.call(lambda: self.device.remove_peer(pub))

    # ---- state ---------------------------------------------------------------------------

    def peers(self) -> list[PeerState]:
        """A consistent snapshot of every peer (taken in the loop thread)."""

        def snapshot() -> list[PeerState]:
            dev = self.device
            return [
                PeerState(
                    encode_key(p.public_key),
                    p.endpoint,
                    [
                        str(ipaddress.ip_network((ipaddress.ip_address(a), c)))
                        for a, c in dev.allowed_ips.entries(p)
                    ],
                    p.last_handshake,
                    p.rx_bytes,
                    p.tx_bytes,
                    p.persistent_keepalive,
                    p.current is not None,
                )
                for p in dev.peers.values()
            ]

        return self.call(snapshot)

    def peer(self, public_key: str | bytes) -> PeerState:
        want = encode_key(key_bytes(public_key))
        for state in self.peers():
            if state.public_key == want:
                return state
        raise KeyError(want)

    def drops(self) -> Counter[Drop]:
        """Datagrams and packets refused since open, by reason."""
        return self.call(lambda: Counter(self._datapath.drops if self._datapath else ()))

    # ---- events --------------------------------------------------------------------------

    def add_event_callback(self, callback: Callable[[Event], None]) -> None:
        """Call `callback(event)` for every event, in the loop thread: keep it short."""
        self._callbacks.append(callback)

    def _on_events(self, events: list[ProtocolEvent]) -> None:
        now = time.monotonic()
        public = [public_event(e, now) for e in events]
        with self._cond:
            for ev in public:
                self._seq += 1
                self._history.append((self._seq, ev))
                for aloop, q in self._async_queues:
                    with contextlib.suppress(RuntimeError):  # that asyncio loop is closed
                        aloop.call_soon_threadsafe(q.put_nowait, ev)
            self._cond.notify_all()
        for ev in public:
            for callback in list(self._callbacks):
                try:
                    callback(ev)
                except Exception:
                    log.exception("event callback failed")

    def wait_for(
        self, kind: EventKind, peer: str | bytes | None = None, timeout: float = 10.0
    ) -> Event:
        """The first event of `kind` (for `peer`, if given) since the interface opened;
        waits for it up to `timeout` seconds (TimeoutError)."""
        want = encode_key(key_bytes(peer)) if peer is not None else None
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, ev in self._history:
                    if ev.kind is kind and (want is None or ev.peer == want):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise TimeoutError(f"no {kind.value} event within {timeout} s")
                self._cond.wait(left)

    def events(self, replay: bool = False) -> EventStream:
        """Every event from this call on (with `replay`, first those since the interface
        opened, up to the last 1,024), as an async iterator in the calling asyncio loop
        (call it from a coroutine); it ends when the interface closes."""
        return EventStream(self, replay)


class EventStream:
    """An async iterator of an interface's events; registered when made, not when first
    awaited, so that events between making it and iterating are kept."""

    def __init__(self, iface: Interface, replay: bool) -> None:
        self._iface = iface
        self._entry = (asyncio.get_running_loop(), asyncio.Queue[Event | None]())
        with iface._cond:  # no event between the replayed ones and the new ones is lost
            if replay:
                for _, ev in iface._history:
                    self._entry[1].put_nowait(ev)
            iface._async_queues.append(self._entry)
        if iface._closed:
            self._entry[1].put_nowait(None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        ev = await self._entry[1].get()
        if ev is None:
            self.close()
            raise StopAsyncIteration
        return ev

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._iface._async_queues.remove(self._entry)


def _resolve(cfg: Config, peer: wgconfig.PeerConfig) -> Endpoint:
    """The peer's endpoint resolved as `wg` does it; a failure is a ConfigError on its line."""
    assert peer.endpoint is not None
    try:
        return parse_address_endpoint(wgconfig.resolve_endpoint(peer.endpoint))
    except (ValueError, OSError) as e:
        raise wgconfig.ConfigError(cfg.path, peer.endpoint_line, "Endpoint", str(e)) from None


def generate_private_key() -> str:
    """A new private key, base64, as `wg genkey`."""
    return encode_key(clamp(os.urandom(32)))


def public_key_of(private_key: str | bytes) -> str:
    from wgpy.core.crypto import public_key

    return encode_key(public_key(clamp(key_bytes(private_key))))
