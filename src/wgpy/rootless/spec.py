"""What `wgpy proxy` serves, from its command line or from a wireproxy config file.

Both give a `ProxySpec`: the tunnel's config and a list of `Listen`s. The kinds:

- `socks` / `http`: a proxy listening on this side, connecting from inside the tunnel;
  `http` over TLS when wireproxy's `CertFile` and `KeyFile` name a certificate and key;
- `forward`: TCP on this side to a fixed target inside the tunnel (wireproxy's
  `[TCPClientTunnel]`); `udp`: the same for UDP datagrams;
- `expose`: TCP on a port of the tunnel's addresses to a target on this side
  (wireproxy's `[TCPServerTunnel]`);
- `sni`: TLS on this side to port 443 of the host its ClientHello names, inside the
  tunnel (wireproxy's `[SNI]`);
- `info`: the health endpoint (`--info`);
- `stdio`: standard input and output to a target inside the tunnel (wireproxy's
  `[STDIOTunnel]`, for ssh's ProxyCommand); the proxy ends when that connection does.

The wireproxy file is a wg-quick file with more sections, read as wireproxy reads it:
sections and keys in any case, several sections of a kind, `WGConfig = PATH` before the
first section to take [Interface] and [Peer] from another file, a [Peer] without
AllowedIPs routing everything; `[Resolve]`'s ResolveStrategy says which address family
the proxy's connections try first. What wireproxy has and we lack is refused by name.
"""

from __future__ import annotations

import ipaddress
import math
import ssl
from dataclasses import dataclass, field

from wgpy.core.endpoint import split_endpoint
from wgpy.tools import config as wgconfig
from wgpy.tools.config import Config, ConfigError

UDP_TIMEOUT = 60.0  # seconds
CHECK_INTERVAL = 5.0  # wireproxy's CheckAliveInterval default
KINDS = ("socks", "http", "forward", "expose", "udp", "info", "stdio", "sni")
SECTIONS = {  # wireproxy's section -> our kind
    "[socks5]": "socks",
    "[http]": "http",
    "[tcpclienttunnel]": "forward",
    "[tcpservertunnel]": "expose",
    "[udpproxytunnel]": "udp",
    "[stdiotunnel]": "stdio",
    "[sni]": "sni",
    "[resolve]": "resolve",  # not a listener: how names resolve (ProxySpec.resolve)
}
NAMES = {"[socks5]": "[Socks5]", "[http]": "[http]", "[tcpclienttunnel]": "[TCPClientTunnel]",
         "[tcpservertunnel]": "[TCPServerTunnel]",
         "[udpproxytunnel]": "[UDPProxyTunnel]", "[stdiotunnel]": "[STDIOTunnel]",
         "[sni]": "[SNI]", "[resolve]": "[Resolve]"}  # fmt: skip
UNSUPPORTED = {  # what wireproxy (and its forks) have that wgpy does not
    "tunneldomains": "TunnelDomains (everything goes through the tunnel)",
    "logdomains": "LogDomains",
}
SECTION_KEYS = {
    "socks": ("bindaddress", "username", "password"),
    "http": ("bindaddress", "username", "password", "certfile", "keyfile"),
    "forward": ("bindaddress", "target"),
    "expose": ("listenport", "target"),
    "udp": ("bindaddress", "target", "inactivitytimeout"),
    "stdio": ("target",),
    "sni": ("bindaddress",),
    "resolve": ("resolvestrategy",),
}
STRATEGIES = ("auto", "ipv4", "ipv6")  # ResolveStrategy's


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass
class Listen:
    """One thing to serve: where it listens (host and port; for `expose` the port on the
    tunnel's addresses), and its target (`forward`, `expose`, `udp`)."""

    kind: str
    host: str
    port: int
    target: tuple[str, int] | None = None
    credentials: Credentials | None = None
    fd: int | None = None  # a listening socket handed in (wgpy.Proxy)
    timeout: float = UDP_TIMEOUT  # a UDP forward's: a client silent this long is forgotten
    tls: ssl.SSLContext | None = None  # an HTTP proxy's, served over TLS (CertFile, KeyFile)

    def describe(self) -> str:
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.kind == "expose":
            where = f"port {self.port} of the tunnel"
        to = f" -> {self.target[0]}:{self.target[1]}" if self.target else ""
        tls = " over TLS" if self.tls else ""
        return f"{self.kind}{tls} {where}{to}"


@dataclass
class ProxySpec:
    config: Config
    listens: list[Listen] = field(default_factory=list)
    check_alive: list[str] = field(default_factory=list)  # addresses pinged for /readyz
    check_interval: float = CHECK_INTERVAL
    resolve: str | None = None  # ResolveStrategy: which family's addresses to try first


def listen_address(value: str) -> tuple[str, int]:
    """'127.0.0.1:1080', '[::1]:1080', 'localhost:0' -> (host, port); port 0 picks one."""
    host, sep, port = value.rpartition(":")
    if sep and port == "0":  # split_endpoint wants a port to connect to: 1 to 65535
        return split_endpoint(f"{host}:1")[0], 0
    return split_endpoint(value)


def port_number(value: str) -> int:
    if not value.isascii() or not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{value!r} is not a port (1 to 65535)")
    return int(value)


def mapping(kind: str, value: str) -> Listen:
    """`--forward ADDR:PORT=HOST:PORT`, `--expose PORT=HOST:PORT`, `--udp-forward ...`."""
    left, eq, right = value.partition("=")
    if not eq:
        raise ValueError(f"{value!r} is not LISTEN=TARGET")
    target = split_endpoint(right)
    if kind == "expose":
        return Listen(kind, "::", port_number(left), target)
    return Listen(kind, *listen_address(left), target)


# ---- wireproxy's file ----------------------------------------------------------------


def _split_lines(text: str) -> list[tuple[int, str]]:
    out = []
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.split("#", 1)[0].strip()  # wg-quick's comment rule, as wgpy reads it
        if line:
            out.append((number, line))
    return out


def is_wireproxy(text: str) -> bool:
    """A wireproxy file: a key before any section, or a section wg-quick lacks."""
    in_section = False
    for _, line in _split_lines(text):
        if line.startswith("["):
            if line.lower() not in ("[interface]", "[peer]"):
                return True
            in_section = True
        elif not in_section:
            return True
    return False


@dataclass
class _Section:
    kind: str
    line: int
    keys: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (value, line)


def parse_wireproxy(text: str, path: str) -> ProxySpec:
    """The tunnel's config and what to serve; ConfigError names file, line and key."""
    wg_lines = [""] * (text.count("\n") + 1)  # [Interface]/[Peer] lines, at their numbers
    sections: list[_Section] = []
    include: tuple[int, str] | None = None
    section = ""
    for number, line in _split_lines(text):
        if line.startswith("["):
            section = line.lower()
            if section in UNSUPPORTED:
                why = f"not supported by wgpy: {UNSUPPORTED[section]}"
                raise ConfigError(path, number, line, why)
            if section in SECTIONS:
                sections.append(_Section(SECTIONS[section], number))
            elif section in ("[interface]", "[peer]"):
                wg_lines[number - 1] = line
            else:
                raise ConfigError(path, number, line, "unknown section")
            continue
        key, eq, value = (part.strip() for part in line.partition("="))
        if not eq:
            raise ConfigError(path, number, "", "expected Key = Value")  # may hold a key
        low = key.lower()
        if not section:
            if low != "wgconfig":
                raise ConfigError(path, number, key, "unknown key before any section")
            include = (number, value)
        elif low in UNSUPPORTED:
            raise ConfigError(path, number, key, f"not supported by wgpy: {UNSUPPORTED[low]}")
        elif section in SECTIONS:
            if low not in SECTION_KEYS[sections[-1].kind]:
                raise ConfigError(path, number, key, f"unknown key in {NAMES[section]}")
            sections[-1].keys[low] = (value, number)
        else:
            wg_lines[number - 1] = line
    spec = _wg_config("\n".join(wg_lines), include, path)
    spec.listens = [_listen(s, path) for s in sections if s.kind != "resolve"]
    for s in sections:
        if s.kind == "resolve":
            spec.resolve = _strategy(s, path)
    return spec


def _strategy(section: _Section, path: str) -> str:
    """[Resolve]'s ResolveStrategy; wireproxy's default, auto, when it is not set."""
    value, line = section.keys.get("resolvestrategy", ("auto", section.line))
    value = value.lower()
    if value not in STRATEGIES:
        raise ConfigError(path, line, "ResolveStrategy", f"{value!r} is not one of {STRATEGIES}")
    return value


def _listen(section: _Section, path: str) -> Listen:
    def need(key: str) -> tuple[str, int]:
        if key not in section.keys:
            raise ConfigError(path, section.line, key, "missing")
        return section.keys[key]

    kind, key = section.kind, "bindaddress"
    try:
        if kind == "stdio":
            key = "target"
            return Listen(kind, "", 0, split_endpoint(need(key)[0]))
        if kind == "expose":
            key = "listenport"
            port = port_number(need(key)[0])
            key = "target"
            return Listen(kind, "::", port, split_endpoint(need(key)[0]))
        listen = Listen(kind, *listen_address(need(key)[0]))
        if kind in ("forward", "udp"):
            key = "target"
            listen.target = split_endpoint(need(key)[0])
        if kind == "udp" and "inactivitytimeout" in section.keys:
            key = "inactivitytimeout"
            value = section.keys[key][0]
            if not value.isascii() or not value.isdigit():
                raise ValueError(f"{value!r} is not a number of seconds")
            listen.timeout = float(value) or math.inf  # 0: never, as wireproxy
        if kind == "http" and ("certfile" in section.keys or "keyfile" in section.keys):
            key = "certfile" if "certfile" in section.keys else "keyfile"
            listen.tls = tls_context(need("certfile")[0], need("keyfile")[0])
        user = section.keys.get("username", ("", 0))[0]
        if user:  # as wireproxy: a Username turns authentication on
            listen.credentials = Credentials(user, section.keys.get("password", ("", 0))[0])
        return listen
    except ValueError as e:
        line = section.keys.get(key, ("", section.line))[1]
        raise ConfigError(path, line, key, str(e)) from None


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server's TLS context from a PEM certificate (chain) and its key, relative to the
    working directory as wireproxy opens them; ValueError says why not."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except OSError as e:  # ssl.SSLError is one: a key that is not the certificate's
        raise ValueError(f"cannot load the certificate {cert!r} and key {key!r}: {e}") from None
    return context


def _wg_config(text: str, include: tuple[int, str] | None, path: str) -> ProxySpec:
    """[Interface] and [Peer] from this file, or from the one WGConfig names (relative to
    the working directory, as wireproxy opens it), with wireproxy's CheckAlive keys taken
    out of [Interface]. Peers without AllowedIPs route all."""
    if include is not None:
        number, name = include
        try:
            with open(name) as f:
                text, path = f.read(), name
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(path, number, "WGConfig", str(e)) from None
    text, alive, interval = _check_alive(text, path)
    cfg = wgconfig.parse(text, path)
    for peer in cfg.peers:
        if not peer.allowed_ips:
            peer.allowed_ips = [ipaddress.ip_network(n) for n in ("0.0.0.0/0", "::/0")]
    if cfg.interface.mtu is None:
        cfg.interface.mtu = WIREPROXY_MTU
    return ProxySpec(cfg, [], alive, interval)


def _check_alive(text: str, path: str) -> tuple[str, list[str], float]:
    """(the text without them, CheckAlive's addresses, CheckAliveInterval)."""
    lines = text.split("\n")
    alive: list[str] = []
    interval = CHECK_INTERVAL
    section = ""
    for i, raw in enumerate(lines):
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            section = line.lower()
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        if section != "[interface]" or key.lower() not in ("checkalive", "checkaliveinterval"):
            continue
        lines[i] = ""
        try:
            if key.lower() == "checkalive":
                alive += [str(ipaddress.ip_address(a.strip())) for a in value.split(",")]
            elif not value.isascii() or not value.isdigit() or int(value) < 1:
                raise ValueError(f"{value!r} is not a number of seconds")
            else:
                interval = float(value)
        except ValueError as e:
            raise ConfigError(path, i + 1, key, str(e)) from None
    return "\n".join(lines), alive, interval


WIREPROXY_MTU = 1420  # wireproxy's default when MTU is not set


def load(path: str) -> ProxySpec:
    """A wireproxy file, or a wg-quick file (nothing to serve in it)."""
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, 0, "file", str(e)) from None
    if is_wireproxy(text):
        return parse_wireproxy(text, path)
    return ProxySpec(wgconfig.parse(text, path))
