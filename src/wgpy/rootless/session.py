"""`wgpy run` and `wgpy proxy`: a tunnel as the only network of a namespace of our own.

The order is the point. First everything that can fail without leaving a trace: the
config is parsed (file:line: key), /dev/net/tun and the namespaces are checked (a forked
child tries to unshare). Then, still in the caller's network namespace, the UDP socket
(and the proxy's listening sockets) are opened and the endpoints resolved. Then the
process unshares user (unless root), network and mount namespaces, maps its own uid and
gid, creates and configures the TUN, mounts a private /etc/resolv.conf for the config's
DNS, starts the datapath thread and runs the command (or serves the proxy). Nothing is
made in the caller's namespace but sockets, and those close with the process; the
namespaces go with their last process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator

from wgpy.embed.interface import Interface, load_config
from wgpy.rootless import userns
from wgpy.rootless.socks import ProxyServer
from wgpy.tools.config import Config, ConfigError

log = logging.getLogger("wgpy.run")
IFNAME = "wg0"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
PR_SET_PDEATHSIG = 1
SI_KERNEL = 0x80  # a signal the terminal sent to the whole foreground process group
USAGE_RUN = "usage: wgpy run [-c CONFIG] [--] [COMMAND [ARGS...]]   (CONFIG: or $WGPY_CONFIG)"
USAGE_PROXY = (
    "usage: wgpy proxy [-c CONFIG] --socks ADDR:PORT [--http ADDR:PORT]   (CONFIG: or $WGPY_CONFIG)"
)


class UsageError(Exception):
    pass


def fail(message: str) -> int:
    sys.stderr.write(f"wgpy: {message}\n")
    return 1


# ---- command lines --------------------------------------------------------------------


def _options(args: list[str], names: set[str]) -> tuple[dict[str, str], list[str]]:
    """Leading `--name VALUE` / `--name=VALUE` / `-c VALUE` options, then the rest."""
    opts: dict[str, str] = {}
    args = list(args)
    while args:
        arg = args[0]
        if arg == "--":
            args.pop(0)
            break
        name, eq, value = arg.partition("=")
        if name not in names:
            if arg.startswith("-") and arg != "-":
                raise UsageError(f"unknown option {arg}")
            break
        args.pop(0)
        if not eq:
            if not args:
                raise UsageError(f"{name} needs a value")
            value = args.pop(0)
        opts[{"-c": "--config"}.get(name, name)] = value
    return opts, args


def _config_path(opts: dict[str, str]) -> str:
    path = opts.get("--config") or os.environ.get("WGPY_CONFIG")
    if not path:
        raise UsageError("no config: give -c CONFIG (a wg-quick file) or set WGPY_CONFIG")
    return path


_FD_PATH = re.compile(r"/(?:dev|proc/self)/fd/(\d+)")


def close_config_fd(path: Config | str) -> None:
    """A config read from /dev/fd/N (wgpy.run's memfd, or `-c <(...)`) holds the private
    key: N is closed once read, so that the command does not inherit it (0-2 stay: they
    are the command's stdio)."""
    found = _FD_PATH.fullmatch(path) if isinstance(path, str) else None
    if found and int(found.group(1)) > 2:
        with contextlib.suppress(OSError):
            os.close(int(found.group(1)))


def listen_address(value: str) -> tuple[str, int]:
    """'127.0.0.1:1080', '[::1]:1080', 'localhost:0' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or not host:
        raise UsageError(f"{value!r} is not ADDRESS:PORT")
    return host.strip("[]"), int(port)


def listening_socket(host: str, port: int) -> socket.socket:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = info[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


# ---- the namespace --------------------------------------------------------------------


def prepare(config: Config | str) -> tuple[Config, int]:
    """The config and the unshare flags, or ConfigError / NamespaceError: nothing made."""
    cfg = load_config(config)
    if cfg.interface.private_key is None:
        where = config if isinstance(config, str) else "<config>"
        raise ConfigError(where, 0, "PrivateKey", "missing from [Interface]")
    flags = userns.flags_for(os.geteuid())
    userns.check(flags)
    i = cfg.interface
    quick_only = {
        "Table": i.table, "PreUp": i.pre_up, "PostUp": i.post_up, "PreDown": i.pre_down,
        "PostDown": i.post_down, "SaveConfig": i.save_config, "FwMark": i.fwmark,
    }  # fmt: skip
    ignored = ", ".join(k for k, v in quick_only.items() if v)
    if ignored:
        sys.stderr.write(f"wgpy: ignoring {ignored} (meant for a system interface)\n")
    return cfg, flags


def enter_namespace(iface: Interface, flags: int, unshare: bool = True) -> None:
    """Unshare, give the namespace its resolv.conf, create and start the interface."""
    if unshare:
        userns.enter(flags)
    cfg = iface.config
    if cfg.interface.dns or cfg.interface.dns_search:
        text = userns.resolv_conf_text(cfg.interface.dns, cfg.interface.dns_search)
        userns.bind_resolv_conf(text)
    iface.open()


@contextlib.contextmanager
def blocked(signals: tuple[int, ...]) -> Iterator[None]:
    """Block `signals` in this thread (and the threads it starts) to take them with
    sigtimedwait, which says who sent them."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def fork_waiting(argv: list[str]) -> tuple[int, int]:
    """Fork the command's process now, while we are single-threaded, and let it wait
    for the word go (`start`). It gets a clean signal state (default dispositions,
    nothing blocked) and dies with us even if we are SIGKILLed (PR_SET_PDEATHSIG)."""
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        os.close(read_end)
        return pid, write_end
    try:  # the child: only async-signal-safe work, then exec
        os.close(write_end)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        for sig in range(1, 32):
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if os.read(read_end, 1) != b"g":
            os._exit(1)  # setting up failed; the parent says why
        os.close(read_end)
        os.execvp(argv[0], argv)
    except OSError as e:
        os.write(2, f"wgpy: cannot run {argv[0]}: {e.strerror}\n".encode())
        os._exit(127 if e.errno == errno.ENOENT else 126)
    finally:
        os._exit(126)


def start(go: int) -> None:
    os.write(go, b"g")
    os.close(go)


def wait_child(pid: int, iface: Interface) -> int:
    """Forward SIGINT, SIGTERM, SIGHUP, SIGQUIT to the command until it exits (except
    what the terminal sent its whole process group, which the command got already)."""
    pgrp = os.getpgrp()
    while True:
        info = signal.sigtimedwait((*FORWARDED, signal.SIGCHLD), 0.25)
        if info is not None and info.si_signo in FORWARDED:
            from_tty = info.si_code == SI_KERNEL and os.getpgid(pid) == pgrp
            name = signal.Signals(info.si_signo).name
            if from_tty:
                log.debug("%s from the terminal: the command has it already", name)
            else:
                log.debug("forwarding %s to the command", name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, info.si_signo)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
        if not iface.running:
            sys.stderr.write("wgpy: the tunnel stopped; stopping the command\n")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def namespace_processes() -> list[int]:
    """Other processes in our network namespace (ours alone: we made it)."""
    own = os.readlink("/proc/self/ns/net")
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/net") == own:
                    found.append(int(entry))
    return found


def end_leftovers(grace: float = 1.0) -> None:
    """What the command left running in the namespace (daemons it started) would live
    on without a network: SIGTERM, and SIGKILL after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = namespace_processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = namespace_processes()
        if not pids:
            return


def run(config_path: Config | str, argv: list[str]) -> int:
    """`wgpy run`: COMMAND in the tunnel's namespace; its exit status."""
    try:
        cfg, flags = prepare(config_path)
    except (ConfigError, userns.NamespaceError) as e:
        return fail(str(e))
    close_config_fd(config_path)
    argv = argv or [os.environ.get("SHELL") or "/bin/sh"]
    try:
        iface = Interface(cfg, IFNAME)
    except (OSError, ValueError, ConfigError) as e:
        return fail(str(e))
    with blocked((*FORWARDED, signal.SIGCHLD)):
        pid = go = -1
        try:
            userns.enter(flags)
            pid, go = fork_waiting(argv)
            enter_namespace(iface, flags, unshare=False)
        except OSError as e:
            iface.close()
            if pid > 0:
                os.close(go)  # the child reads nothing and leaves
                os.waitpid(pid, 0)
            return fail(f"cannot set up the namespace: {e}")
        try:
            start(go)
            status = wait_child(pid, iface)
            end_leftovers()
            return status
        finally:
            iface.close()


def proxy(
    config_path: Config | str,
    socks: socket.socket | None,
    http: socket.socket | None,
    ready_fd: int | None = None,
) -> int:
    """`wgpy proxy`: serve SOCKS5 (and HTTP CONNECT) from inside the tunnel's namespace
    until SIGINT, SIGTERM or SIGHUP."""
    try:
        cfg, flags = prepare(config_path)
    except (ConfigError, userns.NamespaceError) as e:
        return fail(str(e))
    try:
        iface = Interface(cfg, IFNAME)
    except (OSError, ValueError, ConfigError) as e:
        return fail(str(e))
    server = ProxyServer(socks, http)
    with blocked(FORWARDED):
        try:
            enter_namespace(iface, flags)
            server.start()
        except OSError as e:
            server.stop()
            iface.close()
            return fail(f"cannot set up the namespace: {e}")
        try:
            for name, sock in (("SOCKS5", socks), ("HTTP CONNECT", http)):
                if sock is not None:
                    host, port = sock.getsockname()[:2]
                    sys.stderr.write(f"wgpy: {name} proxy on {host}:{port}\n")
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            while iface.running:
                if signal.sigtimedwait(FORWARDED, 0.25) is not None:
                    break
            return 0
        finally:
            server.stop()
            iface.close()


def setup_logging() -> None:
    """LOG_LEVEL=verbose|error|silent, as for the daemon."""
    levels = {"verbose": logging.DEBUG, "error": logging.ERROR, "silent": logging.CRITICAL + 1}
    level = levels.get(os.environ.get("LOG_LEVEL", "error").lower(), logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("wgpy: %(levelname)s: %(message)s"))
    ours = logging.getLogger("wgpy")  # ours only: pyroute2's debug lines stay out
    ours.setLevel(level)
    ours.addHandler(handler)
    ours.propagate = False


def run_main(args: list[str]) -> int:
    setup_logging()
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE_RUN)
        return 0
    try:
        opts, rest = _options(args, {"-c", "--config"})
        path = _config_path(opts)
    except UsageError as e:
        return fail(f"{e}\n{USAGE_RUN}") + 1
    return run(path, rest)


def proxy_main(args: list[str]) -> int:
    setup_logging()
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE_PROXY)
        return 0
    names = {"-c", "--config", "--socks", "--http", "--socks-fd", "--http-fd", "--ready-fd"}
    try:
        opts, rest = _options(args, names)
        if rest:
            raise UsageError(f"unexpected {rest[0]!r}")
        path = _config_path(opts)
        if not {"--socks", "--http", "--socks-fd", "--http-fd"} & opts.keys():
            raise UsageError("nothing to serve: give --socks ADDR:PORT (and/or --http)")
        socks_at = listen_address(opts["--socks"]) if "--socks" in opts else None
        http_at = listen_address(opts["--http"]) if "--http" in opts else None
        ready = int(opts["--ready-fd"]) if "--ready-fd" in opts else None
    except (UsageError, ValueError) as e:
        return fail(f"{e}\n{USAGE_PROXY}") + 1
    try:
        cfg = load_config(path)  # a bad config is reported before any socket is opened
    except ConfigError as e:
        return fail(str(e))
    sockets: list[socket.socket | None] = []
    try:
        for fd_opt, at in (("--socks-fd", socks_at), ("--http-fd", http_at)):
            if fd_opt in opts:
                sockets.append(socket.socket(fileno=int(opts[fd_opt])))
            elif at is not None:
                sockets.append(listening_socket(*at))
            else:
                sockets.append(None)
    except (OSError, ValueError) as e:
        for s in sockets:
            if s is not None:
                s.close()
        return fail(f"cannot listen: {e}")
    try:
        return proxy(cfg, sockets[0], sockets[1], ready)
    finally:
        for s in sockets:
            if s is not None:
                s.close()
