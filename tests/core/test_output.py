"""core/output.py Datagrams: runs kept as the sealer made them, read one by one as the
list of datagrams they stand for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from wgpy.core.output import Datagrams, Output

EP = ("192.0.2.1", 1)
EP2 = ("192.0.2.2", 2)


@given(st.lists(st.tuples(st.integers(1, 50), st.integers(1, 5), st.integers(0, 50))))
def test_runs_read_as_their_datagrams(spec: list[tuple[int, int, int]]) -> None:
    """A run of n datagrams of `size` bytes and a last of `last` bytes (0: none) reads as
    those datagrams, in order, and counts them."""
    d = Datagrams()
    want: list[tuple[bytes, tuple[str, int]]] = []
    for i, (size, n, last) in enumerate(spec):
        last = min(last, size)
        grams = [bytes([i % 256, k]) * (size // 2) + bytes(size % 2) for k in range(n)]
        grams += [bytes([255]) * last] if last else []
        ep = EP if i % 2 else EP2
        d.add_runs([(b"".join(grams), size)], len(grams), ep)
        want += [(g, ep) for g in grams]
    assert list(d) == want and len(d) == len(want) and bool(d) == bool(want)
    assert d == want and d[1:3] == want[1:3]
    assert [ep for _, _, ep in d.runs()] == [EP if i % 2 else EP2 for i in range(len(spec))]


def test_append_extend_and_clear() -> None:
    out, other = Output(), Output()
    out.udp.append((b"a", EP))
    other.udp.add_runs([(b"xxyy", 2)], 2, EP2)
    out.extend(other)
    out.udp += [(b"z", EP)]
    assert list(out.udp) == [(b"a", EP), (b"xx", EP2), (b"yy", EP2), (b"z", EP)]
    assert out.udp[2] == (b"yy", EP2) and len(out.udp) == 4
    assert out.udp.runs() == [(b"a", 1, EP), (b"xxyy", 2, EP2), (b"z", 1, EP)]
    out.udp.clear()
    assert not out.udp and out.udp == [] and list(out.udp) == []
