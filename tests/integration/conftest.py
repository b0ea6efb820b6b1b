"""Integration tests: real TUN devices in network namespaces, real wireguard-go, real `wg`.

Every namespace, interface and process a test makes is removed by the fixtures, also when
the test fails. Needs root, /dev/net/tun, wireguard-go and wg (./run installs them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.rootless_bed import unprivileged_python
from wgpy.demo.testbed import Namespace, Tunnel

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = [tool for tool in ("wg", "wireguard-go", "ip") if shutil.which(tool) is None]
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or missing:
        reason = f"needs root, /dev/net/tun and {', '.join(missing) or 'the tools'}"
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def make_tunnel() -> Iterator[Callable[..., Tunnel]]:
    made: list[Tunnel] = []

    def make(*args: object, **kwargs: object) -> Tunnel:
        t = Tunnel(*args, **kwargs)  # type: ignore[arg-type]
        made.append(t)
        return t

    try:
        yield make
    finally:
        for t in made:
            t.close()


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def load_nft(ns: Namespace, rules: str) -> None:
    """Load an nftables ruleset (text) into namespace `ns`."""
    path = f"/tmp/wgpy-nft-{os.getpid()}.nft"
    with open(path, "w") as f:
        f.write(rules)
    try:
        ns.run("nft", "-f", path, timeout=10)
    finally:
        os.unlink(path)


# ---- the rootless tests' unprivileged interpreter (test_rootless, test_proxy) ----


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wgpy-rootless-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def upy(workdir: Path) -> Path:
    """The interpreter nobody runs (built once per session)."""
    return unprivileged_python(workdir)
