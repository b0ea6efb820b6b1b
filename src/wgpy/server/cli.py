"""`wgpy server ...` and `wgpy client ...`, in the style of PiVPN.

wgpy server init --endpoint HOST:PORT [--subnet 10.8.0.0/24,fd42:42::/64] [--dns IP,...]
                 [--port PORT] [--interface wg0]
wgpy server set [--endpoint HOST:PORT] [--port PORT] [--dns IP,...]
wgpy server run [--web [ADDR:PORT]] [--allowed-host NAME]...  (web default 127.0.0.1:51821)
wgpy client add NAME [--expires DATE] [--allowed-ips NETS] [--qr] [--out FILE]
wgpy client list | show NAME [--qr] [--out FILE] | disable NAME | enable NAME
            | remove NAME | passwd
Every command takes --dir DIR (default /var/lib/wgpy), where the registry lives.
"""

from __future__ import annotations

import argparse
import getpass
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import Any

from wgpy.core.crypto import encode_key
from wgpy.server import auth, manage
from wgpy.server.model import (
    DEFAULT_INTERFACE,
    DEFAULT_SUBNETS,
    ONLINE,
    Client,
    Invalid,
    check_port,
    parse_dns,
    parse_endpoint,
    parse_expiry,
)
from wgpy.server.store import NotInitialized, Registry, SqliteRegistry
from wgpy.tools import config as wgconfig
from wgpy.tools import uapi_client

DEFAULT_DIR = "/var/lib/wgpy"
DEFAULT_WEB = "127.0.0.1:51821"
Handler = Callable[[Registry, argparse.Namespace], int]


def _parser(prog: str) -> tuple[argparse.ArgumentParser, Callable[..., argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"the registry's folder ({DEFAULT_DIR})")
    # not required=True: argparse would then name the missing command before a bad option
    subs = parser.add_subparsers(dest="command")

    def sub(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        # --dir also after the subcommand, without a default that would hide one before it
        p = subs.add_parser(name, **kwargs)
        p.add_argument("--dir", default=argparse.SUPPRESS, help="the registry's folder")
        return p

    return parser, sub


def server_parser() -> argparse.ArgumentParser:
    parser, sub = _parser("wgpy server")
    init = sub("init", help="set up a server: keys, endpoint, address pools")
    init.add_argument("--endpoint", required=True, help="HOST:PORT as clients will dial it")
    init.add_argument("--subnet", default=DEFAULT_SUBNETS, help="IPv4 and/or IPv6 pools")
    init.add_argument("--dns", default="", help="DNS servers for the clients, comma-separated")
    init.add_argument("--port", type=int, help="UDP port to listen on (default: the endpoint's)")
    init.add_argument("--interface", default=DEFAULT_INTERFACE)
    init.set_defaults(handler=cmd_init)
    change = sub("set", help="change the endpoint, the port or the DNS servers")
    change.add_argument("--endpoint", help="HOST:PORT as clients will dial it")
    change.add_argument("--port", type=int, help="UDP port to listen on")
    change.add_argument("--dns", help="DNS servers for the clients ('' for none)")
    change.set_defaults(handler=cmd_set)
    run = sub("run", help="serve the interface (and the web page)")
    run.add_argument("--web", nargs="?", const=DEFAULT_WEB, metavar="ADDR:PORT",
                     help=f"serve the web page (default {DEFAULT_WEB})")  # fmt: skip
    run.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                     help="a host name the page answers to besides its addresses and "
                          "localhost (again for more; '*' for any)")  # fmt: skip
    run.set_defaults(handler=cmd_run)
    sub("passwd", help="set the web page's password").set_defaults(handler=cmd_passwd)
    return parser


def client_parser() -> argparse.ArgumentParser:
    parser, sub = _parser("wgpy client")
    add = sub("add", help="a new client; prints its wg-quick config")
    add.add_argument("name")
    add.add_argument("--expires", default="", help="YYYY-MM-DD or an ISO 8601 time")
    add.add_argument("--allowed-ips", default="0.0.0.0/0,::/0",
                     help="what the client sends through the tunnel")  # fmt: skip
    show = sub("show", help="a client's wg-quick config")
    show.add_argument("name")
    for p in (add, show):
        p.add_argument("--qr", action="store_true", help="also as a QR code in the terminal")
        p.add_argument("--out", help="write the config to this file (mode 0600) instead")
    add.set_defaults(handler=cmd_add)
    show.set_defaults(handler=cmd_show)
    sub("list", help="clients, online state, transfer").set_defaults(handler=cmd_list)
    for name, handler in (("disable", cmd_disable), ("enable", cmd_enable),
                          ("remove", cmd_remove)):  # fmt: skip
        p = sub(name, help=f"{name} a client")
        p.add_argument("name")
        p.set_defaults(handler=handler)
    sub("passwd", help="set the web page's password").set_defaults(handler=cmd_passwd)
    return parser


def cmd_init(registry: Registry, args: argparse.Namespace) -> int:
    s = manage.init(registry, args.endpoint, args.subnet, args.dns, args.port, args.interface)
    print(f"server {s.interface}: public key {encode_key(s.public_key)}, "
          f"port {s.listen_port}, pools {', '.join(map(str, s.pools))}")  # fmt: skip
    print("next: `wgpy client add NAME`, then `wgpy server run`")
    return 0


def cmd_set(registry: Registry, args: argparse.Namespace) -> int:
    if args.endpoint is not None:
        parse_endpoint(args.endpoint)
    s = registry.update_settings(
        endpoint=args.endpoint.strip() if args.endpoint else None,
        listen_port=None if args.port is None else check_port(args.port),
        dns=None if args.dns is None else parse_dns(args.dns),
    )  # fmt: skip
    print(f"endpoint {s.endpoint}, port {s.listen_port}, DNS {', '.join(s.dns) or 'none'}; "
          "clients' files made before keep the old values")  # fmt: skip
    return 0


def cmd_run(registry: Registry, args: argparse.Namespace) -> int:
    from wgpy.server import runner

    web = None
    if args.web:
        host, _, port = args.web.rpartition(":")
        if not port.isdigit() or not host:
            raise Invalid(f"bad --web {args.web!r}: use ADDR:PORT")
        web = (host.strip("[]"), int(port))
    names = [*args.allowed_host, *([web[0]] if web else [])]  # a name it listens on is ours
    try:
        return runner.run(registry, web, names)
    except runner.ServerError as e:
        print(f"wgpy server: {e}", file=sys.stderr)
        return 1


def cmd_passwd(registry: Registry, args: argparse.Namespace) -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("New web password: ")
        if getpass.getpass("Again: ") != password:
            raise Invalid("the passwords differ")
    else:  # piped in: the first line
        password = sys.stdin.readline().rstrip("\n")
    try:
        registry.set_password_hash(auth.hash_password(password))
    except ValueError as e:
        raise Invalid(str(e)) from None
    print("web password set", file=sys.stderr)
    return 0


def _emit(registry: Registry, client: Client, args: argparse.Namespace) -> None:
    text = manage.client_config(registry.settings(), client)
    if args.out:
        wgconfig.write_atomic(args.out, text.encode())
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    if args.qr:
        manage.qr(text).terminal(compact=True)


def cmd_add(registry: Registry, args: argparse.Namespace) -> int:
    expires = parse_expiry(args.expires, manage.now())
    _emit(registry, manage.add_client(registry, args.name, expires, args.allowed_ips), args)
    return 0


def cmd_show(registry: Registry, args: argparse.Namespace) -> int:
    _emit(registry, registry.client(args.name), args)
    return 0


def cmd_list(registry: Registry, args: argparse.Namespace) -> int:
    settings = registry.settings()
    try:
        peers = {p.public_key: p for p in uapi_client.get(settings.interface).peers}
    except (uapi_client.UapiClientError, OSError):
        peers = {}
        print(f"({settings.interface} is not running)", file=sys.stderr)
    now, when = time.time(), manage.now()
    rows = [("NAME", "ADDRESSES", "STATE", "LAST HANDSHAKE", "RX", "TX", "EXPIRES")]
    for c in registry.clients():
        p = peers.get(c.public_key)
        hs = p.last_handshake if p else 0.0
        state = ("disabled" if not c.enabled else "expired" if c.expired(when)
                 else "online" if hs and now - hs < ONLINE else "offline")  # fmt: skip
        rows.append((c.name, ",".join(str(a.ip) for a in c.addresses), state,
                     f"{int(now - hs)} s ago" if hs else "never",
                     uapi_client._bytes(p.rx_bytes if p else 0),
                     uapi_client._bytes(p.tx_bytes if p else 0),
                     c.expires.strftime("%Y-%m-%d %H:%M") if c.expires else "never"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _set_enabled(registry: Registry, name: str, enabled: bool) -> int:
    registry.update_client(name, manage.now(), enabled=enabled)
    print(f"{name} {'enabled' if enabled else 'disabled'}", file=sys.stderr)
    return 0


def cmd_disable(registry: Registry, args: argparse.Namespace) -> int:
    return _set_enabled(registry, args.name, enabled=False)


def cmd_enable(registry: Registry, args: argparse.Namespace) -> int:
    return _set_enabled(registry, args.name, enabled=True)


def cmd_remove(registry: Registry, args: argparse.Namespace) -> int:
    registry.remove_client(args.name)
    print(f"{args.name} removed", file=sys.stderr)
    return 0


def _main(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is needed")
    handler: Handler = args.handler
    try:
        return handler(SqliteRegistry(args.dir), args)
    except (Invalid, NotInitialized) as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
    except sqlite3.Error as e:  # typically: run by a user who may not read the folder
        print(f"{parser.prog}: cannot open the registry in {args.dir}: {e} "
              "(run as root?)", file=sys.stderr)  # fmt: skip
    except ImportError as e:
        print(f"{parser.prog}: {e.name} is missing: pip install 'wgpy[server]'", file=sys.stderr)
    return 1


def server_main(argv: list[str]) -> int:
    return _main(server_parser(), argv)


def client_main(argv: list[str]) -> int:
    return _main(client_parser(), argv)
