"""The handshake work off on the native backend, its X25519 in batches on the crypto
threads (src/native/dh.c), against the pure path worked off one message at a time: the
same datagrams, events, drops, state and randomness drawn."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.handshake_batches import INITIATORS, worked_off, world
from wgpy.core import native
from wgpy.core.backend import Backend

module = native.load()
pytestmark = pytest.mark.skipif(module is None, reason="wgpy._native is not built")
MESSAGES = INITIATORS * 5 + 2


@given(st.integers(0, 2**16), st.lists(st.integers(0, MESSAGES - 1), min_size=1, max_size=40),
       st.sampled_from([1, 16, 64]), st.sampled_from([0, 2]), st.booleans())  # fmt: skip
@settings(max_examples=30, deadline=None)
def test_native_batches_leave_what_pure_one_by_one_leaves(
    seed: int, chosen: list[int], batch: int, workers: int, loaded: bool
) -> None:
    assert module is not None
    want = worked_off(world(seed), chosen, 11.0, 1, loaded)
    module.set_threads(workers)  # 0: the batches on the caller alone
    try:
        got = worked_off(world(seed, Backend(module, threads=3)), chosen, 11.0, batch, loaded)
    finally:
        module.set_threads(0)
    assert got == want
