"""Endpoints written and read one way for everyone (core/endpoint.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgpy.core.endpoint import (
    format_endpoint,
    parse_address_endpoint,
    parse_port,
    split_endpoint,
)

# "²" and "\u0665" (Arabic-Indic five) are digits to str.isdigit(); int("\u0665") is 5.
NOT_ASCII = ["\u00b2", "5\u00b2", "\u0665", "51\u0668\u0662\u0660", "\uff15"]


@pytest.mark.parametrize("port", NOT_ASCII)
def test_ports_are_ascii_digits_only(port: str) -> None:
    assert port.isdigit() or port[-1].isdigit()  # what a bare isdigit() check would take
    with pytest.raises(ValueError):
        parse_port(port)
    with pytest.raises(ValueError):
        split_endpoint(f"192.0.2.1:{port}")
    with pytest.raises(ValueError):
        split_endpoint(f"[fd00::1]:{port}")


@pytest.mark.parametrize("text", ["", "0", "65536", "+5", " 5", "5 ", "1e3", "123456"])
def test_ports_out_of_range_or_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_port(text)


def test_split_and_format() -> None:
    assert split_endpoint("192.0.2.1:51820") == ("192.0.2.1", 51820)
    assert split_endpoint("[fd00::1]:7") == ("fd00::1", 7)
    assert split_endpoint("example.com:65535") == ("example.com", 65535)
    for bad in ["fd00::1:7", "192.0.2.1", "192.0.2.1:0", "[fd00::1]7", ":7", "[]:7"]:
        with pytest.raises(ValueError):
            split_endpoint(bad)
    assert format_endpoint(("fd00::1", 7)) == "[fd00::1]:7"
    assert format_endpoint(("192.0.2.1", 7)) == "192.0.2.1:7"


@given(st.ip_addresses(), st.integers(1, 65535))
def test_format_then_split_is_the_identity(addr: object, port: int) -> None:
    ep = (str(addr), port)
    assert split_endpoint(format_endpoint(ep)) == ep


def test_address_endpoints() -> None:
    assert parse_address_endpoint("[::ffff:192.0.2.1]:7") == ("192.0.2.1", 7)
    assert parse_address_endpoint("[fe80::1%eth0]:7") == ("fe80::1%eth0", 7)
    assert parse_address_endpoint("[2001:0db8::0001]:7") == ("2001:db8::1", 7)
    for bad in ["example.com:7", "192.0.2.1:\u0665", "300.0.0.1:7"]:
        with pytest.raises(ValueError):
            parse_address_endpoint(bad)
