"""The optional native datapath: `wgpy._native` (src/native/*.c), C over OpenSSL's
libcrypto for the per-packet loops, as aioquic's `_crypto.c` does for QUIC.

It does in one call for a whole batch what the Python code does per packet: open a GRO read
(decrypt, replay window, inner checks), seal a batch for one session, coalesce and split
super-packets. The protocol stays in Python, and so does the reference: the pure path is
what the native one is tested against (tests/native), and what runs without a compiler.
"""

from __future__ import annotations

from types import ModuleType


def load() -> ModuleType | None:
    """The extension if it was built, else None; also where it cannot start (its import
    raises OSError when libcrypto refuses an algorithm it needs, as a FIPS-only
    configuration refuses BLAKE2s): the pure path then serves."""
    try:
        import wgpy._native as _native
    except (ImportError, OSError):
        return None
    return _native
