"""Run one coverage-guided fuzz target (atheris/libFuzzer) for as long as asked.

    python bench/fuzz.py TARGET --seconds N [--crashes DIR] [--keep-going] [--native]
                         [-- FLAGS...]

TARGET is one of device, uapi, config, offload (tests/fuzz/fuzz_TARGET.py). It starts
from the checked-in seed corpus tests/fuzz/corpus/TARGET (read only: new inputs go to a
scratch directory, kept with --work) and writes any crashing input to --crashes
(default $TMPDIR/wgpy-fuzz-crashes/TARGET/). --keep-going runs libFuzzer in fork mode and goes on
after a crash. --native: the device target's victim uses the native extension
(wgpy._native, built with `python setup.py build_ext --inplace`). Extra libFuzzer flags
follow `--`. Exits 1 if a crash was found.
Reproduce one: PYTHONPATH=src:. python -m tests.fuzz.fuzz_TARGET CRASH_FILE
Needs `pip install atheris`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzz.common import TARGETS
from tests.fuzz.runner import run, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", choices=TARGETS)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--crashes", type=Path)
    ap.add_argument("--work", type=Path, help="keep the inputs found here")
    ap.add_argument("--keep-going", action="store_true", help="fork mode: go on after a crash")
    ap.add_argument("--native", action="store_true", help="device: the native datapath")
    ap.add_argument("flags", nargs="*", help="extra libFuzzer flags (after --)")
    args = ap.parse_args()
    default = Path(tempfile.gettempdir()) / "wgpy-fuzz-crashes" / args.target
    crashes = (args.crashes or default).resolve()
    extra = list(args.flags)
    if args.keep_going:
        extra += ["-fork=1", "-ignore_crashes=1", "-ignore_timeouts=1", "-ignore_ooms=1"]
    started = time.monotonic()
    env = {"WGPY_FUZZ_NATIVE": "1" if args.native else "0"}
    code, out = run(args.target, args.seconds, crashes, args.work, extra, env)
    print(out[-6000:])
    found = sorted(p.name for p in crashes.glob("*") if p.is_file())
    print(f"{args.target}: ran {time.monotonic() - started:.0f} s, {summary(out)}; "
          f"exit {code}; {len(found)} artifacts in {crashes}")  # fmt: skip
    return 1 if code or found else 0


if __name__ == "__main__":
    sys.exit(main())
