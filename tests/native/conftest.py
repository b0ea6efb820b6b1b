"""Fixtures the native tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wgpy.core import native

module = native.load()


@pytest.fixture(params=[0, 1, 3], ids=lambda n: f"workers{n}")
def workers(request: pytest.FixtureRequest) -> Iterator[int]:
    """The native batch with 0, 1 and 3 crypto threads beside the caller."""
    if module is None:
        yield 0
        return
    module.set_threads(request.param)
    try:
        yield request.param
    finally:
        module.set_threads(0)
