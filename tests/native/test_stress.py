"""The stress run (tests/native/stress.py) on both backends, the native one on 4 threads:
rekeys, peers removed and added back, allowed IPs moved, roaming and key rotation during
traffic in full batches; no nonce twice, nothing delivered that the configuration of the
moment refuses, each peer's packets in order."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest

from tests.native.stress import run
from wgpy.core import native
from wgpy.core.backend import Backend

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = native.load()


@pytest.mark.parametrize("kind", ["python", "native"])
def test_stress(kind: str) -> None:
    if kind == "native" and MODULE is None:
        pytest.skip("wgpy._native is not built")
    module = MODULE if kind == "native" else None
    if module is not None:
        module.set_threads(3)
    try:
        s = run(Backend(module, threading.Lock), seed=3, steps=250)
    finally:
        if module is not None:
            module.set_threads(0)
    assert s.delivered > 5000  # traffic went through, between all the changes
    assert all(c.delivered > 0 for c in s.clients)


def _has_tsan() -> bool:
    if shutil.which("gcc") is None:
        return False
    lib = subprocess.run(["gcc", "-print-file-name=libtsan.so"], capture_output=True, text=True)
    return os.path.isabs(lib.stdout.strip())


@pytest.mark.skipif(MODULE is None or not _has_tsan(), reason="needs the module and libtsan")
def test_stress_under_thread_sanitizer() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run([os.path.join(HERE, "tsan.sh"), "20"], capture_output=True,
                          text=True, timeout=300, env=env)  # fmt: skip
    if done.returncode == 77:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "every check held" in done.stdout
