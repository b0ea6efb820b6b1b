"""The Host check that the web page and the proxy's health endpoint share (DNS rebinding)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgpy.daemon.hosts import AllowedHosts, host_name


@given(st.binary(max_size=60))
def test_the_host_check_takes_any_header(header: bytes) -> None:
    """Any bytes as the Host: no exception, and allowed only for localhost, a name given,
    or an address literal (the port, if any, cut off)."""
    if AllowedHosts(["vpn.example.com"]).allows(header):
        name = host_name(header.decode("latin-1"))
        assert name in ("localhost", "vpn.example.com") or ipaddress.ip_address(name.strip("[]"))


@pytest.mark.parametrize("listen", ["::1", "::", "[::1]", "0.0.0.0", ""])
def test_an_address_to_listen_on_lets_no_empty_host_through(listen: str) -> None:
    """The name a listener was started with is allowed; an IPv6 address there reads as
    no name at all, which must not allow a request with an empty Host or none."""
    hosts = AllowedHosts([listen])
    assert not hosts.allows(b"") and not hosts.allows(None)
    assert hosts.allows(b"[::1]:9080") and hosts.allows(b"127.0.0.1")


def test_names_given_are_allowed_with_or_without_a_port() -> None:
    hosts = AllowedHosts(["Metrics.LAN"])
    assert hosts.allows(b"metrics.lan:9080") and hosts.allows(b"METRICS.lan.")
    assert not hosts.allows(b"metrics.lan.evil.example") and not hosts.allows(b"evil.example")
