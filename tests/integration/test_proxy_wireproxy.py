"""What `wgpy proxy` reads from wireproxy's file beyond the basics, as nobody against a
wireguard-go peer: the HTTP proxy over TLS (`CertFile`/`KeyFile`), the SNI proxy
(`[SNI]`), and `[Resolve]`'s ResolveStrategy."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.rootless_bed import (
    CALLER_INNER,
    CALLER_INNER6,
    NAME,
    PAGE,
    PEER_INNER,
    PEER_INNER6,
    PEER_OUTER,
    SRC,
    Bed,
    free_port,
    in_namespace,
)
from tests.integration.test_proxy import proxy_process
from tests.rootless.test_spec import self_signed

AUTH = b"Proxy-Authorization: Basic " + base64.b64encode(b"alice:s3cret") + b"\r\n"


@pytest.fixture(scope="module")
def bed(workdir: Path) -> Iterator[Bed]:
    b = Bed("t", "wireguard-go", workdir)
    try:
        yield b
    finally:
        b.close()


def wireproxy_file(bed: Bed, workdir: Path, sections: str, dns: str = PEER_INNER) -> Path:
    conf = workdir / "wireproxy.conf"
    conf.write_text(
        f"[Interface]\nAddress = {CALLER_INNER}/32, {CALLER_INNER6}/128\n"
        f"PrivateKey = {bed.private}\nDNS = {dns}\n\n[Peer]\nPublicKey = {bed.peer_public}\n"
        f"Endpoint = {PEER_OUTER}:51820\n\n{sections}"
    )
    conf.chmod(0o644)
    return conf


def read_all(s: socket.socket) -> bytes:
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    return answer


def tls_client(ns: str, port: int, cafile: Path, name: str) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(cafile))
    with in_namespace(ns):
        s = socket.create_connection(("127.0.0.1", port), timeout=15)
    return context.wrap_socket(s, server_hostname=name)


def test_the_http_proxy_serves_over_tls_with_certfile_and_keyfile(
    bed: Bed, upy: Path, workdir: Path
) -> None:
    ns = bed.caller.name
    port = free_port(ns)
    (workdir / "https").mkdir(exist_ok=True)
    cert, key = self_signed(workdir / "https")
    key.chmod(0o644)  # the proxy runs as nobody
    conf = wireproxy_file(bed, workdir, f"[http]\nBindAddress = 127.0.0.1:{port}\n"
                          f"Username = alice\nPassword = s3cret\nCertFile = {cert}\n"
                          f"KeyFile = {key}\n")  # fmt: skip
    with proxy_process(bed, upy, workdir, config=conf) as p:
        assert any("HTTPS proxy on 127.0.0.1" in line for line in p.lines), p.lines
        with tls_client(ns, port, cert, "localhost") as s:  # the certificate checks out
            s.sendall(f"CONNECT {NAME}:8000 HTTP/1.1\r\n".encode() + AUTH + b"\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_all(s).endswith(PAGE.encode())
        with tls_client(ns, port, cert, "localhost") as s:  # credentials still wanted
            s.sendall(f"GET http://{NAME}:8000/ HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            assert read_all(s).startswith(b"HTTP/1.1 407")
        with in_namespace(ns):  # plain HTTP to a TLS port: no answer, the connection ends
            plain = socket.create_connection(("127.0.0.1", port), timeout=15)
        with plain:
            plain.sendall(f"GET http://{NAME}:8000/ HTTP/1.0\r\n".encode() + AUTH + b"\r\n")
            assert b"HTTP/1.1" not in read_all(plain)
        with in_namespace(ns):  # silent: closed after TLS_HANDSHAKE_TIMEOUT
            silent = socket.create_connection(("127.0.0.1", port), timeout=30)
        with silent:
            start = time.monotonic()
            assert read_all(silent) == b""
            assert 9 < time.monotonic() - start < 20
        curl = subprocess.run(
            bed.caller.argv(["curl", "-sS", "--max-time", "20", "--proxy",
                             f"https://127.0.0.1:{port}", "--proxy-cacert", str(cert),
                             "--proxy-user", "alice:s3cret", f"http://{NAME}:8000/"]),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert curl.stdout == PAGE, curl.stderr
        assert p.proc.poll() is None
    assert not any("Traceback" in line for line in p.lines), p.lines


TLS_SERVER = r"""
import socket, ssl, sys, threading
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[2], sys.argv[3])
listener = socket.create_server((sys.argv[1], 443))
def serve(c):
    with context.wrap_socket(c, server_side=True) as t:
        t.recv(1000)
        t.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + sys.argv[4].encode())
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""


@pytest.fixture(scope="module")
def tls_server(bed: Bed, workdir: Path) -> Iterator[Path]:
    """An HTTPS server for NAME on port 443 of the peer's tunnel address; its certificate."""
    (workdir / "sni").mkdir(exist_ok=True)
    cert, key = self_signed(workdir / "sni", NAME)
    proc = bed.peer.popen(sys.executable, "-c", TLS_SERVER, PEER_INNER, str(cert), str(key),
                          PAGE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while f"{PEER_INNER}:443" not in bed.peer.run("ss", "-ltn", check=False):
            assert time.monotonic() < deadline, "the TLS server did not start"
            time.sleep(0.05)
        yield cert
    finally:
        proc.kill()
        proc.wait(5)


def test_the_sni_proxy_routes_tls_by_its_server_name_without_ending_it(
    bed: Bed, upy: Path, workdir: Path, tls_server: Path
) -> None:
    ns = bed.caller.name
    port = free_port(ns)
    conf = wireproxy_file(bed, workdir, f"[SNI]\nBindAddress = 127.0.0.1:{port}\n")
    with proxy_process(bed, upy, workdir, config=conf) as p:
        assert any(f"SNI proxy on 127.0.0.1:{port}" in line for line in p.lines), p.lines
        with tls_client(ns, port, tls_server, NAME) as s:  # the peer's certificate, end to end
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_all(s).endswith(PAGE.encode())
        with in_namespace(ns):
            plain = socket.create_connection(("127.0.0.1", port), timeout=15)
        with plain:  # not TLS: closed at its first byte
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_all(plain) == b""
        with pytest.raises((ssl.SSLError, ConnectionError)):  # a name the tunnel lacks
            tls_client(ns, port, tls_server, "nowhere.test").close()
        with in_namespace(ns):
            silent = socket.create_connection(("127.0.0.1", port), timeout=15)
        with silent:  # half a record, then nothing: closed after HELLO_TIMEOUT
            silent.sendall(b"\x16\x03\x01\x02")
            start = time.monotonic()
            assert read_all(silent) == b""
            assert 4 < time.monotonic() - start < 10
        with tls_client(ns, port, tls_server, NAME) as s:  # and it serves on
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_all(s).endswith(PAGE.encode())
        assert p.proc.poll() is None
    assert not any("Traceback" in line for line in p.lines), p.lines


def test_library_proxy_serves_sni_at_a_port_it_picked(
    bed: Bed, workdir: Path, tls_server: Path
) -> None:
    program = f"""
import socket, ssl, wgpy
context = ssl.create_default_context(cafile={str(tls_server)!r})
with wgpy.Proxy({str(bed.config)!r}, socks=None, sni="127.0.0.1:0") as proxy:
    s = socket.create_connection(proxy.sni_address, timeout=15)
    with context.wrap_socket(s, server_hostname={NAME!r}) as t:
        t.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        answer = b""
        while chunk := t.recv(4096):
            answer += chunk
    print(answer.decode().splitlines()[-1])
"""
    done = subprocess.run(
        bed.caller.argv([sys.executable, "-c", program]), capture_output=True, text=True,
        timeout=60, cwd=workdir, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(SRC)},
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == PAGE.strip()


DUAL_DNS = r"""
import socket, struct, sys
answers = {1: socket.inet_aton(sys.argv[2]), 28: socket.inet_pton(socket.AF_INET6, sys.argv[3])}
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
while True:
    q, src = s.recvfrom(512)
    i = 12
    while q[i]:
        i += q[i] + 1
    qtype = struct.unpack(">H", q[i + 1 : i + 3])[0]
    data = answers.get(qtype, b"")
    ans = b"\xc0\x0c" + struct.pack(">HHIH", qtype, 1, 60, len(data)) + data if data else b""
    head = struct.pack(">HHHHHH", q[0] << 8 | q[1], 0x8180, 1, 1 if ans else 0, 0, 0)
    s.sendto(head + q[12 : i + 5] + ans, src)
"""
WHO = r"""
import socket, sys, threading
def serve(listener):
    while True:
        c = listener.accept()[0]
        with c:
            c.sendall(c.getsockname()[0].encode())
def answer(u):
    while True:
        u.sendto(u.getsockname()[0].encode(), u.recvfrom(100)[1])
for host, port in ((sys.argv[1], 7002), (sys.argv[2], 7002), (sys.argv[1], 7003)):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family)
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.bind((host, port))
    threading.Thread(target=answer, args=(u,), daemon=True).start()
threading.Event().wait()
"""


@pytest.fixture(scope="module")
def dual(bed: Bed) -> Iterator[None]:
    """A name server on the peer's IPv6 address answering any name with both its
    addresses, and a server on port 7002 of both (7003 of the IPv4 one), TCP and UDP, that
    says which one it was reached at."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        bed.peer.popen(sys.executable, "-c", DUAL_DNS, PEER_INNER6, PEER_INNER, PEER_INNER6,
                       **quiet),
        bed.peer.popen(sys.executable, "-c", WHO, PEER_INNER, PEER_INNER6, **quiet),
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while f"[{PEER_INNER6}]:53" not in bed.peer.run("ss", "-lun", check=False) or \
                f"{PEER_INNER}:7003" not in bed.peer.run("ss", "-ltn", check=False):  # fmt: skip
            assert time.monotonic() < deadline, "the name server did not start"
            time.sleep(0.05)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize(
    ("strategy", "port", "reached"),
    [("ipv6", 7002, PEER_INNER6), ("ipv4", 7002, PEER_INNER), ("auto", 7002, PEER_INNER6),
     ("ipv6", 7003, PEER_INNER)],  # nothing on the IPv6 address: the IPv4 one next
)  # fmt: skip
def test_resolve_strategy_picks_the_family_tried_first(
    bed: Bed, upy: Path, workdir: Path, dual: None, strategy: str, port: int, reached: str
) -> None:
    ns = bed.caller.name
    here, udp = free_port(ns), free_port(ns)
    sections = (f"[TCPClientTunnel]\nBindAddress = 127.0.0.1:{here}\nTarget = dual.test:{port}\n"
                f"\n[UDPProxyTunnel]\nBindAddress = 127.0.0.1:{udp}\nTarget = dual.test:7002\n"
                f"\n[Resolve]\nResolveStrategy = {strategy}\n")  # fmt: skip
    conf = wireproxy_file(bed, workdir, sections, dns=PEER_INNER6)
    with proxy_process(bed, upy, workdir, config=conf, services=2):
        with in_namespace(ns):
            s = socket.create_connection(("127.0.0.1", here), timeout=15)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            assert read_all(s).decode() == reached
        with u:  # UDP takes the first address: the preferred family's
            u.settimeout(10)
            u.sendto(b"who", ("127.0.0.1", udp))
            assert u.recv(100).decode() == (PEER_INNER if strategy == "ipv4" else PEER_INNER6)
