"""Run one coverage-guided fuzz target (atheris/libFuzzer) for as long as asked.

    python bench/fuzz.py TARGET --seconds N [--crashes DIR] [--keep-going] [-- FLAGS...]

TARGET is one of device, uapi, config, offload (tests/fuzz/fuzz_TARGET.py). It starts
from the checked-in seed corpus tests/fuzz/corpus/TARGET (read only: new inputs go to a
scratch directory, kept with --work) and writes any crashing input to --crashes
(default fuzz-crashes/TARGET/). --keep-going runs libFuzzer in fork mode and goes on
after a crash. Extra libFuzzer flags follow `--`. Exits 1 if a crash was found.
Reproduce one: PYTHONPATH=src:. python -m tests.fuzz.fuzz_TARGET CRASH_FILE
Needs `pip install atheris`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("device", "uapi", "config", "offload")


def command(target: str, seconds: float, work: Path, crashes: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", f"tests.fuzz.fuzz_{target}",
        str(work), str(ROOT / "tests" / "fuzz" / "corpus" / target),
        f"-max_total_time={max(1, int(seconds))}",
        f"-artifact_prefix={crashes}/",
        "-timeout=20", "-rss_limit_mb=4096", "-max_len=8192", "-print_final_stats=1",
        *extra,
    ]  # fmt: skip


def run(target: str, seconds: float, crashes: Path, work: Path | None = None,
        extra: list[str] | None = None, quiet: bool = False) -> tuple[int, str]:  # fmt: skip
    """Fuzz `target` for `seconds`: (libFuzzer's exit code, its output)."""
    crashes.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as scratch:
        work = work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        argv = command(target, seconds, work, crashes, extra or [])
        done = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=seconds + 120,
        )  # fmt: skip
    out = done.stdout + done.stderr
    if not quiet:
        print(out[-6000:])
    return done.returncode, out


def summary(out: str) -> str:
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
    cov = re.findall(r"#\d+\s+\w+\s+cov: (\d+) ft: (\d+)", out)
    parts = []
    if execs:
        parts.append(f"{execs[-1]} executions")
    if cov:
        parts.append(f"coverage {cov[-1][0]} edges, {cov[-1][1]} features")
    return ", ".join(parts) or "no statistics"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", choices=TARGETS)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--crashes", type=Path)
    ap.add_argument("--work", type=Path, help="keep the inputs found here")
    ap.add_argument("--keep-going", action="store_true", help="fork mode: go on after a crash")
    ap.add_argument("flags", nargs="*", help="extra libFuzzer flags (after --)")
    args = ap.parse_args()
    crashes = (args.crashes or Path("fuzz-crashes") / args.target).resolve()
    extra = list(args.flags)
    if args.keep_going:
        extra += ["-fork=1", "-ignore_crashes=1", "-ignore_timeouts=1", "-ignore_ooms=1"]
    started = time.monotonic()
    code, out = run(args.target, args.seconds, crashes, args.work, extra)
    found = sorted(p.name for p in crashes.glob("*") if p.is_file())
    print(f"{args.target}: ran {time.monotonic() - started:.0f} s, {summary(out)}; "
          f"exit {code}; {len(found)} artifacts in {crashes}")  # fmt: skip
    return 1 if code or found else 0


if __name__ == "__main__":
    sys.exit(main())
