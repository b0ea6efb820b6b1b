"""wg-quick config files: parsing, errors with file/line/key, UAPI output, render, strip."""

from __future__ import annotations

import contextlib
import ipaddress
import os
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
        ("[Interface]\nSaveConfig = maybe\n", 2, "SaveConfig"),
        ("[Interface]\nColour = blue\n", 2, "Colour"),
        ("[Interface]\nno equals\n", 2, "no equals"),
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
