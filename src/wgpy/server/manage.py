"""What the command line and the web page both do to the registry: set up a server, add a
client with fresh keys, render its wg-quick file and QR code, write files atomically."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from wgpy.core.crypto import clamp, public_key
from wgpy.server.model import (
    DEFAULT_ALLOWED_IPS,
    DEFAULT_INTERFACE,
    KEEPALIVE,
    Client,
    Settings,
    check_interface,
    check_port,
    parse_allowed_ips,
    parse_dns,
    parse_endpoint,
    parse_subnets,
)
from wgpy.server.store import NewClient, Registry
from wgpy.tools.config import Config, PeerConfig

if TYPE_CHECKING:
    import segno


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def keypair() -> tuple[bytes, bytes]:
    private = clamp(os.urandom(32))
    return private, public_key(private)


def init(registry: Registry, endpoint: str, subnets: str, dns: str, port: int | None,
         interface: str = DEFAULT_INTERFACE) -> Settings:  # fmt: skip
    """A new server: its keys, and where clients will reach it."""
    _, endpoint_port = parse_endpoint(endpoint)
    private, public = keypair()
    settings = Settings(
        private_key=private, public_key=public, endpoint=endpoint.strip(),
        listen_port=endpoint_port if port is None else check_port(port),
        pools=parse_subnets(subnets),
        dns=parse_dns(dns), interface=check_interface(interface),
    )  # fmt: skip
    registry.initialize(settings)
    return settings


def add_client(registry: Registry, name: str, expires: datetime | None,
               allowed_ips: str = ",".join(DEFAULT_ALLOWED_IPS)) -> Client:  # fmt: skip
    private, public = keypair()
    new = NewClient(name, private, public, os.urandom(32), parse_allowed_ips(allowed_ips),
                    expires)  # fmt: skip
    return registry.add_client(new, now())


def client_config(settings: Settings, client: Client) -> str:
    """The client's wg-quick file: the only place, with its QR code, that shows its key."""
    peer = PeerConfig.build(
        settings.public_key, allowed_ips=[str(n) for n in client.allowed_ips],
        endpoint=settings.endpoint, preshared_key=client.preshared_key,
        persistent_keepalive=KEEPALIVE,
    )  # fmt: skip
    cfg = Config.build(client.private_key, address=[str(a) for a in client.addresses],
                       dns=settings.dns, peers=[peer])  # fmt: skip
    return cfg.text()


def qr(text: str) -> segno.QRCode:
    import segno  # the `wgpy[server]` extra; the rest of the registry works without it

    # error correction "L" keeps a config (~350 bytes) at a size phones read at a glance
    return segno.make_qr(text, error="l")
