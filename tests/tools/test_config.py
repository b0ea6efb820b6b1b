"""wg-quick config files: parsing, errors with file/line/key, UAPI output, render, strip."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import stat
import time
from base64 import urlsafe_b64encode
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgpy.core.crypto import clamp, encode_key
from wgpy.daemon.uapi import parse_set
from wgpy.tools import config
from wgpy.tools.config import ConfigError, parse

PRIV = encode_key(bytes(range(32)))
PUB1 = encode_key(bytes([1]) * 32)
PUB2 = encode_key(bytes([2]) * 32)
PSK = encode_key(bytes([3]) * 32)

GOOD = f"""
# a comment
[Interface]
privatekey = {PRIV}
Address = 10.0.0.1/24, fd00::1/64
Address = 10.9.0.1/32   # another line adds to the list
ListenPort = 51820
FwMark = 0x20
DNS = 10.0.0.53, fd00::53, example.com
MTU = 1380
Table = 1234
PreUp = echo pre %i
PostUp = echo up one
PostUp = echo up two
PostDown = echo down
SaveConfig = true

[Peer]
PublicKey = {PUB1}
PresharedKey = {PSK}
AllowedIPs = 10.0.0.2/32, fd00::2/128
AllowedIPs = 192.168.1.77/24
Endpoint = [2001:db8::1]:51820
PersistentKeepalive = 25

[peer]
PublicKey = {PUB2}
Endpoint = 192.0.2.1:4242
PersistentKeepalive = off
"""


def test_parse_everything() -> None:
    cfg = parse(GOOD, "wg0.conf")
    i = cfg.interface
    assert i.private_key == bytes(range(32)) and i.listen_port == 51820 and i.fwmark == 0x20
    assert [str(a) for a in i.addresses] == ["10.0.0.1/24", "fd00::1/64", "10.9.0.1/32"]
    assert i.dns == ["10.0.0.53", "fd00::53"] and i.dns_search == ["example.com"]
    assert (i.mtu, i.table, i.save_config) == (1380, "1234", True)
    assert i.pre_up == ["echo pre %i"] and i.post_up == ["echo up one", "echo up two"]
    p1, p2 = cfg.peers
    assert p1.preshared_key == bytes([3]) * 32 and p1.persistent_keepalive == 25
    assert [str(n) for n in p1.allowed_ips] == ["10.0.0.2/32", "fd00::2/128", "192.168.1.0/24"]
    assert p1.endpoint == "[2001:db8::1]:51820" and p2.persistent_keepalive is None


def test_render_round_trip() -> None:
    cfg = parse(GOOD)
    assert parse(config.render(cfg)) == cfg


def test_to_uapi_is_what_the_daemon_accepts() -> None:
    body = config.to_uapi(parse(GOOD))
    req = parse_set(body.splitlines())
    assert req.private_key == clamp(bytes(range(32))) and req.replace_peers
    assert req.listen_port == 51820 and req.fwmark == 0x20
    assert "endpoint=[2001:db8::1]:51820" in body and "endpoint=192.0.2.1:4242" in body
    assert body.count("replace_allowed_ips=true") == 2


def test_hostname_endpoints_are_resolved() -> None:
    cfg = parse(f"[Peer]\nPublicKey = {PUB1}\nEndpoint = localhost:7\n")
    assert config.to_uapi(cfg, resolve=lambda e: "127.0.0.1:7").count("endpoint=127.0.0.1:7")
    assert config.resolve_endpoint("localhost:7") in ("127.0.0.1:7", "[::1]:7")


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("[Interface]\nPrivateKey = abc\n", 2, "PrivateKey"),
        ("[Interface]\nListenPort = 65536\n", 2, "ListenPort"),
        ("[Interface]\nListenPort = -1\n", 2, "ListenPort"),
        ("[Interface]\nFwMark = x\n", 2, "FwMark"),
        ("[Interface]\nAddress = 10.0.0.300/24\n", 2, "Address"),
        ("[Interface]\nMTU = 12\n", 2, "MTU"),
        ("[Interface]\nTable = main table\n", 2, "Table"),
        ("[Interface]\nTable = 99999999999\n", 2, "Table"),  # table ids are u32
        ("[Interface]\nTable = 4294967296\n", 2, "Table"),
        ("[Interface]\nTable = \u0661\n", 2, "Table"),
        ("[Interface]\nSaveConfig = maybe\n", 2, "SaveConfig"),
        ("[Interface]\nColour = blue\n", 2, "Colour"),
        ("PrivateKey = x\n", 1, "PrivateKey"),
        ("[Interface]\n[Interface]\n", 2, "[Interface]"),
        ("[Wat]\n", 1, "[Wat]"),
        ("[Peer]\nAllowedIPs = 10.0.0.0/8\n", 1, "[Peer]"),
        (f"[Peer]\nPublicKey = {PUB1}\nEndpoint = nope\n", 3, "Endpoint"),
        (f"[Peer]\nPublicKey = {PUB1}\nEndpoint = 1.2.3.4:0\n", 3, "Endpoint"),
        (f"[Peer]\nPublicKey = {PUB1}\nAllowedIPs = 10.0.0.0/33\n", 3, "AllowedIPs"),
        (f"[Peer]\nPublicKey = {PUB1}\nPersistentKeepalive = 99999\n", 3, "PersistentKeepalive"),
        (f"[Peer]\nPublicKey = {PUB1}\nAddress = 10.0.0.1/24\n", 3, "Address"),
        (f"[Peer]\nPublicKey = {PUB1}\n[Peer]\nPublicKey = {PUB1}\n", 3, "PublicKey"),
    ],
)
def test_errors_name_file_line_and_key(text: str, line: int, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(text, "/etc/wireguard/wg0.conf")
    assert str(e.value).startswith(f"/etc/wireguard/wg0.conf:{line}: {key}: ")


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse(text)


@given(st.lists(st.sampled_from([
    "[Interface]", "[Peer]", f"PrivateKey = {PRIV}", f"PublicKey = {PUB1}",
    f"PublicKey = {PUB2}", "Address = 10.0.0.1/24", "AllowedIPs = 10.0.0.0/8, ::/0",
    "ListenPort = 7", "Endpoint = 1.2.3.4:5", "MTU = 1400", "# c", "", "PostUp = x",
]), max_size=12))  # fmt: skip
def test_config_like_text_round_trips_when_valid(lines: list[str]) -> None:
    try:
        cfg = parse("\n".join(lines))
    except ConfigError:
        return
    assert parse(config.render(cfg)) == cfg


def test_names_paths_and_permissions(tmp_path: Path) -> None:
    conf = tmp_path / "wgt7.conf"
    conf.write_text(f"[Interface]\nPrivateKey = {PRIV}\n")
    ifname, path, cfg = config.load(str(conf))
    assert ifname == "wgt7" and path == str(conf) and cfg.interface.private_key
    for bad in (str(tmp_path / "x.txt"), str(tmp_path / "much-too-long-name.conf")):
        with pytest.raises(ConfigError):
            config.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load("surely-absent")  # means /etc/wireguard/surely-absent.conf
    os.chmod(conf, 0o600)
    assert config.permission_warning(str(conf)) is None
    os.chmod(conf, 0o644)
    os.chmod(tmp_path, 0o755)
    assert config.permission_warning(str(conf)) == f"Warning: `{conf}' is world accessible"


def test_strip_drops_only_wg_quick_keys_of_the_interface() -> None:
    out = config.strip(GOOD)
    assert "Address" not in out and "PostUp" not in out and "SaveConfig" not in out
    assert f"privatekey = {PRIV}" in out and "# a comment" in out and "PersistentKeepalive" in out
    assert parse(out).peers == parse(GOOD).peers


def test_networks_keep_their_host_bits_masked() -> None:
    cfg = parse(f"[Peer]\nPublicKey = {PUB1}\nAllowedIPs = 10.1.2.3/8\n")
    assert cfg.peers[0].allowed_ips == [ipaddress.ip_network("10.0.0.0/8")]


@pytest.mark.parametrize(
    ("value", "stored"),
    [("0", "0"), ("4294967295", "4294967295"), ("007", "7"), ("OFF", "off"), ("Auto", "auto")],
)
def test_table_takes_off_auto_or_a_u32(value: str, stored: str) -> None:
    assert parse(f"[Interface]\nTable = {value}\n").interface.table == stored


def test_an_unresolvable_endpoint_names_file_line_and_host() -> None:
    cfg = parse(f"[Interface]\n[Peer]\nPublicKey = {PUB1}\nEndpoint = nowhere.invalid:51820\n",
                "/etc/wireguard/wg0.conf")  # fmt: skip
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        config.to_uapi(cfg)
    assert time.monotonic() - started < 1  # .invalid never resolves: no query, no retries
    assert str(e.value).startswith("/etc/wireguard/wg0.conf:4: Endpoint: ")
    assert "nowhere.invalid" in str(e.value)


def failing_resolver(monkeypatch: pytest.MonkeyPatch, failures: list[int]) -> list[tuple[str, int]]:
    """getaddrinfo failing with these EAI codes first, then answering 192.0.2.7."""
    calls: list[tuple[str, int]] = []

    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list[object]:
        calls.append((host, port))
        if failures:
            code = failures.pop(0)
            raise socket.gaierror(code, os.strerror(errno.EAGAIN) if code else "x")
        return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.7", port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


def test_temporary_resolution_failures_are_retried_as_wg_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failing_resolver(monkeypatch, [socket.EAI_AGAIN] * 3)
    pauses: list[float] = []
    said: list[str] = []
    got = config.resolve_endpoint("vpn.example:51820", sleep=pauses.append, say=said.append)
    assert got == "192.0.2.7:51820"
    assert pauses == pytest.approx([1.0, 1.2, 1.44])  # 1 s, then 1.2 times longer
    assert len(said) == 3 and "Trying again in 1.00 seconds" in said[0]


def test_retries_follow_wg_endpoint_resolution_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = failing_resolver(monkeypatch, [socket.EAI_AGAIN] * 100)
    pauses: list[float] = []
    monkeypatch.setenv("WG_ENDPOINT_RESOLUTION_RETRIES", "2")
    with pytest.raises(config.ResolveError, match=r"vpn\.example"):
        config.resolve_endpoint("vpn.example:1", sleep=pauses.append, say=lambda _: None)
    assert len(calls) == 3 and len(pauses) == 2
    monkeypatch.delenv("WG_ENDPOINT_RESOLUTION_RETRIES")
    calls.clear()
    pauses.clear()
    with pytest.raises(config.ResolveError):
        config.resolve_endpoint("vpn.example:1", sleep=pauses.append, say=lambda _: None)
    assert len(calls) == 16  # wg's default: 15 retries
    monkeypatch.setenv("WG_ENDPOINT_RESOLUTION_RETRIES", "infinity")
    failing_resolver(monkeypatch, [socket.EAI_AGAIN] * 30)
    pauses.clear()
    config.resolve_endpoint("vpn.example:1", sleep=pauses.append, say=lambda _: None)
    assert len(pauses) == 30 and pauses[-1] == 20.0  # the pause grows up to 20 s
    assert config.resolution_retries({"WG_ENDPOINT_RESOLUTION_RETRIES": "infinity"}) == -1
    assert config.resolution_retries({"WG_ENDPOINT_RESOLUTION_RETRIES": "0"}) == 0
    for bad in ("-1", "x", "1e3", "99999999999"):
        with pytest.raises(config.ResolveError):
            config.resolution_retries({"WG_ENDPOINT_RESOLUTION_RETRIES": bad})


def test_permanent_resolution_failures_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = failing_resolver(monkeypatch, [socket.EAI_NONAME])
    cfg = parse(f"[Peer]\nPublicKey = {PUB1}\nEndpoint = gone.example:7\n", "x.conf")
    with pytest.raises(ConfigError, match=r"^x\.conf:3: Endpoint: .*gone\.example"):
        config.to_uapi(cfg)
    assert len(calls) == 1


def test_a_bad_byte_in_a_comment_is_accepted_elsewhere_named_by_line(tmp_path: Path) -> None:
    conf = tmp_path / "wgt8.conf"
    conf.write_bytes(f"# caf\xe9 \xff\n[Interface]\nPrivateKey = {PRIV} # \xfe\n".encode("latin-1"))
    _, _, cfg = config.load(str(conf))
    assert cfg.interface.private_key == bytes(range(32))
    text = f"[Interface]\n# fine\nPrivateKey = {PRIV}\nListenPort = 5\xff1\n"
    conf.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"wgt8\.conf:4: file: byte 0xff at column 15 "):
        config.load(str(conf))


def test_lines_are_split_at_newlines_only() -> None:
    """A form feed or U+2028 inside a line does not end it (line numbers stay right)."""
    with pytest.raises(ConfigError, match=r":3: ListenPort: "):
        parse("[Interface]\nFwMark = 1\x0c\nListenPort = x\n")


def test_no_key_material_in_repr_str_or_format() -> None:
    """An application's `log.debug("%s", cfg)` must not log the private key or the
    preshared key: not the config model's, nor any other object that holds one."""
    import random

    import wgpy
    from wgpy.core.crypto import PrivateKey
    from wgpy.core.device import Device
    from wgpy.core.peer import Keypair
    from wgpy.daemon.uapi import PeerChange, SetRequest
    from wgpy.tools.uapi_client import DeviceStatus, PeerStatus

    rng = random.Random(22)
    private, psk, send, recv = (rng.randbytes(32) for _ in range(4))
    public = rng.randbytes(32)
    cfg = wgpy.Config.build(encode_key(private), address=["10.0.0.1/24"],
                            peers=[wgpy.PeerConfig.build(public, preshared_key=psk)])  # fmt: skip
    parsed = parse(cfg.text())
    assert parsed.interface.private_key == private and parsed.peers[0].preshared_key == psk
    device = Device(rng.randbytes)
    device.set_private_key(private)
    peer = device.add_peer(public)
    assert peer is not None
    peer.preshared_key = psk
    keypair = Keypair(peer, (send, recv), initiator=True, local_index=1, remote_index=2, now=0)
    holders: list[object] = [
        cfg, cfg.interface, cfg.peers[0], parsed, parsed.interface, parsed.peers[0],
        SetRequest(private_key=private, peers=[PeerChange(public, preshared_key=psk)]),
        DeviceStatus("wg0", private, peers=[PeerStatus(public, psk)]),
        device, peer, keypair, PrivateKey(private),
    ]  # fmt: skip
    secrets = [private, psk, send, recv]
    fragments = [f(k) for k in secrets for f in (
        lambda k: encode_key(k)[:12], lambda k: k.hex()[:16], lambda k: k.hex()[:16].upper(),
        lambda k: repr(k[:8])[2:-1],
    )]  # fmt: skip
    for holder in holders:
        for text in (repr(holder), str(holder), f"{holder}", f"{[holder]}"):  # as %s, %r
            leaked = [f for f in fragments if f in text]
            assert not leaked, (type(holder).__name__, text)
    assert "allowed_ips" in repr(cfg.peers[0])  # the rest is still shown


SECRET = bytes(range(100, 132))
SPELLINGS = (encode_key(SECRET), SECRET.hex(), urlsafe_b64encode(SECRET).decode(),
             SECRET.hex(":"), SECRET.hex(" "))  # fmt: skip


@pytest.mark.parametrize(
    "line",
    [
        f"PrivateKey {encode_key(SECRET)}",  # the "=" that ends the key splits the line
        f"PrivateKey: {SECRET.hex()}",  # no "=" at all
        f"PrivateKey = {encode_key(SECRET)[:-1]}",
        f"ListenPort = {encode_key(SECRET)}",  # pasted into the wrong field
        f"{encode_key(SECRET)}",
        f"[{encode_key(SECRET)}]",
        f"ListenPort = {urlsafe_b64encode(SECRET).decode()}",  # URL-safe base64
        f"ListenPort = {SECRET.hex(':')}",  # hex as some tools print bytes
        f"PrivateKey: {SECRET.hex(' ')}",
    ],
)
def test_errors_never_show_key_material(line: str) -> None:
    """A bad line that holds a key is reported by file and line (and key name where
    there is one), never with the key: the message goes to terminals, logs, bug reports."""
    text = f"[Interface]\nListenPort = 1\n{line}\n"
    with pytest.raises(ConfigError, match=r"^wg0\.conf:3: ") as e:
        parse(text, "wg0.conf")
    pieces = {p[i : i + 8] for p in SPELLINGS for i in range(0, len(p) - 7, 4)}
    assert not [p for p in pieces if p in str(e.value)], str(e.value)


def test_a_line_without_its_equals_sign_is_named_by_its_line() -> None:
    with pytest.raises(ConfigError) as e:
        parse("[Interface]\nListenPort 51820\n", "wg0.conf")
    assert str(e.value) == "wg0.conf:2: expected Key = Value"


def test_files_are_written_whole_and_private(tmp_path: Path) -> None:
    target = tmp_path / "phone.conf"
    target.write_text("old")
    config.write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600

    with pytest.raises(TypeError):
        config.write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"new"  # a failed write leaves the old file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phone.conf"]  # and no temporary
