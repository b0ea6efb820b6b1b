"""Watching a tunnel: verbose logs, `wgpy show --json`, Prometheus metrics, ICMP
unreachable, and a capture Wireshark (tshark) decrypts with the --keylog file."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from wgpy.core import icmp, native
from wgpy.daemon.log import peer_name
from wgpy.demo.testbed import WGPY, WIREGUARD_GO, Namespace, Tunnel, TunnelEnd, wg_keypair
from wgpy.io.uapi_path import socket_path


def name_of(node: TunnelEnd) -> str:
    return peer_name(base64.b64decode(node.public_key))


def dump(node: TunnelEnd) -> list[list[str]]:
    return [line.split("\t") for line in node.wg("show", node.ifname, "dump").splitlines()]


def py(node: TunnelEnd, code: str, timeout: float = 30) -> str:
    return node.ns.run(sys.executable, "-c", code, timeout=timeout)


SCRAPE = (
    "import urllib.request;"
    "print(urllib.request.urlopen('http://{addr}/metrics', timeout=5).read().decode())"
)


def test_logs_json_and_metrics(make_tunnel: Callable[..., Tunnel], tmp_path: Path) -> None:
    env = {"LOG_LEVEL": "verbose", "WGPY_METRICS": "127.0.0.1:9586"}
    t = make_tunnel("o", env=env, log_dir=str(tmp_path))
    a, b = t.a, t.b
    # a third peer at an address nobody answers on: its handshake is retried after 5 s
    _, ghost = wg_keypair()
    a.wg("set", a.ifname, "peer", ghost, "endpoint", "10.200.0.77:51820",
         "allowed-ips", "10.201.0.77/32")  # fmt: skip
    # b expects a somewhere else: a's first initiation moves it (roaming)
    b.wg("set", b.ifname, "peer", a.public_key, "endpoint", f"{a.outer4}:1")
    started = time.monotonic()
    a.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "3", b.inner4, timeout=20)
    a.ns.run("ping", "-c", "1", "-W", "1", "10.201.0.77", check=False, timeout=20)
    # junk from outside: counted by reason, summed up in one line every 10 s
    junk = "b'\\x01\\x00\\x00\\x00junk'"  # type 1, the wrong size: bad_size
    py(b, f"import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
          f"for i in range(50): s.sendto({junk}, ('{a.outer4}', {a.port}))")  # fmt: skip

    # --json against `wg show dump`, and the extra fields
    status = json.loads(a.ns.run(sys.executable, "-m", "wgpy", "show", a.ifname, "--json"))
    rows = dump(a)
    assert status["interface"] == a.ifname
    assert status["public_key"] == rows[0][1] == a.public_key
    assert status["listen_port"] == int(rows[0][2])
    native_on = native.load() is not None and os.environ.get("WGPY_NATIVE", "1") != "0"
    assert status["datapath"] == ("native" if native_on else "python")
    assert status["implementation"].startswith("wgpy")
    assert status["under_load"] is False and status["queued_handshakes"] == 0
    by_key = {p["public_key"]: p for p in status["peers"]}
    for row in rows[1:]:
        peer = by_key[row[0]]
        assert (peer["preshared_key"], peer["endpoint"] or "(none)") == (row[1] != "(none)", row[2])
        assert ",".join(peer["allowed_ips"]) == row[3]
        assert peer["latest_handshake"] == int(row[4])
        assert (peer["rx_bytes"], peer["tx_bytes"]) == (int(row[5]), int(row[6]))
    peer_b = by_key[b.public_key]
    assert peer_b["keypairs"]["current"]["age"] >= 0
    assert peer_b["events"]["initiation_sent"] >= 1
    assert peer_b["events"]["handshake_completed"] >= 1
    assert status["events"]["response_received"] >= 1
    assert "zero_keys" in peer_b["timers"] and peer_b["timers"]["zero_keys"] > 500
    assert "retransmit_handshake" in by_key[ghost]["timers"]
    assert set(status["drops"]) >= {"no_route", "bad_size", "bad_mac1"}

    # metrics, parsed, against `wg show dump`
    from prometheus_client.parser import text_string_to_metric_families

    text = py(a, SCRAPE.format(addr="127.0.0.1:9586"))
    rows = dump(a)
    samples = {
        (s.name, s.labels.get("public_key"), s.labels.get("reason")): s
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    for row in rows[1:]:
        key = row[0]
        sent = samples[("wireguard_sent_bytes_total", key, None)]
        assert sent.labels == {"interface": a.ifname, "public_key": key, "allowed_ips": row[3]}
        assert sent.value == int(row[6])
        assert samples[("wireguard_received_bytes_total", key, None)].value == int(row[5])
        assert samples[("wireguard_latest_handshake_seconds", key, None)].value == int(row[4])
    assert samples[("wgpy_handshake_initiations_sent_total", None, None)].value >= 2
    assert samples[("wgpy_handshakes_completed_total", None, None)].value >= 1
    assert samples[("wgpy_drops_total", None, "bad_size")].value == 50
    assert samples[("wgpy_under_load", None, None)].value == 0
    assert samples[("wgpy_info", None, None)].labels["datapath"] == status["datapath"]
    assert samples[("wgpy_batch_size_count", None, None)].value >= 1
    # off by default, and on loopback only: nothing listens on the outside address
    with pytest.raises(RuntimeError):
        py(b, SCRAPE.format(addr=f"{a.outer4}:9586"))

    # the log lines, in wireguard-go's words
    na, nb, ng = name_of(a), name_of(b), peer_name(base64.b64decode(ghost))
    wait = 11.5 - (time.monotonic() - started)  # a retry after 5 s, a drop summary after 10
    if wait > 0:
        time.sleep(wait)
    log_a = a.log_path.read_text() if a.log_path else ""
    log_b = b.log_path.read_text() if b.log_path else ""
    for line in (
        f"{nb} - Sending handshake initiation",
        f"{nb} - Received handshake response",
        f"created for {nb}",
        f"{nb} - Handshake completed",
        f"{ng} - Sending handshake initiation",
        f"{ng} - Handshake did not complete after 5 seconds, retrying (try 2)",
        "Dropped in the last 10 seconds: 50 bad_size",
        "DEBUG: (",
    ):
        assert line in log_a, f"{line!r} not in a's log:\n{log_a}"
    for line in (
        f"{na} - Received handshake initiation",
        f"{na} - Sending handshake response",
        f"created for {na}",
        f"{na} - Endpoint changed to {a.outer4}:{a.port}",
        f"{na} - Handshake completed",
    ):
        assert line in log_b, f"{line!r} not in b's log:\n{log_b}"
    assert "junk" not in log_a and log_a.count("bad_size") == 1  # one summary, no line each


def test_json_of_wireguard_go_holds_what_get_does(make_tunnel: Callable[..., Tunnel]) -> None:
    t = make_tunnel("g", WGPY, WIREGUARD_GO)
    b = t.b
    status = json.loads(b.ns.run(sys.executable, "-m", "wgpy", "show", b.ifname, "--json"))
    assert status["implementation"] is None
    assert status["public_key"] == b.public_key and status["listen_port"] == b.port
    assert [p["public_key"] for p in status["peers"]] == [t.a.public_key]


def unreachable_after(node: TunnelEnd, addr: str) -> float:
    """Seconds from a UDP send to `addr` to the EHOSTUNREACH the ICMP error causes."""
    # host/address unreachable is a soft error: a UDP socket hears of it with RECVERR
    family, level, recverr = (
        ("AF_INET6", "IPPROTO_IPV6", 25) if ":" in addr else ("AF_INET", "IPPROTO_IP", 11)
    )
    code = (
        "import socket,time,errno\n"
        f"s=socket.socket(socket.{family},socket.SOCK_DGRAM);s.settimeout(2)\n"
        f"s.setsockopt(socket.{level},{recverr},1)\n"
        f"s.connect(('{addr}',9));t=time.monotonic();s.send(b'x')\n"
        "try:\n s.recv(10);print('no error')\n"
        "except OSError as e:\n print(time.monotonic()-t, e.errno==errno.EHOSTUNREACH, e)\n"
    )
    seconds, ok, why = py(node, code).split(maxsplit=2)
    assert ok == "True", why
    return float(seconds)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_icmp_unreachable(make_tunnel: Callable[..., Tunnel], family: str) -> None:
    t = make_tunnel("i")
    a = t.a
    # inside the tunnel's subnet, routed into wg0, covered by no peer's allowed IPs
    addr = "10.201.0.9" if family == "ipv4" else "fd01::9"
    started = time.monotonic()
    done = subprocess.run(a.ns.argv(["ping", "-c", "1", "-W", "1", addr]),
                          capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
    elapsed = time.monotonic() - started
    expect = "Destination Host Unreachable" if family == "ipv4" else "Address unreachable"
    assert expect in done.stdout, done.stdout + done.stderr
    assert f"From {addr}" in done.stdout  # the source: the original destination
    assert elapsed < 1.0  # without the ICMP error, ping would wait its full second
    assert unreachable_after(a, addr) < 0.1


FLOOD = (
    "import socket,time\n"
    "r=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP);r.settimeout(0.5)\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);t0=time.monotonic()\n"
    "for i in range({n}): s.sendto(b'x',('10.201.0.{{}}'.format(100+i%100),9))\n"
    "times=[]\n"
    "while True:\n"
    " try: p=r.recv(2000)\n"
    " except OSError: break\n"
    " if p[20]==3 and p[21]==1: times.append(time.monotonic())\n"
    "print(len(times), (times[-1]-t0) if times else 0)\n"
)


def test_icmp_flood_is_rate_limited(make_tunnel: Callable[..., Tunnel]) -> None:
    t = make_tunnel("f")
    n = 5000
    count, spread = py(t.a, FLOOD.format(n=n)).split()
    # a burst, then at most the rate, from the first packet of the flood to the last error
    assert 0 < int(count) <= icmp.BURST + icmp.RATE * float(spread) + 2
    assert int(count) < n


@pytest.mark.skipif(not (shutil.which("tcpdump") and shutil.which("tshark")),
                    reason="needs tcpdump and tshark")  # fmt: skip
def test_wireshark_decrypts_with_keylog(make_tunnel: Callable[..., Tunnel], tmp_path: Path) -> None:
    keys = tmp_path / "keys.log"
    t = make_tunnel("k", left=[*WGPY, "--keylog", str(keys)])
    a, b = t.a, t.b
    cap = tmp_path / "cap.pcap"
    veth = next(line.split(":")[1].strip().split("@")[0]
                for line in a.ns.run("ip", "-o", "link").splitlines() if "va" in line)  # fmt: skip
    # --immediate-mode: what was seen is written, also when SIGINT comes within a second
    dumper = a.ns.popen("tcpdump", "-i", veth, "-U", "--immediate-mode", "-n",
                        "-w", str(cap), "udp", stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert dumper.stderr is not None
        line = dumper.stderr.readline().decode()  # "listening on ..." once it captures
        assert "listening" in line, line
        a.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "3", b.inner4, timeout=20)
        time.sleep(0.3)
    finally:
        dumper.send_signal(signal.SIGINT)
        dumper.wait(10)
    assert oct(os.stat(keys).st_mode & 0o777) == "0o600"
    text = keys.read_text()
    assert "LOCAL_EPHEMERAL_PRIVATE_KEY = " in text and f"= {a.private_key}" in text

    def tshark_all(*opts: str) -> str:
        return subprocess.run(
            ["tshark", "-n", "-r", str(cap), "-d", f"udp.port=={a.port},wg", *opts],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip

    def tshark(*opts: str) -> str:
        return tshark_all(*opts, "-Y", "icmp")

    assert "Handshake Initiation" in tshark_all()
    assert b.inner4 not in tshark()  # without the keys: nothing inside
    decrypted = tshark("-o", f"wg.keylog_file:{keys}")
    assert f"{a.inner4} → {b.inner4}" in decrypted or f"{a.inner4} -> {b.inner4}" in decrypted
    assert "Echo (ping) request" in decrypted and "Echo (ping) reply" in decrypted


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.parametrize("plant", ["readable file", "symlink"])
def test_keylog_refuses_what_another_user_planted(plant: str) -> None:
    """The administrator names a --keylog path in a directory `nobody` can write to (here
    nobody's own; /tmp where fs.protected_regular=0). Nobody plants a 0666 file there, to
    read the keys later, or a symlink, to have root append them to a file of nobody's
    choosing: the daemon (root) refuses to start, says why, and writes nothing anywhere."""
    top = Path(tempfile.mkdtemp(prefix="wgpy-keylog-", dir="/tmp"))
    top.chmod(0o755)
    theirs, path, victim = top / "nobody", top / "nobody" / "wg.keys", top / "victim"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    victim.write_text("precious\n")
    victim.chmod(0o600)
    ns = Namespace(f"wgpy-kl{os.getpid() % 100000}")
    ifname = f"wkl{os.getpid() % 100000}"
    try:
        sh = f"umask 0 && : > {path}" if plant == "readable file" else f"ln -s {victim} {path}"
        subprocess.run([*NOBODY, "sh", "-c", sh], check=True, timeout=10)
        done = subprocess.run(ns.argv([*WGPY, ifname, "--keylog", str(path)]),
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert f"--keylog {path}: " in done.stderr and "refused" in done.stderr
        assert not ns.has_link(ifname) and not socket_path(ifname).exists()
        read = subprocess.run([*NOBODY, "cat", str(path)], capture_output=True, text=True,
                              timeout=10)  # fmt: skip
        assert read.stdout == ""  # nobody reads no key (of the symlink: root's file is 0600)
        assert victim.read_text() == "precious\n"
    finally:
        ns.close()
        socket_path(ifname).unlink(missing_ok=True)
        shutil.rmtree(top, ignore_errors=True)
