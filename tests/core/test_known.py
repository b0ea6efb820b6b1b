"""The peers' endpoints the shedding rule spares (core/intake.py `known`): read again once
a second, on the datapath's thread, so an endpoint is parsed once, not once a second: at
10,000 peers the parse (ipaddress) took ~280 ms a second here, a stall of the datapath
every second whether or not anything was shed."""

from __future__ import annotations

import random

import pytest

from wgpy.core import intake
from wgpy.core.crypto import clamp
from wgpy.core.device import Device
from wgpy.core.endpoint import Endpoint


def test_an_endpoint_is_parsed_when_it_is_new_only(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[Endpoint] = []
    real = intake._known_key

    def counted(endpoint: Endpoint) -> tuple[bytes, int] | None:
        parsed.append(endpoint)
        return real(endpoint)

    monkeypatch.setattr(intake, "_known_key", counted)
    rng = random.Random(3)
    device = Device(rng.randbytes)
    peers = []
    for i in range(50):
        peer = device.add_peer(clamp(rng.randbytes(32)))
        assert peer is not None
        peer.endpoint = (f"192.0.2.{i}", 51820) if i % 2 else (f"2001:db8::{i:x}%eth0", 7)
        peers.append(peer)
    known = device.intake.known(1000.0)
    assert len(parsed) == 50 and len(known) == 50
    assert device.intake.known(1001.5) == known and len(parsed) == 50  # nothing new
    peers[0].endpoint = ("::ffff:198.51.100.7", 9)  # roams
    known = device.intake.known(1003.0)
    assert parsed[50:] == [("::ffff:198.51.100.7", 9)]
    assert (bytes([198, 51, 100, 7]), 9) in known and len(known) == 50
    assert (intake._known_key(("2001:db8::0%eth0", 7))) not in known
