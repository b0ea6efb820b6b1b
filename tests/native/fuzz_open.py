"""Differential fuzz target for wgpy._native.open_batch (atheris).

Each input becomes one GRO read: pieces of raw input and of pre-sealed data messages
(some with a byte changed), cut at a segment size the input picks; fresh sessions each
time. The native answer must equal the pure-Python reference's (tests/native/reference.py).
    python tests/native/fuzz_open.py -max_total_time=600
"""

from __future__ import annotations

import os
import struct
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports():
    from tests.native.reference import (
        RefSession,
        forge,
        normalize,
        open_batch_ref,
    )
from wgpy import _native as native

KEYS = {1: bytes(range(32)), 0xDEADBEEF: bytes(range(32, 64))}
EXPIRES = 2.0


def _presealed() -> list[bytes]:
    v4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
    v6 = struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64, bytes(15) + b"\1", bytes(16))
    inner = [b"", v4 + bytes(8), v4 + bytes(3), v6 + bytes(8), v6, b"\x45" + bytes(30)]
    out = []
    for index, key in KEYS.items():
        for counter in (0, 1, 2, 3, 64, 8200, 2**64 - 8194):
            for p in inner:
                out.append(forge(key, index, counter, p))
    return out


PRESEALED = _presealed()


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    seg = fdp.ConsumeIntInRange(-1, 200)
    now = float(fdp.ConsumeIntInRange(0, 3))
    parts: list[bytes] = []
    while fdp.remaining_bytes() > 0 and len(parts) < 40:
        op = fdp.ConsumeIntInRange(0, 3)
        if op == 0:
            parts.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 160)))
            continue
        d = bytearray(PRESEALED[fdp.ConsumeIntInRange(0, len(PRESEALED) - 1)])
        if op == 2:
            d[fdp.ConsumeIntInRange(0, len(d) - 1)] = fdp.ConsumeIntInRange(0, 255)
        parts.append(bytes(d))
    buf = b"".join(parts)
    if seg < 0 and parts:
        seg = len(parts[0])
    nat = {i: native.Session(k, EXPIRES) for i, k in KEYS.items()}
    ref = {i: RefSession(k, EXPIRES) for i, k in KEYS.items()}
    names = {id(s): i for i, s in nat.items()} | {id(s): i for i, s in ref.items()}
    for _ in range(2):  # the same read twice: the second is all replays
        got = native.open_batch(buf, len(buf), seg, nat, now)
        want = open_batch_ref(buf, len(buf), seg, ref, now)
        assert normalize(got, names) == normalize(want, names)
        assert all(nat[i].window_state() == ref[i].window_state() for i in KEYS)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
