"""What the registry holds, and the checks every value passes before it is stored.

Pure: no I/O, no clock (callers pass `now`). Each check raises `Invalid` with a sentence a
person can act on; the command line prints it, the web API returns it as a 422.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_SUBNETS = "10.8.0.0/24,fd42:42::/64"
DEFAULT_PORT = 51820
DEFAULT_INTERFACE = "wg0"
DEFAULT_ALLOWED_IPS = ("0.0.0.0/0", "::/0")
ONLINE = 180.0  # seconds since a client's last handshake: no session lives longer
KEEPALIVE = 25  # clients behind NAT (phones) keep their mapping open, as PiVPN sets it
# A name is what a person calls a device: letters, digits and a few separators, so that it
# is also a safe file name ("laptop.conf") and needs no escaping anywhere.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,31}")
_HOST = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")  # fmt: skip
_IFNAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")


class Invalid(ValueError):
    """A value the registry refuses, with the reason in words."""


def _no_scope(text: str, what: str) -> None:
    """Python's ipaddress takes an IPv6 `%scope` verbatim, newlines included, and every
    value here ends up on a line of the client's wg-quick file (where a smuggled `PostUp`
    line would run as root on the client); a scope also means nothing off this host."""
    if "%" in text:
        raise Invalid(f"bad {what} {text!r}: no %scope (a link-local zone) allowed here")


@dataclass(frozen=True)
class Settings:
    """The server: its keys, where clients reach it, and what it hands out."""

    private_key: bytes
    public_key: bytes
    endpoint: str  # HOST:PORT as the clients dial it
    listen_port: int
    pools: tuple[IPNetwork, ...]  # at most one IPv4 and one IPv6 network
    dns: tuple[str, ...]
    interface: str

    def server_addresses(self) -> list[IPInterface]:
        """The server's own address in each pool: the first host."""
        return [ipaddress.ip_interface(f"{next(pool.hosts())}/{pool.prefixlen}")
                for pool in self.pools]  # fmt: skip


@dataclass(frozen=True)
class Client:
    id: int
    name: str
    private_key: bytes
    public_key: bytes
    preshared_key: bytes
    addresses: tuple[IPInterface, ...]  # one in each pool, with the pool's prefix length
    allowed_ips: tuple[IPNetwork, ...]  # what the client sends through the tunnel
    enabled: bool
    expires: datetime | None
    created: datetime
    updated: datetime

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and self.expires <= now

    def active(self, now: datetime) -> bool:
        """Whether the device should carry this client's traffic now."""
        return self.enabled and not self.expired(now)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise Invalid(f"bad client name {name!r}: 1 to 32 letters, digits and _ . @ -, "
                      "starting with a letter or digit")  # fmt: skip
    return name


def check_interface(name: str) -> str:
    if not _IFNAME.fullmatch(name):
        raise Invalid(f"bad interface name {name!r}: 1 to 15 of a-z A-Z 0-9 _ = + . -")
    return name


def check_port(port: int) -> int:
    if not 0 < port < 65536:
        raise Invalid(f"bad port {port}: 1-65535")
    return port


def parse_expiry(text: str, now: datetime) -> datetime | None:
    """A date (YYYY-MM-DD: the end of that day, UTC) or an ISO 8601 time; '' or 'never'
    for none. It must lie in the future: an already expired client is a mistake."""
    text = text.strip()
    if text in ("", "never"):
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            when = datetime.fromisoformat(text).replace(hour=23, minute=59, second=59)
        else:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Invalid(f"bad expiry date {text!r}: use YYYY-MM-DD or an ISO 8601 time") from None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if when <= now:
        raise Invalid(f"expiry date {text!r} is in the past")
    return when


def parse_endpoint(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT, as clients will dial it."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise Invalid(f"bad endpoint {text!r}: use HOST:PORT (port 1-65535)")
    if host.startswith("[") and host.endswith("]"):
        _no_scope(host, "endpoint")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise Invalid(f"bad endpoint {text!r}: {host} is not an IPv6 address") from None
    elif not _HOST.fullmatch(host):
        raise Invalid(f"bad endpoint {text!r}: {host!r} is not a host name or IPv4 address")
    return host, int(port_text)


def parse_subnets(text: str) -> tuple[IPNetwork, ...]:
    """One IPv4 and/or one IPv6 network, comma-separated, with room for a few clients."""
    pools: list[IPNetwork] = []
    for part in (p.strip() for p in text.split(",")):
        _no_scope(part, "subnet")
        try:
            net = ipaddress.ip_network(part)
        except ValueError:
            raise Invalid(f"bad subnet {part!r}: use e.g. 10.8.0.0/24 (host bits zero)") from None
        if net.num_addresses < 4:
            raise Invalid(f"subnet {part} is too small: at most /30 (IPv4) or /126 (IPv6)")
        if any(p.version == net.version for p in pools):
            raise Invalid(f"more than one IPv{net.version} subnet in {text!r}")
        pools.append(net)
    return tuple(sorted(pools, key=lambda n: n.version))


def parse_dns(text: str) -> tuple[str, ...]:
    """DNS servers for the clients: IP addresses, comma-separated ('' for none)."""
    servers = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        _no_scope(part, "DNS server")
        try:
            servers.append(str(ipaddress.ip_address(part)))
        except ValueError:
            raise Invalid(f"bad DNS server {part!r}: an IP address is needed") from None
    return tuple(servers)


def parse_allowed_ips(text: str) -> tuple[IPNetwork, ...]:
    """What a client routes through the tunnel (its AllowedIPs), comma-separated."""
    nets = []
    for part in (p.strip() for p in text.split(",")):
        _no_scope(part, "allowed IP")
        try:
            nets.append(ipaddress.ip_network(part))
        except ValueError:
            raise Invalid(f"bad allowed IP {part!r}: use networks like 0.0.0.0/0") from None
    return tuple(nets)


def check_address(addr: str, pools: tuple[IPNetwork, ...], taken: set[str]) -> IPInterface:
    """A client address given by hand: inside a pool, not the network, broadcast or the
    server's own address, not another client's."""
    _no_scope(addr, "address")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise Invalid(f"bad address {addr!r}") from None
    pool = next((p for p in pools if ip.version == p.version and ip in p), None)
    if pool is None:
        raise Invalid(f"address {addr} is outside the pools "
                      f"({', '.join(map(str, pools))})")  # fmt: skip
    reserved = {pool.network_address, next(pool.hosts())}
    if pool.version == 4:
        reserved.add(pool.broadcast_address)
    if ip in reserved:
        raise Invalid(f"address {addr} is reserved (network, broadcast or the server)")
    if str(ip) in taken:
        raise Invalid(f"address {addr} is already another client's")
    return ipaddress.ip_interface(f"{ip}/{pool.prefixlen}")


def next_address(pool: IPNetwork, taken: set[str]) -> IPInterface:
    """The lowest free client address in a pool (the first host is the server's)."""
    hosts = pool.hosts()
    next(hosts)
    for ip in hosts:
        if str(ip) not in taken:
            return ipaddress.ip_interface(f"{ip}/{pool.prefixlen}")
        if ip.version == 6 and int(ip) - int(pool.network_address) > 1 << 20:
            break  # a /64 has no end worth walking to
    raise Invalid(f"the pool {pool} is full")
