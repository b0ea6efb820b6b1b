"""Initiations screened in batches (src/native/screen.c) against the reference
(core/backend.py `screen`, core/noise.py's arithmetic): valid initiations from peers and
strangers give their static key and DH(our static, their ephemeral), forged ones and
low-order ephemerals None, on both, with and without the crypto threads; and hypothesis
batches of every mix, corrupted anywhere."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgpy.core import backend, handshake, native, noise
from wgpy.core.crypto import PrivateKey, clamp, dh, tai64n
from wgpy.core.messages import parse_initiation
from wgpy.core.peer import Peer

module = native.load()
BACKENDS = [pytest.param(backend.screen, id="python")] + (
    [pytest.param(module.screen, id="native")] if module is not None else []
)
needs_native = pytest.mark.skipif(module is None, reason="wgpy._native is not built")
Screen = Callable[[bytes, bytes, tuple[bytes, ...]], list[backend.Screened]]
# points whose product with any clamped scalar is all zeros (0, 1, one of order 8)
LOW_ORDER = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
]
OURS = PrivateKey(clamp(bytes(range(32))))


def _noop_jitter() -> float:
    return 0.0


def initiation(seed: int, responder: PrivateKey = OURS) -> tuple[bytes, bytes]:
    """An initiation to `responder` made by core/handshake.py (mac1 included) from the
    static key `seed` picks, and that key's public half."""
    rng = random.Random(seed)
    static = PrivateKey(clamp(rng.randbytes(32)))
    peer = Peer(responder.public, _noop_jitter)
    peer.static_static = dh(static, responder.public)
    msg = handshake.create_initiation(static, peer, PrivateKey(rng.randbytes(32)),
                                      rng.getrandbits(32), 1e9 + seed, 0.0)  # fmt: skip
    return msg, static.public


@pytest.mark.parametrize("screen", BACKENDS)
def test_valid_initiations_give_their_static_key_and_the_secret(screen: Screen,
                                                                 workers: int) -> None:  # fmt: skip
    """(static key, ck, h): from there, the rest of message 1 (the timestamp, under
    DH(our static, theirs)) opens as core/noise.py opens it from the start."""
    made = [initiation(i) for i in range(20)]
    got = screen(OURS.raw, OURS.public, tuple(m for m, _ in made))
    for (msg, pub), found in zip(made, got, strict=True):
        assert found is not None and found[0] == pub
        m = parse_initiation(msg)
        resumed, fresh = noise.SymmetricState.resumed(*found[1:]), noise.SymmetricState(OURS.public)
        noise.consume_initiation_static(fresh, OURS, m.ephemeral, m.static)
        assert (fresh.ck, fresh.h) == found[1:]
        stamp = noise.consume_initiation_payload(resumed, dh(OURS, pub), m.timestamp)
        assert stamp == tai64n(1e9 + made.index((msg, pub)))


@pytest.mark.parametrize("screen", BACKENDS)
def test_forgeries_and_low_order_ephemerals_give_none(screen: Screen, workers: int) -> None:
    msg, pub = initiation(1)
    flipped = [bytes(msg[:i]) + bytes([msg[i] ^ 0x80]) + msg[i + 1 :] for i in (8, 39, 40, 87)]
    low = [msg[:8] + point + msg[40:] for point in LOW_ORDER]
    other = initiation(2, PrivateKey(clamp(os.urandom(32))))[0]  # to someone else
    got = screen(OURS.raw, OURS.public, (*flipped, *low, other, msg))
    assert got[:-1] == [None] * (len(flipped) + len(low) + 1)
    assert got[-1] is not None and got[-1][0] == pub


@pytest.mark.parametrize("screen", BACKENDS)
def test_only_the_first_88_bytes_count(screen: Screen) -> None:
    """The timestamp and macs are not screened: they are the Python path's to check."""
    msg, pub = initiation(3)
    changed = msg[:88] + bytes(len(msg) - 88)
    assert screen(OURS.raw, OURS.public, (changed,)) == screen(OURS.raw, OURS.public, (msg,))
    assert screen(OURS.raw, OURS.public, ()) == []


@pytest.mark.parametrize("screen", BACKENDS)
@pytest.mark.parametrize(
    "args",
    [
        (OURS.raw[:31], OURS.public, ()),
        (OURS.raw, OURS.public + b"x", ()),
        (OURS.raw, OURS.public, (bytes(147),)),
        (OURS.raw, OURS.public, (bytes(149),)),
    ],
)
def test_lengths_are_checked(screen: Screen, args: tuple[bytes, bytes, tuple[bytes, ...]]) -> None:
    with pytest.raises(ValueError):
        screen(*args)


@needs_native
def test_the_native_call_takes_a_tuple_of_buffers() -> None:
    assert module is not None
    msg, pub = initiation(4)
    got = module.screen(OURS.raw, OURS.public, (bytearray(msg), memoryview(msg)))
    assert got == backend.screen(OURS.raw, OURS.public, (msg, msg)) and got[0] is not None
    assert got[0][0] == pub
    with pytest.raises(TypeError):
        module.screen(OURS.raw, OURS.public, [msg])
    with pytest.raises(TypeError):
        module.screen(OURS.raw, OURS.public, (None,))


# A process of its own whose libcrypto fails every allocation made off the main thread
# (CRYPTO_set_mem_functions, OpenSSL's own hook, set before anything in the process used
# libcrypto: no site, the extension loaded from its file), or only those made in source
# files whose name holds argv[4]: the crypto thread cannot make its contexts, the caller
# can. Argv: the module's file, our key and public key (hex), the file filter ("": any);
# stdin: the initiations. Prints what the screens and the exchanges came to.
FAILING_WORKER = """
import ctypes, importlib.util, os, sys, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.realloc.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
main, failing, only = threading.get_ident(), [False], sys.argv[4].encode()
where = (ctypes.c_char_p, ctypes.c_int)

def fails(file):
    return failing[0] and threading.get_ident() != main and only in (file or b"")

@ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, *where)
def malloc(n, file, line):
    return None if fails(file) else libc.malloc(n)

@ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, *where)
def realloc(p, n, file, line):
    return None if fails(file) else libc.realloc(p, n)

free = ctypes.cast(libc.free, ctypes.c_void_p)  # libc's own: frees run with errors set
assert ctypes.CDLL("libcrypto.so.3").CRYPTO_set_mem_functions(malloc, realloc, free) == 1
spec = importlib.util.spec_from_file_location("wgpy._native", sys.argv[1])
native = importlib.util.module_from_spec(spec)
spec.loader.exec_module(native)
priv, pub = bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
data = sys.stdin.buffer.read()
messages = tuple(data[i : i + 148] for i in range(0, len(data), 148))
assert None not in native.screen(priv, pub, messages[:2])  # the caller's contexts made
native.set_threads(1)
failing[0] = True

def outcome(call):
    for _ in range(20):  # till the crypto thread took a chunk
        try:
            if None in call():
                return "None"  # a valid message, an exchange of a peer's key
        except MemoryError:
            return "MemoryError"
    return "no chunk on the crypto thread"

print(outcome(lambda: native.screen(priv, pub, messages)))
ephemerals = tuple(m[8:40] for m in messages)  # one key (loaded here), its exchanges shared
print(outcome(lambda: native.x25519(((priv, pub, ephemerals),))[0]), flush=True)
os._exit(0)  # the worker's contexts are freed through the hook at exit: not with no GIL
"""


@needs_native
def test_a_crypto_thread_that_cannot_allocate_raises_memory_error() -> None:
    """A message the screen could not work out (a crypto thread's contexts not made: no
    memory) raises MemoryError: it is no verdict on the message (None, counted as a forged
    handshake: bad_handshake, as it was). The same for an exchange of `x25519` (None: the
    all-zero point, refused as a forgery too)."""
    assert failing_worker("") == ["MemoryError"] * 2


def failing_worker(only: str) -> list[str]:
    """What FAILING_WORKER's screens and exchanges came to."""
    assert module is not None
    messages = b"".join(initiation(i)[0] for i in range(200))
    argv = [sys.executable, "-I", "-S", "-c", FAILING_WORKER, module.__file__, OURS.raw.hex(),
            OURS.public.hex(), only]  # fmt: skip
    done = subprocess.run(argv, input=messages, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().split("\n")[:2]


@needs_native
def test_an_exchange_openssl_has_no_memory_for_raises() -> None:
    """An exchange OpenSSL's provider cannot allocate for (its context, in whichever step
    of the derive: its errors name the failed allocation) raises MemoryError, as where our
    own allocations of the key or the context come back NULL: no verdict on the message
    (the device works the batch off on the loop's thread). A refused exchange with memory
    to spare (a low-order point, an all-zero result) is a verdict: None
    (test_native_and_pure_screens_agree)."""
    assert failing_worker("ecx_exch.c") == ["MemoryError"] * 2


POOL = [initiation(i)[0] for i in range(6)]
message = st.one_of(
    st.sampled_from(POOL),
    st.tuples(st.sampled_from(POOL), st.integers(0, 147), st.integers(1, 255)).map(
        lambda t: t[0][: t[1]] + bytes([t[0][t[1]] ^ t[2]]) + t[0][t[1] + 1 :]
    ),
    st.tuples(st.sampled_from(POOL), st.sampled_from(LOW_ORDER)).map(
        lambda t: t[0][:8] + t[1] + t[0][40:]
    ),
    st.binary(min_size=148, max_size=148),
)


@needs_native
@given(st.lists(message, max_size=24), st.booleans())
@settings(max_examples=60, deadline=None)
def test_native_and_pure_screens_agree(messages: list[bytes], ours: bool) -> None:
    assert module is not None
    key = OURS if ours else PrivateKey(clamp(os.urandom(32)))
    want = backend.screen(key.raw, key.public, tuple(messages))
    for n in (0, 2):
        module.set_threads(n)
        try:
            assert module.screen(key.raw, key.public, tuple(messages)) == want
        finally:
            module.set_threads(0)
