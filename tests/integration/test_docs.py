"""Every fenced python block in docs/api.md runs, each in a fresh network namespace."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgpy.demo.testbed import Namespace

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "api.md"]


def blocks() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for i, m in enumerate(re.finditer(r"^```python\n(.*?)^```", doc.read_text(), re.M | re.S)):
            found.append((f"{doc.name}#{i + 1}", m.group(1)))
    return found


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[Namespace]:
    tag = re.sub(r"[^0-9]", "", request.node.callspec.id)
    ns = Namespace(f"wgpydoc-{os.getpid() % 100000}-{tag}")
    try:
        yield ns
    finally:
        ns.close()


def test_the_docs_have_examples() -> None:
    assert len(blocks()) >= 5


@pytest.mark.parametrize("code", [code for _, code in blocks()], ids=[n for n, _ in blocks()])
def test_example_runs(code: str, namespace: Namespace, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        namespace.argv([sys.executable, "-c", code]),
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
