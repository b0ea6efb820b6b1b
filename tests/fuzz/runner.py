"""Run a fuzz target in a subprocess with libFuzzer's flags (for bench/fuzz.py and the
tests): the checked-in corpus is read, never written; new inputs go to a scratch dir."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.fuzz.common import CORPUS

ROOT = Path(__file__).resolve().parent.parent.parent


def command(target: str, seconds: float, work: Path, crashes: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", f"tests.fuzz.fuzz_{target}", str(work), str(CORPUS / target),
        f"-max_total_time={max(1, round(seconds))}", f"-artifact_prefix={crashes}/",
        "-timeout=20", "-rss_limit_mb=4096", "-max_len=8192", "-print_final_stats=1", *extra,
    ]  # fmt: skip


def run(
    target: str,
    seconds: float,
    crashes: Path,
    work: Path | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Fuzz `target` for `seconds`: (libFuzzer's exit code, its output)."""
    crashes.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{target}-") as scratch:
        work = work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            command(target, seconds, work, crashes, extra or []),
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds + 120,
        )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def summary(out: str) -> str:
    """Executions and coverage from libFuzzer's output."""
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
    cov = re.findall(r"#\d+\s+\w+\s+cov: (\d+) ft: (\d+)", out)
    parts = []
    if execs:
        parts.append(f"{execs[-1]} executions")
    if cov:
        parts.append(f"coverage {cov[-1][0]} edges, {cov[-1][1]} features")
    return ", ".join(parts) or "no statistics"
