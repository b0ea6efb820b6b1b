"""The registry: validation of every value, the SQLite store, migrations, atomic files."""

from __future__ import annotations

import ipaddress
import os
import sqlite3
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wgpy.server import manage, model
from wgpy.server.model import Invalid
from wgpy.server.store import MIGRATIONS, NotFound, NotInitialized, SqliteRegistry
from wgpy.tools.config import Config

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.fixture
def registry(tmp_path: Path) -> SqliteRegistry:
    reg = SqliteRegistry(tmp_path / "reg")
    manage.init(reg, "vpn.example.com:51820", "10.8.0.0/29,fd42:42::/64", "1.1.1.1", None)
    return reg


# ---- validators ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["phone", "Laptop-2", "a", "x" * 32, "me@home", "tv.living_room"])
def test_good_names(name: str) -> None:
    assert model.check_name(name) == name


@pytest.mark.parametrize("name", ["", "-dash", "x" * 33, "a b", "a/b", "../etc", "é", "a\n"])
def test_bad_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(Invalid, match="1 to 32 letters"):
        model.check_name(name)


@given(st.text(max_size=40))
def test_a_name_is_accepted_only_if_it_is_a_safe_file_name(name: str) -> None:
    try:
        model.check_name(name)
    except Invalid:
        return
    assert name == os.path.basename(name) and name.isascii() and name.isprintable()
    assert " " not in name and not name.startswith(("-", "."))


def test_expiry_dates() -> None:
    assert model.parse_expiry("2027-01-31", NOW) == datetime(2027, 1, 31, 23, 59, 59, tzinfo=UTC)
    assert model.parse_expiry("2026-12-04T14:00:00+01:00", NOW) == NOW + timedelta(hours=1)
    with pytest.raises(Invalid, match="in the past"):
        model.parse_expiry("2026-12-04T13:00:00+01:00", NOW)  # that is NOW, in UTC
    assert model.parse_expiry("2026-12-05T00:00Z", NOW) == datetime(2026, 12, 5, tzinfo=UTC)
    assert model.parse_expiry("", NOW) is None and model.parse_expiry("never", NOW) is None
    with pytest.raises(Invalid, match="in the past"):
        model.parse_expiry("2026-12-04T11:00:00", NOW)
    with pytest.raises(Invalid, match="YYYY-MM-DD"):
        model.parse_expiry("tomorrow", NOW)
    with pytest.raises(Invalid, match="YYYY-MM-DD"):
        model.parse_expiry("2026-13-01", NOW)


@given(st.text(max_size=30))
def test_expiry_parser_returns_a_future_utc_time_or_refuses(text: str) -> None:
    try:
        when = model.parse_expiry(text, NOW)
    except Invalid:
        return
    assert when is None or (when.tzinfo == UTC and when > NOW)


@given(st.datetimes(min_value=datetime(2027, 1, 1), max_value=datetime(9000, 1, 1)))
def test_expiry_round_trips_iso_times(when: datetime) -> None:
    assert model.parse_expiry(when.isoformat(), NOW) == when.replace(tzinfo=UTC)


def test_endpoints() -> None:
    assert model.parse_endpoint("vpn.example.com:51820") == ("vpn.example.com", 51820)
    assert model.parse_endpoint("[2001:db8::1]:443") == ("[2001:db8::1]", 443)
    assert model.parse_endpoint("192.0.2.1:1") == ("192.0.2.1", 1)
    for bad in ("vpn.example.com", "host:0", "host:65536", "[nope]:5", "a b:5", ":5", "h:x"):
        with pytest.raises(Invalid, match="bad endpoint"):
            model.parse_endpoint(bad)


@given(st.text(max_size=30))
def test_endpoint_parser_returns_a_port_in_range_or_refuses(text: str) -> None:
    try:
        host, port = model.parse_endpoint(text)
    except Invalid:
        return
    assert 0 < port < 65536 and host and " " not in host


def test_subnets() -> None:
    v4, v6 = model.parse_subnets(" fd42:42::/64 , 10.8.0.0/24")
    assert (str(v4), str(v6)) == ("10.8.0.0/24", "fd42:42::/64")
    with pytest.raises(Invalid, match="host bits"):
        model.parse_subnets("10.8.0.1/24")
    with pytest.raises(Invalid, match="more than one IPv4"):
        model.parse_subnets("10.8.0.0/24,10.9.0.0/24")
    with pytest.raises(Invalid, match="too small"):
        model.parse_subnets("10.8.0.0/31")


@given(st.lists(st.ip_addresses(), max_size=4))
def test_dns_servers_are_ip_addresses(addresses: list[ipaddress.IPv4Address]) -> None:
    text = ", ".join(map(str, addresses))
    assert model.parse_dns(text) == tuple(str(a) for a in addresses)
    with pytest.raises(Invalid, match=r"bad DNS server 'dns\.example'"):
        model.parse_dns(text + ",dns.example")


def test_addresses_given_by_hand_must_be_free_and_inside_a_pool() -> None:
    pools = model.parse_subnets("10.8.0.0/29,fd42::/64")
    assert str(model.check_address("10.8.0.5", pools, set())) == "10.8.0.5/29"
    for addr, why in (("10.9.0.5", "outside the pools"), ("10.8.0.0", "reserved"),
                      ("10.8.0.1", "reserved"), ("10.8.0.7", "reserved"),
                      ("fd42::1", "reserved"), ("nope", "bad address")):  # fmt: skip
        with pytest.raises(Invalid, match=why):
            model.check_address(addr, pools, set())
    with pytest.raises(Invalid, match="another client's"):
        model.check_address("10.8.0.3", pools, {"10.8.0.3"})


INJECTED = "\nPostUp = touch pwned"  # a line that wg-quick would run on the client


@pytest.mark.parametrize(("parse", "text"), [
    (model.parse_endpoint, f"[fe80::1%x{INJECTED}]:51820"),
    (model.parse_dns, f"fe80::53%x{INJECTED}"),
    (model.parse_allowed_ips, f"fe80::%x{INJECTED}/64"),
    (model.parse_subnets, f"10.8.0.0/24,fd42::%x{INJECTED}/64"),
    (lambda text: model.check_address(text, model.parse_subnets("fe80::/64"), set()),
     f"fe80::5%x{INJECTED}"),
])  # fmt: skip
def test_no_value_smuggles_a_line_into_the_client_config(parse: Any, text: str) -> None:
    # Python's ipaddress keeps an IPv6 %scope verbatim, newlines included
    with pytest.raises(Invalid, match="scope"):
        parse(text)


@given(
    st.tuples(
        st.sampled_from(["fe80::1", "[fe80::1", "fe80::", "10.0.0.1", ""]),
        st.sampled_from(["", "%x", "%eth0", "%x\nPostUp = id", " ", "\n"]),
        st.sampled_from(["", "]:51820", "/64", ",10.0.0.1", ":5"]),
    ).map("".join)
)
def test_what_the_parsers_accept_is_one_printable_word(text: str) -> None:
    for parse in (model.parse_endpoint, model.parse_dns, model.parse_allowed_ips):
        try:
            values = parse(text)
        except Invalid:
            continue
        for value in map(str, values):
            assert value.isprintable() and " " not in value and "%" not in value


# ---- the store -------------------------------------------------------------------------------


def test_the_registry_file_is_private(registry: SqliteRegistry) -> None:
    assert stat.S_IMODE(registry.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(registry.directory.stat().st_mode) == 0o700
    with sqlite3.connect(registry.path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_a_folder_others_can_write_to_is_refused(tmp_path: Path) -> None:
    # there, another user could put a symlink where wgpy.db (or its -wal) goes, or keep
    # the file open to read the keys written into it later
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    target = tmp_path / "elsewhere"
    (shared / "wgpy.db").symlink_to(target)
    with pytest.raises(Invalid, match="writable by others"):
        manage.init(SqliteRegistry(shared), "vpn.example.com:51820", "10.8.0.0/24", "", None)
    assert not target.exists()


def test_an_empty_folder_says_how_to_start(tmp_path: Path) -> None:
    with pytest.raises(NotInitialized, match="wgpy server init"):
        SqliteRegistry(tmp_path).clients()
    assert not (tmp_path / "wgpy.db").exists()


def test_init_once(registry: SqliteRegistry) -> None:
    with pytest.raises(Invalid, match="already set up"):
        manage.init(registry, "x.example:1", "10.0.0.0/24", "", None)


def test_clients_get_the_next_free_addresses_and_a_full_pool_is_an_error(
    registry: SqliteRegistry,
) -> None:
    made = [manage.add_client(registry, f"c{i}", None) for i in range(5)]  # /29: .2 to .6
    assert [str(c.addresses[0]) for c in made] == [f"10.8.0.{i}/29" for i in range(2, 7)]
    assert str(made[0].addresses[1]) == "fd42:42::2/64"
    registry.remove_client("c1")
    assert str(manage.add_client(registry, "again", None).addresses[0]) == "10.8.0.3/29"
    with pytest.raises(Invalid, match=r"pool 10\.8\.0\.0/29 is full"):
        manage.add_client(registry, "one-too-many", None)
    assert len(registry.clients()) == 5  # the failed add left nothing behind


def test_duplicate_names_and_keys_are_refused(registry: SqliteRegistry) -> None:
    manage.add_client(registry, "phone", None)
    with pytest.raises(Invalid, match="'phone' exists already"):
        manage.add_client(registry, "phone", None)
    manage.add_client(registry, "laptop", None)
    with pytest.raises(Invalid, match="'laptop' exists already"):
        registry.update_client("phone", NOW, name="laptop")


def test_update_and_remove(registry: SqliteRegistry) -> None:
    c = manage.add_client(registry, "phone", None)
    later = NOW + timedelta(days=1)
    d = registry.update_client(c.id, later, name="tablet", enabled=False, expires=later)
    assert (d.name, d.enabled, d.expires, d.updated, d.created) == (
        "tablet",
        False,
        later,
        later,
        c.created,
    )
    assert d.public_key == c.public_key and d.addresses == c.addresses
    assert registry.update_client("tablet", later, expires=None).expires is None
    registry.remove_client("tablet")
    with pytest.raises(NotFound):
        registry.client("tablet")
    with pytest.raises(NotFound, match="no client 'ghost'"):
        registry.remove_client("ghost")


def test_a_damaged_row_is_named_and_can_be_removed(registry: SqliteRegistry) -> None:
    manage.add_client(registry, "phone", None)
    with sqlite3.connect(registry.path) as db:
        db.execute("UPDATE clients SET allowed_ips = 'nonsense' WHERE name = 'phone'")
    with pytest.raises(Invalid, match=r"'phone' \(row 1\) is damaged.*client remove phone"):
        registry.clients()
    registry.remove_client("phone")
    assert registry.clients() == []
    with pytest.raises(NotFound):
        registry.remove_client("phone")


def test_every_change_moves_the_revision(registry: SqliteRegistry) -> None:
    r0 = registry.revision()
    manage.add_client(registry, "phone", None)
    r1 = registry.revision()
    registry.update_client("phone", NOW, enabled=False)
    assert r0 < r1 < registry.revision()
    with pytest.raises(Invalid):
        manage.add_client(registry, "phone", None)  # refused: no change, same revision
    assert registry.revision() == r1 + 1


def test_one_time_links_work_once_and_not_after_expiry(registry: SqliteRegistry) -> None:
    c = manage.add_client(registry, "phone", None)
    registry.add_link(c.id, b"t1", NOW + timedelta(hours=1))
    assert registry.take_link(b"t1", NOW) == c
    assert registry.take_link(b"t1", NOW) is None
    registry.add_link(c.id, b"t2", NOW + timedelta(hours=1))
    assert registry.take_link(b"t2", NOW + timedelta(hours=2)) is None
    registry.add_link(c.id, b"t3", NOW + timedelta(hours=1))
    registry.remove_client(c.id)
    assert registry.take_link(b"t3", NOW) is None  # the link went with its client


def test_a_new_link_replaces_the_clients_older_ones(registry: SqliteRegistry) -> None:
    # as wg-easy's one link per client: a link sent and forgotten stops working
    c = manage.add_client(registry, "phone", None)
    other = manage.add_client(registry, "laptop", None)
    registry.add_link(c.id, b"old", NOW + timedelta(hours=1))
    registry.add_link(other.id, b"other", NOW + timedelta(hours=1))
    registry.add_link(c.id, b"new", NOW + timedelta(hours=1))
    assert registry.take_link(b"old", NOW) is None
    assert registry.take_link(b"new", NOW) == c
    assert registry.take_link(b"other", NOW) == other


def test_a_version_1_registry_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "wgpy.db"
    with sqlite3.connect(path) as db:
        db.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
        db.execute("INSERT INTO settings (id, private_key, public_key, endpoint, listen_port,"
                   " pools, dns, interface) VALUES (1, x'00', x'01', 'h:1', 1,"
                   " '10.8.0.0/24', '', 'wg0')")  # fmt: skip
    db.close()
    reg = SqliteRegistry(tmp_path)
    assert reg.settings().endpoint == "h:1"
    reg.add_link(manage.add_client(reg, "phone", None).id, b"t", NOW + timedelta(days=1e5))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()


def test_a_newer_schema_is_refused(registry: SqliteRegistry) -> None:
    with sqlite3.connect(registry.path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this wgpy"):
        registry.clients()


def test_the_client_config_is_a_valid_wg_quick_file(registry: SqliteRegistry) -> None:
    c = manage.add_client(registry, "phone", None)
    s = registry.settings()
    cfg = Config.from_text(manage.client_config(s, c))
    assert cfg.interface.private_key == c.private_key
    assert [str(a) for a in cfg.interface.addresses] == ["10.8.0.2/29", "fd42:42::2/64"]
    assert cfg.interface.dns == ["1.1.1.1"]
    (peer,) = cfg.peers
    assert (peer.public_key, peer.preshared_key) == (s.public_key, c.preshared_key)
    assert peer.endpoint == "vpn.example.com:51820" and peer.persistent_keepalive == 25
    assert [str(n) for n in peer.allowed_ips] == ["0.0.0.0/0", "::/0"]


@given(st.sets(st.integers(2, 14), max_size=12), st.integers(0, 4))
def test_allocation_never_hands_out_a_taken_or_reserved_address(taken: set[int], n: int) -> None:
    pool = ipaddress.ip_network("10.8.0.0/28")
    used = {str(pool[i]) for i in taken}
    for _ in range(n):
        try:
            addr = model.next_address(pool, used)
        except Invalid:
            assert len(used) == 13  # .2 to .14: every client address is in use
            return
        assert addr.ip in pool and addr.network == pool
        assert addr.ip not in (pool[0], pool[1], pool[-1]) and str(addr.ip) not in used
        used.add(str(addr.ip))


def test_concurrent_adds_get_distinct_addresses(registry: SqliteRegistry) -> None:
    import threading

    errors: list[BaseException] = []

    def add(name: str) -> None:
        try:
            manage.add_client(registry, name, None)
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(f"c{i}",)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    addresses = [str(c.addresses[0].ip) for c in registry.clients()]
    assert sorted(addresses) == [f"10.8.0.{i}" for i in range(2, 7)]
