"""A script run in a network namespace made for it, for tests that need one of their own
(a loopback with another MTU, a veth pair): the namespace is always removed."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_new_namespace(name: str, setup: list[list[str]], script: str,
                         timeout: float = 60) -> None:  # fmt: skip
    """Make namespace `name` (the pid appended), run each `ip -n NS` command of `setup`
    in it, then `script` with this interpreter (`{src}` in it is the checkout's src/);
    the script must print "ok", and its stderr is the assertion's message."""
    ns = f"{name}{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for command in setup:
            subprocess.run(["ip", "-n", ns, *command], check=True)
        code = script.format(src=os.path.join(ROOT, "src"), root=ROOT)
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", code],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        )  # fmt: skip
        assert done.stdout.strip() == "ok", done.stderr
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
