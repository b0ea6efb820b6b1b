"""The lockout scenarios of tests/core/test_lockout.py (issue 21's policy: spoofed floods
at 1k and 20k/s, the device's maximum rate, the owner's own port, 1,000 peers behind one
address, reflection) with every device taking handshakes through the C intake: the
policy in C holds where the Python one does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.core import test_lockout
from wgpy.core import intake
from wgpy.sim import SimNet

pytestmark = pytest.mark.skipif(not intake.available(), reason="wgpy._classify is not built")

SCENARIOS = [name for name in dir(test_lockout) if name.startswith("test_")]


@pytest.fixture(autouse=True)
def c_intake() -> Iterator[None]:
    SimNet.classify = True
    try:
        yield
    finally:
        SimNet.classify = False


def params(name: str) -> list[tuple[Any, ...]]:
    marks = getattr(getattr(test_lockout, name), "pytestmark", [])
    for mark in marks:
        if mark.name == "parametrize":
            return [tuple(v) if isinstance(v, tuple) else (v,) for v in mark.args[1]]
    return [()]


@pytest.mark.parametrize(
    ("name", "args"), [(name, args) for name in SCENARIOS for args in params(name)]
)
def test_lockout_with_c_intake(name: str, args: tuple[Any, ...]) -> None:
    scenario: Callable[..., None] = getattr(test_lockout, name)
    net = SimNet()
    net.add("probe", ("192.0.2.99", 1))
    device = net.nodes[("192.0.2.99", 1)].device
    assert device.intake.classifier is not None  # the C intake is in use
    scenario(*args)
