"""`wgpy proxy`: proxies and forwards between this side and a tunnel of our own.

What to serve comes from the command line and from a wireproxy file (`spec`). The order
is `wgpy run`'s: the config and every address are checked first; the sockets clients use
on this side (SOCKS5, HTTP, forwards, UDP forwards) are opened in the caller's network
namespace; the `Outside` helper is forked (for `--expose` and SOCKS5 UDP); then the
process unshares, opens the tunnel and the exposed ports inside, and serves until SIGINT,
SIGTERM or SIGHUP. `--configtest` stops after the checks; `--daemon` runs the same in a
detached child and returns once it serves.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import ipaddress
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

from wgpy.core.endpoint import split_endpoint
from wgpy.embed.interface import Interface
from wgpy.rootless import serve, userns
from wgpy.rootless.alive import Alive
from wgpy.rootless.forward import (
    UdpForward,
    expose_handler,
    forward_handler,
    resolve_outside,
    stdio_tunnel,
)
from wgpy.rootless.http import http_handler
from wgpy.rootless.info import info_handler
from wgpy.rootless.outside import Outside
from wgpy.rootless.owners import Owners
from wgpy.rootless.session import (
    FORWARDED,
    IFNAME,
    blocked,
    close_config_fd,
    enter_namespace,
    fail,
    listening_socket,
    prepare,
    serve_uapi,
    set_route_mtu,
    setup_logging,
)
from wgpy.rootless.sni import sni_handler
from wgpy.rootless.socks import Options, socks_handler
from wgpy.rootless.spec import Listen, ProxySpec, listen_address, load, mapping
from wgpy.tools.config import ConfigError

NAMES = {"socks": "SOCKS5 proxy", "http": "HTTP proxy", "forward": "TCP forward",
         "expose": "TCP exposed", "udp": "UDP forward", "info": "health endpoint",
         "stdio": "standard input and output", "sni": "SNI proxy"}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wgpy proxy",
        description="Proxies and port forwards into a WireGuard tunnel of your own, "
        "without root: the tunnel lives in a namespace only this process uses.",
        epilog="CONFIG is a wg-quick file, or a wireproxy file ([Socks5], [http], "
        "[TCPClientTunnel], [TCPServerTunnel], [UDPProxyTunnel], [STDIOTunnel], [SNI], "
        "[Resolve], WGConfig = PATH). "
        "LOG_LEVEL=verbose|error|silent sets what is logged. Listen on loopback: "
        "whoever reaches a port uses your tunnel.",
    )
    add = p.add_argument
    add("-c", "--config", help="the config file (default: $WGPY_CONFIG)")
    add("--socks", action="append", default=[], metavar="ADDR:PORT",
        help="serve SOCKS5 (CONNECT, UDP ASSOCIATE) here")
    add("--http", action="append", default=[], metavar="ADDR:PORT",
        help="serve an HTTP proxy (CONNECT and plain http:// requests) here")
    add("--sni", action="append", default=[], metavar="ADDR:PORT",
        help="serve an SNI proxy here: TLS to port 443 of the host its hello names")
    add("--forward", action="append", default=[], metavar="ADDR:PORT=HOST:PORT",
        help="TCP on ADDR:PORT here to HOST:PORT through the tunnel")
    add("--expose", action="append", default=[], metavar="PORT=HOST:PORT",
        help="TCP on PORT of the tunnel's addresses to HOST:PORT on this side")
    add("--udp-forward", action="append", default=[], metavar="ADDR:PORT=HOST:PORT",
        help="UDP on ADDR:PORT here to HOST:PORT through the tunnel")
    add("--stdio", metavar="HOST:PORT",
        help="standard input and output to HOST:PORT through the tunnel, then exit "
        "(ssh -o ProxyCommand='wgpy proxy -c CONFIG --stdio %%h:%%p')")
    add("-i", "--info", metavar="ADDR:PORT",
        help="serve /readyz and /metrics (Prometheus) here")
    add("--check-alive", action="append", default=[], metavar="ADDRESS",
        help="ping ADDRESS through the tunnel for /readyz (wireproxy's CheckAlive)")
    add("--check-alive-interval", type=int, default=None, metavar="SECONDS",
        help="how often (default 5)")
    add("--max-clients", type=int, default=serve.MAX_CLIENTS, metavar="N",
        help="clients served at once (default %(default)s; fewer under a low fd limit)")
    add("--idle-timeout", type=float, default=serve.IDLE_TIMEOUT, metavar="SECONDS",
        help="close a relayed connection idle this long (default %(default)s)")
    add("-n", "--configtest", action="store_true",
        help="check the config and the addresses, then exit")
    add("-d", "--daemon", action="store_true", help="serve in the background")
    add("-s", "--silent", action="store_true", help="log nothing (LOG_LEVEL=silent)")
    add("--ready-fd", type=int, help=argparse.SUPPRESS)  # wgpy.Proxy's, and --daemon's
    add("--listen-fd", action="append", default=[], help=argparse.SUPPRESS)  # wgpy.Proxy's
    return p  # fmt: skip


@dataclass
class Plan:
    spec: ProxySpec
    max_clients: int
    idle_timeout: float
    silent: bool = False


def plan(ns: argparse.Namespace) -> Plan:
    """Everything checked; ConfigError or ValueError says what is wrong."""
    path = ns.config or os.environ.get("WGPY_CONFIG")
    if not path:
        raise ValueError("no config: give -c CONFIG (wg-quick or wireproxy) or set WGPY_CONFIG")
    spec = load(path)
    for kind, values in (("socks", ns.socks), ("http", ns.http), ("sni", ns.sni)):
        spec.listens += [Listen(kind, *listen_address(v)) for v in values]
    for kind, values in (("forward", ns.forward), ("expose", ns.expose), ("udp", ns.udp_forward)):
        spec.listens += [mapping(kind, v) for v in values]
    if ns.info:
        spec.listens.append(Listen("info", *listen_address(ns.info)))
    spec.check_alive += [str(ipaddress.ip_address(a)) for a in ns.check_alive]
    if ns.check_alive_interval is not None:
        if ns.check_alive_interval < 1:
            raise ValueError("--check-alive-interval must be at least 1")
        spec.check_interval = float(ns.check_alive_interval)
    if ns.stdio:
        spec.listens.append(Listen("stdio", "", 0, split_endpoint(ns.stdio)))
    if sum(lst.kind == "stdio" for lst in spec.listens) > 1:
        raise ValueError("one standard input and output: one --stdio or [STDIOTunnel]")
    spec.listens += [handed_over(value) for value in ns.listen_fd]
    if not spec.listens:
        raise ValueError("nothing to serve: give --socks ADDR:PORT, --http, --sni, --forward, "
                         "--expose or --udp-forward (or sections in a wireproxy file)")  # fmt: skip
    if ns.max_clients < 1 or not ns.idle_timeout > 0:
        raise ValueError("--max-clients and --idle-timeout must be above 0")
    return Plan(spec, ns.max_clients, ns.idle_timeout, ns.silent)


HANDED_OVER = ("socks", "http", "info", "forward", "udp", "sni")


def handed_over(value: str) -> Listen:
    """`--listen-fd KIND:FD[@HOST][=HOST:PORT]`: a socket that wgpy.Proxy opened (so that
    its caller knows the address, port 0 included) and passed down; the host it was asked
    to listen on (a name or a bare address, unbracketed, as listen_address gives it: the
    health endpoint answers to it); a target for forwards."""
    kind, _, rest = value.partition(":")
    head, eq, target = rest.partition("=")
    fd, _, host = head.partition("@")
    if (kind not in HANDED_OVER or not descriptor(fd) or any(c in host for c in "@[]")
            or bool(eq) != (kind in ("forward", "udp"))):  # fmt: skip
        raise ValueError(f"bad --listen-fd {value!r}")
    return Listen(kind, host, 0, split_endpoint(target) if eq else None, fd=int(fd))


def descriptor(text: str) -> bool:
    """Whether `text` is a file descriptor socket.socket(fileno=) takes: ASCII digits
    (str.isdigit takes '²' too), below 2**31 (a C int: past it, OverflowError or a
    'negative file descriptor')."""
    return text.isascii() and text.isdigit() and int(text) < 2**31


def main(args: list[str]) -> int:
    ns = parser().parse_args(args)
    setup_logging("silent" if ns.silent else None)
    try:
        p = plan(ns)
    except ConfigError as e:
        return fail(str(e))
    except ValueError as e:
        return fail(str(e)) + 1
    if ns.configtest:
        for listen in p.spec.listens:
            print(f"wgpy: {listen.describe()}")
        print("wgpy: configuration OK")
        return 0
    if ns.daemon:
        return daemonize(args)
    close_config_fd(ns.config or os.environ.get("WGPY_CONFIG", ""))  # read: the key stays here
    try:
        sockets = open_here(p.spec.listens)
    except OSError as e:
        return fail(f"cannot listen: {e}")
    try:
        return proxy(p, sockets, ns.ready_fd)
    finally:
        for sock in sockets.values():
            sock.close()


def open_here(listens: list[Listen]) -> dict[int, socket.socket]:
    """The sockets on this side, by index in `listens` (exposed ones open inside)."""
    made: dict[int, socket.socket] = {}
    try:
        for i, listen in enumerate(listens):
            if listen.fd is not None:
                made[i] = socket.socket(fileno=listen.fd)
            elif listen.kind == "udp":
                made[i] = udp_socket(listen.host, listen.port)
            elif listen.kind not in ("expose", "stdio"):
                made[i] = listening_socket(listen.host, listen.port)
    except BaseException:
        for sock in made.values():
            sock.close()
        raise
    return made


def udp_socket(host: str, port: int) -> socket.socket:
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def exposed_socket(port: int) -> socket.socket:
    """A listener on `port` of every address in the namespace: the tunnel's ones."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def proxy(p: Plan, sockets: dict[int, socket.socket], ready_fd: int | None) -> int:
    """Unshare, open the tunnel, serve until a signal; the exit status."""
    try:
        cfg, flags = prepare(p.spec.config)
        targets = {i: resolve_outside(lst.target) for i, lst in enumerate(p.spec.listens)
                   if lst.kind == "expose" and lst.target}  # fmt: skip
        iface = Interface(cfg, IFNAME)
    except (ConfigError, userns.NamespaceError, OSError, ValueError) as e:
        return fail(str(e))
    set_route_mtu(cfg)
    outside = Outside()
    owners = Owners()  # the caller's socket tables, opened while we are still there
    ending = Ending()
    cap = serve.client_cap(p.max_clients, serve.raise_fd_limit())
    with blocked(FORWARDED):
        server = uapi = None
        try:
            if targets or any(lst.kind == "socks" for lst in p.spec.listens):
                outside.start()
            enter_namespace(iface, flags)
            for i in targets:
                sockets[i] = exposed_socket(p.spec.listens[i].port)
            server = build_server(p, sockets, targets, outside, cap, iface, ending.end, owners)
            server.start()
            uapi = serve_uapi(iface)
        except OSError as e:
            if server is not None:
                server.stop()
            iface.close()
            outside.close()
            owners.close()
            return fail(f"cannot set up the namespace: {e}")
        try:
            if not p.silent:
                announce(p.spec.listens, sockets)
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)
            while iface.running:
                if signal.sigtimedwait(FORWARDED, 0.25) is not None:
                    break
            return ending.status
        finally:
            for running in (server, uapi):
                if running is not None:
                    running.stop()
            iface.close()
            outside.close()
            owners.close()


class Ending:
    """How the serving thread ends the proxy (the stdio tunnel does, when its connection
    ends): a status, and SIGTERM to ourselves, which the main thread waits for."""

    def __init__(self) -> None:
        self.status = 0

    def end(self, status: int) -> None:
        self.status = status
        os.kill(os.getpid(), signal.SIGTERM)


def build_server(
    p: Plan,
    sockets: dict[int, socket.socket],
    targets: dict[int, list[tuple[int, tuple[str, int]]]],
    outside: Outside,
    cap: int,
    iface: Interface,
    end: Callable[[int], None],
    owners: Owners,
) -> serve.Server:
    services: list[serve.Service] = []
    jobs: list[Callable[[], Coroutine[None, None, None]]] = []
    idle = p.idle_timeout
    alive = None
    if p.spec.check_alive:
        alive = Alive(p.spec.check_alive, p.spec.check_interval)
        jobs.append(alive.run)
    for i, listen in enumerate(p.spec.listens):
        if listen.kind == "stdio":
            assert listen.target is not None
            jobs.append(functools.partial(stdio_tunnel, listen.target, idle, end))
            continue
        sock = sockets[i]
        opts = Options(idle, listen.credentials, outside)
        if listen.kind == "udp":
            assert listen.target is not None
            jobs.append(UdpForward(sock, listen.target, listen.timeout).run)
            continue
        if listen.kind == "socks":
            handler = socks_handler(opts)
        elif listen.kind == "http":
            handler = http_handler(opts)
        elif listen.kind == "sni":
            handler = sni_handler(idle)
        elif listen.kind == "forward":
            assert listen.target is not None
            handler = forward_handler(listen.target, idle)
        elif listen.kind == "info":
            handler = info_handler(iface, lambda: (server.active, server.refused), alive,
                                   names=(listen.host,))  # fmt: skip
        else:
            handler = expose_handler(targets[i], outside, idle)
        services.append(serve.Service(sock, handler, service_name(listen), listen.tls))
    server = serve.Server(services, cap, jobs, owners, preferred_family(p.spec))
    return server


def preferred_family(spec: ProxySpec) -> int | None:
    """ResolveStrategy's family: auto is IPv4 for a tunnel with IPv4 addresses only,
    else IPv6, as wireproxy decides; None (the system's order) without [Resolve]."""
    if spec.resolve is None:
        return None
    if spec.resolve == "auto":
        v6 = any(a.version == 6 for a in spec.config.interface.addresses)
        return int(socket.AF_INET6 if v6 else socket.AF_INET)
    return int(socket.AF_INET6 if spec.resolve == "ipv6" else socket.AF_INET)


def service_name(listen: Listen) -> str:
    return "HTTPS proxy" if listen.kind == "http" and listen.tls else NAMES[listen.kind]


def announce(listens: list[Listen], sockets: dict[int, socket.socket]) -> None:
    """Say where each service listens, and warn of one that other machines reach."""
    for i, listen in enumerate(listens):
        if listen.kind == "stdio":
            continue  # ssh shows our stderr: a ProxyCommand says nothing when all is well
        host, port = sockets[i].getsockname()[:2]
        to = f" -> {listen.target[0]}:{listen.target[1]}" if listen.target else ""
        where = f"port {port} of the tunnel" if listen.kind == "expose" else f"{host}:{port}"
        sys.stderr.write(f"wgpy: {service_name(listen)} on {where}{to}\n")
        if listen.kind != "expose" and not serve.is_loopback(host):
            sys.stderr.write(
                f"wgpy: warning: {host}:{port} is not a loopback address: other machines "
                f"can use it to reach into the tunnel; bind 127.0.0.1 or ::1 unless "
                f"that is what you want\n"
            )


def daemonize(args: list[str]) -> int:
    """`--daemon`: the same command in a new session, detached; 0 once it serves, or
    its error and status if it could not start."""
    kept = [a for a in args if a not in ("-d", "--daemon")]
    argv = [sys.executable, "-m", "wgpy", "proxy", *kept]
    read_end, write_end = os.pipe()
    argv += ["--ready-fd", str(write_end)]
    with open(os.devnull, "rb") as null:
        child = subprocess.Popen(argv, stdin=null, stdout=null, stderr=subprocess.PIPE,
                                 pass_fds=(write_end,), start_new_session=True)  # fmt: skip
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        started = ready.read(6) == b"ready\n"
    assert child.stderr is not None
    if not started:
        sys.stderr.write(child.stderr.read().decode(errors="replace"))
        return child.wait() or 1
    fcntl.fcntl(child.stderr, fcntl.F_SETFL, os.O_NONBLOCK)
    sys.stderr.write((child.stderr.read() or b"").decode(errors="replace"))  # where it serves
    child.stderr.close()  # what it logs from now on goes nowhere: it has no terminal
    print(child.pid)
    return 0
