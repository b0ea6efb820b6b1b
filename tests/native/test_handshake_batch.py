"""The handshake work off on the native backend, its X25519 in batches on the crypto
threads (src/native/dh.c) and its initiations screened there up to their static key
(src/native/screen.c), against the pure path worked off one message at a time: the same
datagrams, events, drops, state and randomness drawn."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.handshake_batches import INITIATORS, worked_off, world
from tests.core.test_handshake_batch import spy_on_noise
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


def test_native_screen_keeps_strangers_and_forgeries_out_of_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the crypto threads, no initiation goes through the Python Noise path from the
    start; the traces are those of the pure path."""
    assert module is not None
    want = worked_off(world(5), list(range(MESSAGES)), 11.0, 1)
    screens = Backend(module, threads=2)
    assert screens.screen is module.screen
    w = world(5, screens)
    seen = spy_on_noise(monkeypatch)
    module.set_threads(1)
    try:
        assert worked_off(w, list(range(MESSAGES)), 11.0, 16) == want
    finally:
        module.set_threads(0)
    assert seen == []


def test_no_screen_on_one_thread_or_the_pure_path() -> None:
    """On one thread the screen would cost what it saves (core/backend.py)."""
    assert Backend(module, threads=1).screen is None
    assert Backend(None, threads=4).screen is None
