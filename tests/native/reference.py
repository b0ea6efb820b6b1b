"""Traffic and sessions to feed both backends' open_batch, and their answers compared.

The reference is the pure-Python backend itself (wgpy.core.backend: `Session`,
`open_batch`), the one path the pure datapath runs: no third copy of the receive logic.
`World` forges sessions and traffic (`forge`: a data message for any counter, even one no
sealer would use) and keeps a native Session and a pure one side by side. Shared by the
differential tests, the sanitizer corpus and the fuzz target.
"""

from __future__ import annotations

import random
import struct
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgpy.core import backend
from wgpy.core.backend import padded_length
from wgpy.core.constants import REJECT_AFTER_MESSAGES
from wgpy.core.messages import DATA_HEADER, MSG_DATA

REASONS = ("bad_size", "unknown_type", "unknown_index", "expired", "bad_tag", "replayed",
           "bad_inner")  # fmt: skip
_NONCE = struct.Struct("<4xQ")
RefSession = backend.Session  # the pure backend's: the reference
open_batch_ref = backend.open_batch


def forge(key: bytes, index: int, counter: int, packet: bytes, mtu: int = 1420) -> bytes:
    """A data message on key `key` for receiver `index` with any u64 counter."""
    plain = packet + bytes(padded_length(len(packet), mtu) - len(packet))
    header = DATA_HEADER.pack(MSG_DATA, index, counter)
    return header + ChaCha20Poly1305(key).encrypt(_NONCE.pack(counter), plain, None)


class Forger:
    """One session's sending side, as a test drives it: the key, the index, a counter."""

    def __init__(self, key: bytes, remote_index: int) -> None:
        self.key = key
        self.remote_index = remote_index
        self.send_counter = 0


def normalize(result: Any, names: dict[int, int]) -> tuple[Any, ...]:
    """An open_batch answer (either backend's) with sessions replaced by their index, a
    run's packets as a list of bytes (C's are a Spans); both name only the reasons that
    dropped something."""
    runs, per, others, drops = result
    assert set(drops) <= set(REASONS), drops
    return (
        [(names[id(s)], src, list(packets)) for s, src, packets in runs],
        [(names[id(s)], n, d) for s, n, d in per],
        others,
        dict(drops),
    )


# ---------------------------------------------------------------- traffic


def ip4(src: bytes, dst: bytes, proto: int, l4: bytes, ip_id: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ip_id, 0x4000, 64, proto, 0, src, dst)
    return hdr + l4


def ip6(src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst) + l4


def inner_packet(rng: random.Random, size: int) -> bytes:
    """An IPv4/IPv6 TCP/UDP packet of about `size` bytes from a few addresses, or garbage
    the inner checks must refuse."""
    roll = rng.random()
    v6 = rng.random() < 0.4
    src = (
        bytes([10, 0, 0, rng.randrange(1, 4)])
        if not v6
        else bytes(15) + bytes([rng.randrange(1, 4)])
    )
    dst = bytes([10, 0, 1, 1]) if not v6 else bytes(15) + b"\x09"
    hdr = 40 if v6 else 20
    body = rng.randbytes(max(0, size - hdr - 20))
    if rng.random() < 0.5:
        l4 = (
            struct.pack("!HHIIBBHHH", 1000, 80, rng.getrandbits(32), 7, 0x50, 0x10, 512, 0, 0)
            + body
        )
        proto = 6
    else:
        l4 = struct.pack("!HHHH", 53, 5353, 8 + len(body), 0) + body
        proto = 17
    p = ip6(src, dst, proto, l4) if v6 else ip4(src, dst, proto, l4, rng.getrandbits(16))
    if roll < 0.85:
        return p
    q = bytearray(p)
    bad = rng.randrange(6)
    if bad == 0:
        q[0] = (rng.choice([0, 5, 7, 15]) << 4) | (q[0] & 15)  # no such version
    elif bad == 1 and not v6:
        q[2:4] = struct.pack("!H", rng.randrange(20))  # total length under 20
    elif bad == 2:
        at = 4 if v6 else 2
        q[at : at + 2] = struct.pack("!H", len(q) + rng.randrange(1, 40))  # past the end
    elif bad == 3:
        del q[rng.randrange(1, hdr) :]  # too short for its header
    elif bad == 4:
        at = 4 if v6 else 2  # shorter than the plaintext: trimmed
        q[at : at + 2] = struct.pack(
            "!H", max(0, len(q) - rng.randrange(1, 16) - (40 if v6 else 0))
        )
    return bytes(q)


class World:
    """Sessions known to both implementations, and the core's sealer for each."""

    def __init__(self, rng: random.Random, nsessions: int, now: float, native: Any) -> None:
        self.rng = rng
        self.now = now
        self.native: dict[int, Any] = {}
        self.ref: dict[int, RefSession] = {}
        self.kps: list[Forger] = []
        self.sent: list[bytes] = []
        for _ in range(nsessions):
            index = rng.getrandbits(32)
            while index in self.ref:
                index = rng.getrandbits(32)
            key = rng.randbytes(32)
            expires = rng.choice([now + 100.0, now + 100.0, now + 100.0, now, now - 1.0])
            self.native[index] = native.Session(key, expires)
            self.ref[index] = RefSession(key, expires)
            self.kps.append(Forger(key, index))
        self.names = {id(s): i for i, s in self.native.items()}
        self.names.update({id(s): i for i, s in self.ref.items()})

    def seal(self, kp: Forger, packet: bytes, counter: int) -> bytes:
        kp.send_counter = (counter + 1) % 2**64
        return forge(kp.key, kp.remote_index, counter % 2**64, packet)

    def datagram(self, size: int) -> bytes:
        rng = self.rng
        kp = rng.choice(self.kps)
        roll = rng.random()
        if roll < 0.55 or not self.sent:
            d = self.seal(kp, inner_packet(rng, size), kp.send_counter)
            self.sent.append(d)
            return d
        if roll < 0.62:
            return rng.choice(self.sent)  # replayed
        if roll < 0.68:  # out of order: behind, far behind, or far ahead
            c = max(
                0, kp.send_counter + rng.choice([-1, -5, -100, -8127, -8128, -9000, 8200, 10**6])
            )
            return self.seal(kp, inner_packet(rng, size), c)
        if roll < 0.70:  # at the end of the counter space
            c = REJECT_AFTER_MESSAGES + rng.choice([-2, -1, 0, 1, 8000])
            return self.seal(kp, inner_packet(rng, size), c)
        if roll < 0.74:
            return self.seal(kp, b"", kp.send_counter)  # a keepalive
        if roll < 0.80:  # a bit flipped anywhere
            d = bytearray(rng.choice(self.sent))
            i = rng.randrange(len(d))
            d[i] ^= 1 << rng.randrange(8)
            return bytes(d)
        if roll < 0.84:  # truncated
            d = rng.choice(self.sent)
            return d[: rng.randrange(len(d))]
        if roll < 0.88:  # an index nobody has
            d = bytearray(rng.choice(self.sent))
            d[4:8] = rng.randbytes(4)
            return bytes(d)
        if roll < 0.94:  # handshake-shaped, or almost
            kind, n = rng.choice([(1, 148), (2, 92), (3, 64), (1, 92), (2, 148), (5, 148)])
            n += rng.choice([0, 0, 0, -1, 1])
            return struct.pack("<I", kind) + rng.randbytes(max(0, n - 4))
        return rng.randbytes(rng.randrange(0, 48))  # junk

    def batch(self) -> tuple[bytes, int, int]:
        """One GRO read: (buf, nbytes, seg), with room after nbytes."""
        rng = self.rng
        size = rng.choice([20, 40, 60, 100, 576, 1280, 1420, rng.randrange(0, 1500)])
        grams = [self.datagram(size) for _ in range(rng.randrange(1, 50))]
        mode = rng.random()
        if mode < 0.15:  # no GRO: one datagram
            d = grams[0]
            return d + rng.randbytes(rng.randrange(8)), len(d), rng.choice([0, -1, len(d)])
        if mode < 0.25:  # a segment size of its own
            seg = rng.randrange(1, 200)
        else:  # the size of most of them: the rest padded or cut to it
            sizes = [len(g) for g in grams]
            seg = max(set(sizes), key=sizes.count) or 1
        parts = []
        for i, g in enumerate(grams):
            if i == len(grams) - 1 and len(g) <= seg:
                parts.append(g)  # a shorter last
            else:
                parts.append(g[:seg] + rng.randbytes(max(0, seg - len(g))))
        buf = b"".join(parts)
        return buf + rng.randbytes(rng.randrange(8)), len(buf), seg
