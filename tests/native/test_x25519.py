"""X25519 in batches (src/native/dh.c) against the reference (core/backend.py `x25519`):
RFC 7748's vectors on both, low-order points refused on both as crypto.dh refuses them,
and hypothesis batches of every shape, with and without the crypto threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgpy.core import backend, native
from wgpy.core.crypto import dh, public_key

module = native.load()
BACKENDS = [pytest.param(backend.x25519, id="python")] + (
    [pytest.param(module.x25519, id="native")] if module is not None else []
)
needs_native = pytest.mark.skipif(module is None, reason="wgpy._native is not built")
Batch = Callable[[tuple[Any, ...]], list[tuple[bytes | None, ...]]]

# RFC 7748 section 5.2 (scalar, u, result) and section 6.1 (Alice, Bob)
RFC_5_2 = [
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
]  # fmt: skip
ALICE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUB = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
# points whose product with any clamped scalar is all zeros (0, 1, one of order 8)
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]


@pytest.mark.parametrize("x25519", BACKENDS)
def test_rfc7748_vectors(x25519: Batch, workers: int) -> None:
    jobs = tuple((bytes.fromhex(k), None, (bytes.fromhex(u),)) for k, u, _ in RFC_5_2)
    got = x25519(jobs)
    assert [row[1] for row in got] == [bytes.fromhex(r) for _, _, r in RFC_5_2]
    got = x25519(((ALICE, None, (BOB_PUB,)), (BOB, None, (ALICE_PUB,))))
    assert got == [(ALICE_PUB, SHARED), (BOB_PUB, SHARED)]


@pytest.mark.parametrize("x25519", BACKENDS)
def test_low_order_results_are_refused(x25519: Batch, workers: int) -> None:
    """None where crypto.dh raises, and the other exchanges of the job still answered."""
    for point in LOW_ORDER:
        with pytest.raises(ValueError):
            dh(ALICE, point)
    got = x25519(((ALICE, ALICE_PUB, (*LOW_ORDER, BOB_PUB)),))
    assert got == [(ALICE_PUB, None, None, None, SHARED)]


@pytest.mark.parametrize("x25519", BACKENDS)
def test_a_known_public_key_is_taken_as_given(x25519: Batch) -> None:
    """The caller's public key comes back as it was given (no X25519 to work it out)."""
    assert x25519(((ALICE, BOB_PUB, ()),)) == [(BOB_PUB,)]
    assert x25519(((ALICE, None, ()),)) == [(ALICE_PUB,)]
    assert x25519(()) == []


@pytest.mark.parametrize("x25519", BACKENDS)
@pytest.mark.parametrize(
    "jobs",
    [
        ((ALICE[:31], None, ()),),
        ((ALICE, None, (BOB_PUB + b"x",)),),
        ((ALICE, b"", ()),),
        ((ALICE, None, (bytearray(BOB_PUB),)),),
    ],
)
def test_keys_must_be_32_bytes(x25519: Batch, jobs: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        x25519(jobs)


@needs_native
@pytest.mark.parametrize("jobs", [[(ALICE, None, ())], ((ALICE, None),), ((ALICE, None, [BOB]),)])
def test_native_batch_shape_is_checked(jobs: Any) -> None:
    assert module is not None
    with pytest.raises(TypeError):
        module.x25519(jobs)


@needs_native
def test_the_device_batches_only_where_threads_can_share_the_work() -> None:
    """On one thread the exchanges go through `cryptography`, whose OpenSSL is quicker."""
    assert backend.Backend(module, threads=1).x25519 is None
    assert backend.Backend(None, threads=4).x25519 is None
    assert module is not None and backend.Backend(module, threads=2).x25519 is module.x25519


keys = st.binary(min_size=32, max_size=32)
peers = st.one_of(keys, st.sampled_from(LOW_ORDER))
job = st.tuples(keys, st.booleans(), st.lists(peers, max_size=4).map(tuple))


@needs_native
@given(st.lists(job, max_size=20))
@settings(max_examples=60, deadline=None)
def test_native_and_pure_batches_agree(drawn: list[tuple[bytes, bool, tuple[bytes, ...]]]) -> None:
    assert module is not None
    jobs = tuple((k, public_key(k) if known else None, ps) for k, known, ps in drawn)
    want = backend.x25519(jobs)
    for n in (0, 2):
        module.set_threads(n)
        try:
            assert module.x25519(jobs) == want
        finally:
            module.set_threads(0)
    for (k, _, ps), (pub, *shared) in zip(jobs, want, strict=True):  # and crypto.dh's
        assert pub == public_key(k)
        for p, s in zip(ps, shared, strict=True):
            assert s == (None if p in LOW_ORDER else dh(k, p))
