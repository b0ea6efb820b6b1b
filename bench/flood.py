"""Handshake-flood benchmark: wgpy and wireguard-go as victims of the same floods.

    sudo python bench/flood.py --quick                    # one short pass, ~3 minutes
    sudo python bench/flood.py --out FLOOD.md             # 20,000/s and max rate, 10 s floods
    sudo python bench/flood.py --victims wgpy --modes b --rates 20000 --seconds 8

The wgpy victim is `--src DIR`'s, else the one PYTHONPATH holds, else this checkout's src/
(bench/tree.py): `PYTHONPATH=/tmp/old/src` measures that tree.

Three network namespaces per victim (src/wgpy/demo/testbed.py): the victim V, a
legitimate side L running two Debian wireguard-go peers of V (L1 with an established
tunnel, L2 whose handshake is timed), and an attacker X, each joined to V by a veth
pair. Victims: wgpy (wgpy-pure: WGPY_NATIVE=0), Debian's wireguard-go and the upstream
snapshot in shared/bin (when present). Flood modes, real WireGuard initiations built with
wgpy.core:
  none  no flood (the baseline);
  a     initiations with a valid mac1 for V's public key from random static and ephemeral
        keys (complete, well-formed handshakes from strangers), one source address;
  b     the same from one source that echoes cookies: it decrypts V's cookie replies (it
        knows each mac1 it sent) and puts a valid mac2 on every later initiation;
  c     as a, rotating over 200 source addresses on X's veth (spoofed sources).
Rates: 20,000/s and 0 = as fast as the sender goes. Modes a and c are sent by
bench/flood_send.c (sendmmsg, compiled with gcc at run time: `build_sender`), mode b by
Python (it must read the cookie replies); --sender python sends a and c from Python too.
Measured per victim x mode x rate, during the flood: how long L2 (reset to no session at
the flood's start) takes to complete a handshake ("> N s" if not within the flood), V's
CPU seconds over the run (/proc/PID/stat; includes carrying L1's ping and iperf3, see the
"none" row), cookie replies that reached X (its UDP counters), ping RTT and loss over
L1's tunnel, then iperf3 throughput over it, and V's resident memory before and at its
peak. Every run is bounded in time; everything is removed in a `finally`. Needs root, wg,
wireguard-go, iperf3 and ping. Markdown to stdout and --out.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))  # already there when run, not when imported

from tree import use  # noqa: E402

SRC = use()  # --src DIR, else the wgpy PYTHONPATH holds, else this checkout's src/

from wgpy.core.cookie import LABEL_COOKIE, CookieGenerator  # noqa: E402
from wgpy.core.crypto import (  # noqa: E402
    InvalidTag,
    PrivateKey,
    dh,
    hash_,
    mac,
    tai64n,
    xaead_decrypt,
)
from wgpy.core.messages import (  # noqa: E402
    COOKIE_REPLY_LEN,
    INITIATION,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    parse_cookie_reply,
)
from wgpy.core.noise import SymmetricState, create_initiation  # noqa: E402

UPSTREAM_GO = ROOT.parent / "shared" / "bin" / "wireguard-go-0.0.20250522"
if not UPSTREAM_GO.exists():
    UPSTREAM_GO = Path("/work/shared/bin/wireguard-go-0.0.20250522")
PORT = 51820
V_LEGIT, L_ADDR = "10.210.0.1", "10.210.0.2"  # the V-L link
V_ATTACK, X_ADDR = "10.210.1.1", "10.210.1.2"  # the V-X link
SPOOFED = [f"10.210.1.{10 + i}" for i in range(200)]  # more addresses on X's veth
V_IN1, L1_IN = "10.211.0.1", "10.211.0.2"  # inside L1's tunnel
V_IN2, L2_IN = "10.211.1.1", "10.211.1.2"  # inside L2's tunnel
POOL = 1024  # distinct initiations an attacker cycles through


# ---- the attacker (runs inside X: `flood.py attack ...`) -------------------------------


def build_pool(victim_pub: bytes, n: int) -> tuple[list[bytearray], dict[int, bytes]]:
    """n initiations from random static and ephemeral keys, with mac1 for the victim:
    (messages, sender index -> mac1)."""
    gen = CookieGenerator(victim_pub)
    pool, mac1s = [], {}
    for _ in range(n):
        static = PrivateKey(os.urandom(32))
        sym = SymmetricState(victim_pub)
        e_pub, enc_static, enc_time = create_initiation(
            sym, static, victim_pub, dh(static, victim_pub), os.urandom(32), tai64n(time.time())
        )
        sender = int.from_bytes(os.urandom(4), "little")
        fields = (MSG_INITIATION, sender, e_pub, enc_static, enc_time, bytes(16), bytes(16))
        msg = bytearray(INITIATION.pack(*fields))
        gen.add_macs(msg, time.monotonic())
        pool.append(msg)
        mac1s[sender] = bytes(msg[-32:-16])
    return pool, mac1s


SENDER_C = Path(__file__).resolve().parent / "flood_send.c"


def build_sender(cache: Path = Path("/tmp")) -> Path:
    """bench/flood_send.c compiled (once per version of the source): the line-rate sender."""
    import hashlib

    digest = hashlib.sha256(SENDER_C.read_bytes()).hexdigest()[:12]
    exe = cache / f"wgpy-flood-send-{digest}"
    if not exe.exists():
        tmp = exe.with_suffix(f".{os.getpid()}")
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp),
                        str(SENDER_C)], check=True)  # fmt: skip
        tmp.replace(exe)
    return exe


def attack_c(args: argparse.Namespace, pool: list[bytearray]) -> None:
    """Modes a and c from the C sender (its "ready" and its figures go to our stdout)."""
    import tempfile

    exe = build_sender()
    with tempfile.NamedTemporaryFile(prefix="wgpy-pool-") as f:
        f.write(b"".join(pool))
        f.flush()
        command = [str(exe), args.target, str(PORT), str(args.rate), str(args.seconds),
                   f.name, str(len(pool[0])), args.sources]  # fmt: skip
        subprocess.run(command, check=True, timeout=args.seconds + 30)


def echo_cookies(sock: socket.socket, cookie_key: bytes, pool: list[bytearray],
                 mac1s: dict[int, bytes], stats: dict[str, int]) -> bool:  # fmt: skip
    """Mode b: read V's cookie replies; with one decrypted, a valid mac2 on every message
    of the pool from now on (the cookie lasts 120 s). Whether a cookie was set."""
    cookie_set = False
    for _ in range(64):
        try:
            reply = sock.recv(2048)
        except BlockingIOError:
            break
        stats["replies_read"] += 1
        if len(reply) != COOKIE_REPLY_LEN or reply[0] != MSG_COOKIE_REPLY:
            continue
        m = parse_cookie_reply(reply)
        mac1 = mac1s.get(m.receiver)
        if mac1 is None:
            continue
        try:
            cookie = xaead_decrypt(cookie_key, m.nonce, m.cookie, mac1)
        except InvalidTag:
            continue
        stats["cookies"] += 1
        for msg in pool:
            msg[-16:] = mac(cookie, bytes(msg[:-16]))
        cookie_set = True
    return cookie_set


def attack(args: argparse.Namespace) -> None:
    victim_pub = bytes.fromhex(args.victim_pub)
    target = (args.target, PORT)
    pool, mac1s = build_pool(victim_pub, args.pool)
    if args.mode in ("a", "c") and args.sender == "c":
        attack_c(args, pool)
        return
    cookie_key = hash_(LABEL_COOKIE, victim_pub)
    sources = args.sources.split(",")
    socks = []
    for addr in sources:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, 0))
        s.setblocking(False)
        socks.append(s)
    stats = {"sent": 0, "errors": 0, "replies_read": 0, "cookies": 0, "mac2_sent": 0}
    print("ready", flush=True)
    start = time.monotonic()
    end = start + args.seconds
    cookie_set = False
    i = 0
    while (now := time.monotonic()) < end:
        if args.mode == "none":
            time.sleep(min(0.05, end - now))
            continue
        if args.rate:
            n = min(int((now - start) * args.rate) - stats["sent"], 64)
            if n <= 0:
                time.sleep(0.0005)
                continue
        else:
            n = 64
        for _ in range(n):
            s = socks[i % len(socks)]
            try:
                s.sendto(pool[i % len(pool)], target)
            except OSError:
                stats["errors"] += 1
            i += 1
        stats["sent"] += n
        if cookie_set:
            stats["mac2_sent"] += n
        if args.mode == "b":  # read the cookie replies; put mac2 on what follows
            cookie_set = echo_cookies(socks[0], cookie_key, pool, mac1s, stats) or cookie_set
    stats["elapsed"] = time.monotonic() - start  # type: ignore[assignment]
    print(json.dumps(stats), flush=True)


# ---- the test bed ---------------------------------------------------------------------


@dataclass
class Bed:
    victim: str
    command: list[str]
    made: list[object] = field(default_factory=list)
    idle_rss: float = 0.0

    def __post_init__(self) -> None:
        from wgpy.demo.testbed import Namespace, TunnelEnd, veth

        tag = f"{os.getpid() % 100000}"
        try:
            self.v, self.l, self.x = (Namespace(f"wgfl{tag}{s}") for s in "vlx")
            self.made += [self.v, self.l, self.x]
            veth(self.v, self.l, f"fv{tag}l", f"fl{tag}v")
            veth(self.v, self.x, f"fv{tag}x", f"fx{tag}v")
            self.v.add_address(f"fv{tag}l", f"{V_LEGIT}/24")
            self.l.add_address(f"fl{tag}v", f"{L_ADDR}/24")
            self.v.add_address(f"fv{tag}x", f"{V_ATTACK}/24")
            for addr in [X_ADDR, *SPOOFED]:
                self.x.add_address(f"fx{tag}v", f"{addr}/24")
            go = ["wireguard-go"]
            self.node = TunnelEnd(self.v, f"wfv{tag}", 1, self.command)
            self.l1 = TunnelEnd(self.l, f"wfa{tag}", 2, go)
            self.l2 = TunnelEnd(self.l, f"wfb{tag}", 3, go)
            self.made += [self.node, self.l1, self.l2]
            for node, port, addr in ((self.node, PORT, V_IN1), (self.l1, PORT + 1, L1_IN),
                                     (self.l2, PORT + 2, L2_IN)):  # fmt: skip
                # wgpy from the tree measured; wireguard-go in the foreground, no banner
                node.start({"PYTHONPATH": SRC, "WG_PROCESS_FOREGROUND": "1"})
                node.set_private_key(port)
                node.ns.add_address(node.ifname, f"{addr}/24")
                node.ns.set_link(node.ifname, state="up", mtu=1420)
            self.node.ns.add_address(self.node.ifname, f"{V_IN2}/24")
            v = self.node
            v.wg("set", v.ifname, "peer", self.l1.public_key, "endpoint", f"{L_ADDR}:{PORT + 1}",
                 "allowed-ips", f"{L1_IN}/32", "peer", self.l2.public_key,
                 "endpoint", f"{L_ADDR}:{PORT + 2}", "allowed-ips", f"{L2_IN}/32")  # fmt: skip
            self.l1.wg("set", self.l1.ifname, "peer", v.public_key,
                       "endpoint", f"{V_LEGIT}:{PORT}", "allowed-ips", f"{V_IN1}/32")  # fmt: skip
            self.reset_l2()
            self.iperf = self.v.popen("iperf3", "-s", "-B", V_IN1, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)  # fmt: skip
            self.l.run("ping", "-c", "3", "-i", "0.2", "-W", "2", V_IN1, timeout=20)
            self.idle_rss = rss_mb(self.victim_pid())  # the issue's bound: 64 MB over this
        except BaseException:
            self.close()
            raise

    def reset_l2(self) -> None:
        """L2 forgets V and learns it again: its next packet needs a new handshake."""
        l2, v = self.l2, self.node
        with contextlib.suppress(RuntimeError):
            l2.wg("set", l2.ifname, "peer", v.public_key, "remove")
        l2.wg("set", l2.ifname, "peer", v.public_key, "endpoint", f"{V_LEGIT}:{PORT}",
              "allowed-ips", f"{V_IN2}/32")  # fmt: skip

    def victim_pid(self) -> int:
        assert self.node.process is not None
        return self.node.process.pid

    def close(self) -> None:
        for thing in reversed(self.made):
            with contextlib.suppress(Exception):
                if hasattr(thing, "stop"):
                    thing.stop()
                else:
                    thing.close()  # type: ignore[attr-defined]
        self.made.clear()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """The resident set of a process, MB (/proc/PID/status VmRSS)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def peak_rss(pid: int, done: threading.Event, result: dict[str, object]) -> None:
    """The largest resident set seen, sampled every 0.2 s until `done`."""
    peak = 0.0
    while not done.wait(0.2):
        with contextlib.suppress(OSError, AttributeError):
            peak = max(peak, rss_mb(pid))
    result["rss"] = peak


def udp_received(bed: Bed) -> int:
    """Datagrams that reached X's UDP layer (delivered, dropped for a full buffer, or to
    no socket): only V's cookie replies come there."""
    lines = [ln.split() for ln in bed.x.run("cat", "/proc/net/snmp").splitlines()
             if ln.startswith("Udp:")]  # fmt: skip
    row = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))
    return row["InDatagrams"] + row["NoPorts"] + row["InErrors"]


def legit_handshake(bed: Bed, bound: float, result: dict[str, object]) -> None:
    """Reset L2, send it traffic, poll `wg show latest-handshakes` until one happened."""
    l2 = bed.l2
    bed.reset_l2()
    t0 = time.monotonic()
    pinger = l2.ns.popen("ping", "-i", "0.5", "-W", "1", "-w", str(int(bound) + 1), V_IN2,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while time.monotonic() - t0 < bound:
            out = l2.wg("show", l2.ifname, "latest-handshakes").split()
            if len(out) >= 2 and out[1] != "0":  # an upper bound: + one `wg show` (~10 ms)
                result["handshake"] = time.monotonic() - t0
                return
            time.sleep(0.05)
        result["handshake"] = None
    finally:
        pinger.kill()
        pinger.wait()


def ping_rtt(bed: Bed, count: int) -> tuple[float | None, float]:
    deadline = str(int(count * 0.2 + 3))  # ping ends by itself, answers or not
    try:
        out = bed.l.run("ping", "-c", str(count), "-i", "0.2", "-W", "1", "-w", deadline,
                        V_IN1, timeout=count * 0.2 + 8, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, 100.0
    loss = re.search(r"([0-9.]+)% packet loss", out)
    rtt = re.search(r"= [0-9.]+/([0-9.]+)/", out)
    return (float(rtt.group(1)) if rtt else None), (float(loss.group(1)) if loss else 100.0)


def iperf(bed: Bed, seconds: float) -> float | None:
    try:
        out = bed.l.run("iperf3", "-c", V_IN1, "-t", str(max(1, round(seconds))), "-J",
                        "--connect-timeout", "2000", timeout=seconds + 15, check=False)  # fmt: skip
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6
    except (ValueError, KeyError, subprocess.TimeoutExpired):
        return None


def attacker_command(victim_pub: str, mode: str, rate: int, seconds: float, sources: str,
                     sender: str) -> list[str]:  # fmt: skip
    """`flood.py attack ...`, to run in X: with the tree measured (`--src`), which it
    builds its packets with (else it would import PYTHONPATH's or this checkout's)."""
    return [sys.executable, str(Path(__file__).resolve()), "attack", "--src", SRC,
            "--victim-pub", victim_pub, "--target", V_ATTACK, "--mode", mode,
            "--rate", str(rate), "--seconds", str(seconds), "--sources", sources,
            "--pool", str(POOL), "--sender", sender]  # fmt: skip


def run_one(bed: Bed, mode: str, rate: int, seconds: float, sender: str) -> dict[str, object]:
    sources = ",".join(SPOOFED if mode == "c" else [X_ADDR])
    cpu0, udp0 = cpu_seconds(bed.victim_pid()), udp_received(bed)  # before the first packet
    victim_pub = base64.b64decode(bed.node.public_key).hex()
    attacker = bed.x.popen(
        *attacker_command(victim_pub, mode, rate, seconds, sources, sender),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    result: dict[str, object] = {"victim": bed.victim, "mode": mode, "rate": rate,
                                 "idle_rss": bed.idle_rss}  # fmt: skip
    done = threading.Event()
    sampler = threading.Thread(target=peak_rss, args=(bed.victim_pid(), done, result))
    sampler.start()
    try:
        assert attacker.stdout is not None
        if attacker.stdout.readline().strip() != "ready":
            raise RuntimeError("the attacker did not start")
        t0 = time.monotonic()
        hs = threading.Thread(target=legit_handshake, args=(bed, seconds - 0.5, result))
        time.sleep(0.5)  # the flood has put the victim under load
        hs.start()
        result["ping"], result["loss"] = ping_rtt(bed, max(3, int(seconds * 0.35 / 0.2)))
        left = seconds - (time.monotonic() - t0) - 0.5
        result["iperf"] = iperf(bed, left) if left >= 1 else None
        hs.join(seconds + 5)
        out, _ = attacker.communicate(timeout=seconds + 30)
        result.update(json.loads(out.strip().splitlines()[-1]))
        time.sleep(0.3)  # the last replies on their way
        result["cpu"] = cpu_seconds(bed.victim_pid()) - cpu0
        result["cookie_replies"] = udp_received(bed) - udp0
        result["bound"] = seconds - 0.5
    finally:
        done.set()
        sampler.join()
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    return result


# ---- the report -----------------------------------------------------------------------


def fmt(r: dict[str, object]) -> str:
    def num(v: object, f: str) -> str:
        return "-" if v is None else format(v, f)

    elapsed = float(r.get("elapsed") or 1)  # type: ignore[arg-type]
    hs = r.get("handshake")
    if hs is None:
        handshake = f"> {r['bound']:.1f} s"
    else:
        handshake = f"{hs * 1000:.0f} ms" if hs < 1 else f"{hs:.2f} s"  # type: ignore[operator]
    replies = f"{r['cookie_replies']:,}"
    if r["mode"] == "b":
        replies += f" ({r['cookies']:,} decrypted)"
    rate = "-" if r["mode"] == "none" else ("max" if not r["rate"] else f"{r['rate']:,}/s")
    sent = "-" if r["mode"] == "none" else f"{int(r['sent']) / elapsed:,.0f}/s"  # type: ignore[call-overload]
    return (
        f"| {r['victim']} | {r['mode']} | {rate} | {sent} | {handshake} | {num(r['cpu'], '.2f')} "
        f"| {replies} | {num(r['ping'], '.3f')} ({num(r['loss'], '.0f')}%) "
        f"| {num(r['iperf'], ',.0f')} | {num(r['idle_rss'], '.0f')} / {num(r.get('rss'), '.0f')} |"
    )


HEADER = (
    "| victim | mode | rate | sent | legit handshake | victim CPU s | cookie replies "
    "| ping ms (loss) | iperf3 Mbit/s | RSS MB idle / peak |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def victims(names: list[str]) -> dict[str, list[str]]:
    from wgpy.demo.testbed import WGPY

    known = {"wgpy": WGPY, "wgpy-pure": ["env", "WGPY_NATIVE=0", *WGPY],
             "wireguard-go": ["wireguard-go"]}  # fmt: skip
    if UPSTREAM_GO.exists():
        known["wireguard-go-0.0.20250522"] = [str(UPSTREAM_GO)]
    missing = [n for n in names if n not in known]
    if missing:
        print(f"skipping victims not found here: {', '.join(missing)}", file=sys.stderr)
    return {n: known[n] for n in names if n in known}


def attack_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("attack")
    ap.add_argument("--src", metavar="DIR", help="the wgpy tree (read at import: tree.py)")
    for name in ("victim-pub", "target", "mode", "sources"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--rate", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--pool", type=int, default=POOL)
    ap.add_argument("--sender", choices=("c", "python"), default="c")
    return ap


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "attack":
        attack(attack_parser().parse_args())
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", metavar="DIR", help="the wgpy tree to measure (read at import)")
    ap.add_argument("--quick", action="store_true", help="one short pass: 20,000/s, 8 s floods")
    ap.add_argument("--victims", default="wgpy,wireguard-go,wireguard-go-0.0.20250522")
    ap.add_argument("--modes", default="none,a,b,c")
    ap.add_argument("--rates", default="20000,0", help="initiations/s; 0 = as fast as it goes")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each flood")
    ap.add_argument(
        "--sender",
        choices=("c", "python"),
        default="c",
        help="what sends modes a and c (b is always Python)",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    rates = [int(r) for r in args.rates.split(",")]
    seconds = args.seconds
    if args.quick:
        rates, seconds = [20000], 8.0  # a cookie round trip (5 s + jitter) fits in
    modes = args.modes.split(",")
    rows = []
    started = time.monotonic()
    for name, command in victims(args.victims.split(",")).items():
        bed = Bed(name, command)
        try:
            for mode in modes:
                for rate in [0] if mode == "none" else rates:
                    r = run_one(bed, mode, rate, seconds, args.sender)
                    rows.append(fmt(r))
                    print(rows[-1], file=sys.stderr, flush=True)
                    time.sleep(1.5)  # the victim leaves its under-load state
        finally:
            bed.close()
    report = (
        f"Handshake flood, `python bench/flood.py {' '.join(sys.argv[1:])}`, "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {seconds:g} s floods "
        f"({time.monotonic() - started:.0f} s in all).\n\n{HEADER}\n" + "\n".join(rows) + "\n"
    )
    print(report)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
