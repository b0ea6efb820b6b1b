"""Fuzz target: the datagram receive path of a configured device (`Device.receive`).

Input: records of `control (1 byte) | length (2 bytes, big-endian) | datagram`, the last
one cut short by the end of the input. Control bits: 0-1 pick the source address
(world.SOURCES), 2 ends the batch after this record, 3 sends the datagram 64 times (the
rate limiter and the handshake queue's budget), 4-6 = k advance the clock by 4**(k-1) ms
before it (k=0: not at all; up to 4 s), 7 puts V under load for the batch (mac2 wanted:
the rate limiter keeps 4 sources from getting there by themselves). Each batch is one
`receive` call.

Each batch goes in as the datapath hands it over (memoryviews into a receive buffer),
and the handshake queue is worked off after it. Invariants: nothing raises; a batch made
only of garbage (anything but a genuine message V has not seen yet, see world.py)
changes no peer state, delivers no packet, makes V send nothing but cookie replies and
reports no event but sending them.
"""

from __future__ import annotations

import sys

from tests.fuzz.common import fuzz, instrumented

with instrumented():
    from tests.fuzz import world
    from wgpy.core.events import EventKind
    from wgpy.core.messages import COOKIE_REPLY_LEN, MSG_COOKIE_REPLY, message_type
    from wgpy.core.output import Output

MAX_RECORDS = 64
FLOOD = 64

_cached: world.World | None = None


def records(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    i = 0
    while i < len(data) and len(out) < MAX_RECORDS:
        control = data[i]
        length = int.from_bytes(data[i + 1 : i + 3], "big")
        out.append((control, data[i + 3 : i + 3 + length]))
        i += 3 + length
    return out


def record(control: int, datagram: bytes) -> bytes:
    """The inverse of `records` for one datagram (for the corpus and the tests)."""
    return bytes([control]) + len(datagram).to_bytes(2, "big") + datagram


def fresh_world() -> world.World:
    global _cached
    w, _cached = _cached or world.build(), None
    return w


def one_input(data: bytes) -> None:
    global _cached
    w = fresh_world()
    genuine = world.genuine_set(w)
    now = w.now
    batch: list[tuple[bytes, tuple[str, int]]] = []
    clean = True  # may the next fuzz input reuse this world?
    load = False
    recs = records(data)
    for n, (control, datagram) in enumerate(recs):
        k = (control >> 4) & 7
        now += 4 ** (k - 1) / 1000 if k else 0.0
        load = load or bool(control & 0x80)
        src = world.SOURCES[control & 3]
        batch += [(datagram, src)] * (FLOOD if control & 8 else 1)
        clean = (
            clean
            and not control & 0x80
            and message_type(datagram) not in (1, 2, 3)
            and not world.authentic(w, genuine, datagram)
        )
        if control & 4 or n == len(recs) - 1:
            world.force_load(w.victim, load)
            deliver(w, batch, now, genuine)
            batch, load = [], False
    if clean:
        _cached = w  # only garbage data messages: the world is as it was built


def step(w: world.World, batch: list[tuple[bytes, tuple[str, int]]], now: float) -> Output:
    """One batch as the datapath hands it over: views into a receive buffer; then the
    handshake queue worked off completely, so that nothing carries over to the next."""
    dev = w.victim
    out = dev.receive([(memoryview(bytearray(d)), src) for d, src in batch], now)
    out.extend(dev.process_handshakes(now, 1 << 20))
    return out


def deliver(
    w: world.World, batch: list[tuple[bytes, tuple[str, int]]], now: float, genuine: set[bytes]
) -> None:
    if any(world.authentic(w, genuine, d) for d, _ in batch):
        step(w, batch, now)  # may change state: only "no exception" here
        return
    before = world.peer_state(w.victim)
    out = step(w, batch, now)
    assert out.tun == [], f"garbage delivered packets: {out.tun!r}"
    for d, _ in out.udp:
        assert d[0] == MSG_COOKIE_REPLY and len(d) == COOKIE_REPLY_LEN, f"garbage made V send {d!r}"
    events = {e.kind for e in out.events}
    assert events <= {EventKind.COOKIE_SENT}, f"garbage made events {events}"
    assert world.peer_state(w.victim) == before, "garbage changed peer state"


if __name__ == "__main__":
    fuzz(one_input, sys.argv)
