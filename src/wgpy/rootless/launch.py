"""`wgpy.run` and `wgpy.Proxy`: the rootless namespace from a program.

Unsharing changes the calling process for good (and needs it single-threaded), so the
namespace is made by a fresh `wgpy run` / `wgpy proxy` process; the config goes to it
through a memfd (no file on disk; closed once read, so the command `wgpy run` starts never
has it), the proxy's listening sockets are opened here and handed over, so their
addresses are known before the child even starts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from wgpy.embed.interface import load_config
from wgpy.rootless.proxy import udp_socket
from wgpy.rootless.session import listen_address, listening_socket
from wgpy.rootless.spec import mapping
from wgpy.tools.config import Config

WGPY = [sys.executable, "-m", "wgpy"]


def _config_fd(config: Config | str | os.PathLike[str]) -> int:
    # close-on-exec: only the `wgpy` child gets it (pass_fds), none of the caller's other
    # children; that child closes it once read (session.close_config_fd)
    fd = os.memfd_create("wgpy-config", os.MFD_CLOEXEC)
    os.write(fd, load_config(config).text().encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def run(
    config: Config | str | os.PathLike[str],
    command: Sequence[str],
    *,
    timeout: float | None = None,
    **popen: object,
) -> int:
    """Run `command` in a namespace whose only network is the tunnel; its exit status.
    Works unprivileged where user namespaces are allowed. `popen` goes to subprocess
    (stdout=..., env=..., ...); a timeout kills the whole run (TimeoutExpired)."""
    fd = _config_fd(config)
    try:
        argv = [*WGPY, "run", "-c", f"/dev/fd/{fd}", "--", *command]
        done = subprocess.run(argv, pass_fds=(fd,), timeout=timeout, check=False, **popen)  # type: ignore[call-overload]
        return int(done.returncode)
    finally:
        os.close(fd)


def _options(
    expose: Sequence[str],
    check_alive: Sequence[str],
    check_alive_interval: int | None,
    max_clients: int | None,
    idle_timeout: float | None,
) -> list[str]:
    """`wgpy proxy`'s options for what needs no socket on this side (checked here)."""
    args = []
    for value in expose:
        mapping("expose", value)
        args += ["--expose", value]
    for address in check_alive:
        args += ["--check-alive", str(ipaddress.ip_address(address))]
    numbers = (("--check-alive-interval", check_alive_interval),
               ("--max-clients", max_clients), ("--idle-timeout", idle_timeout))  # fmt: skip
    for flag, number in numbers:
        if number is not None:
            args += [flag, str(number)]
    return args


class Proxy:
    """`wgpy proxy` in a child process, its connections made inside the tunnel's
    namespace: SOCKS5 at `socks` (None for none), an HTTP proxy at `http`, an SNI proxy
    at `sni` (TLS to port 443 of the host its hello names), TCP and UDP
    forwards (`forward`, `udp_forward`: "ADDR:PORT=HOST:PORT", HOST:PORT through the
    tunnel), ports of the tunnel's addresses exposed to this side (`expose`:
    "PORT=HOST:PORT"), the health endpoint (`info`, with wireproxy's CheckAlive in
    `check_alive` and `check_alive_interval`), and the limits `max_clients` and
    `idle_timeout`: what `wgpy proxy` takes on its command line. The sockets on this
    side are opened here, so a port of 0 picks a free one and the addresses are known at
    once: `socks_address`, `http_address`, `sni_address`, `info_address`, `forward_addresses`,
    `udp_forward_addresses` (in the order given). A bad address raises ValueError before
    anything starts. A context manager; `close()` stops it."""

    def __init__(
        self,
        config: Config | str | os.PathLike[str],
        socks: str | None = "127.0.0.1:0",
        http: str | None = None,
        *,
        forward: Sequence[str] = (),
        udp_forward: Sequence[str] = (),
        expose: Sequence[str] = (),
        info: str | None = None,
        sni: str | None = None,
        check_alive: Sequence[str] = (),
        check_alive_interval: int | None = None,
        max_clients: int | None = None,
        idle_timeout: float | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self._sockets: list[socket.socket] = []
        self.socks_address: tuple[str, int] | None = None
        self.http_address: tuple[str, int] | None = None
        self.sni_address: tuple[str, int] | None = None
        self.info_address: tuple[str, int] | None = None
        self.forward_addresses: list[tuple[str, int]] = []
        self.udp_forward_addresses: list[tuple[str, int]] = []
        self.process: subprocess.Popen[bytes] | None = None
        options = _options(expose, check_alive, check_alive_interval, max_clients, idle_timeout)
        wanted = [
            (kind, where)
            for kind, where in (("socks", socks), ("http", http), ("info", info), ("sni", sni))
            if where is not None
        ]
        wanted += [("forward", v) for v in forward] + [("udp", v) for v in udp_forward]
        fd = _config_fd(config)
        read_end, write_end = os.pipe()
        try:
            args = ["-c", f"/dev/fd/{fd}", "--ready-fd", str(write_end), *options]
            fds = [fd, write_end]
            for kind, value in wanted:
                sock, host = self._open(kind, value)
                fds.append(sock.fileno())
                target = value.partition("=")[2]  # a forward's, checked by _open
                # the name it listens on goes too: the health endpoint answers to it
                args += ["--listen-fd",
                         f"{kind}:{sock.fileno()}@{host}{'=' if target else ''}{target}"]
            self.process = subprocess.Popen(
                [*WGPY, "proxy", *args], pass_fds=fds, stderr=subprocess.PIPE
            )
            os.close(write_end)
            write_end = -1
            self._wait_ready(read_end, ready_timeout)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(fd)
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
            for sock in self._sockets:  # the child has them now
                sock.close()

    def _open(self, kind: str, value: str) -> tuple[socket.socket, str]:
        """The socket for one service, opened here, and the host it was asked for (a
        name, or an address); its address noted."""
        if kind in ("forward", "udp"):
            listen = mapping(kind, value)  # checks the target too
            host, port = listen.host, listen.port
        else:
            host, port = listen_address(value)
        sock = udp_socket(host, port) if kind == "udp" else listening_socket(host, port)
        self._sockets.append(sock)
        address = sock.getsockname()[:2]
        if kind == "forward":
            self.forward_addresses.append(address)
        elif kind == "udp":
            self.udp_forward_addresses.append(address)
        else:
            setattr(self, f"{kind}_address", address)
        return sock, host

    def _wait_ready(self, fd: int, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                if os.read(fd, 16).startswith(b"ready"):
                    return
                break  # EOF: the child gave up
        err = b""
        if self.process.poll() is not None and self.process.stderr is not None:
            err = self.process.stderr.read()
        raise RuntimeError(f"wgpy proxy did not start: {err.decode(errors='replace').strip()}")

    def close(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr is not None:
            with contextlib.suppress(OSError):
                proc.stderr.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
