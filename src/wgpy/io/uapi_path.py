"""Where an interface's UAPI socket lives: the daemon listens there, and every client
(`wg`, wgpy's tools, the demo, the tests) connects there. One directory for all network
namespaces, as wireguard-go has it."""

from __future__ import annotations

from pathlib import Path

SOCKET_DIR = "/var/run/wireguard"


def socket_path(ifname: str, socket_dir: str = SOCKET_DIR) -> Path:
    """Where the daemon of `ifname` listens."""
    return Path(socket_dir) / f"{ifname}.sock"
