"""The web page and its JSON API (FastAPI; the OpenAPI document at /api/openapi.json).

Every /api route but login needs the session cookie (HttpOnly, SameSite=Strict), and
every change also needs the session's CSRF token in the `X-CSRF-Token` header, which the
page reads from the login answer or GET /api/session. Private keys leave the server only
inside a client's own config (download, QR code, one-time link). The page itself is one
template and a script; the Content-Security-Policy lets it load nothing from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import secrets
import socket
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from wgpy._version import __version__
from wgpy.core.crypto import encode_key
from wgpy.daemon.hosts import REFUSED_BODY, REFUSED_STATUS, AllowedHosts
from wgpy.server import manage
from wgpy.server.auth import LoginLimit, Session, Sessions, verify_password
from wgpy.server.model import ONLINE, Client, Invalid, parse_expiry
from wgpy.server.store import UNSET, NotFound, Registry, Unset
from wgpy.tools import uapi_client

HERE = Path(__file__).parent
COOKIE = "wgpy_session"
LINK_LIFETIME = timedelta(hours=1)
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


MAX_BODY = 64 * 1024  # every body here is a small JSON object


class BodyLimit:
    """Refuses a request body over MAX_BODY, or one without a length (chunked), before
    anything reads it: the login is open to anyone, and FastAPI reads a whole body into
    memory before it checks a field's length. (uvicorn delivers no more than the
    Content-Length it was given.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(dict(scope["headers"])) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    @staticmethod
    def refusal(headers: dict[bytes, bytes]) -> Response | None:
        if b"transfer-encoding" in headers:
            return PlainTextResponse("a body needs a Content-Length", 411)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            return PlainTextResponse("request body too large", 413)
        return None


class HostCheck:
    """Answers 421 to a request whose Host header is not one of ours (daemon/hosts.py:
    against DNS rebinding), before anything else sees it: not the page, not the login,
    where a foreign site's script would try passwords and use up the owner's limit."""

    def __init__(self, app: ASGIApp, names: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = AllowedHosts(names).allows

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.allowed(dict(scope["headers"]).get(b"host")):
            await PlainTextResponse(REFUSED_BODY, REFUSED_STATUS)(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class Login(BaseModel):
    password: str = Field(max_length=1024)


class SessionOut(BaseModel):
    csrf: str


class ClientIn(BaseModel):
    name: str = Field(max_length=64)
    expires: str | None = Field(None, description="YYYY-MM-DD or ISO 8601; null: never")


class ClientChange(BaseModel):
    name: str | None = Field(None, max_length=64)
    enabled: bool | None = None
    expires: str | None = Field(None, description="YYYY-MM-DD, ISO 8601, or '' to clear")


class ClientOut(BaseModel):
    id: int
    name: str
    public_key: str
    addresses: list[str]
    allowed_ips: list[str]
    enabled: bool
    expires: datetime | None
    expired: bool
    created: datetime
    updated: datetime
    online: bool
    endpoint: str | None
    last_handshake: float | None = Field(description="Unix time; null: never")
    rx_bytes: int
    tx_bytes: int


class LinkOut(BaseModel):
    url: str
    expires: datetime


def client_out(client: Client, peer: uapi_client.PeerStatus | None, now: float) -> ClientOut:
    when = manage.now()
    handshake = peer.last_handshake if peer and peer.last_handshake else None
    return ClientOut(
        id=client.id, name=client.name, public_key=encode_key(client.public_key),
        addresses=[str(a) for a in client.addresses],
        allowed_ips=[str(n) for n in client.allowed_ips], enabled=client.enabled,
        expires=client.expires, expired=client.expired(when), created=client.created,
        updated=client.updated, online=bool(handshake and now - handshake < ONLINE),
        endpoint=peer.endpoint if peer else None, last_handshake=handshake,
        rx_bytes=peer.rx_bytes if peer else 0, tx_bytes=peer.tx_bytes if peer else 0,
    )  # fmt: skip


def live_peers(ifname: str) -> dict[bytes, uapi_client.PeerStatus]:
    """The device's peers by public key; none when the server is not running."""
    try:
        return {p.public_key: p for p in uapi_client.get(ifname).peers}
    except (uapi_client.UapiClientError, OSError):
        return {}


def _session(request: Request) -> Session:
    token = request.cookies.get(COOKIE)
    found: Session | None = request.app.state.sessions.get(token)
    if found is None:
        raise HTTPException(401, "log in first")
    current = request.app.state.registry.password_hash() or ""
    if not hmac.compare_digest(found.password.encode(), current.encode()):
        request.app.state.sessions.drop(token)  # the password changed since this login
        raise HTTPException(401, "log in first")
    return found


def _change(s: Annotated[Session, Depends(_session)],
            x_csrf_token: Annotated[str, Header()] = "") -> Session:  # fmt: skip
    if not hmac.compare_digest(x_csrf_token.encode(), s.csrf.encode()):
        raise HTTPException(403, "missing or wrong CSRF token")
    return s


ClientId = Annotated[int, PathParam(ge=1, le=(1 << 63) - 1)]  # SQLite's INTEGER range
Reader = Annotated[Session, Depends(_session)]  # logged in
Changer = Annotated[Session, Depends(_change)]  # logged in, and the CSRF token sent


def _middleware(app: FastAPI, allowed_hosts: Iterable[str]) -> None:
    """Each added one runs outside those before it: the security headers go on every
    answer, also the refusals of the Host check and the body limit."""
    app.add_middleware(BodyLimit)
    app.add_middleware(HostCheck, names=allowed_hosts)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
        return response


def create_app(registry: Registry, allowed_hosts: Iterable[str] = ()) -> FastAPI:
    app = FastAPI(title="wgpy server", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")  # fmt: skip
    app.state.sessions = sessions = Sessions()
    app.state.registry = registry
    limit = LoginLimit()
    templates = Jinja2Templates(directory=HERE / "templates")
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _middleware(app, allowed_hosts)

    @app.exception_handler(Invalid)
    async def invalid(request: Request, exc: Invalid) -> JSONResponse:
        status = 404 if isinstance(exc, NotFound) else 422
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(request: Request) -> Response:
        settings = registry.settings()
        return templates.TemplateResponse(request, "index.html", {
            "version": __version__, "endpoint": settings.endpoint,
            "interface": settings.interface})  # fmt: skip

    @app.post("/api/session", tags=["session"])
    def login(body: Login, request: Request, response: Response) -> SessionOut:
        address = request.client.host if request.client else "?"
        wait = limit.attempt(address)  # counted as a failure until the password checks
        if wait:
            raise HTTPException(429, "too many failed logins: wait a minute",
                                headers={"Retry-After": str(int(wait) + 1)})  # fmt: skip
        stored = registry.password_hash()
        if not verify_password(body.password, stored):
            raise HTTPException(401, "wrong password")
        limit.succeeded(address)
        token, s = sessions.create(stored or "")
        # Secure also behind an HTTPS proxy (a forged header only makes it stricter)
        https = "https" in (request.url.scheme, request.headers.get("x-forwarded-proto"))
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=https,
                            path="/")  # fmt: skip
        return SessionOut(csrf=s.csrf)

    @app.get("/api/session", tags=["session"])
    def whoami(s: Reader) -> SessionOut:
        return SessionOut(csrf=s.csrf)

    @app.delete("/api/session", tags=["session"], status_code=204)
    def logout(request: Request, response: Response, s: Changer) -> None:
        sessions.drop(request.cookies.get(COOKIE))
        response.delete_cookie(COOKIE, path="/")

    _client_routes(app, registry)
    _file_routes(app, registry, templates)

    return app


def _client_routes(app: FastAPI, registry: Registry) -> None:
    def listing() -> Iterator[ClientOut]:
        settings = registry.settings()
        peers = live_peers(settings.interface)
        now = manage.now().timestamp()
        for c in registry.clients():
            yield client_out(c, peers.get(c.public_key), now)

    def one(client_id: int) -> ClientOut:
        c = registry.client(client_id)
        peer = live_peers(registry.settings().interface).get(c.public_key)
        return client_out(c, peer, manage.now().timestamp())

    @app.get("/api/clients", tags=["clients"])
    def clients(s: Reader) -> list[ClientOut]:
        return list(listing())

    @app.post("/api/clients", tags=["clients"], status_code=201)
    def add(body: ClientIn, s: Changer) -> ClientOut:
        expires = parse_expiry(body.expires or "", manage.now())
        return one(manage.add_client(registry, body.name, expires).id)

    @app.get("/api/clients/{client_id}", tags=["clients"])
    def get(client_id: ClientId, s: Reader) -> ClientOut:
        return one(client_id)

    @app.patch("/api/clients/{client_id}", tags=["clients"])
    def update(client_id: ClientId, body: ClientChange, s: Changer) -> ClientOut:
        expires: datetime | Unset | None = UNSET
        if body.expires is not None:
            expires = parse_expiry(body.expires, manage.now())
        registry.update_client(client_id, manage.now(), name=body.name, enabled=body.enabled,
                               expires=expires)  # fmt: skip
        return one(client_id)

    @app.delete("/api/clients/{client_id}", tags=["clients"], status_code=204)
    def remove(client_id: ClientId, s: Changer) -> None:
        registry.remove_client(client_id)


def _file_routes(app: FastAPI, registry: Registry, templates: Jinja2Templates) -> None:
    """What carries a private key: the config, its QR code, and one-time links to it."""

    @app.get("/api/clients/{client_id}/configuration", tags=["clients"],
             response_class=PlainTextResponse)  # fmt: skip
    def configuration(client_id: ClientId, s: Reader) -> Response:
        return _config_file(registry, registry.client(client_id))

    @app.get("/api/clients/{client_id}/qrcode.svg", tags=["clients"])
    def qrcode(client_id: ClientId, s: Reader) -> Response:
        text = manage.client_config(registry.settings(), registry.client(client_id))
        out = io.BytesIO()  # a standalone file (xmlns): an <img> shows nothing without it
        manage.qr(text).save(out, kind="svg", scale=4, border=2, xmldecl=False)
        return Response(out.getvalue(), media_type="image/svg+xml")

    @app.post("/api/clients/{client_id}/link", tags=["clients"], status_code=201)
    def link(client_id: ClientId, s: Changer) -> LinkOut:
        _active(registry.client(client_id))
        token = secrets.token_urlsafe(32)
        expires = manage.now() + LINK_LIFETIME
        registry.add_link(client_id, hashlib.sha256(token.encode()).digest(), expires)
        return LinkOut(url=f"/download/{token}", expires=expires)

    @app.api_route("/download/{token}", methods=["GET", "HEAD"], response_class=HTMLResponse,
                   include_in_schema=False)  # fmt: skip
    def download_page(request: Request) -> Response:
        """A one-time link opened: a page whose button POSTs for the file. Opening it
        spends nothing, so a chat app's preview (a GET or a HEAD) leaves it working."""
        return templates.TemplateResponse(request, "download.html", {})

    @app.post("/download/{token}", tags=["clients"], response_class=PlainTextResponse)
    def download(token: str) -> Response:
        """A one-time link's file: no login needed, and it works once, within the hour.
        (A GET of the link is the page with the button that sends this POST.)"""
        client = registry.take_link(hashlib.sha256(token.encode()).digest(), manage.now())
        if client is None:
            raise HTTPException(404, "this link was used already or has expired")
        if not client.active(manage.now()):  # disabling a client withdraws its links
            raise HTTPException(404, "this link's client is disabled or expired")
        return _config_file(registry, client)


def _active(client: Client) -> None:
    """A one-time link goes to someone else: only for a client that works now."""
    if not client.enabled:
        raise Invalid(f"{client.name} is disabled: enable it first")
    if client.expired(manage.now()):
        raise Invalid(f"{client.name} has expired: set a new expiry first")


def _config_file(registry: Registry, client: Client) -> Response:
    text = manage.client_config(registry.settings(), client)
    return PlainTextResponse(text, headers={
        "Content-Disposition": f'attachment; filename="{client.name}.conf"'})  # fmt: skip


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `wgpy server run` owns SIGTERM/SIGINT and
    shuts down the web page and the interface together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def server_config(registry: Registry, allowed_hosts: Iterable[str] = ()) -> uvicorn.Config:
    # proxy_headers off: uvicorn would otherwise take X-Forwarded-For from any local
    # process as the client's address, and the login limit would count nothing
    app = create_app(registry, allowed_hosts)
    return uvicorn.Config(app, log_level="warning", access_log=False,
                          lifespan="off", proxy_headers=False)  # fmt: skip


async def serve(registry: Registry, sock: socket.socket, stop: asyncio.Event,
                allowed_hosts: Iterable[str] = ()) -> None:  # fmt: skip
    """The page on a listening socket, until `stop` is set."""
    server = _Server(server_config(registry, allowed_hosts))

    async def stopper() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.ensure_future(stopper())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
