"""The native open_batch and Session against the pure-Python backend's, the reference."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.native.reference import (
    RefSession,
    World,
    forge,
    normalize,
    open_batch_ref,
)
from wgpy.core.replay import ReplayWindow

native = pytest.importorskip(
    "wgpy._native", reason="wgpy._native is not built (python setup.py build_ext --inplace)"
)


def both(world: World, buf: bytes, nbytes: int, seg: int) -> None:
    """One batch through both backends: everything must agree."""
    got = native.open_batch(buf, nbytes, seg, world.native, world.now)
    want = open_batch_ref(buf, nbytes, seg, world.ref, world.now)
    assert normalize(got, world.names) == normalize(want, world.names)
    for index, s in world.native.items():
        assert s.window_state() == world.ref[index].window_state()


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**64), st.integers(1, 4), st.integers(1, 5))
def test_open_batch_matches_reference(seed: int, nsessions: int, nbatches: int) -> None:
    rng = random.Random(seed)
    world = World(rng, nsessions, 1000.0, native)
    for _ in range(nbatches):
        both(world, *world.batch())
        if rng.random() < 0.1:  # a session wiped between batches drops all after
            index = rng.choice(list(world.native))
            world.native[index].wipe()
            world.ref[index].wipe()
        world.now += rng.choice([0.0, 0.5, 100.0])


def test_one_session_run_and_results_shape() -> None:
    world = World(random.Random(1), 1, 5.0, native)
    (index,) = world.native
    world.native[index].expires = 1e9
    kp = world.kps[0]
    pkt = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
    grams = [world.seal(kp, pkt + bytes(8), c) for c in range(44)]
    buf = b"".join(grams)
    runs, per, others, drops = native.open_batch(buf, len(buf), len(grams[0]), world.native, 5.0)
    ((s, src, packets),) = runs
    assert s is world.native[index] and src == b"\n\0\0\1"
    # 36-byte plaintexts (padded to 48 on the wire) trimmed to their IP length, 28
    assert isinstance(packets, native.Spans) and len(packets) == 44
    assert list(packets) == [pkt + bytes(8)] * 44
    assert per == [(s, len(buf), True)] and others == [] and drops == {}  # none dropped
    # all replayed now; a handshake message next to them is handed back
    hs = struct.pack("<I", 1) + bytes(144)
    runs, per, others, drops = native.open_batch(buf + hs, len(buf) + 148, 0, world.native, 5.0)
    assert (runs, per, others, drops["bad_tag"]) == ([], [], [], 1)  # one datagram: garbage
    runs, per, others, drops = native.open_batch(hs + hs, 296, 148, world.native, 5.0)
    assert others == [(0, 148), (148, 148)]


def test_replay_window_is_the_linux_one() -> None:
    """The window alone: Session.window_state follows ReplayWindow on any counter order."""
    from tests.core.test_replay import SEQUENCE

    key = os.urandom(32)
    world = World(random.Random(2), 0, 0.0, native)
    s, ref = native.Session(key, 1e9), RefSession(key, 1e9)
    world.native, world.ref = {7: s}, {7: ref}
    world.names = {id(s): 7, id(ref): 7}
    for counter, accepted in SEQUENCE:
        d = forge(key, 7, counter, b"", 0)
        runs, per, _, drops = native.open_batch(d, len(d), 0, {7: s}, 1.0)
        assert bool(per) == accepted
        assert bool(open_batch_ref(d, len(d), 0, {7: ref}, 1.0)[1]) == accepted
        assert s.window_state() == ref.window_state()


def test_arguments_are_checked() -> None:
    s = native.Session(bytes(32), 1.0)
    with pytest.raises(ValueError):
        native.Session(bytes(31), 1.0)
    with pytest.raises(ValueError):
        native.open_batch(bytes(64), 65, 0, {}, 0.0)  # nbytes past buf
    with pytest.raises(ValueError):
        open_batch_ref(bytes(64), 65, 0, {}, 0.0)
    with pytest.raises(TypeError):
        native.open_batch(struct.pack("<IIQ", 4, 1, 0) + bytes(16), 32, 0, {1: "x"}, 0.0)
    assert native.open_batch(b"", 0, 0, {}, 0.0)[0:3] == ([], [], [])
    assert open_batch_ref(b"", 0, 0, {}, 0.0)[0:3] == ([], [], [])
    s.expires = 3.5
    assert s.expires == 3.5
    s.wipe()
    s.wipe()
    assert s.expires == float("-inf")
    assert s.window_state() == (0, bytes(1024)) == RefSession(bytes(32), 1.0).window_state()
    assert ReplayWindow().top == 0
