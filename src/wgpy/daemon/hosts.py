"""Which `Host` headers a local HTTP listener answers: the web page (`wgpy server run
--web`) and the proxy's health endpoint (`wgpy proxy --info`).

Against DNS rebinding: a web site turns its own name into 127.0.0.1, and its script in
the visitor's browser, which sends that name as the Host, reaches a listener on the
visitor's machine. An address literal cannot be rebound, so any is allowed (a listener
on 0.0.0.0 is reached by its LAN address); of the names, `localhost` and those given
(the name it listens on, `--allowed-host`; `*` for any, behind a proxy that checks the
name itself). A request without a Host is refused too: HTTP/1.1 requires one, and every
client that scrapes or probes (curl, Prometheus, a browser) sends one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Iterable

REFUSED_STATUS = 421  # Misdirected Request: not a name this listener answers to
REFUSED_BODY = "unknown Host header: ask by address or localhost\n"

_HOST = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::[0-9]*)?")  # name or [v6], then a port


def host_name(header: str) -> str:
    """The name or address in a Host header (lower case, no port, no final dot); "" for
    one that is neither."""
    found = _HOST.fullmatch(header)
    return found.group(1).lower().rstrip(".") if found else ""


class AllowedHosts:
    """The names a listener answers to besides addresses and localhost."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        # "" is no name: an IPv6 listen address ("::1") reads as one, and must not let an
        # empty Host through.
        self.names = ({host_name(n) for n in names} - {""}) | {"localhost"}

    def allows(self, header: bytes | None) -> bool:
        if "*" in self.names:
            return True
        name = host_name(header.decode("latin-1")) if header else ""
        if name in self.names:
            return True
        with contextlib.suppress(ValueError):
            if name.startswith("["):
                ipaddress.IPv6Address(name[1:-1])  # with a %zone too: still an address
            else:
                ipaddress.IPv4Address(name)
            return True
        return False
