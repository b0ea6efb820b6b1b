"""The web API over real HTTP on the loopback (uvicorn), without an interface: login, its
rate limit, cookies, CSRF, every client operation, errors, downloads and one-time links."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
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


@contextlib.contextmanager
def serving(registry: SqliteRegistry, allowed_hosts: tuple[str, ...] = ()) -> Iterator[str]:
    """The page on a loopback port, as `server run --web` serves it; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(web.server_config(registry, allowed_hosts))
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),))
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            threading.Event().wait(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def registry(tmp_path: Path) -> SqliteRegistry:
    registry = SqliteRegistry(tmp_path)
    manage.init(registry, "vpn.example.com:51820", "10.8.0.0/24", "", None,
                interface=f"wgt{id(tmp_path) % 10**8}")  # fmt: skip
    registry.set_password_hash(auth.hash_password(PASSWORD))
    return registry


@pytest.fixture
def site(registry: SqliteRegistry) -> Iterator[tuple[SqliteRegistry, str]]:
    with serving(registry) as base:
        yield registry, base


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


def test_big_or_unsized_bodies_are_refused_before_they_are_read(
    site: tuple[SqliteRegistry, str],
) -> None:
    # anyone may post to the login: a gigabyte there must not become a gigabyte of memory
    _, base = site
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    try:  # a gigabyte announced, none of it sent: refused on the length alone (sending a
        # real body here races the server's early close: the client may get EPIPE first)
        conn.putrequest("POST", "/api/session")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(1 << 30))
        conn.endheaders()
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=10)
    try:  # chunked: no length to check first
        conn.request("POST", "/api/session", body=iter([b'{"password": "', b'x"}']),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)  # fmt: skip
        assert conn.getresponse().status == 411
    finally:
        conn.close()
    assert Browser(base).login() == 200


def test_a_new_password_ends_every_session(site: tuple[SqliteRegistry, str]) -> None:
    # `wgpy client passwd` is what one runs after a leak: whoever was in must be out
    registry, base = site
    b = Browser(base)
    b.login()
    registry.set_password_hash(auth.hash_password("a new password"))
    assert b.call("GET", "/api/clients")[0] == 401
    assert b.login() == 401 and b.login("a new password") == 200
    assert b.call("GET", "/api/clients")[0] == 200


def test_failed_logins_are_rate_limited(site: tuple[SqliteRegistry, str]) -> None:
    _, base = site
    b = Browser(base)
    for _ in range(auth.FAILURES):
        assert b.login("guess") == 401
    status, headers, _ = b.call("POST", "/api/session", {"password": PASSWORD})
    assert status == 429 and 0 < int(headers["retry-after"]) <= 61  # even the right one


def test_concurrent_guesses_do_not_slip_past_the_login_limit(
    site: tuple[SqliteRegistry, str],
) -> None:
    # every guess that starts before the first failure is counted must count too
    _, base = site
    answers: list[int] = []
    threads = [threading.Thread(target=lambda: answers.append(Browser(base).login("guess")))
               for _ in range(3 * auth.FAILURES)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(answers) == [401] * auth.FAILURES + [429] * (2 * auth.FAILURES)


def test_a_forwarded_for_header_does_not_reset_the_login_limit(
    site: tuple[SqliteRegistry, str],
) -> None:
    # uvicorn believes X-Forwarded-For from 127.0.0.1 by default, and any local user (or
    # a page's fetch()) can send one: each guess would come "from" a new address
    _, base = site
    b = Browser(base)  # behind an HTTPS proxy the cookie is still Secure
    b.headers["X-Forwarded-Proto"] = "https"
    status, headers, _ = b.call("POST", "/api/session", {"password": PASSWORD})
    assert status == 200 and "secure" in headers["set-cookie"].lower()
    for i in range(auth.FAILURES + 1):
        b.headers["X-Forwarded-For"] = f"192.0.2.{i}"
        status = b.login("guess")
    assert status == 429


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
    assert b.call("GET", f"/api/clients/{1 << 64}")[0] == 422  # not SQLite's OverflowError

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
    status, _, data = stranger.call("POST", link["url"])  # the button on the link's page
    assert status == 200 and data.decode() == expected
    assert stranger.call("POST", link["url"])[0] == 404  # once only
    assert stranger.call("GET", f"/api/clients/{cid}/configuration")[0] == 401


def test_a_disabled_clients_link_gives_nothing(site: tuple[SqliteRegistry, str]) -> None:
    # disabling a client is how its owner's access is withdrawn: a link made before must
    # not hand its keys out after; the admin's own download still works (as `client show`)
    registry, base = site
    b = Browser(base)
    b.login()
    cid = b.json("POST", "/api/clients", {"name": "lost-phone"}, 201)["id"]
    link = b.json("POST", f"/api/clients/{cid}/link", expect=201)
    b.json("PATCH", f"/api/clients/{cid}", {"enabled": False})
    status, _, data = Browser(base).call("POST", link["url"])
    assert status == 404 and b"PrivateKey" not in data
    status, _, data = b.call("POST", f"/api/clients/{cid}/link")
    assert status == 422 and b"disabled" in data
    assert b.call("GET", f"/api/clients/{cid}/configuration")[0] == 200


def test_the_page_and_its_headers(site: tuple[SqliteRegistry, str]) -> None:
    _, base = site
    status, headers, data = Browser(base).call("GET", "/")
    assert status == 200 and b"wgpy server" in data and b"/static/app.js" in data
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    spec = Browser(base).json("GET", "/api/openapi.json")
    assert {"/api/session", "/api/clients", "/api/clients/{client_id}/link"} <= set(spec["paths"])
    assert Browser(base).call("GET", "/static/uPlot.iife.min.js")[0] == 200


def with_host(base: str, host: str) -> Browser:
    b = Browser(base)
    b.headers["Host"] = host
    return b


@pytest.mark.parametrize("host", ["evil.example", "evil.example:51821", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "", "[::1"])  # fmt: skip
def test_a_foreign_host_header_is_refused(site: tuple[SqliteRegistry, str], host: str) -> None:
    """DNS rebinding: a site whose name now resolves to 127.0.0.1 makes the visitor's
    browser send requests here with its own name as the Host. They get 421: not the page,
    not the login (where they would try passwords and use up the owner's limit)."""
    _, base = site
    b = with_host(base, host)
    status, headers, _ = b.call("GET", "/")
    assert status == 421 and headers["x-frame-options"] == "DENY"
    assert b.login() == 421
    assert b.call("GET", "/download/x")[0] == 421


ALWAYS = ["127.0.0.1", "127.0.0.1:51821", "localhost:51821", "LOCALHOST.", "[::1]:51821",
          "192.0.2.7", "[2001:db8::7]"]  # fmt: skip


@pytest.mark.parametrize("host", ALWAYS)
def test_addresses_and_localhost_are_always_allowed(
    site: tuple[SqliteRegistry, str], host: str
) -> None:
    """An address cannot be rebound, so any address literal is fine (a server on
    0.0.0.0 is reached by its LAN address); of the names, localhost."""
    _, base = site
    assert with_host(base, host).login() == 200


def test_allowed_host_names_are_configurable(registry: SqliteRegistry) -> None:
    with serving(registry, ("vpn.example.com",)) as base:
        assert with_host(base, "VPN.example.com:443").login() == 200
        assert with_host(base, "vpn.example.com.evil").login() == 421
    with serving(registry, ("::1",)) as base:  # `--web [::1]:PORT`'s name: none, not ""
        assert with_host(base, "").login() == 421
    with serving(registry, ("*",)) as base:  # behind a proxy that checks names itself
        assert with_host(base, "anything.example").login() == 200


def test_opening_a_one_time_link_does_not_spend_it(site: tuple[SqliteRegistry, str]) -> None:
    """Chat apps fetch a link to preview it (GET, HEAD): that must neither spend it nor
    show the keys. The GET is a page with a button; its POST hands out the file, once."""
    registry, base = site
    b = Browser(base)
    b.login()
    cid = b.json("POST", "/api/clients", {"name": "phone"}, 201)["id"]
    expected = manage.client_config(registry.settings(), registry.client(cid))
    url = b.json("POST", f"/api/clients/{cid}/link", expect=201)["url"]
    previewer = Browser(base)
    for method in ("GET", "HEAD", "GET"):
        status, headers, data = previewer.call(method, url)
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b"PrivateKey" not in data and "content-disposition" not in headers
    status, _, page = previewer.call("GET", url)
    assert b'<form method="post"' in page and b"<button" in page
    status, headers, data = Browser(base).call("POST", url)
    assert status == 200 and data.decode() == expected
    assert headers["content-disposition"] == 'attachment; filename="phone.conf"'
    assert Browser(base).call("POST", url)[0] == 404  # once only
