"""Type stubs of the optional C extension src/native/classify.c (core/intake.py) and
src/native/reader.c (io/datapath.py)."""

from collections.abc import Iterable

from typing_extensions import Buffer

class Classifier:
    """Device's handshake intake for a whole read: token buckets, mac1, the queue bound."""

    def __init__(
        self,
        seed: Buffer,
        rate: float,
        burst: float,
        cookie_rate: float,
        cookie_burst: float,
        max_sources: int,
        queue_size: int,
        hold: float,
        refresh: float,
        shed_rate: float = 0,
        shed_burst: float = 0,
    ) -> None: ...
    def classify(
        self,
        buf: Buffer,
        n: int,
        seg: int,
        host: str,
        port: int,
        now: float,
        until: float,
        queued: int,
        forced: bool,
        reply_state: tuple[bytes, bytes, int] | None,
        shed: bool = False,
    ) -> tuple[list[tuple[int, int]], int, float, dict[str, int], bytes | None, int]: ...
    def drain(
        self,
        fd: int | UdpReader,
        buf: bytearray | UdpReader,
        slot: int,
        count: int,
        now: float,
        until: float,
        queued: int,
        forced: bool,
        reply_state: tuple[bytes, bytes, int] | None,
    ) -> tuple[
        list[
            tuple[int, int, int, tuple[str, int], bytes | None, list[tuple[int, int]] | None, int]
        ],
        int,
        float,
        dict[str, int],
        int,
        int,
    ]: ...
    def set_known(self, endpoints: Iterable[tuple[str, int]]) -> None: ...
    def set_mac1_key(self, key: Buffer) -> None: ...
    def set_cookie_secret(self, secret: Buffer, born: float) -> None: ...
    def sources(self) -> tuple[int, int]: ...

class UdpReader(Buffer):
    """A thread reading a UDP socket into a ring of slots for `Classifier.drain`."""

    def __init__(
        self, fd: int, slots: int = 4, count: int = 64, size: int = 69632, arm: int = 2
    ) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    def counts(self) -> tuple[int, int, int]: ...
    @property
    def running(self) -> bool: ...

def mac(key: Buffer, data: Buffer) -> bytes: ...
