"""`--keylog FILE`: the keys Wireshark needs to decrypt a capture of this tunnel.

Wireshark's WireGuard dissector reads `wg.keylog_file`, lines of `<TYPE> = <base64 key>`
with TYPE one of LOCAL_STATIC_PRIVATE_KEY, REMOTE_STATIC_PUBLIC_KEY,
LOCAL_EPHEMERAL_PRIVATE_KEY and PRESHARED_KEY (the format of wireguard-tools'
contrib/extract-handshakes). With our static and ephemeral private keys it can redo the
handshake and derive the session keys. One block is appended per handshake message we
create (initiation or response), as the ephemeral key is made.

Anyone who reads the file can decrypt every session it covers: it undoes forward secrecy.
It is off by default, made 0600, and the daemon warns at every start that it is on.
"""

from __future__ import annotations

import logging
import os

from wgpy.core.crypto import clamp, encode_key
from wgpy.core.device import Device
from wgpy.core.peer import Peer

log = logging.getLogger("wgpy")
WARNING = (
    "--keylog {path}: the keys of every handshake are written there; whoever reads it can "
    "decrypt this tunnel's traffic (no forward secrecy). For debugging only."
)


class KeyLog:
    """The device's `keylog` hook: appends the keys of each handshake to a file."""

    def __init__(self, path: str, device: Device) -> None:
        self.path = path
        self.device = device
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

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
