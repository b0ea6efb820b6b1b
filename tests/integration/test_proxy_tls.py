"""`wgpy proxy`'s TLS services, as nobody against a wireguard-go peer: the HTTP proxy
over TLS (wireproxy's `CertFile`/`KeyFile`) and the SNI proxy (wireproxy's `[SNI]`)."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.rootless_bed import (
    CALLER_INNER,
    NAME,
    PAGE,
    PEER_INNER,
    PEER_OUTER,
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
