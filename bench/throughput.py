"""Side-by-side tunnel benchmark: wgpy and wireguard-go, in one run, on this machine.

    sudo python bench/throughput.py [--reps 3] [--seconds 5] [--out BENCHMARKS.md]
        [--pair A:B ...] [--impl NAME=COMMAND ...] [--baseline A:B]

Implementations: `wgpy` (the native datapath when built), `wgpy-pure` (WGPY_NATIVE=0),
`upstream` (the current wireguard-go, ../shared/bin/wireguard-go-* beside the repository,
when present), `debian` (Debian's wireguard-go 0.0.20220316, which predates batched I/O
and offloads), and any `--impl NAME="COMMAND ARGS"` (e.g. another checkout of wgpy:
`--impl before="env PYTHONPATH=/tmp/old/src python3 -m wgpy"`). For each pairing it
builds two namespaces joined by veth (MTU 1420 on the tunnel), then runs iperf3 TCP
through the tunnel in both directions, `--reps` times each, alternating the pairings so
that drift in the machine's speed hits all of them alike. It reports the median Gbit/s,
the ratio against the baseline pairing, the CPU seconds per GB of each tunnel process,
and the ping round trip, into its section of BENCHMARKS.md, with a PNG bar chart.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from sections import write_section  # noqa: E402

from wgpy.demo.run import iperf3  # noqa: E402
from wgpy.demo.testbed import WGPY, WIREGUARD_GO, Tunnel, TunnelEnd  # noqa: E402

# ../shared/bin beside the checkout; from a git worktree (wt/NAME), the one further up
UPSTREAM = next((found for parent in ROOT.parents
                 if (found := sorted((parent / "shared" / "bin").glob("wireguard-go-*")))),
                [])  # fmt: skip
IMPLEMENTATIONS: dict[str, list[str]] = {
    "wgpy": ["env", "WGPY_NATIVE=1", *WGPY],
    "wgpy-pure": ["env", "WGPY_NATIVE=0", *WGPY],
    "debian": WIREGUARD_GO,
}
if UPSTREAM:
    IMPLEMENTATIONS["upstream"] = [str(UPSTREAM[-1])]
# --metrics: wgpy with its Prometheus endpoint on, scraped every second while it runs
METRICS = "127.0.0.1:9586"
IMPLEMENTATIONS["wgpy-metrics"] = ["env", "WGPY_NATIVE=1", f"WGPY_METRICS={METRICS}", *WGPY]
SCRAPE_EVERY = 1.0  # seconds; Prometheus' default is 15, so this is pessimistic
SCRAPER = (  # quietly: at teardown the daemon goes first and a scrape is refused
    "import time,urllib.request\n"
    "while True:\n"
    f" try: urllib.request.urlopen('http://{METRICS}/metrics',timeout=5).read()\n"
    " except OSError: pass\n"
    f" time.sleep({SCRAPE_EVERY})\n"
)
DEFAULT_PAIRS = ["wgpy:wgpy", "wgpy-pure:wgpy-pure", "upstream:upstream", "debian:debian",
                 "wgpy:upstream"]  # fmt: skip


@dataclass
class Result:
    gbits: dict[str, list[float]] = field(default_factory=lambda: {"a->b": [], "b->a": []})
    cpu_per_gb: dict[str, list[float]] = field(default_factory=lambda: {"a": [], "b": []})
    # the busiest thread's CPU seconds per GB (the serial part: the loop's thread), and
    # every thread's share of its daemon's CPU, by thread name
    serial_per_gb: dict[str, list[float]] = field(default_factory=lambda: {"a": [], "b": []})
    shares: dict[str, list[str]] = field(default_factory=lambda: {"a": [], "b": []})
    rtt_ms: list[float] = field(default_factory=list)

    def median_gbits(self) -> float:
        return statistics.median(self.gbits["a->b"] + self.gbits["b->a"])

    def median_cpu(self) -> float:
        """CPU seconds per GB of both ends together."""
        return sum(statistics.median(self.cpu_per_gb[s]) for s in "ab")


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of `pid`: (its name, CPU seconds so far)."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return threads


def thread_shares(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                  gigabytes: float) -> tuple[float, str]:  # fmt: skip
    """(the busiest thread's s/GB, "name share%, ..." over the threads that ran)."""
    used = {tid: (name, cpu - before.get(tid, (name, 0.0))[1])
            for tid, (name, cpu) in after.items()}  # fmt: skip
    total = sum(cpu for _, cpu in used.values()) or 1.0
    busiest = max((cpu for _, cpu in used.values()), default=0.0)
    ranked = sorted(used.values(), key=lambda t: -t[1])
    share = ", ".join(f"{name} {100 * cpu / total:.0f}%" for name, cpu in ranked if cpu > 0)
    return (busiest / gigabytes if gigabytes else 0.0), share


def rtt(src: TunnelEnd, dst: TunnelEnd) -> float:
    out = src.ns.run("ping", "-c", "20", "-i", "0.05", "-q", dst.inner4, timeout=30)
    return float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])


def run_once(pair: str, seconds: float, result: Result) -> None:
    left, right = (IMPLEMENTATIONS[n] for n in pair.split(":"))
    with Tunnel("bn", left, right) as t:
        t.a.ns.run("ping", "-c", "1", "-W", "3", t.b.inner4)  # handshake first
        for end in (t.a, t.b):  # scraped all along, as by a Prometheus (dies with the netns)
            if f"WGPY_METRICS={METRICS}" in end.implementation:
                end.ns.popen(sys.executable, "-c", SCRAPER)
        for label, client, server in (("a->b", t.a, t.b), ("b->a", t.b, t.a)):
            pids = [end.process.pid for end in (t.a, t.b) if end.process is not None]
            before = [cpu_seconds(p) for p in pids]
            threads_before = [thread_cpu(p) for p in pids]
            gbits = iperf3(client, server, seconds) / 1e9
            after = [cpu_seconds(p) for p in pids]
            threads_after = [thread_cpu(p) for p in pids]
            result.gbits[label].append(gbits)
            gigabytes = gbits * seconds / 8
            for side, b0, b1 in zip("ab", before, after, strict=True):
                result.cpu_per_gb[side].append((b1 - b0) / gigabytes if gigabytes else 0.0)
            for side, t0, t1 in zip("ab", threads_before, threads_after, strict=True):
                serial, share = thread_shares(t0, t1, gigabytes)
                result.serial_per_gb[side].append(serial)
                result.shares[side].append(f"{label}: {share}")
        result.rtt_ms.append(rtt(t.a, t.b))


def plot(results: dict[str, Result], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.38
    for i, direction in enumerate(("a->b", "b->a")):
        values = [statistics.median(results[n].gbits[direction]) for n in names]
        xs = [x + (i - 0.5) * width for x in range(len(names))]
        ax.bar(xs, values, width, label=direction)
    ax.set_xticks(range(len(names)), [n.replace(":", "\n<->\n") for n in names], fontsize=8)
    ax.set_ylabel("iperf3 TCP, Gbit/s (median)")
    ax.set_title(f"Tunnel throughput, {os.cpu_count()} cores, MTU 1420 (left side = a)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def report(results: dict[str, Result], args: argparse.Namespace) -> str:
    base = results[args.baseline]
    command = "sudo python bench/throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "## Throughput",
        "",
        f"Produced by `{command.strip()}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} "
        f"cores, kernel {os.uname().release}. Both tunnel ends and iperf3 share the cores; "
        f"the pairings alternate within one run. Ratios are against `{args.baseline}` in "
        "the same run. `upstream` is wireguard-go 0.0.20250522 (batched UDP GSO/GRO, TUN "
        "offloads, several cores); `debian` is Debian's 0.0.20220316, which has none of "
        "them; `wgpy` is the native datapath, `wgpy-pure` the pure-Python one.",
        "",
        "| pairing (a <-> b) | a->b Gbit/s | b->a Gbit/s | ratio | CPU s/GB a | CPU s/GB b "
        "| ping ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        ab, ba = statistics.median(r.gbits["a->b"]), statistics.median(r.gbits["b->a"])
        cpu_a, cpu_b = (statistics.median(r.cpu_per_gb[s]) for s in "ab")
        lines.append(
            f"| {name.replace(':', ' <-> ')} | {ab:.2f} | {ba:.2f} | "
            f"{r.median_gbits() / base.median_gbits():.2f}x | {cpu_a:.1f} | {cpu_b:.1f} "
            f"| {statistics.median(r.rtt_ms):.3f} |"
        )
    lines += threads_table(results)
    lines += targets(results)
    lines += [
        "",
        "![throughput](bench/throughput.png)",
        "",
        "Every sample (Gbit/s): "
        + "; ".join(
            f"{n} {d}: {', '.join(f'{g:.2f}' for g in r.gbits[d])}"
            for n, r in results.items()
            for d in r.gbits
        ),
    ]
    return "\n".join(lines) + "\n"


def threads_table(results: dict[str, Result]) -> list[str]:
    """Per pairing: the serial (busiest) thread's CPU s/GB at each end, the throughput that
    predicts once every other thread has a core of its own (8 / s/GB of the slower end),
    and each thread's share of its daemon's CPU in the last repetition."""
    lines = ["", "| pairing | serial thread s/GB a / b | predicts Gbit/s on enough cores "
             "| thread shares (last rep, a; b) |", "| --- | --- | --- | --- |"]  # fmt: skip
    for name, r in results.items():
        if not r.serial_per_gb["a"]:
            continue
        sa, sb = (statistics.median(r.serial_per_gb[s]) for s in "ab")
        predicted = 8 / max(sa, sb) if max(sa, sb) else 0.0
        shares = "; ".join(r.shares[s][-1] for s in "ab")
        lines.append(f"| {name.replace(':', ' <-> ')} | {sa:.1f} / {sb:.1f} | "
                     f"{predicted:.2f} | {shares} |")  # fmt: skip
    return lines


def targets(results: dict[str, Result]) -> list[str]:
    """Issue 17's targets, against upstream wireguard-go in this run (when both ran): those
    for 2 cores where the machine has at most 4, the 16-core ones where it has more."""
    ours, pure = results.get("wgpy:wgpy"), results.get("wgpy-pure:wgpy-pure")
    up, mixed = results.get("upstream:upstream"), results.get("wgpy:upstream")
    if not (ours and up):
        return []
    ping = statistics.median(ours.rtt_ms) / statistics.median(up.rtt_ms)
    speed, cpu = ours.median_gbits() / up.median_gbits(), ours.median_cpu() / up.median_cpu()
    small = (os.cpu_count() or 1) <= 4
    want_speed, want_cpu = (1.1, 0.9) if small else (1.0, 1.0)
    rows = [
        (f"wgpy<->wgpy >= {want_speed}x upstream<->upstream"
         + ("" if small else " (aim 1.3x)"), f"{speed:.2f}x", speed >= want_speed),
        (f"daemon CPU s/GB <= {want_cpu}x upstream's",
         f"{ours.median_cpu():.1f} vs {up.median_cpu():.1f} ({cpu:.2f}x)", cpu <= want_cpu),
        ("ping <= 1.2x upstream's", f"{ping:.2f}x", ping <= 1.2),
    ]  # fmt: skip
    if mixed:
        ratio = mixed.median_gbits() / up.median_gbits()
        rows.append(("wgpy<->upstream >= 0.95x upstream<->upstream", f"{ratio:.2f}x",
                     ratio >= 0.95))  # fmt: skip
    if pure:  # the "no slower than today": 1.47 Gbit/s against upstream's 2.90
        ratio = pure.median_gbits() / up.median_gbits()
        got = f"{ratio:.2f}x ({pure.median_gbits():.2f} Gbit/s)"
        rows.append(("pure path >= 0.51x upstream (the issue's run: 1.47 vs 2.90 Gbit/s)",
                     got, ratio >= 0.51))  # fmt: skip
    lines = ["", "| target | this run | met |", "| --- | --- | --- |"]
    return lines + [f"| {what} | {got} | {'yes' if ok else 'no'} |" for what, got, ok in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--pair", action="append", help="A:B, implementation names")
    parser.add_argument("--impl", action="append", default=[], help='NAME="COMMAND ARGS"')
    parser.add_argument("--baseline", help="the pairing ratios are against")
    parser.add_argument("--metrics", action="store_true",
                        help="add wgpy-metrics:wgpy-metrics (scraped each second)")  # fmt: skip
    args = parser.parse_args()
    for spec in args.impl:
        name, _, command = spec.partition("=")
        IMPLEMENTATIONS[name] = shlex.split(command)
    pairs = [p for p in args.pair or DEFAULT_PAIRS if set(p.split(":")) <= set(IMPLEMENTATIONS)]
    if args.metrics:
        pairs.append("wgpy-metrics:wgpy-metrics")
    args.baseline = args.baseline or ("upstream:upstream" if UPSTREAM else "debian:debian")
    if args.baseline not in pairs:
        pairs.append(args.baseline)
    results = {pair: Result() for pair in pairs}
    for rep in range(args.reps):
        for pair in pairs if rep % 2 == 0 else pairs[::-1]:
            run_once(pair, args.seconds, results[pair])
            last = results[pair].gbits
            print(f"rep {rep + 1}: {pair}: {last['a->b'][-1]:.2f} / {last['b->a'][-1]:.2f} Gbit/s")
    text = report(results, args)
    # the chart beside the report: bench/throughput.png for the repository's BENCHMARKS.md
    ours = args.out.resolve() == ROOT / "BENCHMARKS.md"
    png = ROOT / "bench" / "throughput.png" if ours else args.out.with_suffix(".png")
    plot(results, png)
    write_section(args.out, "throughput", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
