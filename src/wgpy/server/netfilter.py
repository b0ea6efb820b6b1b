"""Forwarding and NAT for the clients' traffic, as wg-easy's default rules, undone on exit.

wg-easy's PostUp: masquerade what the clients send out of the server, accept the
WireGuard port and forwarding to and from the interface. Here with nftables (one table of
our own, `inet wgpy-server-IFNAME`, removed whole on exit), or, without `nft`, the same
rules through iptables/ip6tables tagged with a comment so that exactly they are deleted.
IP forwarding is switched on and its previous value put back on exit.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from wgpy.server.model import IPNetwork

FORWARDING = {4: Path("/proc/sys/net/ipv4/ip_forward"),
              6: Path("/proc/sys/net/ipv6/conf/all/forwarding")}  # fmt: skip


def nft_rules(ifname: str, port: int, pools: tuple[IPNetwork, ...]) -> str:
    table = f"inet wgpy-server-{ifname}"
    lines = [
        f"add table {table}",
        f"add chain {table} input {{ type filter hook input priority 0; }}",
        f"add chain {table} forward {{ type filter hook forward priority 0; }}",
        f"add chain {table} postrouting {{ type nat hook postrouting priority 100; }}",
        f"add rule {table} input udp dport {port} accept",
        f'add rule {table} forward iifname "{ifname}" accept',
        f'add rule {table} forward oifname "{ifname}" accept',
    ]
    for pool in pools:
        family = "ip" if pool.version == 4 else "ip6"
        lines.append(f'add rule {table} postrouting {family} saddr {pool} oifname != "{ifname}" '
                     "masquerade")  # fmt: skip
    return "\n".join(lines) + "\n"


def iptables_rules(ifname: str, port: int, pool: IPNetwork) -> list[list[str]]:
    """wg-easy's rules for one family, each as the arguments after `-A`/`-D`."""
    tag = ["-m", "comment", "--comment", f"wgpy server {ifname}"]
    return [
        ["-t", "nat", "POSTROUTING", "-s", str(pool), "!", "-o", ifname, "-j", "MASQUERADE", *tag],
        ["INPUT", "-p", "udp", "-m", "udp", "--dport", str(port), "-j", "ACCEPT", *tag],
        ["FORWARD", "-i", ifname, "-j", "ACCEPT", *tag],
        ["FORWARD", "-o", ifname, "-j", "ACCEPT", *tag],
    ]


def _iptables(tool: str, action: str, rule: list[str]) -> list[str]:
    if rule[0] == "-t":  # the table option goes before the action
        return [tool, *rule[:2], action, *rule[2:]]
    return [tool, action, *rule]


@dataclass
class Firewall:
    """Rules we added and sysctls we changed, to undo exactly those."""

    ifname: str
    port: int
    pools: tuple[IPNetwork, ...]
    _forwarding: dict[int, str] = field(default_factory=dict)
    _nft: bool = False
    _iptables: list[list[str]] = field(default_factory=list)

    def up(self) -> None:
        for version in sorted({p.version for p in self.pools}):
            self._forwarding[version] = FORWARDING[version].read_text().strip()
            FORWARDING[version].write_text("1\n")
        if shutil.which("nft"):
            self.down_rules()  # a table left by a server that was killed
            text = nft_rules(self.ifname, self.port, self.pools)
            subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True)
            self._nft = True
            return
        for pool in self.pools:
            tool = "iptables" if pool.version == 4 else "ip6tables"
            if shutil.which(tool) is None:
                raise RuntimeError(f"neither nft nor {tool} found: cannot NAT the clients")
            for rule in iptables_rules(self.ifname, self.port, pool):
                subprocess.run(_iptables(tool, "-A", rule), check=True)
                self._iptables.append([tool, *rule])

    def down_rules(self) -> None:
        subprocess.run(["nft", "delete", "table", "inet", f"wgpy-server-{self.ifname}"],
                       capture_output=True, check=False)  # fmt: skip

    def down(self) -> None:
        if self._nft:
            self.down_rules()
        for tool, *rule in reversed(self._iptables):
            subprocess.run(_iptables(tool, "-D", rule), capture_output=True, check=False)
        self._iptables.clear()
        for version, value in self._forwarding.items():
            FORWARDING[version].write_text(value + "\n")
        self._forwarding.clear()
