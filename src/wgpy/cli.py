"""The `wgpy` command line.

wgpy [-f|--foreground] IFNAME      serve interface IFNAME (like `wireguard-go IFNAME`)
     [--metrics [HOST:]PORT]       ... with Prometheus metrics (default host: 127.0.0.1)
     [--keylog FILE]               ... appending handshake keys for Wireshark (INSECURE)
wgpy genkey | pubkey | genpsk      keys, as `wg genkey` etc.
wgpy up|down|strip|save CONFIG     wg-quick for wgpy (CONFIG: a path, or NAME for
                                   /etc/wireguard/NAME.conf); `up` also takes the
                                   daemon's --metrics and --keylog
wgpy show [IFNAME] [--json]        what `wg show` prints; --json: that and wgpy's counters
wgpy demo                          a tunnel between two namespaces, with traffic
wgpy run [-c CONFIG] [--] [COMMAND...]
                                   COMMAND (or $SHELL) in a namespace whose only network
                                   is the tunnel; no root needed (user namespaces)
wgpy proxy [-c CONFIG] --socks ADDR:PORT [--http ADDR:PORT]
                                   a SOCKS5 (and HTTP CONNECT) proxy into the tunnel
wgpy server init|run|passwd ...    a VPN server with a registry of clients and a web page
wgpy client add|list|show|disable|enable|remove|passwd ...
                                   its clients (docs/server.md)
"""

from __future__ import annotations

import os
import platform
import sys

from wgpy import __version__
from wgpy.core.crypto import clamp, decode_key, encode_key, public_key

USAGE = __doc__ or ""


def genkey() -> int:
    print(encode_key(clamp(os.urandom(32))))
    return 0


def genpsk() -> int:
    print(encode_key(os.urandom(32)))
    return 0


def pubkey() -> int:
    try:
        private = decode_key(sys.stdin.read())
    except ValueError as e:
        print(f"wgpy: key is not the correct length or format: {e}", file=sys.stderr)
        return 1
    print(encode_key(public_key(clamp(private))))
    return 0


def _quick(command: str, args: list[str]) -> int:
    from wgpy.tools import quick

    if command == "show":
        if "--json" in args:
            from wgpy.tools import status

            return status.show_json([a for a in args if a != "--json"])
        return quick.show_command(args)
    if command == "up":  # the daemon's options, passed on to the daemon `up` starts
        from wgpy.daemon.daemon import parse_options

        try:
            opts, args = parse_options(args)
        except ValueError as e:
            print(f"wgpy up: {e}", file=sys.stderr)
            return 2
        for name, value in (("WGPY_METRICS", opts.metrics), ("WGPY_KEYLOG", opts.keylog)):
            if value:
                os.environ[name] = value
    if len(args) != 1:
        print(f"usage: wgpy {command} CONFIG_FILE | INTERFACE", file=sys.stderr)
        return 2
    return quick.command(command, args[0])


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0 if args else 2
    command = args[0]
    if command in ("-v", "--version", "version"):
        print(f"wgpy v{__version__}\n\nUserspace WireGuard daemon for {sys.platform}-"
              f"{platform.machine()}, in Python {platform.python_version()}.\n"
              "A drop-in for wireguard-go and wg-quick.")  # fmt: skip
        return 0
    simple = {"genkey": genkey, "genpsk": genpsk, "pubkey": pubkey}
    if command in simple:
        return simple[command]()
    if command in ("up", "down", "strip", "save", "show"):
        return _quick(command, args[1:])
    if command in ("run", "proxy"):
        from wgpy.rootless import session

        return session.run_main(args[1:]) if command == "run" else session.proxy_main(args[1:])
    if command in ("server", "client"):
        from wgpy.server import cli as server_cli

        return (server_cli.server_main if command == "server" else server_cli.client_main)(args[1:])
    if command == "demo":
        from wgpy.demo.run import main as demo

        return demo(args[1:])
    from wgpy.daemon.daemon import FOREGROUND_ENV, parse_options, serve

    try:
        options, args = parse_options(args)
    except ValueError as e:
        print(f"wgpy: {e}", file=sys.stderr)
        return 2
    foreground = False
    while args and args[0] in ("-f", "--foreground"):
        foreground = True
        args.pop(0)
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE.strip(), file=sys.stderr)
        return 2
    return serve(args[0], foreground or os.environ.get(FOREGROUND_ENV) == "1", options)
