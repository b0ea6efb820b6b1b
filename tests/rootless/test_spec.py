"""What `wgpy proxy` serves: its command line and wireproxy's config file; the parsers of
what clients send (SOCKS5 UDP headers, HTTP heads) on any input."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgpy.core.crypto import encode_key
from wgpy.rootless import http, proxy, spec, udp
from wgpy.rootless.launch import Proxy
from wgpy.tools.config import Config, ConfigError

KEY = encode_key(bytes(range(32)))
WG = f"""[Interface]
PrivateKey = {KEY}
Address = 10.0.0.2/32 # a comment, as wireproxy's sample has

[peer]
PublicKey = {KEY}
Endpoint = 192.0.2.1:51820
"""


def parsed(text: str, tmp_path: Path) -> spec.ProxySpec:
    path = tmp_path / "w.conf"
    path.write_text(text)
    return spec.load(str(path))


def test_a_wireproxy_file_gives_the_tunnel_and_its_listeners(tmp_path: Path) -> None:
    p = parsed(WG + """
[TCPClientTunnel]
BindAddress = 127.0.0.1:25565
Target = play.example:25565

[TCPServerTunnel]
listenport = 3422
Target = localhost:25545

[tcpservertunnel]
ListenPort = 3423
Target = [::1]:80

[Socks5]
BindAddress = 127.0.0.1:25344
Username = alice
Password = pw

[http]
BindAddress = [::1]:25345

[UDPProxyTunnel]
BindAddress = 127.0.0.1:5353
Target = 1.1.1.1:53
InactivityTimeout = 0 # never

[STDIOTunnel]
Target = ssh.example:22

[SNI]
BindAddress = 127.0.0.1:8443
""", tmp_path)  # fmt: skip
    assert [(x.kind, x.host, x.port, x.target) for x in p.listens] == [
        ("forward", "127.0.0.1", 25565, ("play.example", 25565)),
        ("expose", "::", 3422, ("localhost", 25545)),
        ("expose", "::", 3423, ("::1", 80)),
        ("socks", "127.0.0.1", 25344, None),
        ("http", "::1", 25345, None),
        ("udp", "127.0.0.1", 5353, ("1.1.1.1", 53)),
        ("stdio", "", 0, ("ssh.example", 22)),
        ("sni", "127.0.0.1", 8443, None),
    ]
    assert p.listens[5].timeout == math.inf
    assert p.listens[3].credentials == spec.Credentials("alice", "pw")
    assert p.listens[4].credentials is None
    peer = p.config.peers[0]  # no AllowedIPs: everything, as wireproxy routes it
    assert peer.allowed_ips == [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    assert p.config.interface.mtu == 1420  # wireproxy's default


def test_checkalive_is_read_from_the_interface(tmp_path: Path) -> None:
    text = WG.replace("[peer]", "CheckAlive = 10.0.0.1, fd00::1\nCheckAliveInterval = 3\n[peer]")
    p = parsed(text + "[Socks5]\nBindAddress = 127.0.0.1:1\n", tmp_path)
    assert (p.check_alive, p.check_interval) == (["10.0.0.1", "fd00::1"], 3.0)
    with pytest.raises(ConfigError, match=r":5: CheckAlive: .*does not appear to be an IP"):
        parsed(WG.replace("[peer]", "CheckAlive = nohost\n[peer]") + "[http]\n", tmp_path)


def test_wgconfig_takes_the_tunnel_from_another_file(tmp_path: Path) -> None:
    (tmp_path / "wg.conf").write_text(WG + "AllowedIPs = 10.0.0.0/24\n")
    p = parsed(f"WGConfig = {tmp_path / 'wg.conf'}\n\n[Socks5]\nBindAddress = 127.0.0.1:1080\n",
               tmp_path)  # fmt: skip
    assert p.config.peers[0].allowed_ips == [ipaddress.ip_network("10.0.0.0/24")]
    assert p.listens[0].kind == "socks"


@pytest.mark.parametrize(
    ("tail", "where"),
    [
        ("[STDIOTunnel]\nTarget = nohost\n", ":10: target: 'nohost' is not"),
        ("[Socks5]\nBindAddress = 127.0.0.1:1080\nColour = red\n",
         ":11: Colour: unknown key in [Socks5]"),
        ("[Socks5]\nUsername = a\n", ":9: bindaddress: missing"),
        ("[TCPClientTunnel]\nBindAddress = 127.0.0.1:1\nTarget = nohost\n",
         ":11: target: 'nohost' is not"),
        ("[TCPServerTunnel]\nListenPort = 70000\nTarget = a:1\n",
         ":10: listenport: '70000' is not a port"),
        ("[Nonsense]\n", ":9: [Nonsense]: unknown section"),
        ("[http]\nBindAddress = 127.0.0.1:1\nCertFile = c.pem\n", ":9: keyfile: missing"),
        ("[http]\nBindAddress = 127.0.0.1:1\nKeyFile = k.pem\n", ":9: certfile: missing"),
        ("[http]\nBindAddress = 127.0.0.1:1\nCertFile = /nonexistent/c\nKeyFile = k\n",
         ":11: certfile: cannot load the certificate '/nonexistent/c'"),
        ("[Socks5]\nBindAddress = 127.0.0.1:1\nCertFile = c.pem\n",
         ":11: CertFile: unknown key in [Socks5]"),
        ("[SNI]\nBindAddress = 127.0.0.1:443\nTarget = a:1\n", ":11: Target: unknown key in [SNI]"),
        ("[SNI]\n", ":9: bindaddress: missing"),
        ("[Resolve]\nResolveStrategy = ipv5\n", ":10: ResolveStrategy: 'ipv5' is not one of"),
        ("[Resolve]\nTunnelDomains = a\n", ":10: TunnelDomains: not supported by wgpy"),
    ],
)  # fmt: skip
def test_what_we_lack_or_cannot_read_is_named_by_line(
    tmp_path: Path, tail: str, where: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parsed(WG + "\n" + tail, tmp_path)
    assert where in str(e.value)


def self_signed(tmp_path: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A certificate for `name` and its key, made by openssl."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def test_certfile_and_keyfile_serve_the_http_proxy_over_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    p = parsed(WG + f"\n[http]\nBindAddress = 127.0.0.1:1\nCertFile = {cert}\nKeyFile = {key}\n",
               tmp_path)  # fmt: skip
    assert isinstance(p.listens[0].tls, ssl.SSLContext)
    assert p.listens[0].describe() == "http over TLS 127.0.0.1:1"
    (tmp_path / "other").mkdir()
    other, _ = self_signed(tmp_path / "other")  # a key that is not this certificate's
    with pytest.raises(ConfigError, match=r":11: certfile: cannot load .*KEY_VALUES_MISMATCH"):
        parsed(WG + f"\n[http]\nBindAddress = 127.0.0.1:1\nCertFile = {other}\n"
               f"KeyFile = {key}\n", tmp_path)  # fmt: skip


def test_a_wg_quick_file_serves_nothing_by_itself(tmp_path: Path) -> None:
    assert parsed(WG, tmp_path).listens == []
    assert not spec.is_wireproxy(WG)


def test_command_line_mappings_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert spec.mapping("forward", "127.0.0.1:5353=10.0.0.1:53").target == ("10.0.0.1", 53)
    exposed = spec.mapping("expose", "8080=localhost:80")
    assert (exposed.port, exposed.target) == (8080, ("localhost", 80))
    for bad in ("8080", "x=localhost:80", "8080=localhost", "0=a:1"):
        with pytest.raises(ValueError):
            spec.mapping("expose", bad)
    with pytest.raises(SystemExit) as done:
        proxy.parser().parse_args(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--forward" in out and "--expose" in out
    assert "--listen-fd" not in out and "--ready-fd" not in out  # wgpy.Proxy's, hidden


@given(st.text(alphabet=st.sampled_from("[]=#:. \nabcSocks5httpTCPClientTunnelInterfacePeer0123"),
               max_size=300))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_any_text_is_read_or_refused_with_a_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        spec.parse_wireproxy(text, "f")


@given(st.binary(max_size=80))
def test_any_datagram_header_parses_or_is_dropped(data: bytes) -> None:
    parsed = udp.parse_header(data)
    if parsed is not None:
        host, port, _, payload = parsed
        assert 0 <= port < 65536 and len(payload) <= len(data)


@given(st.ip_addresses(), st.integers(0, 65535), st.binary(max_size=20))
def test_a_header_we_write_reads_back(addr: object, port: int, payload: bytes) -> None:
    assert udp.parse_header(udp.header(str(addr), port) + payload)[::3] == (str(addr), payload)


@given(st.binary(max_size=200))
def test_any_http_head_parses_or_is_a_bad_request(head: bytes) -> None:
    with contextlib.suppress(http.BadRequest):
        http.parse_head(head)


@pytest.mark.parametrize(
    "value, kind, fd, host, target",
    [("socks:5", "socks", 5, "", None), ("info:7@vm", "info", 7, "vm", None),
     ("socks:6@::1", "socks", 6, "::1", None),
     ("forward:8=10.0.0.1:80", "forward", 8, "", ("10.0.0.1", 80)),
     ("udp:9@127.0.0.1=[fd00::1]:53", "udp", 9, "127.0.0.1", ("fd00::1", 53))],
)  # fmt: skip
def test_sockets_handed_over_by_the_library(
    value: str, kind: str, fd: int, host: str, target: tuple[str, int] | None
) -> None:
    got = proxy.handed_over(value)
    assert (got.kind, got.fd, got.host, got.target) == (kind, fd, host, target)


@pytest.mark.parametrize(
    "value",
    ["expose:3=a:1", "forward:3", "socks:3=a:1", "socks:x", "udp", "info:@vm", "forward:8@h",
     # a descriptor: ASCII digits below 2**31 (socket.socket(fileno=) raises past them)
     "socks:99999999999999999999999", "socks:2147483648", "socks:\u00b2", "socks:\u0663",
     # a host: a name or a bare address, as wgpy.Proxy passes it (describe brackets it)
     "info:7@vm@x", "info:7@[::1]", "socks:6@[::1", "forward:8@h]=10.0.0.1:80"],
)  # fmt: skip
def test_bad_handed_over_sockets_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="--listen-fd"):
        proxy.handed_over(value)


def test_a_bad_handed_over_socket_is_one_line() -> None:
    """On the command line: a one-line error and status 2, no traceback (a process of
    its own: `wgpy proxy` sets the logging up)."""
    for value in ("socks:99999999999999999999999", "socks:2147483648", "socks:\u00b2"):
        argv = [sys.executable, "-m", "wgpy", "proxy", "-c", "/dev/null", "--listen-fd", value]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "--listen-fd" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "kwargs",
    [{"forward": ["127.0.0.1:0"]}, {"udp_forward": ["127.0.0.1:0=nowhere"]},
     {"expose": ["0=127.0.0.1:80"]}, {"check_alive": ["not an address"]}],
)  # fmt: skip
def test_the_library_proxy_checks_its_arguments_before_starting(
    kwargs: dict[str, list[str]],
) -> None:
    config = Config.build(encode_key(bytes(range(32))), address=["10.0.0.2/24"])
    with pytest.raises(ValueError):
        Proxy(config, socks=None, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("line", [f"PrivateKey {KEY[:-1]}", f"PrivateKey: {bytes(range(32)).hex()}",
                                  f"PrivateKey {KEY}", f"ListenPort = {KEY}"])  # fmt: skip
def test_a_bad_line_holding_a_key_is_not_quoted(tmp_path: Path, line: str) -> None:
    """As in wg-quick files (tools/config.py): the error names the file and line only."""
    text = WG.replace(f"PrivateKey = {KEY}", line) + "[Socks5]\nBindAddress = 127.0.0.1:1\n"
    with pytest.raises(ConfigError, match=r"w\.conf:2: ") as e:
        parsed(text, tmp_path)
    secret = {KEY, bytes(range(32)).hex()}
    pieces = {p[i : i + 8] for p in secret for i in range(0, len(p) - 8, 4)}
    assert not [p for p in pieces if p in str(e.value)], str(e.value)


def test_sni_on_the_command_line_and_from_a_handed_socket(tmp_path: Path) -> None:
    path = tmp_path / "wg.conf"
    path.write_text(WG)
    ns = proxy.parser().parse_args(["-c", str(path), "--sni", "127.0.0.1:8443"])
    listens = proxy.plan(ns).spec.listens
    assert [(x.kind, x.host, x.port) for x in listens] == [("sni", "127.0.0.1", 8443)]
    assert proxy.handed_over("sni:7").fd == 7
    with pytest.raises(ValueError):
        proxy.handed_over("sni:7=a.example:443")  # no target: the hello names it


def test_resolve_strategy_names_the_family_tried_first(tmp_path: Path) -> None:
    def family(text: str) -> int | None:
        return proxy.preferred_family(parsed(text + "[http]\nBindAddress = 127.0.0.1:1\n",
                                             tmp_path))  # fmt: skip

    v6 = WG.replace("10.0.0.2/32", "10.0.0.2/32, fd00::2/128")
    assert family(WG) is None  # no [Resolve]: getaddrinfo's order
    assert family(WG + "[Resolve]\nResolveStrategy = IPv6\n") == socket.AF_INET6
    assert family(v6 + "[Resolve]\nResolveStrategy = ipv4\n") == socket.AF_INET
    assert family(WG + "[Resolve]\n") == socket.AF_INET  # auto, IPv4 addresses only
    assert family(v6 + "[Resolve]\nResolveStrategy = auto\n") == socket.AF_INET6
