"""The handshake intake in C: `wgpy._classify` (src/wgpy/_classify.c), optional.

In Python every datagram of a flood became a read's tuple, a memoryview, a `bytes`, a mac1
computed in `hashlib` and two dict looks before it was refused: 6-16 us of one Python
thread, and the kernel dropped what it could not read, a tunnel's datagrams among them.
The classifier gives a whole read its verdicts in one call (`classify`), or reads the
socket itself, 64 reads a `recvmmsg` (`drain`, used by io/datapath.py), with what
`Device._admit` decides: type and size, mac1, the token buckets of ratelimit.py, the
queue bound and the under-load deadline. It makes the cookie replies a flood is owed
(and `drain` sends them), so only the messages that pass become Python objects; the
refused ones are counted by their `Drop` reason. The Python intake stays the reference
(tests/native/test_classify.py holds the two to identical verdicts, counts and reply
bytes) and what runs without the extension, with WGPY_NATIVE=0, or with WGPY_INTAKE=0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wgpy.core.constants import COOKIE_REFRESH_TIME
from wgpy.core.crypto import hash_
from wgpy.core.ratelimit import (
    BURST,
    COOKIE_BURST,
    COOKIE_PACKETS_PER_SECOND,
    MAX_SOURCES,
    PACKETS_PER_SECOND,
    UNDER_LOAD_HOLD,
)

if TYPE_CHECKING:
    from wgpy._classify import Classifier

# what passes, as `Classifier.classify` says it
ENQUEUE = 1  # queue it: a source within its rate while not under load
ENQUEUE_COOKIE = 2  # queue it: it needed a cookie and came with a valid mac2
SEND_COOKIE = 3  # it needed a cookie and had none: a cookie reply
COOKIE_REPLY = 4  # a cookie reply for us
COOKIE_MADE = 5  # as SEND_COOKIE, and the classifier made the reply


def available() -> bool:
    """Whether the extension was built."""
    try:
        import wgpy._classify  # noqa: F401
    except ImportError:
        return False
    return True


def classifier(seed: bytes, queue_size: int) -> Classifier:
    """A classifier with the limits of ratelimit.py (the extension must be there); its
    bucket table's hash is keyed from `seed` (sources are the attacker's to choose), and
    drawing nothing from the device's `rand` keeps both paths' randomness in step."""
    from wgpy._classify import Classifier

    return Classifier(hash_(b"wgpy intake", seed)[:8], PACKETS_PER_SECOND, BURST,
                      COOKIE_PACKETS_PER_SECOND, COOKIE_BURST, MAX_SOURCES, queue_size,
                      UNDER_LOAD_HOLD, COOKIE_REFRESH_TIME)  # fmt: skip
