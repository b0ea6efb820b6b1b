"""`wgpy up` / `wgpy down` in network namespaces, compared with what wg-quick does."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgpy.demo.testbed import WGPY, WIREGUARD_GO, Namespace, TunnelEnd, veth, wg_keypair
from wgpy.io.uapi_path import socket_path
from wgpy.tools.quick import KERNEL_LL

PID = os.getpid() % 100000
NOISE = ("proto", "kernel", "static")  # words that differ between kernel and userspace


def snapshot(ns: Namespace) -> list[str]:
    """Everything `up` may touch: links, addresses, routes, rules, in both families."""
    parts = []
    for args in (
        ["link"], ["addr"], ["-4", "route", "show", "table", "all"],
        ["-6", "route", "show", "table", "all"], ["-4", "rule"], ["-6", "rule"],
    ):  # fmt: skip
        lines = ns.run("ip", *args).splitlines()
        parts += [line for line in lines if "valid_lft" not in line]
    return parts


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Namespace, Namespace, Path]]:
    """Namespace A (where `up` runs) and B (a peer) joined by veth 10.200.0.0/24."""
    a = Namespace(f"wgpy-q{PID}-a")
    b = Namespace(f"wgpy-q{PID}-b")
    try:
        veth(a, b, f"qa{PID}", f"qb{PID}")
        a.add_address(f"qa{PID}", "10.200.0.1/24")
        b.add_address(f"qb{PID}", "10.200.0.2/24")
        yield a, b, tmp_path
    finally:
        a.close()
        b.close()
        for name in (f"wq{PID}", f"wr{PID}", f"wb{PID}"):
            socket_path(name).unlink(missing_ok=True)


def wgpy(
    ns: Namespace, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ns.argv([*WGPY, *args]), capture_output=True, text=True, timeout=60,
                          env=env)  # fmt: skip


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_up_down_round_trip_leaves_the_namespace_as_it_was(
    site: tuple[Namespace, Namespace, Path],
) -> None:
    a, _, tmp = site
    priv, _ = wg_keypair()
    _, peer = wg_keypair()
    conf = write(
        tmp / f"wq{PID}.conf",
        f"""[Interface]
PrivateKey = {priv}
Address = 10.201.0.1/24, fd01::1/64
Address = 10.202.0.1/32
ListenPort = 51820

[Peer]
PublicKey = {peer}
Endpoint = 10.200.0.2:51821
AllowedIPs = 10.201.0.0/24, fd01::/64
AllowedIPs = 192.168.77.0/24
""",
    )
    before = snapshot(a)
    done = wgpy(a, "up", str(conf))
    assert done.returncode == 0, done.stderr
    ifname = f"wq{PID}"
    link = a.run("ip", "link", "show", ifname)
    assert "mtu 1420" in link and ",UP" in link  # auto MTU: the veth's 1500 - 80
    addrs = a.run("ip", "addr", "show", ifname)
    for want in ("10.201.0.1/24", "fd01::1/64", "10.202.0.1/32"):
        assert want in addrs
    assert f"192.168.77.0/24 dev {ifname}" in a.run("ip", "-4", "route")
    assert f"fd01::/64 dev {ifname}" in a.run("ip", "-6", "route")
    assert peer in a.run("wg", "show", ifname, "peers")
    assert wgpy(a, "show", ifname).stdout.startswith(f"interface: {ifname}")
    during = snapshot(a)
    again = wgpy(a, "up", str(conf))
    assert again.returncode == 1 and "already exists" in again.stderr
    assert snapshot(a) == during
    done = wgpy(a, "down", str(conf))
    assert done.returncode == 0, done.stderr
    assert snapshot(a) == before
    assert not socket_path(ifname).exists()
    gone = wgpy(a, "down", str(conf))
    assert gone.returncode == 1 and "is not a wgpy interface" in gone.stderr


@contextlib.contextmanager
def wgpy_and_wg_quick(
    site: tuple[Namespace, Namespace, Path], allowed_ips: str, path: str | None = None
) -> Iterator[tuple[str, str]]:
    """One config brought up by `wgpy up` in namespace A and by `wg-quick up` (with
    wireguard-go) in B, both with the given PATH if any; yields the two interface names,
    takes both down at the end."""
    a, b, tmp = site
    _, peer = wg_keypair()
    body = f"""[Interface]
PrivateKey = {wg_keypair()[0]}
Address = 10.201.0.1/24, fd01::1/64

[Peer]
PublicKey = {peer}
Endpoint = 10.200.0.77:51821
AllowedIPs = {allowed_ips}
"""
    ours = write(tmp / f"wr{PID}.conf", body)
    theirs = write(tmp / f"wb{PID}.conf", body)
    env = {**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go"}
    if path:
        env["PATH"] = path
    done = wgpy(a, "up", str(ours), env=env)
    assert done.returncode == 0, done.stderr
    quick = subprocess.run(b.argv(["wg-quick", "up", str(theirs)]), capture_output=True,
                           text=True, env=env, timeout=60)  # fmt: skip
    try:
        assert quick.returncode == 0, quick.stderr
        yield f"wr{PID}", f"wb{PID}"
    finally:
        subprocess.run(b.argv(["wg-quick", "down", str(theirs)]), capture_output=True, timeout=60,
                       env=env)  # fmt: skip
        assert wgpy(a, "down", str(ours), env=env).returncode == 0


def normalized(ns: Namespace, ifname: str, *commands: list[str]) -> list[str]:
    """The commands' output with the interface name neutral, link-local lines dropped
    (their addresses differ by nature) and words that differ by implementation removed."""
    return [
        " ".join(w for w in line.replace(ifname, "IF").split() if w not in NOISE)
        for command in commands
        for line in ns.run(*command).splitlines()
        if "fe80" not in line and "valid_lft" not in line
    ]


def test_same_addresses_routes_and_mtu_as_wg_quick(site: tuple[Namespace, Namespace, Path]) -> None:
    a, b, _ = site

    def view(ns: Namespace, ifname: str) -> list[str]:
        lines = normalized(ns, ifname, ["ip", "-4", "route", "show", "dev", ifname],
                           ["ip", "-6", "route", "show", "dev", ifname],
                           ["ip", "-o", "addr", "show", "dev", ifname])  # fmt: skip
        mtu = ns.run("ip", "link", "show", ifname).split(" mtu ")[1].split()[0]
        return [*sorted(lines), f"mtu {mtu}"]

    with wgpy_and_wg_quick(site, "10.201.0.0/24, fd01::/64, 172.16.0.0/12") as (ours, theirs):
        assert view(a, ours) == view(b, theirs)


def test_default_route_keeps_the_endpoint_reachable(
    site: tuple[Namespace, Namespace, Path],
) -> None:
    """0.0.0.0/0 through the tunnel: wg-quick's fwmark table and rules let the tunnel's own
    UDP packets out, and traffic to the peer's inside address flows both ways."""
    a, b, tmp = site
    priv_a, pub_a = wg_keypair()
    priv_b, pub_b = wg_keypair()
    peer_b = TunnelEnd(b, f"wb{PID}", 2, WIREGUARD_GO)
    peer_b.private_key, peer_b.public_key = priv_b, pub_b
    peer_b.start()
    try:
        peer_b.set_private_key(51821)
        b.add_address(peer_b.ifname, "10.201.0.2/24")
        b.set_link(peer_b.ifname, state="up", mtu=1420)
        peer_b.wg("set", peer_b.ifname, "peer", pub_a, "allowed-ips", "10.201.0.1/32")
        conf = write(
            tmp / f"wq{PID}.conf",
            f"""[Interface]
PrivateKey = {priv_a}
Address = 10.201.0.1/24

[Peer]
PublicKey = {pub_b}
Endpoint = 10.200.0.2:51821
AllowedIPs = 0.0.0.0/0, ::/0
""",
        )
        done = wgpy(a, "up", str(conf))
        assert done.returncode == 0, done.stderr
        rules = a.run("ip", "-4", "rule")
        assert "not from all fwmark 0xca6c lookup 51820" in rules
        assert "lookup main suppress_prefixlength 0" in rules
        assert "default dev" in a.run("ip", "-4", "route", "show", "table", "51820")
        a.run("ping", "-c", "2", "-i", "0.2", "-W", "3", "10.201.0.2", timeout=20)
        assert "latest handshake" in a.run("wg", "show", f"wq{PID}")
        assert wgpy(a, "down", str(conf)).returncode == 0
        assert "suppress_prefixlength" not in a.run("ip", "-4", "rule")
        assert "suppress_prefixlength" not in a.run("ip", "-6", "rule")
    finally:
        peer_b.stop()


def interface(tmp: Path, *lines: str) -> Path:
    """wq<pid>.conf: an [Interface] with a fresh key and Address 10.201.0.1/24, then `lines`."""
    text = "\n".join(["[Interface]", f"PrivateKey = {wg_keypair()[0]}", "Address = 10.201.0.1/24"])
    return write(tmp / f"wq{PID}.conf", text + "\n" + "\n".join(lines) + "\n")


def test_failure_half_way_undoes_everything(site: tuple[Namespace, Namespace, Path]) -> None:
    a, _, tmp = site
    _, peer = wg_keypair()
    conf = interface(tmp, "PostUp = false", "[Peer]", f"PublicKey = {peer}",
                     "AllowedIPs = 10.201.0.0/24, 192.168.9.0/24")  # fmt: skip
    before = snapshot(a)
    done = wgpy(a, "up", str(conf))
    assert done.returncode == 1 and "hook failed: false" in done.stderr
    assert snapshot(a) == before
    assert not socket_path(f"wq{PID}").exists()


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("PrivateKey = notakey", "PrivateKey"),
        ("ListenPort = 70000", "ListenPort"),
        ("Address = 10.0.0.300/24", "Address"),
        ("MTU = lots", "MTU"),
        ("Table = -3", "Table"),
        ("Bogus = 1", "Bogus"),
    ],
)
def test_bad_input_names_file_line_and_key_and_changes_nothing(
    site: tuple[Namespace, Namespace, Path], line: str, key: str
) -> None:
    a, _, tmp = site
    priv, _ = wg_keypair()
    conf = write(tmp / f"wq{PID}.conf", f"[Interface]\nPrivateKey = {priv}\n{line}\n")
    before = snapshot(a)
    done = wgpy(a, "up", str(conf))
    assert done.returncode == 1
    assert f"{conf}:3" in done.stderr and key.lower() in done.stderr.lower()
    assert snapshot(a) == before


def test_save_config_on_down(site: tuple[Namespace, Namespace, Path]) -> None:
    a, _, tmp = site
    _, peer = wg_keypair()
    conf = interface(tmp, "SaveConfig = true")
    assert wgpy(a, "up", str(conf)).returncode == 0
    ifname = f"wq{PID}"
    a.run("wg", "set", ifname, "listen-port", "41414", "peer", peer, "allowed-ips", "10.9.0.0/16")
    assert wgpy(a, "down", str(conf)).returncode == 0
    saved = conf.read_text()
    assert "ListenPort = 41414" in saved and f"PublicKey = {peer}" in saved
    assert "Address = 10.201.0.1/24" in saved and "SaveConfig = true" in saved
    assert conf.stat().st_mode & 0o077 == 0


def test_save_ignores_a_planted_tmp_file_and_writes_mode_0600(
    site: tuple[Namespace, Namespace, Path],
) -> None:
    """The file `save` writes first is its own, made new with mode 0600: a symlink or a
    world-readable file planted where a fixed CONFIG.tmp would go is neither followed
    (root would write the private key wherever it points) nor used (its mode would be
    kept, and the saved config with the key in it readable by all)."""
    a, _, tmp = site
    conf = interface(tmp, "ListenPort = 41515")
    private = conf.read_text().split("PrivateKey = ")[1].split("\n")[0]
    assert wgpy(a, "up", str(conf)).returncode == 0
    try:
        victim = tmp / "victim"
        victim.write_text("untouched\n")
        planted = Path(f"{conf}.tmp")
        planted.symlink_to(victim)
        done = wgpy(a, "save", str(conf))
        assert done.returncode == 0, done.stderr
        assert victim.read_text() == "untouched\n"
        assert private in conf.read_text() and conf.stat().st_mode & 0o777 == 0o600
        planted.unlink(missing_ok=True)
        planted.write_text("")
        planted.chmod(0o644)
        done = wgpy(a, "save", str(conf))
        assert done.returncode == 0, done.stderr
        assert private in conf.read_text() and conf.stat().st_mode & 0o777 == 0o600
        assert not [p.name for p in tmp.iterdir() if p.name.startswith(f".{conf.name}")]
    finally:
        wgpy(a, "down", str(conf))


def test_up_passes_metrics_and_keylog_to_the_daemon(
    site: tuple[Namespace, Namespace, Path],
) -> None:
    """`wgpy up CONFIG --metrics ADDR --keylog FILE`: the daemon `up` starts serves the
    metrics and writes the keylog, as `wgpy IFNAME --metrics ... --keylog ...` would."""
    a, _, tmp = site
    conf = interface(tmp)
    keys = tmp / "keys.log"
    try:
        done = wgpy(a, "up", str(conf), "--metrics", "127.0.0.1:9587", "--keylog", str(keys))
        assert done.returncode == 0, done.stderr
        fetch = "import urllib.request as u;print(u.urlopen('http://127.0.0.1:9587/metrics').read().decode())"
        text = a.run(sys.executable, "-c", fetch)
        assert "wireguard_" in text and f'interface="wq{PID}"' in text
        assert keys.exists()
    finally:
        wgpy(a, "down", str(conf))
    assert wgpy(a, "up", str(conf), "--metrics").returncode == 2  # a missing value


def test_strip_matches_wg_quick_and_world_readable_warns(tmp_path: Path) -> None:
    priv, _ = wg_keypair()
    _, peer = wg_keypair()
    conf = tmp_path / f"wq{PID}.conf"
    conf.write_text(f"""[Interface]
# a comment
PrivateKey = {priv}
Address = 10.0.0.1/24
DNS = 1.1.1.1
PostUp = echo hi

[Peer]
PublicKey = {peer}
AllowedIPs = 10.0.0.0/24
""")
    ours = subprocess.run([*WGPY, "strip", str(conf)], capture_output=True, text=True)
    theirs = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True)
    assert ours.returncode == 0 and ours.stdout == theirs.stdout
    # wg-quick warns when both the file and its folder let others in
    conf.chmod(0o644)
    tmp_path.chmod(0o755)
    ours = subprocess.run([*WGPY, "strip", str(conf)], capture_output=True, text=True)
    theirs = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True)
    assert ours.stderr == theirs.stderr and "world accessible" in ours.stderr


@pytest.mark.parametrize("table", ["off", "1234"])
def test_table_off_and_numbered(site: tuple[Namespace, Namespace, Path], table: str) -> None:
    a, _, tmp = site
    _, peer = wg_keypair()
    conf = interface(tmp, f"Table = {table}", "[Peer]", f"PublicKey = {peer}",
                     "AllowedIPs = 192.168.50.0/24, fd50::/64")  # fmt: skip
    assert wgpy(a, "up", str(conf)).returncode == 0
    try:
        main = a.run("ip", "-4", "route") + a.run("ip", "-6", "route")
        numbered = a.run("ip", "-4", "route", "show", "table", "all")
        assert "192.168.50.0/24" not in main and "fd50::/64" not in main
        if table == "1234":
            assert f"192.168.50.0/24 dev wq{PID} table 1234" in numbered
            assert "fd50::/64 dev" in a.run("ip", "-6", "route", "show", "table", "1234")
        else:
            assert "192.168.50.0/24" not in numbered
    finally:
        assert wgpy(a, "down", str(conf)).returncode == 0


@pytest.mark.skipif(shutil.which("resolvconf") is not None, reason="would change the host's DNS")
def test_dns_without_resolvconf_warns_and_goes_on(
    site: tuple[Namespace, Namespace, Path],
) -> None:
    a, _, tmp = site
    conf = interface(tmp, "DNS = 10.201.0.53, example.com")
    done = wgpy(a, "up", str(conf))
    assert done.returncode == 0 and "resolvconf not found" in done.stderr
    assert wgpy(a, "down", str(conf)).returncode == 0


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables")
def test_default_route_rules_and_firewall_as_wg_quick_makes_them(
    site: tuple[Namespace, Namespace, Path],
) -> None:
    a, b, _ = site
    commands = (["nft", "list", "ruleset"], ["ip", "-4", "rule"], ["ip", "-6", "rule"],
                ["ip", "-4", "route", "show", "table", "51820"],
                ["ip", "-6", "route", "show", "table", "51820"])  # fmt: skip
    with wgpy_and_wg_quick(site, "0.0.0.0/0, ::/0") as (ours, theirs):
        assert normalized(a, ours, *commands) == normalized(b, theirs, *commands)
    assert "wg-quick" not in a.run("nft", "list", "tables")


def test_save_writes_the_live_state_as_wg_quick_save_does(
    site: tuple[Namespace, Namespace, Path],
) -> None:
    """Up a config, change the interface behind wgpy's back (an address and the MTU through
    netlink, a new peer, a moved endpoint and another port through `wg set`), then save:
    the file must be the one real `wg-quick save` writes for that same state."""
    a, _, tmp = site
    _, peer = wg_keypair()
    _, added = wg_keypair()
    conf = interface(tmp, "MTU = 1400", "Table = auto", "SaveConfig = true", "PostUp = true",
                     "PreDown = true", "PostDown = true", "", "[Peer]", f"PublicKey = {peer}",
                     "Endpoint = 10.200.0.2:51821", "AllowedIPs = 10.201.0.2/32")  # fmt: skip
    original = conf.read_text()
    ifname = f"wq{PID}"
    assert wgpy(a, "up", str(conf)).returncode == 0
    try:
        with a.ipr() as ipr:
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=index, address="10.203.0.1", prefixlen=16)
            ipr.addr("add", index=index, address="fd03::1", prefixlen=64)
            ipr.link("set", index=index, mtu=1380)
        a.run("wg", "set", ifname, "listen-port", "41415", "peer", peer, "endpoint",
              "10.200.0.9:4444", "peer", added, "allowed-ips", "10.9.0.0/16,fd09::/64",
              "persistent-keepalive", "25")  # fmt: skip
        done = wgpy(a, "save", str(conf))
        assert done.returncode == 0, done.stderr
        ours = conf.read_text()
        conf.write_text(original)
        quick = subprocess.run(a.argv(["wg-quick", "save", str(conf)]), capture_output=True,
                               text=True, timeout=60)  # fmt: skip
        assert quick.returncode == 0, quick.stderr
        # wg-quick also saves the link-local address the kernel made; wgpy leaves it out
        with a.ipr() as ipr:
            kernel_ll = {
                f"Address = {msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"
                for msg in ipr.get_addr(index=index)
                if msg.get_attr("IFA_PROTO") == KERNEL_LL
            }
        assert kernel_ll  # the comparison does cover its removal
        theirs = "".join(line for line in conf.read_text().splitlines(keepends=True)
                         if line.strip() not in kernel_ll)  # fmt: skip
        assert ours == theirs
        wanted = ("Address = 10.203.0.1/16", "Address = fd03::1/64", "MTU = 1380",
                  "Table = auto", "SaveConfig = true", "PreDown = true", "ListenPort = 41415",
                  "Endpoint = 10.200.0.9:4444", f"PublicKey = {added}",
                  "AllowedIPs = 10.9.0.0/16, fd09::/64", "PersistentKeepalive = 25")  # fmt: skip
        assert all(want in ours for want in wanted), ours
    finally:
        conf.write_text(original)
        assert wgpy(a, "down", str(conf)).returncode == 0


def path_without(tmp: Path, hidden: str) -> str:
    """A PATH of one folder of links to every program in the usual folders but `hidden`."""
    shim = tmp / f"no-{hidden}"
    shim.mkdir()
    for folder in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            link = shim / name
            if name != hidden and not link.exists() and not link.is_symlink():
                link.symlink_to(os.path.join(folder, name))
    return str(shim)


def iptables_view(ns: Namespace, ifname: str) -> list[str]:
    """Both families' iptables-save, without its comments, counters, the interface name and
    the link-local address (random by nature)."""
    return [
        re.sub(r"\[\d+:\d+\]|fe80::[0-9a-f:]+", "", line).replace(ifname, "IF")
        for tool in ("iptables-save", "ip6tables-save")
        for line in ns.run(tool).splitlines()
        if not line.startswith("#")
    ]


@pytest.mark.skipif(shutil.which("iptables-restore") is None, reason="needs iptables")
def test_without_nft_the_iptables_rules_of_wg_quick(
    site: tuple[Namespace, Namespace, Path],
) -> None:
    """With no `nft` on the PATH, wg-quick falls back to iptables-restore: wgpy must write
    the same rules, in the same tables and order, and remove them on `down`."""
    a, b, tmp = site
    path = path_without(tmp, "nft")
    with wgpy_and_wg_quick(site, "0.0.0.0/0, ::/0", path) as (ours, theirs):
        view = iptables_view(a, ours)
        assert view == iptables_view(b, theirs)
        assert sum('"wg-quick(8) rule for IF"' in line for line in view) >= 6
        if shutil.which("nft"):
            assert "wg-quick" not in a.run("nft", "list", "tables")
    for ns in (a, b):
        assert "wg-quick" not in ns.run("iptables-save") + ns.run("ip6tables-save")
