"""Endpoints: the one `Endpoint` type, and host:port written and read one way for all.

An endpoint is `(host, port)`: an IPv4 host as a dotted quad, an IPv6 one without
brackets (a link-local one may keep its `%scope`). Written, IPv6 hosts take brackets
(`[fd00::1]:51820`), as `wg` writes them. Ports are ASCII digits only: `str.isdigit()`
also takes "²" and the Arabic-Indic "\u0665", and `int("\u0665")` is 5.
"""

from __future__ import annotations

import ipaddress
import re

Endpoint = tuple[str, int]

_HOST_PORT = re.compile(r"\[([^\]]+)\]:([0-9]{1,5})|([^:\[\]]+):([0-9]{1,5})")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_port(text: str) -> int:
    """A port from 1 to 65535, written in ASCII digits; ValueError otherwise."""
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise ValueError(f"{text!r} is not a port (1-65535)")
    return int(text)


def split_endpoint(value: str) -> Endpoint:
    """'host:port' or '[v6]:port' -> (host, port); the host may still be a name."""
    m = _HOST_PORT.fullmatch(value)
    port = int(m.group(2) or m.group(4)) if m else 0
    if not m or not 0 < port < 65536:
        raise ValueError(f"{value!r} is not host:port or [address]:port")
    return m.group(1) or m.group(3), port


def parse_address_endpoint(value: str) -> Endpoint:
    """`1.2.3.4:51820` or `[fd00::1]:51820`, the host an address, not a name (as `wg`
    sends it: already resolved); a link-local address keeps its %scope, an IPv4-mapped
    one becomes the IPv4 address. ValueError otherwise."""
    host, port = split_endpoint(value)
    addr = ipaddress.ip_address(host)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return (str(addr), port)


def format_endpoint(ep: Endpoint) -> str:
    """The inverse of `split_endpoint`: brackets around IPv6 hosts."""
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"
