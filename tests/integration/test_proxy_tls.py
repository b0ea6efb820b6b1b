"""`wgpy proxy`'s TLS services, as nobody against a wireguard-go peer: the HTTP proxy
over TLS (wireproxy's `CertFile`/`KeyFile`) and the SNI proxy (wireproxy's `[SNI]`)."""

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
    NAME,
    PAGE,
    PEER_INNER,
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


def wireproxy_file(bed: Bed, workdir: Path, sections: str) -> Path:
    conf = workdir / "tls.conf"
    conf.write_text(
        f"[Interface]\nAddress = {CALLER_INNER}/32\nPrivateKey = {bed.private}\n"
        f"DNS = {PEER_INNER}\n\n[Peer]\nPublicKey = {bed.peer_public}\n"
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
