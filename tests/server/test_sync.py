"""`sync.diff`: only what changed goes to the device; peers left alone are not named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from wgpy.server import manage, sync
from wgpy.server.store import SqliteRegistry
from wgpy.tools.uapi_client import DeviceStatus, PeerStatus

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def device_for(reg: SqliteRegistry) -> DeviceStatus:
    """The device as it would be after applying the registry in full."""
    s = reg.settings()
    dev = DeviceStatus(s.interface, s.private_key, s.listen_port)
    for c in reg.clients():
        if c.active(NOW):
            ips = [f"{a.ip}/{a.max_prefixlen}" for a in c.addresses]
            dev.peers.append(PeerStatus(c.public_key, c.preshared_key, allowed_ips=ips))
    return dev


def test_an_equal_device_gets_nothing_and_changes_name_only_their_peer(tmp_path: Path) -> None:
    reg = SqliteRegistry(tmp_path)
    s = manage.init(reg, "h.example:51820", "10.8.0.0/24,fd42::/64", "", 51999)
    a, b = (manage.add_client(reg, n, None) for n in ("a", "b"))
    dev = device_for(reg)
    assert sync.diff(s, reg.clients(), dev, NOW) == ""

    c = manage.add_client(reg, "c", None)
    body = sync.diff(s, reg.clients(), dev, NOW)
    assert body == (
        f"public_key={c.public_key.hex()}\npreshared_key={c.preshared_key.hex()}\n"
        "replace_allowed_ips=true\nallowed_ip=10.8.0.4/32\nallowed_ip=fd42::4/128\n"
    )

    reg.update_client("a", NOW, enabled=False)
    body = sync.diff(s, reg.clients(), device_for(reg), NOW)
    assert body == ""
    assert sync.diff(s, reg.clients(), dev, NOW).startswith(
        f"public_key={a.public_key.hex()}\nremove=true\n"
    )
    assert b.public_key.hex() not in sync.diff(s, reg.clients(), dev, NOW)


def test_expiry_removes_and_a_changed_peer_is_updated_in_place(tmp_path: Path) -> None:
    reg = SqliteRegistry(tmp_path)
    s = manage.init(reg, "h.example:51820", "10.8.0.0/24", "", None)
    a = manage.add_client(reg, "a", None)
    dev = device_for(reg)
    reg.update_client("a", NOW, expires=NOW + timedelta(minutes=1))
    assert sync.diff(s, reg.clients(), dev, NOW) == ""
    later = NOW + timedelta(minutes=1)
    removal = f"public_key={a.public_key.hex()}\nremove=true\n"
    assert sync.diff(s, reg.clients(), dev, later) == removal

    dev.peers[0].allowed_ips = ["10.8.0.99/32"]  # someone ran `wg set`
    assert sync.diff(s, reg.clients(), dev, NOW) == (
        f"public_key={a.public_key.hex()}\nupdate_only=true\n"
        f"preshared_key={a.preshared_key.hex()}\nreplace_allowed_ips=true\nallowed_ip=10.8.0.2/32\n"
    )
    dev.private_key, dev.listen_port = None, 0
    assert sync.diff(s, reg.clients(), device_for(reg), NOW) == ""
    assert sync.diff(s, [], DeviceStatus("x"), NOW) == (
        f"private_key={s.private_key.hex()}\nlisten_port=51820\n"
    )
