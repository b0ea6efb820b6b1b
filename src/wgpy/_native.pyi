"""Type stubs of the optional C extension (src/wgpy/_native.c)."""

from collections.abc import Sequence

from typing_extensions import Buffer

WINDOW: int

class Session:
    """A receiving session: a ChaCha20-Poly1305 key and a replay window."""

    expires: float
    def __init__(self, key: Buffer, expires: float) -> None: ...
    def wipe(self) -> None: ...
    def window_state(self) -> tuple[int, bytes]: ...

class Sealer:
    """A sending key and its counter."""

    def __init__(self, key: Buffer, receiver_index: int, counter: int = 0) -> None: ...
    @property
    def counter(self) -> int: ...
    def seal(self, packets: Sequence[Buffer], mtu: int) -> list[bytes]: ...
    def expire(self) -> None: ...
    def wipe(self) -> None: ...

def open_batch(
    buf: Buffer,
    nbytes: int,
    seg: int,
    sessions: dict[int, Session],
    now: float,
    out: Buffer,
) -> tuple[
    list[tuple[Session, bytes, bytes]],
    list[tuple[Session, int, bool]],
    list[tuple[int, int]],
    dict[str, int],
]: ...
def coalesce(packets: Sequence[Buffer], udp: bool = True) -> list[bytes]: ...
def checksum(data: Buffer, initial: int = 0) -> int: ...
def split(buf: Buffer, mtu: int) -> list[bytes]: ...
