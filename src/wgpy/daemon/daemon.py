"""`wgpy IFNAME`: the daemon, a drop-in for `wireguard-go IFNAME`.

Creates the TUN interface and the UAPI socket, detaches (unless foreground), and serves
until SIGTERM/SIGINT, until the interface is deleted, or until the socket file is removed.

wireguard-go's process conventions hold: WG_PROCESS_FOREGROUND=1 is `-f`; WG_TUN_FD and
WG_UAPI_FD name an open TUN descriptor and a listening UAPI unix socket that a privileged
parent made, and the daemon then makes neither (the interface's name is the TUN's own).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from wgpy.core.device import Device
from wgpy.core.endpoint import Endpoint
from wgpy.core.events import ProtocolEvent
from wgpy.core.output import Output
from wgpy.daemon import keylog, uapi_server
from wgpy.daemon.log import DropSummary, FallbackWarning, log_events
from wgpy.daemon.status import Stats, build_status
from wgpy.io.datapath import Datapath, backend, native_intake, tun_offloads
from wgpy.io.loop import Loop
from wgpy.io.tun import Tun, TunGone, open_tun
from wgpy.io.uapi_path import SOCKET_DIR
from wgpy.io.udp import UdpSocket

log = logging.getLogger("wgpy")
LOG_LEVELS = {"verbose": logging.DEBUG, "error": logging.ERROR, "silent": logging.CRITICAL + 1}
HOUSEKEEPING_EVERY = 1.0  # seconds between checks of the socket file and the MTU
TUN_FD_ENV = "WG_TUN_FD"
UAPI_FD_ENV = "WG_UAPI_FD"
FOREGROUND_ENV = "WG_PROCESS_FOREGROUND"


@dataclass
class Options:
    """What `wgpy IFNAME` takes besides the name. The environment gives the defaults
    (WGPY_METRICS, WGPY_KEYLOG, WGPY_THREADS), so `wgpy up`, which starts the daemon,
    passes them on."""

    metrics: str | None = None  # PORT, HOST:PORT or [V6]:PORT for the Prometheus endpoint
    keylog: str | None = None  # a file for Wireshark's wg.keylog_file
    threads: int | None = None  # crypto threads (native datapath); None: WGPY_THREADS or cores

    @classmethod
    def from_env(cls) -> Options:
        threads = os.environ.get("WGPY_THREADS", "")
        return cls(os.environ.get("WGPY_METRICS") or None, os.environ.get("WGPY_KEYLOG") or None,
                   int(threads) if threads.isascii() and threads.isdigit() else None)  # fmt: skip


def add_options(parser: argparse.ArgumentParser) -> None:
    """The daemon's own options, for `wgpy IFNAME` and for `wgpy up`, which passes them
    on to the daemon it starts (through the environment: `Options.from_env`)."""
    env = Options.from_env()
    parser.add_argument("--metrics", metavar="[HOST:]PORT", default=env.metrics,
                        help="serve Prometheus metrics there (default host 127.0.0.1; "
                        "env WGPY_METRICS)")  # fmt: skip
    parser.add_argument("--keylog", metavar="FILE", default=env.keylog,
                        help="append each handshake's keys to FILE for Wireshark: INSECURE, "
                        "FILE holds the interface's private key and every session key "
                        "(made 0600; refused if a symlink or others may read it; "
                        "env WGPY_KEYLOG)")  # fmt: skip
    parser.add_argument("--threads", metavar="N", type=_positive, default=env.threads,
                        help="seal and open data messages and work out handshakes' "
                        "X25519 on N threads (the native datapath; default one per "
                        "core; env WGPY_THREADS)")  # fmt: skip


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return int(text)


def options_from(args: argparse.Namespace) -> Options:
    return Options(args.metrics or None, args.keylog or None, args.threads)


def metrics_address(options: Options) -> Endpoint | None:
    """Where `--metrics` asks the endpoint to listen, or None; OSError if it is not an
    address (a name would need a resolver) or a port."""
    if not options.metrics:
        return None
    from wgpy.daemon.metrics import parse_listen

    try:
        return parse_listen(options.metrics)
    except ValueError as e:
        raise OSError(f"--metrics {options.metrics}: {e}") from None


class Daemon:
    """Owns the device, the interface, the socket and the loop; the UAPI's `Host`."""

    def __init__(
        self,
        ifname: str,
        socket_dir: str = SOCKET_DIR,
        tun: Tun | None = None,
        listener: uapi_server.UapiListener | None = None,
        options: Options | None = None,
    ) -> None:
        """The TUN and the UAPI listener are made here unless handed over."""
        raise_fd_limit()
        options = options or Options()
        metrics_listen = metrics_address(options)  # checked before anything is opened
        # WGPY_NATIVE=0 forces the pure-Python datapath even where the C one was built
        self.backend = backend(options.threads)
        self.device = Device(
            os.urandom,
            wall_offset=time.time() - time.monotonic(),
            backend=self.backend,
            classify=native_intake(),
        )
        # WGPY_OFFLOAD=0 turns off the batching offloads (virtio header, GSO, GRO): for
        # comparisons, and for kernels that refuse them
        self.offload = os.environ.get("WGPY_OFFLOAD", "1") != "0"
        # TSO reads pay only where C splits them (see io/tun.py)
        self.tun = tun or open_tun(ifname, self.offload, tun_offloads(self.device, self.offload))
        try:
            self.udp = UdpSocket(0, offload=self.offload)
            self.listener = listener or uapi_server.UapiListener(self.tun.name, socket_dir)
        except BaseException:
            self.tun.close()
            if listener is not None:
                listener.close()
            raise
        self.datapath_kind = self.backend.name
        self.fwmark = 0
        self.device.mtu = self.tun.mtu()
        self.stats = Stats()
        self.drop_summary = DropSummary()
        self.fallback_warning = FallbackWarning()
        self._next_housekeeping = 0.0
        try:  # (a datapath that fails to be made has stopped its own reader thread)
            self.datapath = Datapath(self.device, self.tun, self.udp, self._on_events)
            self._watch()
        except BaseException:  # nothing left running: not the reader thread either
            if hasattr(self, "datapath"):
                self.datapath.close()  # (joined before the socket goes)
            self.udp.close()
            self.tun.close()
            self.listener.close()
            raise
        self.keylog: keylog.KeyLog | None = None
        self.metrics: Any = None  # a metrics.MetricsServer: prometheus-client is optional
        try:
            self._start_extras(options.keylog, metrics_listen)
        except BaseException:
            self.close()
            raise

    def _watch(self) -> None:
        """The loop, watching the TUN, the socket (and its reader thread's eventfd) and
        the UAPI listener."""
        self.loop = Loop(self._tick)
        try:
            self.loop.add_reader(self.tun.fileno(), self._on_tun)
            for fd in self.datapath.udp_fds():  # the socket, and its reader's eventfd
                self.loop.add_reader(fd, self.datapath.on_udp)
            self.uapi = uapi_server.UapiServer(self, self.loop, self.listener)
        except BaseException:
            self.loop.close()
            raise

    def _start_extras(self, keylog_path: str | None, metrics_listen: Endpoint | None) -> None:
        """The opt-in extras: the key log (`--keylog`) and the metrics endpoint."""
        if keylog_path:
            self.keylog = keylog.KeyLog(keylog_path, self.device)
            self.device.keylog = self.keylog
            log.warning(keylog.WARNING.format(path=keylog_path))
        if metrics_listen is not None:
            from wgpy.daemon.metrics import MetricsServer, Source

            source = Source(
                self.tun.name, self.device, self.datapath, self.stats, self.offload,
                self.datapath_kind,
            )  # fmt: skip
            self.metrics = MetricsServer(source, metrics_listen)

    # ---- uapi.Host ---------------------------------------------------------------

    @property
    def listen_port(self) -> int:
        return self.udp.port

    def set_listen_port(self, port: int) -> None:
        # raises if the port is taken, and then the old socket keeps serving
        fresh = UdpSocket(port, self.fwmark, self.offload)
        for fd in self.datapath.udp_fds():
            self.loop.remove_reader(fd)
        old, self.udp = self.udp, fresh
        try:
            self.datapath.use_udp(fresh)  # its sends in C, as the first socket's; its reader
        finally:  # (raising, it already serves `fresh`: the loop watches it, never deaf)
            old.close()  # (after use_udp: the old socket's reader thread is joined by then)
            for fd in self.datapath.udp_fds():
                self.loop.add_reader(fd, self.datapath.on_udp)
        log.info("listening on UDP port %d", fresh.port)

    def set_fwmark(self, mark: int) -> None:
        self.udp.set_fwmark(mark)
        self.fwmark = mark

    def now(self) -> float:
        return time.monotonic()

    def transmit(self, out: Output) -> None:
        self.datapath.transmit(out)

    def wgpy_status(self) -> str:
        """The answer to `wgpy_status=1` (`wgpy show --json`): one line of JSON."""
        return json.dumps(self.status(), separators=(",", ":"))

    def status(self) -> dict[str, Any]:
        self.stats.forget(self.device.peers)
        return build_status(
            name=self.tun.name,
            device=self.device,
            listen_port=self.udp.port,
            fwmark=self.fwmark,
            drops=self.datapath.drops,
            stats=self.stats,
            datapath=self.datapath_kind,
            offload=self.offload,
            now=time.monotonic(),
        )

    def _on_events(self, events: list[ProtocolEvent]) -> None:
        self.stats.count(events)
        log_events(events)

    # ---- the loop ----------------------------------------------------------------

    def _on_tun(self) -> None:
        if not self.datapath.on_tun():
            log.info("interface %s is gone; exiting", self.tun.name)
            self.loop.stop()

    def _tick(self) -> None:
        now = time.monotonic()
        self.datapath.tick(now)
        self.stats.tick(now, self.device)
        self.drop_summary.log(now, self.datapath.drops)
        self.uapi.tick(now)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_EVERY
            self.fallback_warning.check(self.device.crypto_fallbacks)
            if not self.listener.still_there():
                log.info("UAPI socket removed; exiting")
                self.loop.stop()
            try:
                mtu = self.tun.mtu()
            except TunGone:
                log.info("interface %s is gone; exiting", self.tun.name)
                self.loop.stop()
                return
            except OSError as e:  # EMFILE: no descriptor for the query; next time
                log.warning("cannot read the MTU: %s", e)
                return
            if mtu and mtu != self.device.mtu:
                log.info("MTU is now %d", mtu)
                self.device.mtu = mtu

    def run(self, signals: StopSignals | None = None) -> None:
        """Serve until a stop signal (caught by `signals` since before the daemon was made,
        or from now on) or until the interface or the socket goes; then clean up."""
        (signals or StopSignals()).stop(self.loop)
        log.info("%s up: UDP port %d, UAPI %s, %s datapath on %d thread(s)", self.tun.name,
                 self.udp.port, self.listener.path, self.datapath_kind,
                 self.backend.threads)  # fmt: skip
        try:
            self.loop.run()
        finally:
            self.close()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.keylog is not None:
            self.keylog.close()
            self.keylog = None
        self.uapi.close()
        self.datapath.close()  # its reader thread joined before the socket goes
        self.udp.close()
        self.tun.close()
        self.loop.close()


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP, caught from before the interface and the socket are
    made. With the default action a signal during start-up killed the daemon with its
    socket file left behind; caught, it stops the daemon as soon as it runs, through the
    same cleanup as a signal later on."""

    def __init__(self) -> None:
        self.received = False
        self._loop: Loop | None = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.received = True
        if self._loop is not None:
            self._loop.stop()

    def stop(self, loop: Loop) -> None:
        """Stop `loop` on a signal: at once if one came already (a loop stopped before it
        runs returns at once)."""
        self._loop = loop
        if self.received:
            loop.stop()


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one, as Go's runtime does at start:
    every UAPI client costs a descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:  # an infinite hard limit is refused
            log.warning("cannot raise the open files limit to %s: %s", hard, e)


def make_daemon(ifname: str, options: Options | None = None) -> Daemon:
    """The daemon, with the TUN and UAPI socket from WG_TUN_FD / WG_UAPI_FD if set."""
    tun_fd, uapi_fd = os.environ.get(TUN_FD_ENV), os.environ.get(UAPI_FD_ENV)
    tun = Tun.adopt(int(tun_fd)) if tun_fd else None
    name = tun.name if tun else ifname
    try:
        listener = uapi_server.UapiListener.adopt(int(uapi_fd), name) if uapi_fd else None
    except BaseException:
        if tun:
            tun.close()
        raise
    return Daemon(name, tun=tun, listener=listener, options=options)


def setup_logging(ifname: str) -> None:
    level = LOG_LEVELS.get(os.environ.get("LOG_LEVEL", "error").lower(), logging.ERROR)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(levelname)s: ({ifname}) %(asctime)s %(message)s",
    )


def serve(ifname: str, foreground: bool, options: Options | None = None) -> int:
    """Start the daemon; in the background, return once it is serving (or failed)."""
    setup_logging(ifname)
    options = options or Options.from_env()
    if options.keylog and not log.isEnabledFor(logging.WARNING):
        # the Daemon logs the warning; say it on stderr also when LOG_LEVEL hides it
        sys.stderr.write(f"wgpy: warning: {keylog.WARNING.format(path=options.keylog)}\n")
    if foreground:
        return _run(ifname, options)
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        status = os.read(read_fd, 1)  # the child says when it is ready
        return 0 if status == b"1" else 1
    os.close(read_fd)
    os.setsid()
    signals = StopSignals()
    try:
        daemon = make_daemon(ifname, options)
    except (OSError, ValueError) as e:
        log.error("cannot start %s: %s", ifname, e)
        sys.stderr.write(f"wgpy: cannot start {ifname}: {e}\n")
        os.write(write_fd, b"0")
        os._exit(1)
    _detach_stdio()
    os.write(write_fd, b"1")
    os.close(write_fd)
    try:
        daemon.run(signals)
    finally:
        os._exit(0)


def _run(ifname: str, options: Options) -> int:
    signals = StopSignals()
    try:
        daemon = make_daemon(ifname, options)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"wgpy: cannot start {ifname}: {e}\n")
        return 1
    daemon.run(signals)
    return 0


def _detach_stdio() -> None:
    """Like wireguard-go: a daemon keeps stdout/stderr only if LOG_LEVEL asks for output."""
    level = os.environ.get("LOG_LEVEL", "")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if not level or level.lower() == "silent":
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    os.close(devnull)
