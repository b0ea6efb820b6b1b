"""`wgpy up|down|strip|save|show`: wg-quick for wgpy, with netlink through pyroute2.

`up` follows wg-quick(8): the config is read and checked before anything changes; then
PreUp, the daemon, the `wg` keys through the UAPI, addresses, MTU (the route to the
endpoints minus 80 when not given), DNS through resolvconf, a route per allowed IP (for
a default route, wg-quick's fwmark table and policy rules), PostUp. Any failure on the
way undoes what was done. `down` runs PreDown, saves the config if SaveConfig is set,
removes rules, DNS and the interface (the daemon exits with it), then PostDown.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

from pyroute2 import IPRoute, NetlinkError

from wgpy.io.uapi_path import socket_path
from wgpy.tools import config, uapi_client
from wgpy.tools.config import Config, ConfigError, IPNetwork

DEFAULT_TABLE = 51820
MAIN_TABLE = 254
FIB_RULE_INVERT = 0x2
SCOPE_LINK = 253  # what `ip route add PREFIX dev IF` gives a route without a gateway
IMPLEMENTATION_ENV = "WGPY_USERSPACE_IMPLEMENTATION"
FAMILIES = (socket.AF_INET, socket.AF_INET6)


class QuickError(Exception):
    pass


def log(message: str) -> None:
    print(f"[#] {message}", file=sys.stderr)


def run_hooks(hooks: list[str], ifname: str) -> None:
    for hook in hooks:
        command = hook.replace("%i", ifname)
        log(command)
        if subprocess.run(["bash", "-c", command], check=False).returncode != 0:
            raise QuickError(f"hook failed: {command}")


@contextlib.contextmanager
def netlink() -> Iterator[IPRoute]:
    with IPRoute() as ipr:
        yield ipr


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


# ---- up ---------------------------------------------------------------------------------


def start_daemon(ifname: str) -> None:
    implementation = os.environ.get(IMPLEMENTATION_ENV)
    argv = shlex.split(implementation) if implementation else [sys.executable, "-m", "wgpy"]
    log(f"{' '.join(argv)} {ifname}")
    done = subprocess.run([*argv, ifname], check=False)
    if done.returncode != 0:
        raise QuickError(f"could not start the daemon for {ifname}")
    deadline = time.monotonic() + 10
    while not socket_path(ifname).exists():
        if time.monotonic() > deadline:
            raise QuickError(f"{ifname}: no UAPI socket after 10 s")
        time.sleep(0.02)


def auto_mtu(ipr: IPRoute, endpoints: list[str]) -> int:
    """wg-quick's rule: the largest MTU on the way to an endpoint (or the default route's
    device), minus 80 for the WireGuard overhead; 1420 when nothing says otherwise."""
    best = 0
    for host in endpoints:
        with contextlib.suppress(NetlinkError, OSError):  # no route to it: no say in the MTU
            for route in ipr.route("get", dst=host):
                best = max(best, _route_mtu(ipr, route))
    if not best:
        for route in ipr.get_default_routes(family=socket.AF_INET):
            best = max(best, _route_mtu(ipr, route))
    return (best or 1500) - 80


def _route_mtu(ipr: IPRoute, route: object) -> int:
    metrics = route.get_attr("RTA_METRICS")  # type: ignore[attr-defined]
    if metrics and metrics.get_attr("RTAX_MTU"):
        return int(metrics.get_attr("RTAX_MTU"))
    oif = route.get_attr("RTA_OIF")  # type: ignore[attr-defined]
    if oif is None:
        return 0
    return int(ipr.get_links(oif)[0].get_attr("IFLA_MTU"))


def endpoint_hosts(ifname: str) -> list[str]:
    hosts = []
    for peer in uapi_client.get(ifname).peers:
        if peer.endpoint:
            hosts.append(peer.endpoint.rpartition(":")[0].strip("[]"))
    return hosts


def set_dns(ifname: str, cfg: Config) -> bool:
    """DNS through resolvconf, as wg-quick; False (with a warning) when it is missing."""
    if not cfg.interface.dns and not cfg.interface.dns_search:
        return False
    if shutil.which("resolvconf") is None:
        print(f"wgpy: warning: resolvconf not found; DNS for {ifname} not set", file=sys.stderr)
        return False
    lines = [f"nameserver {d}" for d in cfg.interface.dns]
    if cfg.interface.dns_search:
        lines.append("search " + " ".join(cfg.interface.dns_search))
    log(f"resolvconf -a {ifname} -m 0 -x")
    subprocess.run(
        ["resolvconf", "-a", ifname, "-m", "0", "-x"], input="\n".join(lines) + "\n", text=True,
        check=True,
    )  # fmt: skip
    return True


def unset_dns(ifname: str) -> None:
    if shutil.which("resolvconf"):
        subprocess.run(["resolvconf", "-d", ifname, "-f"], check=False, capture_output=True)


def add_routes(ipr: IPRoute, ifname: str, index: int, cfg: Config) -> None:
    table = cfg.interface.table
    if table == "off":
        return
    # wg-quick's order (`sort -nr -k 2 -t /`): longest prefix first, ties in reverse text
    nets = sorted(
        {net for peer in cfg.peers for net in peer.allowed_ips},
        key=lambda n: (n.prefixlen, str(n)),
        reverse=True,
    )
    for net in nets:
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        if table and table != "auto":
            log(f"ip -{net.version} route add {net} dev {ifname} table {table}")
            ipr.route("add", dst=str(net), oif=index, table=int(table), family=family,
                      scope=SCOPE_LINK)  # fmt: skip
        elif net.prefixlen == 0:
            add_default(ipr, ifname, index, net)
        elif not covered(ipr, index, net):
            log(f"ip -{net.version} route add {net} dev {ifname}")
            ipr.route("add", dst=str(net), oif=index, family=family, scope=SCOPE_LINK)


def covered(ipr: IPRoute, index: int, net: IPNetwork) -> bool:
    """Whether a main-table route on the interface already covers `net` (an address's
    own prefix route, say): wg-quick adds none then (`ip route show dev IF match NET`)."""
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    for route in ipr.get_routes(family=family, oif=index, table=MAIN_TABLE):
        dst = route.get_attr("RTA_DST") or ("0.0.0.0" if net.version == 4 else "::")
        if net.subnet_of(ipaddress.ip_network(f"{dst}/{route['dst_len']}")):  # type: ignore[arg-type]
            return True
    return False


def default_table(ifname: str, ipr: IPRoute) -> int:
    """The fwmark doubles as the routing table number, as wg-quick chooses it."""
    mark = uapi_client.get(ifname).fwmark
    if mark:
        return mark
    table = DEFAULT_TABLE
    while any(ipr.get_routes(table=table, family=f) for f in FAMILIES):
        table += 1
    log(f"wg set {ifname} fwmark {table}")
    uapi_client.set_config(ifname, f"fwmark={table}")
    return table


def add_default(ipr: IPRoute, ifname: str, index: int, net: IPNetwork) -> None:
    """Everything not marked by our own UDP socket goes through the tunnel's table, while
    the main table's more specific routes still win (suppress_prefixlength 0)."""
    table = default_table(ifname, ipr)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    v = net.version
    log(f"ip -{v} rule add not fwmark {table} table {table}")
    ipr.rule("add", family=family, fwmark=table, fwmask=0xFFFFFFFF, table=table,
             flags=FIB_RULE_INVERT, priority=next_priority(ipr, family))  # fmt: skip
    log(f"ip -{v} rule add table main suppress_prefixlength 0")
    ipr.rule("add", family=family, table=MAIN_TABLE, suppress_prefixlen=0,
             priority=next_priority(ipr, family))  # fmt: skip
    log(f"ip -{v} route add {net} dev {ifname} table {table}")
    ipr.route("add", dst=str(net), oif=index, table=table, family=family, scope=SCOPE_LINK)
    if v == 4:
        log("sysctl -q net.ipv4.conf.all.src_valid_mark=1")
        with open("/proc/sys/net/ipv4/conf/all/src_valid_mark", "w") as f:
            f.write("1\n")
    add_firewall(ipr, ifname, index, family, table)


def add_firewall(ipr: IPRoute, ifname: str, index: int, family: int, mark: int) -> None:
    """wg-quick's rules next to a default route: drop packets for the tunnel's addresses
    that arrive from elsewhere, and keep the mark on the tunnel's own UDP flows (connection
    mark), so that replies to them also bypass the tunnel. nftables if `nft` is there, else
    wg-quick's iptables-restore fallback, with its comment marker to find them again."""
    v4 = family == socket.AF_INET
    addresses = [msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr(index=index, family=family)]
    if shutil.which("nft"):
        text = nft_rules(ifname, "ip" if v4 else "ip6", addresses, mark)
        log(f"nft -f (table {'ip' if v4 else 'ip6'} wg-quick-{ifname})")
        subprocess.run(["nft", "-f", "-"], input=text, text=True, check=True)
        return
    restore = "iptables-restore" if v4 else "ip6tables-restore"
    if shutil.which(restore) is None:
        print(f"wgpy: warning: neither nft nor {restore} found; no anti-spoofing rules for "
              f"{ifname}", file=sys.stderr)  # fmt: skip
        return
    log(f"{restore} -n")
    subprocess.run([restore, "-n"], input=iptables_rules(ifname, addresses, mark), text=True,
                   check=True)  # fmt: skip


def nft_rules(ifname: str, pf: str, addresses: list[str], mark: int) -> str:
    table = f"{pf} wg-quick-{ifname}"
    commands = [
        f"add table {table}",
        f"add chain {table} preraw {{ type filter hook prerouting priority -300; }}",
        f"add chain {table} premangle {{ type filter hook prerouting priority -150; }}",
        f"add chain {table} postmangle {{ type filter hook postrouting priority -150; }}",
    ]
    commands += [
        f'add rule {table} preraw iifname != "{ifname}" {pf} daddr {address} '
        "fib saddr type != local drop"
        for address in addresses
    ]
    commands += [
        f"add rule {table} postmangle meta l4proto udp mark {mark} ct mark set mark",
        f"add rule {table} premangle meta l4proto udp meta mark set ct mark",
    ]
    return "\n".join(commands) + "\n"


def marker(ifname: str) -> str:
    return f'-m comment --comment "wg-quick(8) rule for {ifname}"'


def iptables_rules(ifname: str, addresses: list[str], mark: int) -> str:
    """The `iptables-restore -n` input of wg-quick's add_default, word for word."""
    lines = ["*raw"]
    lines += [
        f"-I PREROUTING ! -i {ifname} -d {address} -m addrtype ! --src-type LOCAL -j DROP "
        + marker(ifname)
        for address in addresses
    ]
    lines += [
        "COMMIT",
        "*mangle",
        f"-I POSTROUTING -m mark --mark {mark} -p udp -j CONNMARK --save-mark {marker(ifname)}",
        f"-I PREROUTING -p udp -j CONNMARK --restore-mark {marker(ifname)}",
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def del_firewall(ifname: str) -> None:
    """Both kinds of rules, as wg-quick's remove_firewall: the nftables table by its name,
    the iptables rules by their comment marker (each `-A` of them turned into a `-D`)."""
    if shutil.which("nft"):
        listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        for line in listed.splitlines():
            if line.endswith(f" wg-quick-{ifname}"):  # "table ip wg-quick-wg0"
                log(f"nft delete {line}")
                subprocess.run(["nft", "delete", *line.split()], check=False)
    if shutil.which("iptables") is None:
        return
    for tool in ("iptables", "ip6tables"):
        saved = subprocess.run([f"{tool}-save"], capture_output=True, text=True, check=False)
        ours = [line for line in saved.stdout.splitlines()
                if line.startswith("-A ") and marker(ifname) in line]  # fmt: skip
        if not ours:
            continue
        kept = [line for line in saved.stdout.splitlines()
                if line.startswith("*") or line == "COMMIT" or line in ours]  # fmt: skip
        log(f"{tool}-restore -n")
        text = "\n".join("-D" + line[2:] if line in ours else line for line in kept) + "\n"
        subprocess.run([f"{tool}-restore", "-n"], input=text, text=True, check=False)


def next_priority(ipr: IPRoute, family: int) -> int:
    """The preference `ip rule add` picks when given none: just above the first rule
    after the local table's (pyroute2 would use a fixed 32000)."""
    prefs = [r.get_attr("FRA_PRIORITY") or 0 for r in ipr.get_rules(family=family)]
    return min((p for p in prefs if p > 0), default=32766) - 1


def del_rules(ipr: IPRoute, ifname: str) -> None:
    """The policy rules `up` added for a default route (found by their table = fwmark)."""
    try:
        mark = uapi_client.get(ifname).fwmark
    except uapi_client.UapiClientError:
        return  # no daemon: no fwmark to find our rules by
    if not mark:
        return
    for family in FAMILIES:
        for rule in ipr.get_rules(family=family):
            ours = rule.get_attr("FRA_TABLE") == mark and rule.get_attr("FRA_FWMARK") == mark
            if ours or rule.get_attr("FRA_SUPPRESS_PREFIXLEN") == 0:
                ipr.rule("del", family=family, priority=rule.get_attr("FRA_PRIORITY"))


def delete_interface(ifname: str) -> None:
    with netlink() as ipr:
        del_rules(ipr, ifname)
        index = link_index(ipr, ifname)
        if index is not None:
            log(f"ip link delete dev {ifname}")
            ipr.link("del", index=index)
    del_firewall(ifname)
    unset_dns(ifname)
    deadline = time.monotonic() + 5  # the daemon notices and removes its socket
    while socket_path(ifname).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def up(ifname: str, cfg: Config) -> None:
    with netlink() as ipr:
        if link_index(ipr, ifname) is not None or socket_path(ifname).exists():
            raise QuickError(f"`{ifname}' already exists")
    run_hooks(cfg.interface.pre_up, ifname)
    body = config.to_uapi(cfg)  # resolves the endpoints: a bad one stops here, on its line
    start_daemon(ifname)
    try:
        log(f"wg setconf {ifname} (through the UAPI)")
        uapi_client.set_config(ifname, body)
        with netlink() as ipr:
            index = link_index(ipr, ifname)
            if index is None:
                raise QuickError(f"{ifname} vanished")
            for addr in cfg.interface.addresses:
                log(f"ip -{addr.version} address add {addr} dev {ifname}")
                ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
            mtu = cfg.interface.mtu or auto_mtu(ipr, endpoint_hosts(ifname))
            log(f"ip link set mtu {mtu} up dev {ifname}")
            ipr.link("set", index=index, mtu=mtu, state="up")
            set_dns(ifname, cfg)
            add_routes(ipr, ifname, index, cfg)
        run_hooks(cfg.interface.post_up, ifname)
    except BaseException:
        delete_interface(ifname)
        raise


def down(ifname: str, cfg: Config, path: str) -> None:
    if not socket_path(ifname).exists():
        raise QuickError(f"`{ifname}' is not a wgpy interface")
    run_hooks(cfg.interface.pre_down, ifname)
    if cfg.interface.save_config:
        save(ifname, cfg, path)
    delete_interface(ifname)
    run_hooks(cfg.interface.post_down, ifname)


KERNEL_LL = 3  # IFA_PROTO of the link-local address the kernel makes itself (IFAPROT_KERNEL_LL)


def live_addresses(ipr: IPRoute, index: int) -> list[config.IPInterface]:
    """The interface's addresses as `ip -brief address show` lists them (IPv4 first), less
    the kernel's own IPv6 link-local one: wg-quick saves that too, and every later `up`
    then adds it back next to a fresh one."""
    found = []
    for msg in ipr.get_addr(index=index):
        if msg.get_attr("IFA_PROTO") == KERNEL_LL:
            continue
        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        found.append(ipaddress.ip_interface(f"{address}/{msg['prefixlen']}"))
    return found


def current_config(ifname: str, cfg: Config) -> Config:
    """What `wg-quick save` writes: the live addresses, the live MTU (only if the file sets
    an MTU), the file's DNS, Table, SaveConfig and hooks, then the live `wg showconf`."""
    live = config.from_status(uapi_client.get(ifname), cfg.interface)
    with netlink() as ipr:
        index = link_index(ipr, ifname)
        if index is None:
            raise QuickError(f"`{ifname}' does not exist")
        live.interface.addresses = live_addresses(ipr, index)
        if cfg.interface.mtu:
            live.interface.mtu = int(ipr.get_links(index)[0].get_attr("IFLA_MTU"))
    return live


def save(ifname: str, cfg: Config, path: str) -> None:
    text = config.render(current_config(ifname, cfg))
    log(f"saving configuration to {path}")
    config.write_atomic(path, text.encode())  # mode 0600: it holds the private key


# ---- commands ---------------------------------------------------------------------------


def _load(target: str) -> tuple[str, str, Config]:
    ifname, path, cfg = config.load(target)
    warning = config.permission_warning(path)
    if warning:
        print(warning, file=sys.stderr)
    return ifname, path, cfg


def command(action: str, target: str) -> int:
    """`wgpy up|down|save|strip TARGET`: 0, or 1 with the error on stderr."""
    try:
        ifname, path, cfg = _load(target)
        if action == "up":
            up(ifname, cfg)
        elif action == "down":
            down(ifname, cfg, path)
        elif action == "save":
            save(ifname, cfg, path)
        elif action == "strip":
            sys.stdout.write(config.strip(config.read(path)))
        return 0
    except (ConfigError, QuickError, uapi_client.UapiClientError, OSError) as e:
        print(f"wgpy {action}: {e}", file=sys.stderr)
        return 1


def show_command(names: list[str]) -> int:
    """`wg show` for wgpy interfaces: all of them, or those named."""
    names = names or uapi_client.interfaces()
    blocks = []
    for name in names:
        try:
            dev = uapi_client.get(name)
        except uapi_client.UapiClientError as e:
            print(f"wgpy show: {e}", file=sys.stderr)
            return 1
        pub = None
        if dev.private_key:
            from wgpy.core.crypto import public_key

            pub = public_key(dev.private_key)
        blocks.append(uapi_client.render(dev, pub))
    if blocks:
        print("\n\n".join(blocks))
    return 0
