"""The replay window: the Linux selftest/counter.c cases, then a model-based property."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from wgpy.core.constants import REJECT_AFTER_MESSAGES
from wgpy.core.replay import WINDOW, ReplayWindow

LIM = WINDOW + 1
R = REJECT_AFTER_MESSAGES

# (counter, accepted?) in order, on one window: the 34 numbered Linux cases
SEQUENCE = [
    (0, True), (1, True), (1, False), (9, True), (8, True), (7, True), (7, False),
    (LIM, True), (LIM - 1, True), (LIM - 1, False), (LIM - 2, True), (2, True), (2, False),
    (LIM + 16, True), (3, False), (LIM + 16, False), (LIM * 4, True),
    (LIM * 4 - (LIM - 1), True), (10, False), (LIM * 4 - LIM, False),
    (LIM * 4 - (LIM + 1), False), (LIM * 4 - (LIM - 2), True), (LIM * 4 + 1 - LIM, False),
    (0, False), (R, False), (R - 1, True), (R, False), (R - 1, False), (R - 2, True),
    (R + 1, False), (R + 2, False), (R - 2, False), (R - 3, True), (0, False),
]  # fmt: skip


def test_linux_sequence() -> None:
    w = ReplayWindow()
    got = [(c, w.accept(c)) for c, _ in SEQUENCE]
    assert got == SEQUENCE


def run(counters: list[int]) -> list[bool]:
    w = ReplayWindow()
    return [w.accept(c) for c in counters]


def test_linux_bulk_cases() -> None:
    assert all(run([*range(1, WINDOW + 1), 0])) and run([*range(1, WINDOW + 1), 0, 0])[-1] is False
    assert run([*range(2, WINDOW + 2), 1, 0])[-2:] == [True, False]
    assert all(run(list(range(WINDOW, -1, -1))))
    assert run([*range(WINDOW + 1, 0, -1), 0]) == [True] * (WINDOW + 1) + [False]
    assert run([*range(WINDOW, 0, -1), WINDOW + 1, 0]) == [True] * (WINDOW + 1) + [False]
    assert all(run([*range(WINDOW, 0, -1), 0, WINDOW + 1]))


def test_reset_forgets() -> None:
    w = ReplayWindow()
    assert w.accept(5) and not w.accept(5)
    w.reset()
    assert w.accept(5)


counters = st.lists(st.one_of(st.integers(0, 20000), st.integers(R - 20000, R + 2)), max_size=200)


@given(counters)
def test_matches_a_naive_model(seq: list[int]) -> None:
    """Accepted iff below the limit, not seen, and at most WINDOW behind the highest seen."""
    w = ReplayWindow()
    seen: set[int] = set()
    top = -1
    for c in seq:
        expect = c < R and c not in seen and c + WINDOW >= top
        assert w.accept(c) is expect, (c, top)
        if expect:
            seen.add(c)
            top = max(top, c)
