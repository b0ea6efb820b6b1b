"""Sockets in the caller's network namespace, for a process that has left it.

A socket belongs to the namespace it was made in, wherever it is used afterwards. So a
helper forked before unsharing (`Outside.start`) stays in the caller's namespaces and
makes sockets on request; they come back over a socketpair (SCM_RIGHTS), and the proxy
connects or binds them from inside the tunnel's namespace: `--expose` reaches targets
on this side, SOCKS5 UDP ASSOCIATE gives clients a relay address they can reach.
(An unprivileged process could not setns back: the caller's namespace belongs to a user
namespace it has no rights in.) The helper makes sockets and nothing else; it leaves
when the proxy closes its end, or dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import struct
import threading

PR_SET_PDEATHSIG = 1
_REQUEST = struct.Struct("!ii")  # family, type


class Outside:
    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        """Fork the helper; call while single-threaded, before unsharing."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                ours.close()
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() == parent:
                    _serve(theirs)
                    code = 0
            finally:
                os._exit(code)
        theirs.close()
        self._sock, self._pid = ours, pid

    def socket(self, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket made in the caller's namespace (OSError if it could not be)."""
        if self._sock is None:
            return socket.socket(family, kind)  # never left: make it here
        with self._lock:
            self._sock.sendall(_REQUEST.pack(family, kind))
            msg, fds, _, _ = socket.recv_fds(self._sock, 16, 1)
        if not fds:
            errno = int(msg.decode() or "5")
            raise OSError(errno, f"the outside helper: {os.strerror(errno)}")
        return socket.socket(family, kind, fileno=fds[0])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._pid, 0)
            self._pid = 0


def _serve(chan: socket.socket) -> None:  # pragma: no cover (runs in the child)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)  # the proxy ends us by closing the channel
    while request := chan.recv(_REQUEST.size):
        family, kind = _REQUEST.unpack(request)
        try:
            made = socket.socket(family, kind | socket.SOCK_CLOEXEC)
        except OSError as e:
            chan.sendall(str(e.errno or 5).encode())
            continue
        with made:
            socket.send_fds(chan, [b"ok"], [made.fileno()])
