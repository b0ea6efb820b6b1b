"""The sanitizer corpus (sanitize.sh) and the fuzz target (fuzz_open.py), run briefly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

pytest.importorskip(
    "wgpy._native", reason="wgpy._native is not built (python setup.py build_ext --inplace)"
)


def _has_asan() -> bool:
    if shutil.which("gcc") is None:
        return False
    lib = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True)
    return os.path.isabs(lib.stdout.strip())


@pytest.mark.skipif(not _has_asan(), reason="needs gcc with libasan")
def test_hostile_corpus_under_asan_and_ubsan() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(
        [os.path.join(HERE, "sanitize.sh"), "30"],
        capture_output=True,
        text=True,
        timeout=240,  # 30 s of corpus, then the C intake's tests (~10-60 s under ASan)
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rounds clean" in done.stdout
    assert " passed" in done.stdout  # tests/native/test_classify.py ran too


def test_fuzz_open_briefly() -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "fuzz_open.py"), "-max_total_time=5", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
