"""The registry: the server's settings and its clients, behind one small interface.

`Registry` is the interface (a second store, e.g. PostgreSQL for several gateways sharing
one registry, implements the same methods); `SqliteRegistry` is the default: one file,
mode 0600 in a 0700 folder, every change one transaction (SQLite's journal makes a crash
or a full disk leave the old state, never half a change). The schema carries its version
in `PRAGMA user_version`, and `MIGRATIONS[n]` brings version n to n + 1 when a file is
opened. `revision()` counts changes, so that a server polling the registry notices a
change made by another process (the command line, the web page) with one small read.
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from wgpy.server.model import (
    Client,
    Invalid,
    IPInterface,
    IPNetwork,
    Settings,
    check_address,
    check_name,
    next_address,
)

DB_NAME = "wgpy.db"
MIGRATIONS = [
    # 0 -> 1: settings and clients
    """
    CREATE TABLE settings (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        private_key BLOB NOT NULL, public_key BLOB NOT NULL, endpoint TEXT NOT NULL,
        listen_port INTEGER NOT NULL, pools TEXT NOT NULL, dns TEXT NOT NULL,
        interface TEXT NOT NULL, password TEXT, revision INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE clients (
        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
        private_key BLOB NOT NULL, public_key BLOB NOT NULL UNIQUE,
        preshared_key BLOB NOT NULL, addresses TEXT NOT NULL, allowed_ips TEXT NOT NULL,
        enabled INTEGER NOT NULL, expires TEXT, created TEXT NOT NULL, updated TEXT NOT NULL);
    """,
    # 1 -> 2: one-time download links (only a hash of the token is kept)
    """
    CREATE TABLE links (
        token_hash BLOB PRIMARY KEY,
        client_id INTEGER NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
        expires TEXT NOT NULL);
    """,
]


class NotInitialized(Exception):
    """No server in this folder yet (`wgpy server init`)."""


class NotFound(Invalid):
    pass


class Damaged(Invalid):
    """A row this program cannot read (edited by hand, or written by a newer wgpy)."""


@dataclass(frozen=True)
class NewClient:
    name: str
    private_key: bytes
    public_key: bytes
    preshared_key: bytes
    allowed_ips: tuple[IPNetwork, ...]
    expires: datetime | None
    addresses: tuple[str, ...] = ()  # given by hand; empty: the next free one in each pool


class Unset:
    """The absence of an argument where None means something (no expiry)."""


UNSET = Unset()


class Registry(Protocol):
    def initialize(self, settings: Settings) -> None: ...
    def settings(self) -> Settings: ...
    def update_settings(self, *, endpoint: str | None = None, listen_port: int | None = None,
                        dns: tuple[str, ...] | None = None) -> Settings: ...  # fmt: skip
    def revision(self) -> int: ...
    def clients(self) -> list[Client]: ...
    def client(self, ref: str | int) -> Client: ...  # a name or an id
    def add_client(self, new: NewClient, now: datetime) -> Client: ...
    def update_client(
        self, ref: str | int, now: datetime, *, name: str | None = None,
        enabled: bool | None = None, expires: datetime | Unset | None = UNSET,
    ) -> Client: ...  # fmt: skip
    def remove_client(self, ref: str | int) -> None: ...
    def password_hash(self) -> str | None: ...
    def set_password_hash(self, value: str) -> None: ...
    def add_link(self, ref: str | int, token_hash: bytes, expires: datetime) -> None: ...
    def take_link(self, token_hash: bytes, now: datetime) -> Client | None: ...


def _join(items: tuple[object, ...]) -> str:
    return ",".join(str(i) for i in items)


def _client(row: sqlite3.Row) -> Client:
    try:
        return _parse_client(row)
    except (ValueError, TypeError, AttributeError) as e:
        raise Damaged(
            f"client {row['name']!r} (row {row['id']}) is damaged in the registry: "
            f"{e}; `wgpy client remove {row['name']}` deletes it"
        ) from None


def _parse_client(row: sqlite3.Row) -> Client:
    return Client(
        id=row["id"], name=row["name"], private_key=row["private_key"],
        public_key=row["public_key"], preshared_key=row["preshared_key"],
        addresses=tuple(ipaddress.ip_interface(a) for a in row["addresses"].split(",") if a),
        allowed_ips=tuple(ipaddress.ip_network(a) for a in row["allowed_ips"].split(",") if a),
        enabled=bool(row["enabled"]),
        expires=datetime.fromisoformat(row["expires"]) if row["expires"] else None,
        created=datetime.fromisoformat(row["created"]),
        updated=datetime.fromisoformat(row["updated"]),
    )  # fmt: skip


class SqliteRegistry:
    """The registry in `DIR/wgpy.db`. A connection per call: calls may come from any
    thread (the web server's workers, the sync loop) and from several processes."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME

    def exists(self) -> bool:
        return self.path.exists()

    def _create(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_directory()
        # create the file 0600 before SQLite does (it would honour the umask), and never
        # through a symlink; the WAL and shared-memory files SQLite makes beside it copy
        # the database's mode
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        os.close(os.open(self.path, flags, 0o600))

    def _check_directory(self) -> None:
        """The folder must be ours alone: where others can write, they can put a symlink
        where the database or its journal goes, or open the file before keys go in."""
        try:
            st = self.directory.stat()
        except FileNotFoundError:
            return
        if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
            raise Invalid(f"{self.directory} is writable by others or owned by another user: "
                          "the registry needs a private folder (chmod 700)")  # fmt: skip

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        self._check_directory()
        if not self.path.exists():
            if not write:
                raise NotInitialized(f"no server in {self.directory} (run `wgpy server init`)")
            self._create()
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")  # a commit is on the disk when it returns
            self._migrate(db)
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if write:
                db.execute("UPDATE settings SET revision = revision + 1")
            db.execute("COMMIT")
        finally:
            db.close()

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"the registry's schema {version} is newer than this wgpy's")
        for number in range(version, len(MIGRATIONS)):
            db.execute("BEGIN IMMEDIATE")
            try:  # another process may have migrated meanwhile
                if db.execute("PRAGMA user_version").fetchone()[0] == number:
                    for statement in MIGRATIONS[number].split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {number + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def initialize(self, settings: Settings) -> None:
        with self._db(write=True) as db:
            if db.execute("SELECT 1 FROM settings").fetchone():
                raise Invalid(f"a server is already set up in {self.directory}")
            db.execute(
                "INSERT INTO settings (id, private_key, public_key, endpoint, listen_port,"
                " pools, dns, interface) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                (settings.private_key, settings.public_key, settings.endpoint,
                 settings.listen_port, _join(settings.pools), _join(settings.dns),
                 settings.interface),
            )  # fmt: skip

    def settings(self) -> Settings:
        with self._db() as db:
            return self._settings(db)

    def _settings(self, db: sqlite3.Connection) -> Settings:
        row = db.execute("SELECT * FROM settings").fetchone()
        if row is None:
            raise NotInitialized(f"no server in {self.directory} (run `wgpy server init`)")
        return Settings(
            private_key=row["private_key"], public_key=row["public_key"],
            endpoint=row["endpoint"], listen_port=row["listen_port"],
            pools=tuple(ipaddress.ip_network(p) for p in row["pools"].split(",") if p),
            dns=tuple(d for d in row["dns"].split(",") if d), interface=row["interface"],
        )  # fmt: skip

    def update_settings(self, *, endpoint: str | None = None, listen_port: int | None = None,
                        dns: tuple[str, ...] | None = None) -> Settings:  # fmt: skip
        with self._db(write=True) as db:
            self._settings(db)
            for column, value in (("endpoint", endpoint), ("listen_port", listen_port),
                                  ("dns", None if dns is None else _join(dns))):  # fmt: skip
                if value is not None:
                    db.execute(f"UPDATE settings SET {column} = ?", (value,))
            return self._settings(db)

    def revision(self) -> int:
        with self._db() as db:
            row = db.execute("SELECT revision FROM settings").fetchone()
            return int(row[0]) if row else 0

    def clients(self) -> list[Client]:
        with self._db() as db:
            return [_client(r) for r in db.execute("SELECT * FROM clients ORDER BY id")]

    def client(self, ref: str | int) -> Client:
        with self._db() as db:
            return self._find(db, ref)

    @staticmethod
    def _find(db: sqlite3.Connection, ref: str | int) -> Client:
        column = "id" if isinstance(ref, int) else "name"
        row = db.execute(f"SELECT * FROM clients WHERE {column} = ?", (ref,)).fetchone()
        if row is None:
            raise NotFound(f"no client {ref!r}")
        return _client(row)

    def add_client(self, new: NewClient, now: datetime) -> Client:
        check_name(new.name)
        with self._db(write=True) as db:
            pools = self._settings(db).pools
            if db.execute("SELECT 1 FROM clients WHERE name = ?", (new.name,)).fetchone():
                raise Invalid(f"a client named {new.name!r} exists already")
            taken = {str(a.ip) for r in db.execute("SELECT * FROM clients")
                     for a in _client(r).addresses}  # fmt: skip
            addresses = self._addresses(new.addresses, pools, taken)
            cur = db.execute(
                "INSERT INTO clients (name, private_key, public_key, preshared_key, addresses,"
                " allowed_ips, enabled, expires, created, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                (new.name, new.private_key, new.public_key, new.preshared_key,
                 _join(addresses), _join(new.allowed_ips),
                 new.expires.isoformat() if new.expires else None, now.isoformat(),
                 now.isoformat()),
            )  # fmt: skip
            return self._find(db, int(cur.lastrowid or 0))

    @staticmethod
    def _addresses(
        given: tuple[str, ...], pools: tuple[IPNetwork, ...], taken: set[str]
    ) -> tuple[IPInterface, ...]:
        if given:
            out = []
            for addr in given:
                out.append(check_address(addr, pools, taken))
                taken.add(str(out[-1].ip))
            return tuple(out)
        return tuple(next_address(pool, taken) for pool in pools)

    def update_client(
        self, ref: str | int, now: datetime, *, name: str | None = None,
        enabled: bool | None = None, expires: datetime | Unset | None = UNSET,
    ) -> Client:  # fmt: skip
        with self._db(write=True) as db:
            client = self._find(db, ref)
            if name is not None and name != client.name:
                check_name(name)
                if db.execute("SELECT 1 FROM clients WHERE name = ?", (name,)).fetchone():
                    raise Invalid(f"a client named {name!r} exists already")
                db.execute("UPDATE clients SET name = ? WHERE id = ?", (name, client.id))
            if enabled is not None:
                db.execute("UPDATE clients SET enabled = ? WHERE id = ?", (enabled, client.id))
            if not isinstance(expires, Unset):
                db.execute("UPDATE clients SET expires = ? WHERE id = ?",
                           (expires.isoformat() if expires else None, client.id))  # fmt: skip
            db.execute("UPDATE clients SET updated = ? WHERE id = ?", (now.isoformat(), client.id))
            return self._find(db, client.id)

    def remove_client(self, ref: str | int) -> None:
        with self._db(write=True) as db:  # without reading the row: a damaged one goes too
            column = "id" if isinstance(ref, int) else "name"
            if not db.execute(f"DELETE FROM clients WHERE {column} = ?", (ref,)).rowcount:
                raise NotFound(f"no client {ref!r}")

    def password_hash(self) -> str | None:
        with self._db() as db:
            row = db.execute("SELECT password FROM settings").fetchone()
            return row[0] if row else None

    def set_password_hash(self, value: str) -> None:
        with self._db(write=True) as db:
            self._settings(db)
            db.execute("UPDATE settings SET password = ?", (value,))

    def add_link(self, ref: str | int, token_hash: bytes, expires: datetime) -> None:
        with self._db(write=True) as db:
            client = self._find(db, ref)
            # one link per client, as wg-easy: a link sent and forgotten stops working
            db.execute("DELETE FROM links WHERE client_id = ?", (client.id,))
            db.execute("INSERT INTO links VALUES (?, ?, ?)",
                       (token_hash, client.id, expires.isoformat()))  # fmt: skip

    def take_link(self, token_hash: bytes, now: datetime) -> Client | None:
        """The link's client, once: the link is gone after this call, used or expired."""
        with self._db(write=True) as db:
            row = db.execute("DELETE FROM links WHERE token_hash = ? RETURNING *",
                             (token_hash,)).fetchone()  # fmt: skip
            db.execute("DELETE FROM links WHERE expires <= ?", (now.isoformat(),))
            if row is None or datetime.fromisoformat(row["expires"]) <= now:
                return None
            return self._find(db, int(row["client_id"]))
