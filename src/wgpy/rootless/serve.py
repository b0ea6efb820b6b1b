"""Serving many proxy clients from a few file descriptors, without falling over.

Every relayed connection costs two descriptors (the client's and the one into the
tunnel), and a local user can open connections for free. So:

- `raise_fd_limit()` lifts the soft limit on open files to the hard one at start, as the
  daemon (and Go's runtime) do.
- At most `client_cap()` clients are served at once: below what the limit allows, with
  `FD_RESERVE` descriptors left for the datapath, name lookups and logging. A client past
  the cap is accepted and closed at once, so it learns at once. Once half the places are
  taken, a local user who holds half already gets no more (`owners.py`), so one user
  cannot lock the others out by opening connections. accept() itself failing
  for want of a descriptor (EMFILE) pauses accepting until a client leaves or
  `ACCEPT_RETRY` passes, instead of retrying in a loop.
- Each refusal is logged at most once per `LOG_EVERY` seconds, with the count since the
  last line: asyncio's own accept loop logged a traceback per failed accept, ~1,000 lines
  a second, for as long as the descriptors stayed taken.
- `relay()` ends a connection on which nothing moved either way for `idle_timeout`
  seconds, so forgotten connections give their descriptors back.
- A service may be served over TLS (`Service.tls`: the HTTPS proxy): a client has
  `TLS_HANDSHAKE_TIMEOUT` seconds for its handshake, and a failed one is a throttled
  log line. TLS has no half-close, so `relay()` passes an end on to a TLS side as a close.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import ipaddress
import logging
import resource
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from wgpy.rootless.owners import Owners

log = logging.getLogger("wgpy.proxy")

MAX_CLIENTS = 1024  # a browser keeps tens to hundreds of connections open
FD_RESERVE = 64  # descriptors kept for the datapath, lookups, logging
IDLE_TIMEOUT = 600.0  # seconds without a byte either way before a relay is closed
ACCEPT_RETRY = 1.0
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds a client of a TLS service has to finish its hello
LOG_EVERY = 1.0
BUFFER = 65536
_NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# The address family tried first by connect() (wireproxy's ResolveStrategy), or None for
# getaddrinfo's own order (glibc's puts IPv6 first, ULA or not): a Server's `prefer`.
PREFERRED: contextvars.ContextVar[int | None] = contextvars.ContextVar("prefer", default=None)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # an infinite hard limit is refused
            log.warning("cannot raise the open files limit to %s: %s", hard, e)
    return soft


def client_cap(wanted: int, fd_limit: int) -> int:
    """How many clients to serve at once: `wanted`, but two descriptors each must fit
    under `fd_limit` after the reserve."""
    return max(1, min(wanted, (fd_limit - FD_RESERVE) // 2))


def is_loopback(host: str) -> bool:
    """Whether a listening address reaches only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


class Throttled:
    """A log line at most once per `every` seconds, saying how many it stands for."""

    def __init__(self, level: int, every: float = LOG_EVERY) -> None:
        self.level = level
        self.every = every
        self._last = -every
        self._count = 0

    def __call__(self, message: str) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self.every:
            times = f" ({self._count} times)" if self._count > 1 else ""
            log.log(self.level, "%s%s", message, times)
            self._last, self._count = now, 0


async def relay(a: Stream, b: Stream, idle_timeout: float = IDLE_TIMEOUT) -> None:
    """Copy both ways until both ends closed; a half-close is passed on as one (the
    other direction goes on). Nothing moving either way for `idle_timeout` ends both."""
    loop = asyncio.get_running_loop()
    last = [loop.time()]

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(BUFFER):
                last[0] = loop.time()
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
            else:  # TLS has no half-close: its end (close_notify) ends both ways
                dst.close()
        except (ConnectionError, OSError):
            dst.close()  # a reset on one side resets the other

    async def watch(work: asyncio.Future[tuple[None, None]]) -> None:
        while not work.done():
            left = last[0] + idle_timeout - loop.time()
            if left <= 0:
                work.cancel()
                return
            await asyncio.wait([work], timeout=left)

    work = asyncio.gather(pipe(a[0], b[1]), pipe(b[0], a[1]))
    work.add_done_callback(_retrieved)
    try:
        await watch(work)
        with contextlib.suppress(asyncio.CancelledError):
            await work
    finally:
        work.cancel()
        for _, writer in (a, b):
            writer.close()


def _retrieved(future: asyncio.Future[tuple[None, None]]) -> None:
    """Mark a relay's outcome seen (cancelled when the server stops, or timed out)."""
    if not future.cancelled():
        future.exception()


async def accepted(conn: socket.socket, tls: ssl.SSLContext | None) -> Stream:
    """Streams over an accepted client's socket, over TLS (the server's side) with `tls`:
    what asyncio.start_server makes of each client, for a socket accepted by us."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    timeout = TLS_HANDSHAKE_TIMEOUT if tls else None
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, conn, ssl=tls, ssl_handshake_timeout=timeout
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


AddrInfo = TypeVar("AddrInfo", bound=tuple[Any, ...])  # one of getaddrinfo's answers


def preferred(infos: list[AddrInfo]) -> list[AddrInfo]:
    """getaddrinfo's answers, the PREFERRED family's first (stable: in getaddrinfo's
    order within each family)."""
    family = PREFERRED.get()
    if family is None:
        return infos
    return sorted(infos, key=lambda info: info[0] != family)


async def connect(host: str, port: int, timeout: float) -> Stream:
    """A connection to `host` (inside the tunnel's namespace: its DNS); with a PREFERRED
    family, that family's addresses are tried first, then the others, one at a time."""
    family = PREFERRED.get()
    if family is None:
        return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    async with asyncio.timeout(timeout):
        loop = asyncio.get_running_loop()
        infos = preferred(await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        error: OSError = OSError(f"no address for {host}")
        for *_, address in infos:
            try:
                return await asyncio.open_connection(str(address[0]), port)
            except OSError as e:
                error = e
        raise error


@dataclass
class Service:
    """A listening socket and the handler of each client it accepts."""

    sock: socket.socket
    handler: Handler
    name: str
    tls: ssl.SSLContext | None = None  # served over TLS (the HTTPS proxy)


class Server:
    """Serves `services` from a thread of its own (so the datapath's loop never waits for
    it), at most `max_clients` clients at once over all of them."""

    def __init__(
        self,
        services: list[Service],
        max_clients: int = MAX_CLIENTS,
        udp: list[Callable[[], Coroutine[None, None, None]]] | None = None,
        owners: Owners | None = None,
        prefer: int | None = None,
    ) -> None:
        self.services = services
        self.prefer = prefer  # the family connect() tries first (PREFERRED)
        self.owners = owners
        self.max_clients = max_clients
        self.udp = udp or []
        self.active = 0
        self.refused = 0
        self._clients: set[asyncio.Task[None]] = set()
        self._left = asyncio.Event()  # set when a client leaves: accepting may resume
        self._refused = Throttled(logging.ERROR)
        self._starved = Throttled(logging.ERROR)
        self._handshakes = Throttled(logging.INFO)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wgpy-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:
            self.error = e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._left = asyncio.Event()
        PREFERRED.set(self.prefer)  # the tasks made from here on see it
        tasks = [asyncio.create_task(self._accept(s)) for s in self.services]
        tasks += [asyncio.create_task(job()) for job in self.udp]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            for task in [*tasks, *self._clients]:
                task.cancel()

    async def _accept(self, service: Service) -> None:
        loop = asyncio.get_running_loop()
        service.sock.setblocking(False)
        while True:
            try:
                conn, _ = await loop.sock_accept(service.sock)
            except OSError as e:
                if e.errno not in _NO_DESCRIPTORS:
                    log.error("%s: accept failed: %s", service.name, e)
                    await asyncio.sleep(ACCEPT_RETRY)
                    continue
                self._starved(f"{service.name}: no descriptor left to accept a client")
                self._left.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._left.wait(), ACCEPT_RETRY)
                continue
            why = self._refusal(conn)
            if why:
                self.refused += 1
                conn.close()
                self._refused(f"{service.name}: {why}; refusing one")
                continue
            self.active += 1
            task = asyncio.create_task(self._serve(conn, service))
            self._clients.add(task)  # the loop keeps only weak references
            task.add_done_callback(self._clients.discard)

    def _refusal(self, conn: socket.socket) -> str:
        """Why `conn` gets no place, or "": the places are all taken, or more than half
        are taken and its user holds half already (`owners`)."""
        if self.active >= self.max_clients:
            return f"{self.max_clients} clients already"
        share = self.max_clients // 2
        if self.owners is None or self.active < share:
            return ""
        try:
            uid, held = self.owners.held(conn.getpeername(), conn.getsockname())
        except OSError:
            return ""
        return f"uid {uid} holds {held - 1} of {self.max_clients} places" if held > share else ""

    async def _serve(self, conn: socket.socket, service: Service) -> None:
        try:
            try:
                reader, writer = await accepted(conn, service.tls)
            except (OSError, TimeoutError) as e:  # ssl.SSLError is an OSError
                conn.close()
                what = "TLS handshake" if service.tls else "connection"
                self._handshakes(f"{service.name}: a client's {what} failed: {e}")
                return
            except BaseException:
                conn.close()
                raise
            try:
                await service.handler(reader, writer)
            finally:
                writer.close()
        except Exception:  # a handler's bug must not end the server
            log.exception("a proxy client failed")
        finally:
            self.active -= 1
            self._left.set()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)
