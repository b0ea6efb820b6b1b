"""The UAPI socket: /var/run/wireguard/IFNAME.sock, its clients, and their requests.

The protocol itself (parsing, applying, answering) is in `uapi.py`; this file moves bytes
between clients and `uapi.handle_steps`, on the daemon's one loop thread, without ever
making the datapath wait:

- Nothing blocks. Requests are read as they come; answers are written as far as the
  client takes them and the rest when the socket is writable again (`Loop.add_writer`).
- Requests run one at a time, in arrival order, like wireguard-go's IPC lock. A request
  runs in slices of about `SLICE` seconds (`uapi.handle_steps` yields every few hundred
  lines or entries; the loop's `call_soon` runs the next slice after the next round of
  packets), so a 130,000-line `set` or `get` delays packets by a few milliseconds at a
  time, not by a second. (A worker thread would not help: it would hold the GIL, and
  every datapath syscall would then wait up to the 5 ms switch interval to get it back.)
- Every client is bounded. A pending request may hold `MAX_REQUEST` bytes (a 130k
  allowed-IP `wg setconf` is 4-6 MB); past that the client is answered
  `errno=-EMSGSIZE` ("Message too long") and closed. Its unsent answers may hold
  `MAX_OUTPUT` bytes (a 130k allowed-IP `get` is ~4 MB); past that, or after
  `STALL_TIMEOUT` seconds without taking a byte, it is dropped. The search for the
  blank line that ends a request looks at each byte once, whatever the read sizes.
- A request cut off by the end of the connection is neither answered nor applied; the
  complete requests before it are.
- File descriptors: at most `MAX_CLIENTS` clients (more are accepted and closed at once);
  when accept() finds no descriptor left (EMFILE/ENFILE), accepting pauses until a
  client leaves or the next tick, instead of spinning or failing.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import socket
import stat
import time
from collections import deque
from typing import Protocol

from wgpy.daemon import uapi
from wgpy.daemon.uapi import Host
from wgpy.io.loop import Loop
from wgpy.io.uapi_path import SOCKET_DIR, socket_path

MAX_REQUEST = 32 << 20  # bytes of one pending request; a 130k allowed-IPs setconf is ~5 MB
MAX_OUTPUT = 16 << 20  # bytes of unsent answers; a 130k allowed-IPs get is ~4 MB
MAX_CLIENTS = 512
STALL_TIMEOUT = 10.0  # seconds a client may leave an answer unread
SLICE = 0.002  # seconds of UAPI work per round of the loop
READ_SIZE = 1 << 20
TOO_BIG = f"errno=-{errno.EMSGSIZE}\n\n".encode()
_NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
log = logging.getLogger("wgpy.uapi")


class Connection:
    """One client: bytes in, complete requests out, answers buffered until sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buffer = bytearray()
        self.scanned = 0  # buffer[:scanned] holds no b"\n\n"
        self.out = bytearray()
        self.busy = False  # a request of this client is queued or running
        self.eof = False  # no more requests will come
        self.too_big = False  # to be answered EMSGSIZE, then drained
        self.draining_since = 0.0  # answered EMSGSIZE: its input is read and dropped
        self.closed = False
        self.last_progress = time.monotonic()

    def read(self) -> int:
        """Take what is waiting: the number of bytes, 0 at the end, -1 on an error."""
        try:
            chunk = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return 1
        except OSError:
            return -1
        self.buffer += chunk
        return len(chunk)

    def next_request(self) -> bytes | None:
        """The first complete request (without its blank line), taken out of the buffer.
        Only bytes not looked at before are searched (one back, for a split b"\\n\\n")."""
        end = self.buffer.find(b"\n\n", max(self.scanned - 1, 0))
        if end < 0:
            self.scanned = len(self.buffer)
            return None
        with memoryview(self.buffer) as view:
            request = bytes(view[:end])  # one copy, not two
        del self.buffer[: end + 2]  # cheap: CPython moves the start of a bytearray
        self.scanned = 0
        return request

    def write(self) -> bool:
        """Send what the socket takes now; False on an error (the client is gone)."""
        while self.out:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            del self.out[:sent]
            self.last_progress = time.monotonic()
        return True


class UapiListener:
    """/var/run/wireguard/IFNAME.sock: made like wireguard-go's (dir 0755, socket 0600)."""

    def __init__(self, ifname: str, socket_dir: str = SOCKET_DIR) -> None:
        os.makedirs(socket_dir, mode=0o755, exist_ok=True)
        self.path = str(socket_path(ifname, socket_dir))
        _remove_stale(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self.sock.bind(self.path)
        finally:
            os.umask(old)
        self.sock.listen(128)
        self.sock.setblocking(False)
        self._ino: int | None = os.stat(self.path).st_ino

    @classmethod
    def adopt(cls, fd: int, ifname: str) -> UapiListener:
        """A socket a parent bound and listens on, handed over (wireguard-go's WG_UAPI_FD);
        it too goes when its file is removed, and removes the file when it goes."""
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise OSError(f"UAPI fd {fd} is not a unix stream socket")
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        self = cls.__new__(cls)
        self.sock = sock
        self.path = str(sock.getsockname() or socket_path(ifname))
        try:
            self._ino = os.stat(self.path).st_ino
        except OSError:
            self._ino = None  # no file to watch (an abstract socket, or already gone)
        return self

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> socket.socket | None:
        return accept_client(self.sock)

    def still_there(self) -> bool:
        """False once someone deleted or replaced our socket file: time to go."""
        if self._ino is None:
            return True
        try:
            return os.stat(self.path).st_ino == self._ino
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()
        if self._ino is not None and self.still_there():
            os.unlink(self.path)


def accept_client(listening: socket.socket) -> socket.socket | None:
    """A new client, non-blocking, or None if none is waiting. Raises OSError (EMFILE...)."""
    try:
        conn, _ = listening.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        return None
    conn.setblocking(False)
    return conn


class Listener(Protocol):
    """A listening UAPI socket: ours (UapiListener), or one a parent handed over."""

    path: str

    def fileno(self) -> int: ...
    def accept(self) -> socket.socket | None: ...  # raises OSError (EMFILE...)
    def still_there(self) -> bool: ...
    def close(self) -> None: ...


def _remove_stale(path: str) -> None:
    """Replace a socket nobody answers on; refuse to steal a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by a running daemon")


Job = tuple[Connection, uapi.Steps[str]]


class UapiServer:
    """The listener's clients and their requests, served from `loop`."""

    def __init__(self, host: Host, loop: Loop, listener: Listener) -> None:
        self.host = host
        self.loop = loop
        self.listener = listener
        self.clients: dict[int, Connection] = {}
        self._waiting: deque[tuple[Connection, bytes]] = deque()
        self._job: Job | None = None
        self._scheduled = False
        self._gc_paused = False
        self._accepting = False
        self._starved = False  # accept() found no descriptor left
        self._resume_accepting()

    # ---- accepting ---------------------------------------------------------------------

    def _resume_accepting(self) -> None:
        if not self._accepting:
            self._accepting = True
            self.loop.add_reader(self.listener.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        try:
            sock = self.listener.accept()
        except OSError as e:
            if e.errno not in _NO_DESCRIPTORS:
                log.error("UAPI: accept failed: %s", e)
                return
            # the client stays in the backlog; try again when a descriptor may be free
            if not self._starved:
                log.warning("UAPI: cannot accept a client: %s; pausing", os.strerror(e.errno))
            self._starved = True
            self._accepting = False
            self.loop.remove_reader(self.listener.fileno())
            return
        if sock is None:
            return
        self._starved = False
        if len(self.clients) >= MAX_CLIENTS:
            log.warning("UAPI: %d clients already; closing a new one", MAX_CLIENTS)
            sock.close()
            return
        conn = Connection(sock)
        self.clients[conn.fd] = conn
        self.loop.add_reader(conn.fd, lambda: self._on_readable(conn))

    # ---- one client ----------------------------------------------------------------------

    def _on_readable(self, conn: Connection) -> None:
        got = conn.read()
        if got < 0:  # reset: the client is gone, and takes no answer
            self._close(conn)
            return
        if conn.draining_since:
            conn.buffer.clear()
            if got == 0:
                self._close(conn)
            return
        if got == 0:  # the end: answer the complete requests, drop a cut-off one
            conn.eof = True
            self.loop.remove_reader(conn.fd)
        self._advance(conn)
        if len(conn.buffer) > MAX_REQUEST and not conn.closed:
            log.error("UAPI: a request over %d bytes; closing its client", MAX_REQUEST)
            conn.too_big = True
            conn.buffer = bytearray()
            self._advance(conn)

    def _advance(self, conn: Connection) -> None:
        """An idle client: queue its next complete request, or finish it once all is said.
        One whose request was too big is answered EMSGSIZE, then its input is read and
        dropped until it ends (closing a socket with unread input would reset it, and the
        answer would be lost) or for at most STALL_TIMEOUT."""
        if conn.busy or conn.closed:
            return
        if conn.too_big:
            conn.too_big = False
            conn.draining_since = time.monotonic()
            self._send(conn, TOO_BIG)
        if conn.draining_since:
            if not conn.out and not conn.closed:
                if conn.eof:
                    self._close(conn)
                else:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_WR)
            return
        request = conn.next_request()
        if request is not None:
            conn.busy = True
            self._waiting.append((conn, request))
            self._schedule()
            return
        if conn.eof and not conn.out:
            self._close(conn)

    def _send(self, conn: Connection, data: bytes) -> None:
        """Queue an answer and send what the socket takes now; the rest when writable."""
        if not conn.out:
            conn.last_progress = time.monotonic()
        conn.out += data
        if len(conn.out) > MAX_OUTPUT:
            log.error("UAPI: a client leaves over %d bytes unread; dropping it", MAX_OUTPUT)
            self._close(conn)
            return
        if not conn.write():
            self._close(conn)
        elif conn.out:
            self.loop.add_writer(conn.fd, lambda: self._on_writable(conn))

    def _on_writable(self, conn: Connection) -> None:
        if not conn.write():
            self._close(conn)
        elif not conn.out:
            self.loop.remove_writer(conn.fd)
            self._advance(conn)  # closes a client that has said all it will

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.loop.remove_reader(conn.fd)
        self.loop.remove_writer(conn.fd)
        self.clients.pop(conn.fd, None)
        conn.sock.close()
        conn.buffer = bytearray()
        conn.out = bytearray()
        # a request not started yet is dropped with its client; a running one finishes
        self._waiting = deque(item for item in self._waiting if item[0] is not conn)
        self._resume_accepting()

    # ---- running requests, a slice at a time ---------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._work)

    def _work(self) -> None:
        self._scheduled = False
        deadline = time.monotonic() + SLICE
        while True:
            if self._job is None:
                if not self._waiting:
                    self._collect_garbage(True)
                    return
                self._collect_garbage(False)
                conn, request = self._waiting.popleft()
                self._job = (conn, uapi.handle_steps(self.host, uapi.split_lines(request)))
            conn, steps = self._job
            try:
                while time.monotonic() < deadline:
                    next(steps)
            except StopIteration as done:
                answer: str = done.value
            except Exception:  # handle_steps answers its own errors; this is a bug
                log.exception("UAPI request failed unexpectedly")
                answer = f"errno=-{uapi.IPC_ERROR_UNKNOWN}\n\n"
            else:
                self._young_collection()
                self._schedule()  # out of time: the datapath goes first
                return
            self._young_collection()
            self._job = None
            conn.busy = False
            if not conn.closed:
                self._send(conn, answer.encode())
            self._advance(conn)

    def _collect_garbage(self, on: bool) -> None:
        """CPython's automatic collections are paused while requests run: a big `set`
        makes many objects that live on, and each time their number has grown by a
        quarter a full collection walks the whole heap (a pause of its own, 10-90 ms).
        Instead, each slice ends with a young collection of what that slice made (well
        under a millisecond; it also untracks the new tuples of plain numbers that the
        allowed-IPs table keeps, so they never count towards a full collection)."""
        if not on and gc.isenabled():
            gc.disable()
            self._gc_paused = True
        elif on and self._gc_paused:
            self._gc_paused = False
            gc.enable()

    def _young_collection(self) -> None:
        if self._gc_paused:
            gc.collect(1)

    # ---- housekeeping --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """From the loop's tick: accept again after EMFILE, drop clients that stopped reading."""
        self._resume_accepting()
        for conn in list(self.clients.values()):
            if conn.out and now - conn.last_progress > STALL_TIMEOUT:
                log.error("UAPI: a client has not read its answer for %.0f s; dropping it",
                          STALL_TIMEOUT)  # fmt: skip
                self._close(conn)
            elif conn.draining_since and now - conn.draining_since > STALL_TIMEOUT:
                self._close(conn)

    def close(self) -> None:
        self._collect_garbage(True)
        for conn in list(self.clients.values()):
            self._close(conn)
        self._accepting = False
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
