"""Side-by-side tunnel benchmark: wgpy and wireguard-go, in one run, on this machine.

    sudo python bench/throughput.py [--reps 3] [--seconds 5] [--out BENCHMARKS.md]

For each pairing (wgpy<->wgpy, wgpy<->wireguard-go, wireguard-go<->wireguard-go) it
builds two namespaces joined by veth (MTU 1420 on the tunnel), then runs iperf3 TCP
through the tunnel in both directions, `--reps` times each, alternating the pairings so
that drift in the machine's speed hits all of them alike. It reports the median Gbit/s,
the ratio against wireguard-go<->wireguard-go, the CPU seconds per GB of each tunnel
process, and the ping round trip; the core's in-memory handshake rate is measured too.
The results go to BENCHMARKS.md (a table and a PNG bar chart).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from wgpy.demo.run import iperf3  # noqa: E402
from wgpy.demo.testbed import WGPY, WIREGUARD_GO, Node, Tunnel  # noqa: E402

PAIRINGS = {
    "wgpy <-> wgpy": (WGPY, WGPY),
    "wgpy <-> wireguard-go": (WGPY, WIREGUARD_GO),
    "wireguard-go <-> wireguard-go": (WIREGUARD_GO, WIREGUARD_GO),
}
BASELINE = "wireguard-go <-> wireguard-go"


@dataclass
class Result:
    gbits: dict[str, list[float]] = field(default_factory=lambda: {"a->b": [], "b->a": []})
    cpu_per_gb: dict[str, list[float]] = field(default_factory=lambda: {"a": [], "b": []})
    rtt_ms: list[float] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iperf(client: Node, server: Node, seconds: float) -> float:
    return iperf3(client, server, seconds) / 1e9


def rtt(src: Node, dst: Node) -> float:
    out = src.ns.run("ping", "-c", "20", "-i", "0.05", "-q", dst.inner4, timeout=30)
    return float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])


def run_once(name: str, seconds: float, result: Result) -> None:
    with Tunnel("bn", *PAIRINGS[name]) as t:
        t.a.ns.run("ping", "-c", "1", "-W", "3", t.b.inner4)  # handshake first
        for label, client, server in (("a->b", t.a, t.b), ("b->a", t.b, t.a)):
            pids = [end.process.pid for end in (t.a, t.b) if end.process is not None]
            before = [cpu_seconds(p) for p in pids]
            gbits = iperf(client, server, seconds)
            after = [cpu_seconds(p) for p in pids]
            result.gbits[label].append(gbits)
            gigabytes = gbits * seconds / 8
            for side, b0, b1 in zip("ab", before, after, strict=True):
                result.cpu_per_gb[side].append((b1 - b0) / gigabytes if gigabytes else 0.0)
        result.rtt_ms.append(rtt(t.a, t.b))


def handshake_rate() -> float:
    from core import bench_handshakes  # bench/core.py

    return bench_handshakes(3.0)


def plot(results: dict[str, Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for i, direction in enumerate(("a->b", "b->a")):
        values = [statistics.median(results[n].gbits[direction]) for n in names]
        xs = [x + (i - 0.5) * width for x in range(len(names))]
        ax.bar(xs, values, width, label=direction)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("iperf3 TCP, Gbit/s (median)")
    ax.set_title("Tunnel throughput, 2 cores, MTU 1420 (left side = a)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def report(results: dict[str, Result], args: argparse.Namespace, hps: float) -> str:
    base = statistics.median(results[BASELINE].gbits["a->b"] + results[BASELINE].gbits["b->a"])
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `sudo python bench/throughput.py --reps {args.reps} --seconds "
        f"{args.seconds:g}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"kernel {os.uname().release}. Both tunnel ends and iperf3 share the cores; the "
        "pairings alternate within one run. Ratios are against wireguard-go <-> wireguard-go "
        "(Debian's package) measured in the same run.",
        "",
        "| pairing (a <-> b) | a->b Gbit/s | b->a Gbit/s | ratio | CPU s/GB a | CPU s/GB b "
        "| ping ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        ab, ba = statistics.median(r.gbits["a->b"]), statistics.median(r.gbits["b->a"])
        cpu_a, cpu_b = (statistics.median(r.cpu_per_gb[s]) for s in "ab")
        ratio = statistics.median(r.gbits["a->b"] + r.gbits["b->a"]) / base
        lines.append(
            f"| {name} | {ab:.2f} | {ba:.2f} | {ratio:.2f}x | {cpu_a:.1f} | {cpu_b:.1f} "
            f"| {statistics.median(r.rtt_ms):.3f} |"
        )
    lines += targets(results, base, hps)
    lines += [
        "",
        f"Handshake responses per second, one core, in memory (bench/core.py): {hps:,.0f}",
        "",
        "![throughput](bench/throughput.png)",
        "",
        "Where the time goes: py-spy profiles of both daemons under iperf3 show the "
        "receiving daemon at ~95% of a core (the bottleneck; the sender idles ~5-30%). "
        "About a quarter of the receiver's time is ChaCha20-Poly1305 itself (~2 us per "
        "1420-byte packet on these machines); the rest is interpreter work spread thin: "
        "the coalescer (~1.8 us a segment), the replay window, UDP and TUN calls. A "
        "handshake response is three X25519 exchanges and one key generation (~36 us "
        "each here) plus ~23 HMAC-BLAKE2s. Ping pays four Python wake-ups per round trip. "
        "What each datapath change bought: docs/design.md, section 'The datapath'.",
        "",
        "Every sample (Gbit/s): "
        + "; ".join(
            f"{n} {d}: {', '.join(f'{g:.2f}' for g in r.gbits[d])}"
            for n, r in results.items()
            for d in r.gbits
        ),
    ]
    return "\n".join(lines) + "\n"


def targets(results: dict[str, Result], base: float, hps: float) -> list[str]:
    """The issue's targets against this run's figures."""

    def ratio(name: str) -> float:
        r = results.get(name)
        return statistics.median(r.gbits["a->b"] + r.gbits["b->a"]) / base if r else 0.0

    ours = results.get("wgpy <-> wgpy")
    base_rtt = statistics.median(results[BASELINE].rtt_ms)
    rtt = statistics.median(ours.rtt_ms) / base_rtt if ours else 0.0
    with_go = ratio("wgpy <-> wireguard-go")
    rows = [
        ("wgpy<->wgpy >= 3.0x wireguard-go", f"{ratio('wgpy <-> wgpy'):.2f}x",
         ratio("wgpy <-> wgpy") >= 3.0),
        ("wgpy<->wireguard-go >= wireguard-go<->wireguard-go", f"{with_go:.2f}x", with_go >= 1.0),
        (">= 5,000 handshake responses/s per core", f"{hps:,.0f}/s", hps >= 5000),
        ("ping within 1.5x wireguard-go's", f"{rtt:.2f}x", 0 < rtt <= 1.5),
    ]  # fmt: skip
    lines = ["", "| target | this run | met |", "| --- | --- | --- |"]
    lines += [f"| {what} | {got} | {'yes' if ok else 'no'} |" for what, got, ok in rows]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--only", choices=list(PAIRINGS), action="append")
    args = parser.parse_args()
    names = args.only or list(PAIRINGS)
    if BASELINE not in names:
        names.append(BASELINE)
    results = {name: Result() for name in names}
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            run_once(name, args.seconds, results[name])
            last = results[name].gbits
            print(f"rep {rep + 1}: {name}: {last['a->b'][-1]:.2f} / {last['b->a'][-1]:.2f} Gbit/s")
    hps = handshake_rate()
    text = report(results, args, hps)
    plot(results, ROOT / "bench" / "throughput.png")
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
