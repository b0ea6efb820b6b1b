"""Addresses, MTU and routes for an interface we own, over pyroute2 (as `wgpy up` does).

Used in the process's current network namespace: a namespace of our own (`wgpy run`,
`wgpy proxy`) or, with root, wherever the program runs. A route for every allowed IP; for
0.0.0.0/0 and ::/0 a plain default route, which is right only where the UDP socket lives
in another namespace (or the program routes its endpoints itself).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import threading

from wgpy.tools.config import Config

SCOPE_LINK = 253


def configure(index: int, cfg: Config, mtu: int, loopback: bool = False) -> None:
    """Address the interface, set its MTU, bring it up, route its peers' allowed IPs.
    pyroute2's synchronous API runs an asyncio loop of its own, which it cannot do in a
    thread whose loop is running: from there, the work goes to a short-lived thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        _configure(index, cfg, mtu, loopback)
        return
    errors: list[BaseException] = []

    def work() -> None:
        try:
            _configure(index, cfg, mtu, loopback)
        except BaseException as e:
            errors.append(e)

    worker = threading.Thread(target=work, name="wgpy-netconf")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


def _configure(index: int, cfg: Config, mtu: int, loopback: bool) -> None:
    from pyroute2 import IPRoute  # imported here: `import wgpy` stays light

    with IPRoute() as ipr:
        if loopback:
            lo = ipr.link_lookup(ifname="lo")
            if lo:
                ipr.link("set", index=lo[0], state="up")
        ipr.link("set", index=index, mtu=mtu, state="up")
        for addr in cfg.interface.addresses:
            _ignore_exists(
                ipr.addr, "add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen
            )
        nets = sorted({n for p in cfg.peers for n in p.allowed_ips}, key=lambda n: n.prefixlen)
        for net in nets:
            family = socket.AF_INET if net.version == 4 else socket.AF_INET6
            dst = "default" if net.prefixlen == 0 else str(net)
            _ignore_exists(ipr.route, "add", dst=dst, oif=index, family=family, scope=SCOPE_LINK)


def _ignore_exists(call: object, *args: object, **kwargs: object) -> None:
    from pyroute2 import NetlinkError

    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except NetlinkError as e:
        if e.code != errno.EEXIST:  # an address's own prefix route is there already
            raise
