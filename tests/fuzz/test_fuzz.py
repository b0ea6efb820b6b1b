"""The fuzz targets: each seed of the corpus, a short coverage-guided run of each target
(atheris, in a subprocess; skipped without it), the oracle's own sanity, and one
regression test per finding (xfail-strict while it awaits its product fix).

Longer runs: python bench/fuzz.py TARGET --seconds N.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.fuzz import fuzz_config, fuzz_device, fuzz_offload, fuzz_uapi, world
from tests.fuzz.common import CORPUS, TARGETS
from wgpy.io import offload

ONE_INPUT = {
    "device": fuzz_device.one_input,
    "uapi": fuzz_uapi.one_input,
    "config": fuzz_config.one_input,
    "offload": fuzz_offload.one_input,
}
SECONDS = 4  # per target: the four with their start-up stay under 30 s together


def seeds(target: str) -> list[Path]:
    return sorted((CORPUS / target).iterdir())


@pytest.mark.parametrize("target", TARGETS)
def test_every_seed_passes(target: str) -> None:
    files = seeds(target)
    assert files, f"no seeds for {target}"
    for f in files:
        ONE_INPUT[target](f.read_bytes())


def test_corpus_is_small() -> None:
    assert sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file()) < 200_000


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (pip install atheris, or the 'fuzz' extra)",
)
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_briefly(target: str, tmp_path: Path) -> None:
    from tests.fuzz.runner import run

    code, out = run(target, SECONDS, tmp_path / "crashes")
    found = list((tmp_path / "crashes").iterdir())
    assert code == 0 and not found, f"{target}: {[f.name for f in found]}\n{out[-4000:]}"


# ---- the device oracle ----------------------------------------------------------------


def test_device_world_is_deterministic() -> None:
    assert world.build().pending == world.build().pending


def test_device_corpus_is_from_this_world() -> None:
    """The seeds are the world's own messages; a core that draws its randomness
    differently makes another world, and the seeds must be made again."""
    w = world.build()
    for name, data in w.pending.items():
        seed = (CORPUS / "device" / name).read_bytes()
        assert seed == fuzz_device.record(0, data), (
            f"corpus/device/{name} is stale: sudo PYTHONPATH=src:. python -m tests.fuzz.make_corpus"
        )


def test_every_pending_message_is_accepted() -> None:
    """The genuine set is not empty talk: each one changes V's state on its own."""
    for name in world.build().pending:
        w = world.build()
        before = world.peer_state(w.victim)
        world.replay(w, [name])
        assert world.peer_state(w.victim) != before, name


def test_the_oracle_notices_a_state_change() -> None:
    w = world.build()
    data = w.pending["data-a"]
    with pytest.raises(AssertionError, match=r"delivered|changed"):
        fuzz_device.deliver(w, [(data, world.A_EP)], w.now, genuine=set())


def test_mac2_and_cookie_receiver_index_are_not_authenticated() -> None:
    """Why world.canonical ignores them: such variants really are accepted."""
    w = world.build()
    init = bytearray(w.pending["initiation-a"])
    init[-1] ^= 1  # mac2, unchecked while not under load
    before = world.peer_state(w.victim)
    w.victim.receive([(bytes(init), world.A_EP)], w.now)
    assert world.peer_state(w.victim) != before
    assert world.canonical(bytes(init)) in world.genuine_set(w)


def test_device_flood_and_garbage_seeds_change_nothing() -> None:
    w = world.build()
    before = world.peer_state(w.victim)
    fuzz_device.one_input((CORPUS / "device" / "initiation-stranger").read_bytes())
    fuzz_device.one_input(fuzz_device.record(2 | 8, w.other["initiation-stranger"]))
    fuzz_device.one_input(fuzz_device.record(0, w.other["seen-2-type4"]))  # a replay
    assert world.peer_state(w.victim) == before


# ---- findings ---------------------------------------------------------------------------

# offload.split on a GSO read (here USO) whose IPv4 header says IHL=0: _segment cut an
# 8-byte header copy and _set_ip_length wrote the IPv4 checksum at bytes 10-12 of it,
# growing the bytearray while a memoryview of it was alive: BufferError. Found by
# fuzz_offload in 3 s (and independently on main, fixed there by f85ebcf: IPv4 header
# lengths under 20 are refused). The datapath's loop caught it, but the read's whole batch
# was lost and a traceback logged.
IHL_ZERO_USO = bytes.fromhex(
    "6b855858"
    "0a000000"
    "00"
    "6b"  # virtio header: flags, gso_type 0x85 (UDP_L4|ECN), ...
    "40ffffffffffff07000000000000"  # "IPv4" with IHL 0
    "58585d0a5706400686060606060606060606060606"
)


def test_split_drops_gso_read_with_short_ipv4_header() -> None:
    assert offload.split(IHL_ZERO_USO, 1500) == []
    for ihl in range(5):
        buf = bytearray(IHL_ZERO_USO)
        buf[10] = 0x40 | ihl
        assert offload.split(bytes(buf), 1500) == []
    fuzz_offload.one_input(b"\0\x05\x8c" + IHL_ZERO_USO)


# config.strip once split lines with str.splitlines(), which also breaks at a lone \r, \v,
# \f, \x1c-\x1e, \x85, \u2028 and \u2029, while config.parse and wg-quick's own `strip`
# (bash `read`) split at \n only: a comment holding such a character came out of
# `wgpy strip` as live lines (here a commented-out peer routing everything, which
# `wg syncconf wg0 <(wgpy strip wg0)` would have installed). Found by fuzz_config in 4 s.
@pytest.mark.parametrize("sep", list("\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"))
def test_strip_keeps_a_comment_one_line(sep: str) -> None:
    from tests.tools.test_config import PRIV, PUB1
    from wgpy.tools import config

    text = (
        f"[Interface]\nPrivateKey = {PRIV}\n"
        f"# retired:{sep}[Peer]{sep}PublicKey = {PUB1}{sep}AllowedIPs = 0.0.0.0/0\n"
    )
    assert config.parse(text).peers == []
    assert config.parse(config.strip(text)).peers == []
