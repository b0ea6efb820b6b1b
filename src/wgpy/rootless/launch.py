"""`wgpy.run` and `wgpy.Proxy`: the rootless namespace from a program.

Unsharing changes the calling process for good (and needs it single-threaded), so the
namespace is made by a fresh `wgpy run` / `wgpy proxy` process; the config goes to it
through a memfd (no file on disk; closed once read, so the command `wgpy run` starts never
has it), the proxy's listening sockets are opened here and handed over, so their
addresses are known before the child even starts.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from wgpy.embed.interface import load_config
from wgpy.rootless.session import listen_address, listening_socket
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


class Proxy:
    """`wgpy proxy` in a child process: SOCKS5 at `socks` (and HTTP CONNECT at `http`,
    if given), its connections made inside the tunnel's namespace. A port of 0 picks a
    free one: see `socks_address`. A context manager; `close()` stops it."""

    def __init__(
        self,
        config: Config | str | os.PathLike[str],
        socks: str | None = "127.0.0.1:0",
        http: str | None = None,
        *,
        ready_timeout: float = 20.0,
    ) -> None:
        self._sockets: list[socket.socket] = []
        self.socks_address: tuple[str, int] | None = None
        self.http_address: tuple[str, int] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        fd = _config_fd(config)
        read_end, write_end = os.pipe()
        try:
            args = ["-c", f"/dev/fd/{fd}", "--ready-fd", str(write_end)]
            fds = [fd, write_end]
            for opt, where in (("--socks-fd", socks), ("--http-fd", http)):
                if where is None:
                    continue
                sock = listening_socket(*listen_address(where))
                self._sockets.append(sock)
                fds.append(sock.fileno())
                args += [opt, str(sock.fileno())]
                address = sock.getsockname()[:2]
                if opt == "--socks-fd":
                    self.socks_address = address
                else:
                    self.http_address = address
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
