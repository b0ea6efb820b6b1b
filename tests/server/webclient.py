"""A small HTTP client for the server's API, as the page's fetch() calls it."""

from __future__ import annotations

import http.cookiejar
import json
import urllib.error
import urllib.request
from typing import Any

PASSWORD = "correct horse battery"


class Browser:
    """urllib with a cookie jar: what a page's fetch() does."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.csrf = ""
        self.headers: dict[str, str] = {}  # sent with every request

    def call(self, method: str, path: str, body: Any = None,
             csrf: bool = True) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers=self.headers)  # fmt: skip
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if csrf and self.csrf:
            req.add_header("X-CSRF-Token", self.csrf)
        try:
            with self.opener.open(req, timeout=10) as res:
                return res.status, dict(res.headers), res.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def json(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        status, _, data = self.call(method, path, body)
        assert status == expect, (status, data)
        return json.loads(data) if data else None

    def login(self, password: str = PASSWORD) -> int:
        status, _, data = self.call("POST", "/api/session", {"password": password})
        if status == 200:
            self.csrf = json.loads(data)["csrf"]
        return status
