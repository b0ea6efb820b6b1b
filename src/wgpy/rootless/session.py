"""`wgpy run` and `wgpy proxy`: a tunnel as the only network of a namespace of our own.

The order is the point. First everything that can fail without leaving a trace: the
config is parsed (file:line: key), /dev/net/tun and the namespaces are checked (a forked
child tries to unshare). Then, still in the caller's network namespace, the UDP socket
(and the proxy's listening sockets) are opened and the endpoints resolved. Then the
process unshares user (unless root), network and mount namespaces, maps its own uid and
gid, creates and configures the TUN, mounts a private /etc/resolv.conf for the config's
DNS, starts the datapath thread and runs the command (or serves the proxy). A config
without MTU gets wg-quick's: from the route to its endpoints, looked up before leaving.
Nothing is made in the caller's namespace but sockets, and those close with the process;
the namespaces go with their last process.
"""

from __future__ import annotations

import argparse
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

from pyroute2 import IPRoute

from wgpy.core.endpoint import split_endpoint
from wgpy.embed.interface import Interface, load_config
from wgpy.rootless import serve, uapi_socket, userns
from wgpy.rootless.spec import listen_address as listen_address  # launch.py's import
from wgpy.tools.config import Config, ConfigError, resolve_endpoint
from wgpy.tools.quick import auto_mtu

log = logging.getLogger("wgpy.run")
IFNAME = "wg0"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
PR_SET_PDEATHSIG = 1
SI_KERNEL = 0x80  # a signal the terminal sent to the whole foreground process group


def fail(message: str) -> int:
    sys.stderr.write(f"wgpy: {message}\n")
    return 1


# ---- the config's descriptor, sockets on this side ------------------------------------


_FD_PATH = re.compile(r"/(?:dev|proc/self)/fd/(\d+)")


def close_config_fd(path: Config | str) -> None:
    """A config read from /dev/fd/N (wgpy.run's memfd, or `-c <(...)`) holds the private
    key: N is closed once read, so that the command does not inherit it (0-2 stay: they
    are the command's stdio)."""
    found = _FD_PATH.fullmatch(path) if isinstance(path, str) else None
    if found and int(found.group(1)) > 2:
        with contextlib.suppress(OSError):
            os.close(int(found.group(1)))


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


def set_route_mtu(cfg: Config) -> None:
    """wg-quick's MTU for a config that sets none, from the routes to its endpoints here,
    in the caller's namespace (inside ours, the only route is the tunnel)."""
    if cfg.interface.mtu is not None:
        return
    hosts = []
    for peer in cfg.peers:
        if peer.endpoint:  # resolved once already, by the Interface: retries needless
            with contextlib.suppress(ValueError, OSError):
                hosts.append(split_endpoint(resolve_endpoint(peer.endpoint, retries=0))[0])
    try:
        with IPRoute() as ipr:
            cfg.interface.mtu = auto_mtu(ipr, hosts)
    except OSError as e:  # netlink refused: the Interface's default stands
        log.info("no MTU from the routes: %s", e)


def enter_namespace(iface: Interface, flags: int, unshare: bool = True) -> None:
    """Unshare, give the namespace its resolv.conf, create and start the interface."""
    if unshare:
        userns.enter(flags)
    cfg = iface.config
    if cfg.interface.dns or cfg.interface.dns_search:
        text = userns.resolv_conf_text(cfg.interface.dns, cfg.interface.dns_search)
        userns.bind_resolv_conf(text)
    iface.open()


def serve_uapi(iface: Interface) -> serve.Server | None:
    """A read-only UAPI socket where `wg` looks, in our mount namespace (`uapi_socket`)."""
    sock = uapi_socket.listen(iface.name)
    if sock is None:
        return None
    server = serve.Server([serve.Service(sock, uapi_socket.uapi_handler(iface), "UAPI")], 16)
    try:
        server.start()
    except OSError as e:
        log.info("no UAPI socket for `wg show`: %s", e)
        sock.close()
        return None
    return server


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
    set_route_mtu(cfg)
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
        uapi = serve_uapi(iface)
        try:
            start(go)
            status = wait_child(pid, iface)
            end_leftovers()
            return status
        finally:
            if uapi is not None:
                uapi.stop()
            iface.close()


def setup_logging(name: str | None = None) -> None:
    """LOG_LEVEL=verbose|error|silent, as for the daemon (`name` overrides it)."""
    levels = {"verbose": logging.DEBUG, "error": logging.ERROR, "silent": logging.CRITICAL + 1}
    name = name or os.environ.get("LOG_LEVEL", "error")
    level = levels.get(name.lower(), logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("wgpy: %(levelname)s: %(message)s"))
    ours = logging.getLogger("wgpy")  # ours only: pyroute2's debug lines stay out
    ours.setLevel(level)
    ours.addHandler(handler)
    ours.propagate = False


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wgpy run",
        description="Run COMMAND (default: your shell) with a WireGuard tunnel as its only "
        "network, without root: a user, network and mount namespace of its own.",
    )
    p.add_argument("-c", "--config", help="a wg-quick file (default: $WGPY_CONFIG)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="[--] COMMAND [ARGS...]",
                   help="what to run in the tunnel's namespace")  # fmt: skip
    return p


def run_main(args: list[str]) -> int:
    ns = run_parser().parse_args(args)
    setup_logging()
    path = ns.config or os.environ.get("WGPY_CONFIG")
    if not path:
        return fail("no config: give -c CONFIG (a wg-quick file) or set WGPY_CONFIG") + 1
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    return run(path, command)
