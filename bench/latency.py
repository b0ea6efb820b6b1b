"""Ping round trip through a tunnel: wgpy against upstream wireguard-go, in one run.

    sudo python bench/latency.py [--reps 3] [--count 300] [--interval 0.01]
        [--pair A:B ...] [--impl NAME=COMMAND ...] [--baseline A:B] [--out FILE]

The implementations and the test bed are bench/throughput.py's (`wgpy`, `wgpy-pure`,
`upstream`, `debian`, `--impl`). For each pairing: two namespaces joined by veth, a
tunnel between them, one ping to make the handshake, then `ping -i INTERVAL -c COUNT`
from a to b; `--reps` times, the pairings alternating so that drift in the machine's
load hits all of them alike. A bare ping over the veth (no tunnel) in each repetition
gives the kernel's floor. It reports each pairing's median and 90th percentile round
trip over all its samples, the ratio of the medians against the baseline, and what
the tunnel adds over the floor. `--out` writes the table into a section of that file
(BENCHMARKS.md); without it the table is only printed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sections import write_section
from throughput import IMPLEMENTATIONS, UPSTREAM

from wgpy.demo.testbed import Tunnel, TunnelEnd

DEFAULT_PAIRS = ["wgpy:wgpy", "upstream:upstream", "wgpy:upstream"]
FLOOR = "veth"  # the bare veth, no tunnel: the kernel's part of every round trip
_TIME = re.compile(r"time=([0-9.]+) ms")


@dataclass
class Samples:
    ms: list[float] = field(default_factory=list)
    reps: list[float] = field(default_factory=list)  # each repetition's median

    def median(self) -> float:
        return statistics.median(self.ms)

    def p90(self) -> float:
        return statistics.quantiles(self.ms, n=10)[-1]


def ping(src: TunnelEnd, address: str, count: int, interval: float) -> list[float]:
    """Every reply's round trip in ms (a lost one is simply missing)."""
    out = src.ns.run("ping", "-n", "-i", str(interval), "-c", str(count), address,
                     timeout=count * interval + 60, check=False)  # fmt: skip
    return [float(m) for m in _TIME.findall(out)]


def run_once(pair: str, count: int, interval: float, results: dict[str, Samples]) -> None:
    left, right = (IMPLEMENTATIONS[n] for n in pair.split(":"))
    with Tunnel("lt", left, right) as t:
        t.a.ns.run("ping", "-c", "1", "-W", "3", t.b.inner4)  # the handshake first
        ping(t.a, t.b.inner4, 20, interval)  # warm up (caches, the CPU's clock)
        results[FLOOR].ms += ping(t.a, t.b.outer4, count, interval)
        results[pair].ms += ping(t.a, t.b.inner4, count, interval)


def report(results: dict[str, Samples], baseline: str, command: str) -> str:
    floor = results[FLOOR].median()
    base = results[baseline].median()
    lines = [
        "## Latency",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
        f"kernel {os.uname().release}, the machine shared. Round trips of `ping` from a to "
        f"b through the tunnel, all samples of all repetitions; ratios against `{baseline}`;"
        ' `veth` is the bare link without a tunnel, and "added" what the tunnel adds to its '
        "median. Where the time goes: docs/design.md (Latency: a lone packet); "
        "`bench/hops.py` times one hop in-process.",
        "",
        "| pairing (a <-> b) | samples | median ms | p90 ms | ratio | ratio by repetition "
        "| added ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in results.items():
        if not s.ms:
            continue
        ratio = f"{s.median() / base:.2f}x" if name != FLOOR else ""
        added = f"{s.median() - floor:.3f}" if name != FLOOR else ""
        by_rep = by_repetition(s, results[baseline]) if name != FLOOR else ""
        lines.append(f"| {name.replace(':', ' <-> ')} | {len(s.ms)} | {s.median():.3f} "
                     f"| {s.p90():.3f} | {ratio} | {by_rep} | {added} |")  # fmt: skip
    lines += ["", "Ratio by repetition: each repetition's median against the baseline's in "
              "the same repetition (the pairings of one repetition ran seconds apart), their "
              "median and range: the machine's drift from one repetition to the next (+-25% "
              "here) cancels out of it."]  # fmt: skip
    return "\n".join(lines) + "\n"


def by_repetition(pair: Samples, baseline: Samples) -> str:
    ratios = [p / b for p, b in zip(pair.reps, baseline.reps, strict=True) if p == p and b == b]
    if not ratios:  # (nan != nan: a repetition with no reply has no ratio)
        return ""
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--pair", action="append", help="A:B, implementation names")
    parser.add_argument("--impl", action="append", default=[], help='NAME="COMMAND ARGS"')
    parser.add_argument("--baseline", help="the pairing ratios are against")
    parser.add_argument("--out", type=Path, help="write the table into this file's section")
    args = parser.parse_args()
    for spec in args.impl:
        name, _, command = spec.partition("=")
        IMPLEMENTATIONS[name] = shlex.split(command)
    pairs = [p for p in args.pair or DEFAULT_PAIRS if set(p.split(":")) <= set(IMPLEMENTATIONS)]
    baseline = args.baseline or ("upstream:upstream" if UPSTREAM else "debian:debian")
    if baseline not in pairs:
        pairs.append(baseline)
    results = {pair: Samples() for pair in pairs}
    results[FLOOR] = Samples()
    for rep in range(args.reps):
        for pair in pairs if rep % 2 == 0 else pairs[::-1]:
            before = len(results[pair].ms)
            run_once(pair, args.count, args.interval, results)
            got = results[pair].ms[before:]
            median = statistics.median(got) if got else math.nan  # (no reply: no median)
            results[pair].reps.append(median)
            print(f"rep {rep + 1}: {pair}: median {median:.3f} ms, "
                  f"{len(got)} replies", flush=True)  # fmt: skip
    command = "sudo python bench/latency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = report(results, baseline, command.strip())
    if args.out is not None:
        write_section(args.out, "latency", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
