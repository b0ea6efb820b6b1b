"""Queued handshake messages worked off in batches (device.py `_work_off`: the X25519 work
of a batch first, then each message in queue order) leave exactly the traces they leave
worked off one by one: the same datagrams, events, drops, peer and index state, and the
same randomness drawn."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.handshake_batches import INITIATORS, worked_off, world

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
