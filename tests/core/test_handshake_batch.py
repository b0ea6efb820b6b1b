"""Queued handshake messages worked off in batches (device.py `_work_off`: the X25519 work
of a batch first, then each message in queue order) leave exactly the traces they leave
worked off one by one: the same datagrams, events, drops, peer and index state, and the
same randomness drawn; also where the backend screens initiations up to their static key
(core/backend.py `screen`, the reference, standing in for the native one), which keeps
strangers' initiations and forgeries out of the Python Noise path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.handshake_batches import INITIATORS, worked_off, world
from wgpy.core import backend, handshake
from wgpy.core.backend import Backend
from wgpy.core.output import Drop

MESSAGES = INITIATORS * 5 + 2
picks = st.lists(st.integers(0, MESSAGES - 1), min_size=1, max_size=40)


def test_every_kind_of_message_is_in_the_pool() -> None:
    """The pool makes responses, key-ups and every refusal (or the test below is weak)."""
    w = world(1)
    assert len(w.messages) == MESSAGES
    first = [n for i in range(INITIATORS) for n in (5 * i + 3, 5 * i + 2)]  # responses
    order = first + [n for n in range(MESSAGES) if n not in first]
    (_, (udp, drops, events)), _ = worked_off(w, order, 11.0, 64)
    kinds = {values[0].value for values in events}
    assert {"initiation_received", "response_sent", "response_received",
            "keypair_created", "handshake_completed"} <= kinds  # fmt: skip
    assert {d.value for d in drops} == {"bad_handshake", "unknown_peer", "unknown_index"}
    assert udp


@given(st.integers(0, 2**16), picks, st.sampled_from([2, 3, 16, 64]), st.booleans())
@settings(max_examples=40, deadline=None)
def test_batches_leave_what_one_by_one_leaves(seed: int, chosen: list[int], batch: int,
                                              loaded: bool) -> None:  # fmt: skip
    one_by_one = worked_off(world(seed), chosen, 11.0, 1, loaded)
    assert worked_off(world(seed), chosen, 11.0, batch, loaded) == one_by_one


def screening() -> Backend:
    """The pure backend with the reference screen, as the native one has its own."""
    screens = Backend()
    screens.screen = backend.screen
    return screens


@given(st.integers(0, 2**16), picks, st.sampled_from([1, 3, 16]), st.booleans())
@settings(max_examples=30, deadline=None)
def test_screened_batches_leave_what_one_by_one_leaves(
    seed: int, chosen: list[int], batch: int, loaded: bool
) -> None:
    one_by_one = worked_off(world(seed), chosen, 11.0, 1, loaded)
    assert worked_off(world(seed, screening()), chosen, 11.0, batch, loaded) == one_by_one


def spy_on_noise(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The initiations the device takes through the Python Noise path from the start
    (`handshake.consume_initiation`), recorded as they pass (the real one runs)."""
    seen: list[bytes] = []
    real = handshake.consume_initiation

    def spied(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(handshake, "consume_initiation", spied)
    return seen


def test_screened_strangers_and_forgeries_skip_the_python_noise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Screened, no initiation goes through the Python Noise path from the start: the
    stranger's, the forged and the low-order ones are refused as they were (unknown peer,
    bad handshake), the peers' are answered from the state the screen reached."""
    w, plain, everything = world(3, screening()), world(3), list(range(MESSAGES))
    seen = spy_on_noise(monkeypatch)  # the worlds are made: their initiators are not spied
    (_, (udp, drops, events)), _ = worked_off(w, everything, 11.0, 16)
    assert seen == []
    assert (udp, drops, events) == worked_off(plain, everything, 11.0, 16)[0][1]
    assert len(seen) == INITIATORS * 2 + 2  # unscreened: each initiation, forgeries too
    assert isinstance(drops, dict)
    assert drops[Drop.UNKNOWN_PEER] == 1 and drops[Drop.BAD_HANDSHAKE] >= INITIATORS + 1


def failing(screen: bool, x25519: bool, error: type[Exception] = MemoryError) -> Backend:
    """The reference batch calls, those named raising `error` as the native ones do when
    a crypto thread cannot set OpenSSL up."""

    def fail(*_: Any) -> Any:
        raise error

    calls = Backend()
    calls.screen = fail if screen else backend.screen
    calls.x25519 = fail if x25519 else backend.x25519
    return calls


@pytest.mark.parametrize(
    ("screen", "x25519", "error"),
    [(True, False, MemoryError), (False, True, MemoryError), (True, True, MemoryError),
     (True, True, OSError)],
)  # fmt: skip
def test_a_batch_call_that_raises_leaves_the_batch_to_the_loop_thread(
    screen: bool, x25519: bool, error: type[Exception]
) -> None:
    """The batch call raising (screen before phase 2, x25519 in phase 1 or 3) costs the
    batch nothing: every message is answered, counted and dropped as one by one, and
    the device counts the fallbacks (the daemon warns once)."""
    everything = list(range(MESSAGES))
    w = world(5, failing(screen, x25519, error))
    assert worked_off(w, everything, 11.0, 16) == worked_off(world(5), everything, 11.0, 1)
    assert w.responder.crypto_fallbacks > 0
    reference = world(5, failing(False, False))
    worked_off(reference, everything, 11.0, 16)
    assert reference.responder.crypto_fallbacks == 0


def test_a_failed_screen_leaves_its_exchanges_to_the_x25519_batch() -> None:
    """Only the screen raising: its initiations' DH(our static, their ephemeral) go to the
    x25519 batch call, as without a screen, not one by one on the loop's thread (review
    F8); the traces are those of one by one."""
    asked: list[bytes] = []

    def x25519(jobs: tuple[Any, ...]) -> list[tuple[bytes | None, ...]]:
        asked.extend(peer for _, _, peers in jobs for peer in peers)
        return backend.x25519(jobs)

    calls = failing(True, False)
    calls.x25519 = x25519
    w, everything = world(5, calls), list(range(MESSAGES))
    assert worked_off(w, everything, 11.0, 16) == worked_off(world(5), everything, 11.0, 1)
    ephemerals = {m[8:40] for m, _ in w.messages if m[0] == 1}
    assert len(ephemerals) > INITIATORS and ephemerals <= set(asked)
    assert w.responder.crypto_fallbacks > 0


@given(st.integers(0, 2**16), picks, st.sampled_from([2, 16]), st.booleans(),
       st.sampled_from([(True, False), (False, True), (True, True)]))  # fmt: skip
@settings(max_examples=20, deadline=None)
def test_batches_whose_calls_raise_leave_what_one_by_one_leaves(
    seed: int, chosen: list[int], batch: int, loaded: bool, fails: tuple[bool, bool]
) -> None:
    one_by_one = worked_off(world(seed), chosen, 11.0, 1, loaded)
    assert worked_off(world(seed, failing(*fails)), chosen, 11.0, batch, loaded) == one_by_one
