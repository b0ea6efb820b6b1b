"""The server's forwarding and NAT rules, with nftables and with the iptables fallback:
real traffic from a "client" namespace through the server to an "internet" namespace that
has no route back, so that only masquerading brings the replies home; then everything
undone, the forwarding sysctl back as it was.

 client 10.8.0.2 --(vcPID, the "tunnel")-- server --(viPID)-- internet 10.202.0.2
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.netns import inside
from wgpy.demo.testbed import Namespace, veth
from wgpy.server.netfilter import Firewall

PID = os.getpid() % 10000


@pytest.fixture
def nets() -> Iterator[tuple[Namespace, Namespace, Namespace]]:
    made: list[Namespace] = []
    try:
        for tag in ("c", "s", "i"):
            made.append(Namespace(f"wgpynf-{PID}-{tag}"))
        client, server, net = made
        veth(server, client, f"vc{PID}", f"cv{PID}")
        veth(server, net, f"vi{PID}", f"iv{PID}")
        server.add_address(f"vc{PID}", "10.8.0.1/24")
        client.add_address(f"cv{PID}", "10.8.0.2/24")
        client.run("ip", "route", "add", "default", "via", "10.8.0.1")
        server.add_address(f"vi{PID}", "10.202.0.1/24")
        net.add_address(f"iv{PID}", "10.202.0.2/24")
        yield client, server, net
    finally:
        for ns in made:
            ns.close()


def reaches(client: Namespace) -> bool:
    done = subprocess.run(client.argv(["ping", "-c", "1", "-W", "1", "10.202.0.2"]),
                          capture_output=True, timeout=5, check=False)  # fmt: skip
    return done.returncode == 0


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_nat_and_forwarding_then_undone(
    backend: str, nets: tuple[Namespace, Namespace, Namespace], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    client, server, _ = nets
    path = os.environ["PATH"]
    if backend == "iptables":  # while the rules go in and out, a PATH without nft
        if shutil.which("iptables") is None or shutil.which("ip6tables") is None:
            pytest.skip("needs iptables and ip6tables")
        for tool in ("iptables", "ip6tables"):
            (tmp_path / tool).symlink_to(str(shutil.which(tool)))
        path = str(tmp_path)
    elif shutil.which("nft") is None:
        pytest.skip("needs nft")
    pools = (ipaddress.ip_network("10.8.0.0/24"), ipaddress.ip_network("fd42:42::/64"))
    assert not reaches(client)  # no forwarding yet (and no route back in any case)
    firewall = Firewall(f"vc{PID}", 51820, pools)
    with inside(server), monkeypatch.context() as m:
        m.setenv("PATH", path)
        firewall.up()
    try:
        assert server.run("cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
        assert reaches(client)  # only masquerading lets the replies find their way back
        if backend == "nft":
            table = server.run("nft", "list", "table", "inet", f"wgpy-server-vc{PID}")
            assert "masquerade" in table
        else:
            assert f"wgpy server vc{PID}" in server.run("iptables-save", "-t", "nat")
    finally:
        with inside(server), monkeypatch.context() as m:
            m.setenv("PATH", path)
            firewall.down()
    assert server.run("cat", "/proc/sys/net/ipv4/ip_forward").strip() == "0"
    assert server.run("cat", "/proc/sys/net/ipv6/conf/all/forwarding").strip() == "0"
    assert "wgpy" not in server.run("nft", "list", "ruleset")
    assert "wgpy" not in server.run("iptables-save") + server.run("ip6tables-save")
    assert not reaches(client)
