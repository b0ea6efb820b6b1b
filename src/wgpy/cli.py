"""The `wgpy` command line.

wgpy [-f|--foreground] IFNAME      serve interface IFNAME (like `wireguard-go IFNAME`)
     [--metrics [HOST:]PORT]       ... with Prometheus metrics (default host: 127.0.0.1)
     [--keylog FILE]               ... appending handshake keys for Wireshark (INSECURE:
                                   FILE holds the private key and all session keys; made
                                   0600, refused if a symlink or others may read it)
     [--threads N]                 ... sealing and opening on N threads (default: one
                                   per core; WGPY_THREADS; the native datapath only)
wgpy genkey | pubkey | genpsk      keys, as `wg genkey` etc.
wgpy up|down|strip|save CONFIG     wg-quick for wgpy (CONFIG: a path, or NAME for
                                   /etc/wireguard/NAME.conf); `up` also takes the
                                   daemon's --metrics, --keylog and --threads
wgpy show [IFNAME] [--json]        what `wg show` prints; --json: that and wgpy's counters
wgpy demo                          a tunnel between two namespaces, with traffic
wgpy run [-c CONFIG] [--] [COMMAND...]
                                   COMMAND (or $SHELL) in a namespace whose only network
                                   is the tunnel; no root needed (user namespaces)
wgpy proxy [-c CONFIG] --socks ADDR:PORT [--http ADDR:PORT]
                                   a SOCKS5 (and HTTP CONNECT) proxy into the tunnel
wgpy server init|set|run|passwd ...
                                   a VPN server with a registry of clients and a web page
wgpy client add|list|show|disable|enable|remove|passwd ...
                                   its clients (docs/server.md)
wgpy COMMAND --help                that command's options

Each command parses its arguments with argparse: `--help` prints them, a usage error
exits with status 2. Only what a command needs is imported, so `wgpy genkey` loads no
datapath.
"""

from __future__ import annotations

import argparse
import os
import platform
import stat
import sys
from collections.abc import Callable

from wgpy._version import __version__
from wgpy.core.crypto import clamp, decode_key, encode_key, public_key

USAGE = __doc__ or ""


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"wgpy {command}", description=description,
                                   allow_abbrev=False)  # fmt: skip


def genkey(args: list[str]) -> int:
    _parser("genkey", "Print a new private key (base64), as `wg genkey`.").parse_args(args)
    _warn_if_world_accessible()
    print(encode_key(clamp(os.urandom(32))))
    return 0


def genpsk(args: list[str]) -> int:
    _parser("genpsk", "Print a new preshared key (base64), as `wg genpsk`.").parse_args(args)
    _warn_if_world_accessible()
    print(encode_key(os.urandom(32)))
    return 0


def _warn_if_world_accessible() -> None:
    """`wgpy genkey > file` into a file others may access: wg genkey's warning (and
    its test: a regular file with any permission for others). The key is still written."""
    try:
        st = os.fstat(1)
    except OSError:  # no stdout at all: nothing to warn about
        return
    if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IRWXO:
        sys.stderr.write(
            "Warning: writing to world accessible file.\n"
            "Consider setting the umask to 077 and trying again.\n"
        )


def pubkey(args: list[str]) -> int:
    _parser("pubkey", "Read a private key on stdin, print its public key, as `wg pubkey`."
            ).parse_args(args)  # fmt: skip
    try:
        private = decode_key(sys.stdin.read())
    except ValueError as e:
        print(f"wgpy: key is not the correct length or format: {e}", file=sys.stderr)
        return 1
    print(encode_key(public_key(clamp(private))))
    return 0


_QUICK = {
    "up": "Create the interface, start its daemon and configure it from CONFIG, as `wg-quick up`.",
    "down": "Run the hooks, save the config if asked, and delete the interface, as "
    "`wg-quick down`.",
    "strip": "Print CONFIG without wg-quick's own keys (what `wg setconf` takes).",
    "save": "Write the interface's live configuration back to CONFIG, as `wg-quick save`.",
}


def quick_command(command: str, args: list[str]) -> int:
    """`wgpy up|down|strip|save CONFIG`."""
    parser = _parser(command, _QUICK[command])
    parser.add_argument("config", metavar="CONFIG",
                        help="a wg-quick file, or NAME for /etc/wireguard/NAME.conf")  # fmt: skip
    if command == "up":  # the daemon's options, passed on to the daemon `up` starts
        from wgpy.daemon.daemon import add_options, options_from

        add_options(parser)
    parsed = parser.parse_args(args)
    if command == "up":
        opts = options_from(parsed)
        threads = str(opts.threads) if opts.threads else None
        for name, value in (("WGPY_METRICS", opts.metrics), ("WGPY_KEYLOG", opts.keylog),
                            ("WGPY_THREADS", threads)):  # fmt: skip
            if value:
                os.environ[name] = value
    from wgpy.tools import quick

    return quick.command(command, parsed.config)


def show(args: list[str]) -> int:
    """`wgpy show [IFNAME...] [--json]`."""
    parser = _parser("show", "What `wg show` prints, for wgpy's interfaces.")
    parser.add_argument("interfaces", metavar="IFNAME", nargs="*",
                        help="the interfaces to show (default: all)")  # fmt: skip
    parser.add_argument("--json", action="store_true",
                        help="one interface's status and wgpy's counters as JSON "
                        "(docs/status.md); a list of them without IFNAME")  # fmt: skip
    parsed = parser.parse_args(args)
    if parsed.json:
        if len(parsed.interfaces) > 1:
            parser.error("--json shows one interface, or all")
        from wgpy.tools import status

        return status.show_json(parsed.interfaces[0] if parsed.interfaces else None)
    from wgpy.tools import quick

    return quick.show_command(parsed.interfaces)


def version() -> int:
    print(f"wgpy v{__version__}\n\nUserspace WireGuard daemon for {sys.platform}-"
          f"{platform.machine()}, in Python {platform.python_version()}.\n"
          "A drop-in for wireguard-go and wg-quick.")  # fmt: skip
    return 0


def daemon(args: list[str]) -> int:
    """`wgpy [-f] IFNAME [--metrics ADDR] [--keylog FILE] [--threads N]`: wireguard-go's
    syntax."""
    from wgpy.daemon.daemon import FOREGROUND_ENV, add_options, options_from, serve

    parser = argparse.ArgumentParser(
        prog="wgpy",
        usage="wgpy [-f] IFNAME [--metrics [HOST:]PORT] [--keylog FILE] [--threads N]\n"
        "       wgpy COMMAND ... (wgpy --help lists them)",
        description="Serve interface IFNAME, as `wireguard-go IFNAME`.", allow_abbrev=False,
    )  # fmt: skip
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground (env WG_PROCESS_FOREGROUND=1)")  # fmt: skip
    parser.add_argument("ifname", metavar="IFNAME", help="the TUN interface to create")
    add_options(parser)
    parsed = parser.parse_args(args)
    foreground = parsed.foreground or os.environ.get(FOREGROUND_ENV) == "1"
    return serve(parsed.ifname, foreground, options_from(parsed))


def _quick(command: str) -> Callable[[list[str]], int]:
    return lambda args: quick_command(command, args)


def _rootless(command: str) -> Callable[[list[str]], int]:
    def run(args: list[str]) -> int:
        if command == "run":
            from wgpy.rootless import session

            return session.run_main(args)
        from wgpy.rootless import proxy

        return proxy.main(args)

    return run


def _server(command: str) -> Callable[[list[str]], int]:
    def run(args: list[str]) -> int:
        from wgpy.server import cli

        return cli.server_main(args) if command == "server" else cli.client_main(args)

    return run


def _demo(args: list[str]) -> int:
    from wgpy.demo.run import main as demo

    return demo(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "genkey": genkey,
    "genpsk": genpsk,
    "pubkey": pubkey,
    "up": _quick("up"),
    "down": _quick("down"),
    "strip": _quick("strip"),
    "save": _quick("save"),
    "show": show,
    "demo": _demo,
    "run": _rootless("run"),
    "proxy": _rootless("proxy"),
    "server": _server("server"),
    "client": _server("client"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.strip())
        return 0 if args else 2
    if args[0] in ("-v", "--version", "version"):
        return version()
    command = COMMANDS.get(args[0])
    try:
        return command(args[1:]) if command is not None else daemon(args)
    except SystemExit as e:  # argparse: 0 after --help, 2 after a usage error
        return e.code if isinstance(e.code, int) else 1
