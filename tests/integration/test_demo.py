"""The README's main command: the demo tunnel carries traffic and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wgpy.io.uapi_path import SOCKET_DIR


@pytest.mark.parametrize("peer", ["wgpy", "wireguard-go"])
def test_demo_runs_and_cleans_up(peer: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wgpy", "demo", "--seconds", "1", "--peer", peer],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("rtt min/avg/max/mdev") == 4  # ping both ways, IPv4 and IPv6
    assert "Gbit/s" in out and out.count("latest handshake:") == 2
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "demo" not in namespaces
    leftovers = subprocess.run(["ls", SOCKET_DIR], capture_output=True, text=True).stdout
    assert "demo" not in leftovers
