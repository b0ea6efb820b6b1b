"""`wgpy server run`: the interface, its firewall, and the loop that keeps it equal to the
registry.

The interface is served by an ordinary wgpy daemon in a child process (`wgpy -f IFNAME`),
configured through its UAPI socket as any tool would. Every half second the loop reads
the registry's revision (one small query); when it moved, when a client's expiry passed,
or every ten seconds in any case (someone may have used `wg set`), it diffs the registry
against the device (`sync.diff`) and sends the difference. The web page, if asked for,
runs in the same asyncio loop; SIGTERM and SIGINT end both, and everything made is undone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Sequence
from datetime import datetime

from pyroute2 import IPRoute

from wgpy.io.uapi_path import socket_path
from wgpy.server import manage, sync
from wgpy.server.model import Settings
from wgpy.server.netfilter import Firewall
from wgpy.server.store import Registry
from wgpy.tools import uapi_client

log = logging.getLogger("wgpy.server")
MTU = 1420
POLL = 0.5  # seconds between looks at the registry: how soon a change takes effect
FULL_SYNC = 10.0
PR_SET_PDEATHSIG = 1


class ServerError(Exception):
    pass


def _die_with_parent() -> None:
    """In the daemon's process before exec: a SIGTERM when the server dies, even by
    SIGKILL, so the interface does not outlive it. (Forked from the main thread, which
    lives as long as the server.)"""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def served(ifname: str) -> bool:
    """Whether a daemon answers on the interface's socket (a stale file, left by a
    daemon that was killed, is not one: the new daemon replaces it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(socket_path(ifname)))
        except OSError:
            return False
    return True


def start_daemon(ifname: str) -> subprocess.Popen[bytes]:
    if served(ifname):
        raise ServerError(f"{ifname} is already served ({socket_path(ifname)})")
    proc = subprocess.Popen([sys.executable, "-m", "wgpy", "-f", ifname],
                            preexec_fn=_die_with_parent)  # fmt: skip
    deadline = time.monotonic() + 10
    while not served(ifname):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise ServerError(f"the daemon for {ifname} did not start")
        time.sleep(0.02)
    return proc


def configure_link(settings: Settings) -> None:
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=settings.interface)[0]
        for addr in settings.server_addresses():
            ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        ipr.link("set", index=index, mtu=MTU, state="up")


def delete_link(ifname: str) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if found:
            ipr.link("del", index=found[0])


class Syncer:
    """Applies the registry to the device when it changed or a deadline passed."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.revision = -1
        self.next_full = 0.0
        self.next_expiry: datetime | None = None

    def due(self, now: datetime) -> bool:
        revision = self.registry.revision()
        expiring = self.next_expiry is not None and self.next_expiry <= now
        return revision != self.revision or expiring or time.monotonic() >= self.next_full

    def step(self) -> None:
        now = manage.now()
        if not self.due(now):
            return
        self.revision = self.registry.revision()  # before reading: a later change is seen
        settings = self.registry.settings()
        clients = self.registry.clients()
        body = sync.diff(settings, clients, uapi_client.get(settings.interface), now)
        if body:
            log.info("sync: %d lines to %s", body.count("\n"), settings.interface)
            uapi_client.set_config(settings.interface, body)
        pending = [c.expires for c in clients if c.expires and c.expires > now and c.enabled]
        self.next_expiry = min(pending, default=None)
        self.next_full = time.monotonic() + FULL_SYNC


async def sync_loop(syncer: Syncer, daemon: subprocess.Popen[bytes], stop: asyncio.Event) -> None:
    last_error = ""
    while not stop.is_set():
        if daemon.poll() is not None:
            raise ServerError(f"the daemon exited ({daemon.returncode})")
        try:  # in a thread: the web page's requests go on while the daemon answers
            await asyncio.to_thread(syncer.step)
            last_error = ""
        except Exception as e:
            # a damaged row, a busy database, the UAPI: the device keeps what it has (no
            # client is dropped, the server stays up) and the next look retries
            if str(e) != last_error:
                log.error("sync failed (the device is left as it was): %s", e)
            last_error = str(e)
            syncer.revision = -1  # try again at the next look, not only on a new change
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL)


def listen(host: str, port: int) -> socket.socket:
    """The web page's listening socket, opened before anything else starts: a port in use
    is a one-line error, not a half-started server."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise ServerError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ServerError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # through the `finally` that undoes what was made


def _ignore_signals() -> None:
    """Once the server is undoing what it made, a second SIGTERM or Ctrl-C must not cut
    that short (and leave the rules and sysctls behind); SIGKILL still ends it."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def run(registry: Registry, web: tuple[str, int] | None,
        allowed_hosts: Sequence[str] = ()) -> int:  # fmt: skip
    """Serve the interface (and the page on `web`, answering the Host names
    `allowed_hosts` besides addresses and localhost) until SIGTERM or SIGINT."""
    settings = registry.settings()
    if web is not None and not registry.password_hash():
        raise ServerError("no web password yet: set one with `wgpy client passwd`")
    sock = listen(*web) if web is not None else None
    for signum in (signal.SIGTERM, signal.SIGINT):  # until the loop takes them over
        signal.signal(signum, _exit_on_signal)
    try:
        daemon = start_daemon(settings.interface)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    firewall = Firewall(settings.interface, settings.listen_port, settings.pools)
    try:
        syncer = Syncer(registry)
        syncer.step()  # keys, port and peers before the link comes up
        configure_link(settings)
        try:
            firewall.up()
        except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
            raise ServerError(f"cannot set up forwarding and NAT: {e}") from e
        print(f"wgpy server: {settings.interface} up, listening on {settings.listen_port}",
              file=sys.stderr, flush=True)  # fmt: skip
        asyncio.run(_serve(syncer, daemon, registry, sock, allowed_hosts))
    finally:
        _ignore_signals()
        if sock is not None:
            sock.close()
        firewall.down()
        delete_link(settings.interface)
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(timeout=5)
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait()
    return 0


async def _serve(syncer: Syncer, daemon: subprocess.Popen[bytes], registry: Registry,
                 web: socket.socket | None, allowed_hosts: Sequence[str]) -> None:  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks: list[Awaitable[None]] = [sync_loop(syncer, daemon, stop)]
    if web is not None:
        from wgpy.server import web as webapp

        tasks.append(webapp.serve(registry, web, stop, allowed_hosts))
    running = [asyncio.ensure_future(t) for t in tasks]
    stopper = asyncio.ensure_future(_wait(stop))
    done, _ = await asyncio.wait([*running, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    for signum in (signal.SIGTERM, signal.SIGINT):  # else the loop's close puts back the
        loop.remove_signal_handler(signum)  # defaults, which would kill the clean-up
    _ignore_signals()
    for task in running:
        if task not in done:
            await _finish(task)
    for task in done:
        task.result()  # a failure (the daemon died) is the command's error


async def _wait(event: asyncio.Event) -> None:
    await event.wait()


async def _finish(task: asyncio.Future[None], grace: float = 5.0) -> None:
    """Give a task (the web server) a moment to close its connections, then cancel it."""
    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(task, grace)
