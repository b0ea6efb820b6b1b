"""The page's locks: password hashes, the login limit, sessions."""

from __future__ import annotations

import time

import pytest

from wgpy.server import auth


def test_password_hashes_are_salted_scrypt_and_checked() -> None:
    a, b = auth.hash_password("a long password"), auth.hash_password("a long password")
    assert a != b and a.startswith(f"scrypt${auth.SCRYPT_N}${auth.SCRYPT_R}$")
    assert auth.verify_password("a long password", a)
    assert not auth.verify_password("a long passwore", a)
    assert not auth.verify_password("a long password", None)
    assert not auth.verify_password("a long password", "scrypt$1$2$3")  # damaged
    assert not auth.verify_password("a long password", a.replace("scrypt", "plain"))
    huge = "$".join(["scrypt", str(1 << 30), "8", "1", *a.split("$")[4:]])
    assert not auth.verify_password("a long password", huge)  # refused, not computed
    with pytest.raises(ValueError, match="at least 8"):
        auth.hash_password("short")


def test_the_login_limit_counts_failures_per_address_within_the_window() -> None:
    limit = auth.LoginLimit(failures=3, window=0.3)
    for _ in range(3):
        assert limit.retry_after("192.0.2.1") == 0
        limit.failed("192.0.2.1")
    assert 0 < limit.retry_after("192.0.2.1") <= 0.3
    assert limit.retry_after("192.0.2.2") == 0  # another address is not held up
    time.sleep(0.31)
    assert limit.retry_after("192.0.2.1") == 0  # the window passed
    limit.failed("192.0.2.1")
    limit.succeeded("192.0.2.1")
    assert limit.retry_after("192.0.2.1") == 0


def test_sessions_expire_when_idle_and_on_logout() -> None:
    sessions = auth.Sessions(idle=0.2)
    token, session = sessions.create()
    assert sessions.get(token) is session and session.csrf != token
    assert sessions.get("forged") is None and sessions.get(None) is None
    time.sleep(0.1)
    assert sessions.get(token) is session  # use keeps it alive
    time.sleep(0.21)
    assert sessions.get(token) is None
    token, _ = sessions.create()
    sessions.drop(token)
    assert sessions.get(token) is None


def test_an_ipv6_guesser_is_limited_per_64_not_per_address() -> None:
    limit = auth.LoginLimit(failures=3, window=60)
    for i in range(3):  # a host has a whole /64 to pick its source from
        assert limit.attempt(f"2001:db8:1:2::{i + 1}") == 0
    assert limit.attempt("2001:db8:1:2:ffff::9") > 0
    assert limit.attempt("2001:db8:1:3::1") == 0  # the next /64 is another network
    assert limit.attempt("192.0.2.1") == 0
