"""Keep a live device equal to the registry, as `wg syncconf` does: compute the difference
and send only it through the UAPI. Peers that did not change are not named in the request,
so their sessions, endpoints and queued packets stay as they are: adding, disabling or
removing one client loses no packet of any other."""

from __future__ import annotations

from datetime import datetime
from ipaddress import ip_network

from wgpy.server.model import Client, Settings
from wgpy.tools.uapi_client import DeviceStatus


def desired_peers(clients: list[Client], now: datetime) -> dict[bytes, Client]:
    """The clients the device should carry now: enabled and not expired."""
    return {c.public_key: c for c in clients if c.active(now)}


def diff(settings: Settings, clients: list[Client], device: DeviceStatus,
         now: datetime) -> str:  # fmt: skip
    """The `set=1` body (without `set=1` and the blank line) that makes `device` equal to
    the registry, or '' when it already is."""
    lines = []
    if device.private_key != settings.private_key:
        lines.append(f"private_key={settings.private_key.hex()}")
    if device.listen_port != settings.listen_port:
        lines.append(f"listen_port={settings.listen_port}")
    want = desired_peers(clients, now)
    have = {p.public_key: p for p in device.peers}
    for key in have.keys() - want.keys():
        lines += [f"public_key={key.hex()}", "remove=true"]
    for key, client in want.items():
        ips = [f"{a.ip}/{a.max_prefixlen}" for a in client.addresses]  # the client's own
        peer = have.get(key)
        same = (
            peer is not None
            and peer.preshared_key == client.preshared_key
            and {ip_network(n) for n in peer.allowed_ips} == {ip_network(n) for n in ips}
        )
        if same:
            continue
        lines.append(f"public_key={key.hex()}")
        if peer is not None:
            lines.append("update_only=true")
        lines.append(f"preshared_key={client.preshared_key.hex()}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={ip}" for ip in ips]
    return "".join(line + "\n" for line in lines)
