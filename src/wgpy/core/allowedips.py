"""Cryptokey routing: the longest-prefix-match table from addresses to peers.

The same table answers both questions WireGuard asks: which peer does an outgoing packet's
destination belong to, and does a decrypted packet's source belong to the peer it came
from. An entry is (address, prefix length) -> owner; inserting masks the address, and an
entry inserted for a second owner moves to it, as the `wg` tool expects.

Layout: per address family, one dict per prefix length, keyed by the prefix as an integer
(the address shifted right by the host bits). A lookup probes the lengths present, longest
first, so it costs one C-level dict probe per distinct prefix length in use (typically one
to three) instead of walking up to 128 Python-level nodes of a bitwise trie. Path
compression buys nothing here: the "path" is a single integer shift. A per-owner index
keeps removal by owner and listing proportional to the owner's entries.

A `Mirror` (the native backend's `Routes`, published by the device at its first send) is
told every change as this table makes it, so that C can route a batch read from the TUN
without asking Python per packet, and never by a table older than this one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")


class Mirror(Protocol):
    """A copy of the table kept elsewhere (the native backend's `Routes`, which routes a
    batch in C): told every change as it is made, so the two never disagree."""

    def insert(self, addr: bytes, cidr: int, owner: Any) -> None: ...
    def remove(self, addr: bytes, cidr: int) -> bool: ...
    def clear(self) -> None: ...


class _Family(Generic[T]):
    """All prefixes of one address length (4 or 16 bytes)."""

    __slots__ = ("bits", "levels", "order")

    def __init__(self, size: int) -> None:
        self.bits = size * 8
        self.levels: dict[int, dict[int, T]] = {}
        self.order: list[tuple[int, dict[int, T]]] = []  # longest prefix first

    def reorder(self) -> None:
        self.order = sorted(self.levels.items(), key=lambda item: -item[0])


class AllowedIPs(Generic[T]):
    def __init__(self) -> None:
        self._families: dict[int, _Family[T]] = {4: _Family(4), 16: _Family(16)}
        # owner -> {(family size, cidr, prefix): None}, in insertion order
        self._owned: dict[T, dict[tuple[int, int, int], None]] = {}
        self.mirror: Mirror | None = None

    def publish(self, mirror: Mirror) -> None:
        """From now on, keep `mirror` a copy of this table (filled with it now)."""
        mirror.clear()
        for size, family in self._families.items():
            for cidr, level in family.levels.items():
                for prefix, owner in level.items():
                    mirror.insert(_address(size, cidr, prefix), cidr, owner)
        self.mirror = mirror

    def __len__(self) -> int:
        return sum(len(level) for f in self._families.values() for level in f.levels.values())

    def insert(self, addr: bytes, cidr: int, value: T) -> None:
        family, prefix = self._locate(addr, cidr)
        level = family.levels.get(cidr)
        if level is None:
            level = family.levels[cidr] = {}
            family.reorder()
        key = (len(addr), cidr, prefix)
        old = level.get(prefix)
        if old is not None and old is not value:
            del self._owned[old][key]
        level[prefix] = value
        self._owned.setdefault(value, {})[key] = None
        if self.mirror is not None:
            self.mirror.insert(addr, cidr, value)

    def remove(self, addr: bytes, cidr: int, value: T) -> bool:
        """Remove one entry if `value` owns it; True if something was removed."""
        family, prefix = self._locate(addr, cidr)
        level = family.levels.get(cidr)
        if level is None or level.get(prefix) is not value:
            return False
        self._drop(family, cidr, prefix)
        del self._owned[value][(len(addr), cidr, prefix)]
        if self.mirror is not None:
            self.mirror.remove(addr, cidr)
        return True

    def remove_value(self, value: T) -> None:
        for size, cidr, prefix in self._owned.pop(value, {}):
            self._drop(self._families[size], cidr, prefix)
            if self.mirror is not None:
                self.mirror.remove(_address(size, cidr, prefix), cidr)

    def clear(self) -> None:
        mirror = self.mirror
        self.__init__()  # type: ignore[misc]
        if mirror is not None:
            mirror.clear()
            self.mirror = mirror

    def lookup(self, addr: bytes | memoryview) -> T | None:
        """The owner of the longest prefix containing `addr` (4 or 16 bytes), or None."""
        family = self._families.get(len(addr))
        if family is None:
            return None
        key = int.from_bytes(addr, "big")
        bits = family.bits
        for cidr, level in family.order:
            value = level.get(key >> (bits - cidr))
            if value is not None:
                return value
        return None

    def entries(self, value: T) -> list[tuple[bytes, int]]:
        """The (masked address, cidr) entries owned by `value`, in insertion order."""
        owned = self._owned.get(value, {})
        return [(_address(size, cidr, prefix), cidr) for size, cidr, prefix in owned]

    def iter_entries(self, value: T) -> Iterator[tuple[bytes, int]]:
        """`entries` one at a time, over a copy of the owner's keys taken at the first step:
        for callers that list or remove a large set a slice at a time."""
        for size, cidr, prefix in list(self._owned.get(value, {})):
            yield _address(size, cidr, prefix), cidr

    def _locate(self, addr: bytes, cidr: int) -> tuple[_Family[T], int]:
        family = self._families.get(len(addr))
        if family is None or not 0 <= cidr <= family.bits:
            raise ValueError(f"bad prefix: {len(addr)}-byte address, /{cidr}")
        return family, int.from_bytes(addr, "big") >> (family.bits - cidr)

    @staticmethod
    def _drop(family: _Family[T], cidr: int, prefix: int) -> None:
        level = family.levels[cidr]
        del level[prefix]
        if not level:
            del family.levels[cidr]
            family.reorder()


def _address(size: int, cidr: int, prefix: int) -> bytes:
    """The masked address of a prefix of `cidr` bits in a `size`-byte family."""
    return (prefix << (size * 8 - cidr)).to_bytes(size, "big")


def parse_cidr(text: str) -> tuple[bytes, int]:
    """'10.0.0.1/24' -> (b'\\n\\0\\0\\1', 24); a bare address is a host route. ValueError if bad."""
    addr_text, slash, cidr_text = text.strip().partition("/")
    addr = ipaddress.ip_address(addr_text)
    if not slash:
        return addr.packed, addr.max_prefixlen
    if not (cidr_text.isascii() and cidr_text.isdigit()) or int(cidr_text) > addr.max_prefixlen:
        raise ValueError(f"bad prefix length in {text!r}")
    return addr.packed, int(cidr_text)


def format_cidr(addr: bytes, cidr: int) -> str:
    return f"{ipaddress.ip_address(addr)}/{cidr}"
