"""`--keylog FILE`: the keys Wireshark needs to decrypt a capture of this tunnel.

Wireshark's WireGuard dissector reads `wg.keylog_file`, lines of `<TYPE> = <base64 key>`
with TYPE one of LOCAL_STATIC_PRIVATE_KEY, REMOTE_STATIC_PUBLIC_KEY,
LOCAL_EPHEMERAL_PRIVATE_KEY and PRESHARED_KEY (the format of wireguard-tools'
contrib/extract-handshakes). With our static and ephemeral private keys it can redo the
handshake and derive the session keys. One block is appended per handshake message we
create (initiation or response), as the ephemeral key is made.

The file holds the interface's private key and every session's keys: anyone who reads it
can decrypt every session it covers, and it undoes forward secrecy. It is off by default
and the daemon warns at every start that it is on. It is made 0600; a file already there
is used only if it is a regular file of the daemon's own user that no one else may read or
write, with no other name. A symlink is never followed: someone who could plant one (or
a readable file) at the path would get the keys, or have root append them where they like.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from wgpy.core.crypto import clamp, encode_key
from wgpy.core.device import Device
from wgpy.core.peer import Peer

log = logging.getLogger("wgpy")
WARNING = (
    "--keylog {path}: the interface's private key and the keys of every handshake are "
    "written there; whoever reads it can decrypt this tunnel's traffic (no forward "
    "secrecy). For debugging only."
)
# O_NONBLOCK: a FIFO planted at the path must not hang the daemon in open(); it is refused
# by fstat like anything else that is not a regular file
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_private(path: str) -> int:
    """`path` opened for appending, only if no one but us can read what we write there;
    OSError (its message says why) otherwise."""
    try:
        fd = os.open(path, _FLAGS, 0o600)
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise OSError(f"--keylog {path}: {why}; refused: it would hold the private key") from None
    try:
        problem = _not_private(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    if problem:
        os.close(fd)
        raise OSError(
            f"--keylog {path}: {problem}; refused: it would hold the interface's private "
            "key (remove it, or name a new file)"
        )
    return fd


def _not_private(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by the daemon's ({os.geteuid()})"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):04o} lets others at it (0600 only)"
    if st.st_nlink != 1:
        return "it has another name (a hard link)"
    return None


class KeyLog:
    """The device's `keylog` hook: appends the keys of each handshake to a file."""

    def __init__(self, path: str, device: Device) -> None:
        self.path = path
        self.device = device
        self.fd = open_private(path)

    def __call__(self, peer: Peer, ephemeral: bytes) -> None:
        if self.device.private_key is None:
            return
        lines = [
            f"LOCAL_STATIC_PRIVATE_KEY = {encode_key(self.device.private_key)}",
            f"REMOTE_STATIC_PUBLIC_KEY = {encode_key(peer.public_key)}",
            f"LOCAL_EPHEMERAL_PRIVATE_KEY = {encode_key(clamp(ephemeral))}",
            f"PRESHARED_KEY = {encode_key(peer.preshared_key)}",
        ]
        try:
            os.write(self.fd, ("\n".join(lines) + "\n").encode())
        except OSError as e:  # a full disk must not stop the handshake
            log.error("keylog %s: %s", self.path, e)

    def close(self) -> None:
        os.close(self.fd)
