"""`--keylog FILE` holds the interface's private key: the daemon writes it only into a
file it made 0600 or one that is already its own and private, never through a symlink,
into a file someone else planted, a file others may read, or something not a file."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from wgpy.core.crypto import clamp, encode_key
from wgpy.core.device import Device
from wgpy.daemon.keylog import KeyLog

NOBODY = 65534


def device() -> Device:
    rng = random.Random(3)
    dev = Device(rng.randbytes)
    dev.set_private_key(clamp(rng.randbytes(32)))
    return dev


def write_one(path: Path) -> str:
    """Open the keylog at `path`, log one handshake's keys; the private key logged."""
    dev = device()
    assert dev.private_key is not None
    peer = dev.add_peer(bytes(range(32)))
    assert peer is not None
    log = KeyLog(str(path), dev)
    try:
        log(peer, bytes(32))
    finally:
        log.close()
    return encode_key(dev.private_key)


def test_a_new_file_is_made_0600_and_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    key = write_one(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_one(path)  # our own private file: opened again and appended to
    assert path.read_text().count(f"LOCAL_STATIC_PRIVATE_KEY = {key}") == 2


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o666, 0o604, 0o620], ids=oct)
def test_a_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "keys"
    path.write_text("")
    path.chmod(mode)
    with pytest.raises(OSError, match=r"refused.*private key"):
        write_one(path)
    assert path.read_text() == ""


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("precious\n")
    target.chmod(0o600)
    (tmp_path / "keys").symlink_to(target)
    with pytest.raises(OSError, match="symbolic link"):
        write_one(tmp_path / "keys")
    assert target.read_text() == "precious\n"
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")  # nor made through one
    with pytest.raises(OSError, match="symbolic link"):
        write_one(tmp_path / "dangling")
    assert not (tmp_path / "nothing").exists()


def test_a_hard_link_is_refused(tmp_path: Path) -> None:
    """Appending through a second name would write into whatever file that is."""
    other = tmp_path / "other"
    other.write_text("precious\n")
    other.chmod(0o600)
    os.link(other, tmp_path / "keys")
    with pytest.raises(OSError, match="hard link"):
        write_one(tmp_path / "keys")
    assert other.read_text() == "precious\n"


def test_not_a_regular_file_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO: refused at once, whether or not anyone reads it (no open that hangs)."""
    fifo = tmp_path / "keys"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(OSError, match=r"keylog .*refused"):
        write_one(fifo)  # no reader: ENXIO
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(OSError, match="not a regular file"):
            write_one(fifo)
        assert os.read(reader, 100) == b""  # nothing came through (and no writer is left)
    finally:
        os.close(reader)
    with pytest.raises(OSError, match=r"keylog .*refused"):
        write_one(tmp_path)  # a directory


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to nobody")
def test_a_file_another_user_owns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("")
    path.chmod(0o600)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(OSError, match="owned by uid 65534"):
        write_one(path)
    assert path.read_text() == ""
