"""The web API over real HTTP on the loopback (uvicorn), without an interface: login, its
rate limit, cookies, CSRF, every client operation, errors, downloads and one-time links."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import uvicorn

from tests.server.webclient import PASSWORD, Browser
from wgpy.core.crypto import encode_key
from wgpy.server import auth, manage, web
from wgpy.server.store import SqliteRegistry


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[SqliteRegistry, str]]:
    registry = SqliteRegistry(tmp_path)
    manage.init(registry, "vpn.example.com:51820", "10.8.0.0/24", "", None,
                interface=f"wgt{id(tmp_path) % 10**8}")  # fmt: skip
    registry.set_password_hash(auth.hash_password(PASSWORD))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(web.create_app(registry), log_level="warning",
                                           lifespan="off"))  # fmt: skip
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),))
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            threading.Event().wait(0.02)
        yield registry, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_login_cookie_and_logout(site: tuple[SqliteRegistry, str]) -> None:
    _, base = site
    b = Browser(base)
    assert b.call("GET", "/api/clients")[0] == 401
    assert b.login("wrong password") == 401
    status, headers, _ = b.call("POST", "/api/session", {"password": PASSWORD})
    cookie = headers["set-cookie"].lower()
    assert status == 200 and "httponly" in cookie and "samesite=strict" in cookie
    assert b.login() == 200
    assert b.json("GET", "/api/clients") == []
    assert b.json("GET", "/api/session")["csrf"] == b.csrf
    assert b.call("DELETE", "/api/session", csrf=False)[0] == 403  # a change: needs the token
    b.json("DELETE", "/api/session", expect=204)
    assert b.call("GET", "/api/clients")[0] == 401


def test_failed_logins_are_rate_limited(site: tuple[SqliteRegistry, str]) -> None:
    _, base = site
    b = Browser(base)
    for _ in range(auth.FAILURES):
        assert b.login("guess") == 401
    status, headers, _ = b.call("POST", "/api/session", {"password": PASSWORD})
    assert status == 429 and 0 < int(headers["retry-after"]) <= 61  # even the right one


def test_changes_need_the_csrf_token(site: tuple[SqliteRegistry, str]) -> None:
    registry, base = site
    b = Browser(base)
    b.login()
    assert b.call("POST", "/api/clients", {"name": "phone"}, csrf=False)[0] == 403
    b.csrf = "forged"
    assert b.call("POST", "/api/clients", {"name": "phone"})[0] == 403
    assert registry.clients() == []


def test_clients_through_the_api(site: tuple[SqliteRegistry, str]) -> None:
    registry, base = site
    b = Browser(base)
    b.login()
    made = b.json("POST", "/api/clients", {"name": "phone", "expires": "2999-01-01"}, 201)
    client = registry.client("phone")
    assert made["public_key"] == encode_key(client.public_key)
    assert made["addresses"] == ["10.8.0.2/24"] and made["online"] is False
    assert made["expires"].startswith("2999-01-01T23:59:59")
    _, _, listing = b.call("GET", "/api/clients")
    for secret in (client.private_key, client.preshared_key):  # never in the list
        assert encode_key(secret).encode() not in listing and secret.hex().encode() not in listing

    cid = made["id"]
    changed = b.json("PATCH", f"/api/clients/{cid}", {"name": "tablet", "enabled": False})
    assert (changed["name"], changed["enabled"]) == ("tablet", False)
    assert b.json("PATCH", f"/api/clients/{cid}", {"expires": ""})["expires"] is None
    assert registry.client(cid).name == "tablet"

    for body, words in (({"name": "bad name"}, "1 to 32 letters"),
                        ({"name": "tablet"}, "exists already"),
                        ({"name": "x", "expires": "2001-01-01"}, "in the past"),
                        ({"name": "y", "expires": "soon"}, "YYYY-MM-DD")):  # fmt: skip
        status, _, data = b.call("POST", "/api/clients", body)
        assert status == 422 and words in json.loads(data)["detail"], data
    assert b.call("PATCH", "/api/clients/999", {"enabled": True})[0] == 404

    b.json("DELETE", f"/api/clients/{cid}", expect=204)
    assert b.call("GET", f"/api/clients/{cid}")[0] == 404
    assert registry.clients() == []


def test_config_qr_and_one_time_link(site: tuple[SqliteRegistry, str]) -> None:
    registry, base = site
    b = Browser(base)
    b.login()
    cid = b.json("POST", "/api/clients", {"name": "laptop"}, 201)["id"]
    expected = manage.client_config(registry.settings(), registry.client(cid))
    status, headers, data = b.call("GET", f"/api/clients/{cid}/configuration")
    assert status == 200 and data.decode() == expected
    assert headers["content-disposition"] == 'attachment; filename="laptop.conf"'
    status, headers, data = b.call("GET", f"/api/clients/{cid}/qrcode.svg")
    assert status == 200 and headers["content-type"].startswith("image/svg+xml")
    assert data.startswith(b"<svg") and b'xmlns="http://www.w3.org/2000/svg"' in data

    link = b.json("POST", f"/api/clients/{cid}/link", expect=201)
    stranger = Browser(base)  # no session: the link is the credential
    status, _, data = stranger.call("GET", link["url"])
    assert status == 200 and data.decode() == expected
    assert stranger.call("GET", link["url"])[0] == 404  # once only
    assert stranger.call("GET", f"/api/clients/{cid}/configuration")[0] == 401


def test_the_page_and_its_headers(site: tuple[SqliteRegistry, str]) -> None:
    _, base = site
    status, headers, data = Browser(base).call("GET", "/")
    assert status == 200 and b"wgpy server" in data and b"/static/app.js" in data
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    spec = Browser(base).json("GET", "/api/openapi.json")
    assert {"/api/session", "/api/clients", "/api/clients/{client_id}/link"} <= set(spec["paths"])
    assert Browser(base).call("GET", "/static/uPlot.iife.min.js")[0] == 200
