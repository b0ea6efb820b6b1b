"""The UAPI protocol against a real core device (the sockets are tested with `wg` later)."""

from __future__ import annotations

import errno
import logging
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgpy.core.crypto import clamp, encode_key, public_key
from wgpy.core.device import Device, Output
from wgpy.core.peer import Peer
from wgpy.daemon import uapi


class MemoryHost:
    """The daemon's side of the UAPI, in memory: a port table instead of sockets."""

    taken_ports = {4242}

    def __init__(self) -> None:
        self.device = Device(random.Random(5).randbytes)
        self.listen_port = 51820
        self.fwmark = 0
        self.sent: list[bytes] = []

    def set_listen_port(self, port: int) -> None:
        if port in self.taken_ports:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        self.listen_port = port

    def set_fwmark(self, mark: int) -> None:
        self.fwmark = mark

    def now(self) -> float:
        return 100.0

    def transmit(self, out: Output) -> None:
        self.sent += [d for d, _ in out.udp]


PRIV = clamp(bytes(range(32)))
PEER1 = public_key(clamp(bytes([7] * 32)))
PEER2 = public_key(clamp(bytes([9] * 32)))


def req(host: MemoryHost, *lines: str) -> str:
    return uapi.handle(host, list(lines))


def get(host: MemoryHost) -> list[str]:
    text = req(host, "get=1")
    assert text.endswith("errno=0\n\n")
    return text.strip().split("\n")


def test_empty_device_get() -> None:
    host = MemoryHost()
    assert get(host) == ["listen_port=51820", "errno=0"]


def test_set_and_get_round_trip() -> None:
    host = MemoryHost()
    answer = req(
        host,
        "set=1",
        f"private_key={PRIV.hex()}",
        "listen_port=12345",
        "fwmark=7",
        f"public_key={PEER1.hex()}",
        f"preshared_key={'ab' * 32}",
        "endpoint=[fd00::1]:51820",
        "persistent_keepalive_interval=0",
        "replace_allowed_ips=true",
        "allowed_ip=10.0.0.0/24",
        "allowed_ip=fd00::5/64",
        f"public_key={PEER2.hex()}",
        "endpoint=192.0.2.1:1",
        "allowed_ip=10.0.1.1/32",
    )
    assert answer == "errno=0\n\n"
    lines = get(host)
    assert lines[:3] == [f"private_key={PRIV.hex()}", "listen_port=12345", "fwmark=7"]
    assert f"public_key={PEER1.hex()}" in lines
    assert "endpoint=[fd00::1]:51820" in lines and "endpoint=192.0.2.1:1" in lines
    assert "allowed_ip=10.0.0.0/24" in lines and "allowed_ip=fd00::/64" in lines
    assert f"preshared_key={'ab' * 32}" in lines
    assert "protocol_version=1" in lines


def test_allowed_ip_moves_removal_and_replace() -> None:
    host = MemoryHost()
    req(host, "set=1", f"public_key={PEER1.hex()}", "allowed_ip=10.0.0.0/24")
    req(host, "set=1", f"public_key={PEER2.hex()}", "allowed_ip=10.0.0.0/24")
    dev = host.device
    assert dev.allowed_ips.entries(dev.peers[PEER1]) == []
    req(
        host,
        "set=1",
        f"public_key={PEER2.hex()}",
        "allowed_ip=-10.0.0.0/24",
        "allowed_ip=10.2.0.0/16",
    )
    assert dev.allowed_ips.entries(dev.peers[PEER2]) == [(bytes([10, 2, 0, 0]), 16)]
    req(host, "set=1", f"public_key={PEER2.hex()}", "replace_allowed_ips=true")
    assert dev.allowed_ips.entries(dev.peers[PEER2]) == []


def test_remove_update_only_replace_peers_and_own_key() -> None:
    host = MemoryHost()
    req(host, "set=1", f"private_key={PRIV.hex()}", f"public_key={PEER1.hex()}")
    assert req(host, "set=1", f"public_key={PEER2.hex()}", "update_only=true") == "errno=0\n\n"
    assert list(host.device.peers) == [PEER1]
    req(host, "set=1", f"public_key={public_key(PRIV).hex()}", "allowed_ip=1.1.1.1/32")
    assert list(host.device.peers) == [PEER1]
    req(host, "set=1", f"public_key={PEER1.hex()}", "remove=true")
    assert host.device.peers == {}
    req(host, "set=1", f"public_key={PEER1.hex()}", f"public_key={PEER2.hex()}")
    req(host, "set=1", "replace_peers=true", f"public_key={PEER2.hex()}")
    assert list(host.device.peers) == [PEER2]


def test_zero_private_key_means_none() -> None:
    host = MemoryHost()
    req(host, "set=1", f"private_key={PRIV.hex()}")
    req(host, "set=1", f"private_key={'00' * 32}")
    assert not any(line.startswith("private_key") for line in get(host))


def test_keepalive_switched_on_sends_at_once() -> None:
    host = MemoryHost()
    req(
        host,
        "set=1",
        f"private_key={PRIV.hex()}",
        f"public_key={PEER1.hex()}",
        "endpoint=192.0.2.1:9",
    )
    req(host, "set=1", f"public_key={PEER1.hex()}", "persistent_keepalive_interval=25")
    assert len(host.sent) == 1 and len(host.sent[0]) == 148  # a handshake first
    assert "persistent_keepalive_interval=25" in get(host)


@pytest.mark.parametrize(
    ("lines", "code"),
    [
        (["set=1", "private_key=abc"], errno.EINVAL),
        (["set=1", f"private_key={'zz' * 32}"], errno.EINVAL),
        (["set=1", "listen_port=65536"], errno.EINVAL),
        (["set=1", "listen_port=-1"], errno.EINVAL),
        (["set=1", "fwmark=x"], errno.EINVAL),
        (["set=1", "bogus=1"], errno.EINVAL),
        (["set=1", "endpoint=1.2.3.4:5"], errno.EINVAL),  # peer key before any peer
        (["set=1", "no equals sign"], errno.EPROTO),
        (["set=1", f"public_key={PEER1.hex()}", "endpoint=1.2.3.4"], errno.EINVAL),
        (["set=1", f"public_key={PEER1.hex()}", "endpoint=host:1"], errno.EINVAL),
        (["set=1", f"public_key={PEER1.hex()}", "allowed_ip=10.0.0.0/33"], errno.EINVAL),
        (["set=1", f"public_key={PEER1.hex()}", "protocol_version=2"], errno.EINVAL),
        (["set=1", f"public_key={PEER1.hex()}", "remove=yes"], errno.EINVAL),
        (
            ["set=1", f"public_key={PEER1.hex()}", "persistent_keepalive_interval=70000"],
            errno.EINVAL,
        ),
        (["set=1", "listen_port=4242"], errno.EADDRINUSE),
        (["set=1", "listen_port=\u00b2"], errno.EINVAL),  # "²".isdigit() is True
        (["set=1", "listen_port=\u0661\u0662"], errno.EINVAL),  # Arabic-Indic digits
        (["set=1", "fwmark="], errno.EINVAL),
        (["set=1", "private_key=" + "ab" * 31 + " a"], errno.EINVAL),  # fromhex skips spaces
        (["set=1", "public_key=" + "ab" * 31 + " a"], errno.EINVAL),
        (["get=1", "private_key=00"], errno.EINVAL),
        (["hello"], errno.EPROTO),
        ([], errno.EPROTO),
    ],
)
def test_errors_answer_negative_errno_and_change_nothing(lines: list[str], code: int) -> None:
    host = MemoryHost()
    req(
        host,
        "set=1",
        f"private_key={PRIV.hex()}",
        f"public_key={PEER2.hex()}",
        "allowed_ip=10.9.0.0/16",
    )
    before = get(host)
    # a valid change placed before the bad line must not be applied either
    if lines and lines[0] == "set=1":
        extra = ["fwmark=99"]
        if len(lines) > 1 and lines[1].startswith("public_key="):
            extra += [f"public_key={PEER2.hex()}", "allowed_ip=10.8.0.0/16"]
        lines = [lines[0], *extra, *lines[1:]]
    assert req(host, *lines) == f"errno=-{code}\n\n"
    assert get(host) == before


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(alphabet="=abcdefghijklmnopqrstuvwxyz0123456789_./:-[]\n", max_size=80), max_size=8
    )
)
def test_garbage_requests_never_raise(lines: list[str]) -> None:
    host = MemoryHost()
    answer = req(host, "set=1", *lines)
    assert answer.startswith("errno=") and answer.endswith("\n\n")


def test_large_config_round_trip() -> None:
    host = MemoryHost()
    lines = ["set=1", f"public_key={PEER1.hex()}"]
    lines += [f"allowed_ip=10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32" for i in range(130_000)]
    assert req(host, *lines) == "errno=0\n\n"
    text = req(host, "get=1")
    assert text.count("allowed_ip=") == 130_000


class FussyHost(MemoryHost):
    """A host whose socket refuses mark 13 (SO_MARK can fail: EPERM)."""

    def set_fwmark(self, mark: int) -> None:
        if mark == 13:
            raise OSError(errno.EPERM, "Operation not permitted")
        self.fwmark = mark


def test_a_refused_mark_changes_nothing_and_answers_eaddrinuse() -> None:
    host = FussyHost()
    req(host, "set=1", "fwmark=5")
    before = get(host)
    assert req(host, "set=1", "listen_port=1234", "fwmark=13") == f"errno=-{errno.EADDRINUSE}\n\n"
    assert get(host) == before
    # a refused port after an accepted mark: the mark is put back
    assert req(host, "set=1", "fwmark=6", "listen_port=4242") == f"errno=-{errno.EADDRINUSE}\n\n"
    assert get(host) == before


def test_crlf_lines_and_scoped_link_local_endpoints() -> None:
    host = MemoryHost()
    assert req(host, "set=1", "listen_port=4000\r", f"public_key={PEER1.hex()}\r",
               "endpoint=[fe80::1%lo]:51820\r") == "errno=0\n\n"  # fmt: skip
    lines = get(host)
    assert "listen_port=4000" in lines and "endpoint=[fe80::1%lo]:51820" in lines


class BrokenHost(MemoryHost):
    def now(self) -> float:
        raise RuntimeError("a bug")


def test_an_unexpected_failure_costs_one_request_not_the_daemon() -> None:
    host = BrokenHost()
    answer = req(host, "set=1", f"public_key={PEER1.hex()}", "persistent_keepalive_interval=1")
    assert answer == f"errno=-{uapi.IPC_ERROR_UNKNOWN}\n\n"
    assert get(host)[-1] == "errno=0"


def test_a_private_key_is_stored_clamped_as_by_wireguard_go() -> None:
    host = MemoryHost()
    raw = bytes([0xFF] * 32)  # every bit set: clamping changes the first and last byte
    assert req(host, "set=1", f"private_key={raw.hex()}") == "errno=0\n\n"
    assert get(host)[0] == f"private_key={clamp(raw).hex()}"
    assert host.device.public_key == public_key(clamp(raw))


@pytest.mark.parametrize("prefix", ["\u0663", "\u00b2", "\uff13", "1\u0662", " 8", "+8", ""])
def test_allowed_ip_prefix_lengths_are_ascii_digits_only(prefix: str) -> None:
    host = MemoryHost()
    lines = ["set=1", f"public_key={PEER1.hex()}", f"allowed_ip=10.0.0.0/{prefix}"]
    assert req(host, *lines) == f"errno=-{errno.EINVAL}\n\n"
    assert host.device.peers == {}


def test_sliced_handling_yields_often_and_answers_like_handle() -> None:
    host = MemoryHost()
    lines = ["set=1", f"public_key={PEER1.hex()}"]
    lines += [f"allowed_ip=10.{i >> 8 & 255}.{i & 255}.0/24" for i in range(5000)]
    steps = uapi.handle_steps(host, uapi.split_lines("\n".join(lines).encode(), piece=999))
    slices = 0
    with pytest.raises(StopIteration) as done:
        while True:
            next(steps)
            slices += 1
    assert done.value.value == "errno=0\n\n"
    assert slices >= 2 * 5000 // uapi.STEP  # parsing and applying both yield
    assert len(host.device.allowed_ips.entries(host.device.peers[PEER1])) == 5000
    assert uapi.handle(host, ["get=1"]) == uapi.run(uapi.handle_steps(host, iter(["get=1"])))


@given(st.binary(max_size=300), st.integers(1, 50))
def test_split_lines_is_decode_and_split(data: bytes, piece: int) -> None:
    expected = data.decode("utf-8", "replace").split("\n")
    assert list(uapi.split_lines(data, piece)) == expected


ENTRY = st.tuples(st.booleans(), st.integers(0, 7), st.sampled_from([24, 29, 30, 32]))


@settings(max_examples=300, deadline=None)
@given(st.lists(ENTRY, max_size=12), st.lists(ENTRY, max_size=12), st.lists(ENTRY, max_size=4))
def test_replace_allowed_ips_ends_as_remove_all_first_and_never_drops_a_kept_entry(
    before: list[tuple[bool, int, int]],
    changes: list[tuple[bool, int, int]],
    theirs: list[tuple[bool, int, int]],
) -> None:
    def ops(entries: list[tuple[bool, int, int]]) -> list[tuple[bool, bytes, int]]:
        return [(add, bytes([10, 0, 0, 4 * host]), cidr) for add, host, cidr in entries]

    def setup() -> tuple[Device, Peer]:
        dev = Device(random.Random(1).randbytes)
        peer, other = dev.add_peer(PEER1), dev.add_peer(PEER2)
        assert peer is not None and other is not None
        for _, addr, cidr in ops(before):
            dev.allowed_ips.insert(addr, cidr, peer)
        for _, addr, cidr in ops(theirs):
            dev.allowed_ips.insert(addr, cidr, other)
        return dev, peer

    expected_dev, expected_peer = setup()  # what replace_allowed_ips means: all out first
    expected_dev.allowed_ips.remove_value(expected_peer)
    for add, addr, cidr in ops(changes):
        if add:
            expected_dev.allowed_ips.insert(addr, cidr, expected_peer)
        else:
            expected_dev.allowed_ips.remove(addr, cidr, expected_peer)
    expected = expected_dev.allowed_ips.entries(expected_peer)

    dev, peer = setup()
    # kept: what stays and is not removed on the way by a "-" line (`wg` never sends those
    # with replace_allowed_ips, but the UAPI allows them)
    removed = {uapi._entry_key(addr, cidr) for add, addr, cidr in ops(changes) if not add}
    kept = {
        e for e in set(dev.allowed_ips.entries(peer)) & set(expected)
        if uapi._entry_key(*e) not in removed
    }  # fmt: skip
    old_step, uapi.STEP = uapi.STEP, 1
    try:
        for _ in uapi._replace_allowed_ips(dev, peer, ops(changes)):
            owned = set(dev.allowed_ips.entries(peer))
            assert kept <= owned  # between slices, a kept entry is never missing
    finally:
        uapi.STEP = old_step
    assert dev.allowed_ips.entries(peer) == expected  # the same entries, in the same order
    other = dev.peers[PEER2]
    assert dev.allowed_ips.entries(other) == expected_dev.allowed_ips.entries(
        expected_dev.peers[PEER2]
    )


SECRET = bytes(range(100, 132))  # a key that must never appear in an error or a log line


@pytest.mark.parametrize(
    "lines",
    [
        ["set=1", f"private_key {SECRET.hex()}"],  # no "=": the whole line is the mistake
        ["set=1", f"private_key {encode_key(SECRET)}"],  # base64 ends in "=": a bad key name
        ["set=1", f"private_key={SECRET.hex()}z"],
        ["set=1", f"public_key={PEER1.hex()}", f"preshared_key {encode_key(SECRET)}"],
        ["set=1", f"public_key={PEER1.hex()}", f"preshared_key:{SECRET.hex()}"],
        ["set=1", f"listen_port={SECRET.hex()}"],  # pasted into the wrong field
        ["set=1", f"public_key={PEER1.hex()}", f"endpoint={encode_key(SECRET)}"],
        [f"private_key={SECRET.hex()}"],  # no set=1: the key line is taken as the operation
        [f"private_key {encode_key(SECRET)}"],
    ],
)
def test_errors_never_show_key_material(lines: list[str], caplog: pytest.LogCaptureFixture) -> None:
    """A malformed line holding a key is refused, and neither the answer nor the log line
    carries any of it (logs go to journals and bug reports): the error names the line."""
    host = MemoryHost()
    with caplog.at_level(logging.DEBUG):
        answer = req(host, *lines)
    assert answer.startswith("errno=-")
    logged = caplog.text
    assert "failed" in logged  # the error itself is still logged
    pieces = {SECRET.hex(), encode_key(SECRET)}
    pieces |= {p[i : i + 8] for p in set(pieces) for i in range(0, len(p) - 8, 4)}
    assert not [p for p in pieces if p in logged or p in answer], logged
