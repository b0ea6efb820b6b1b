"""`wgpy up` with a bad config: one line naming file, line and key, exit 1, and the
namespace exactly as it was (nothing started, nothing left)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_quick import snapshot, wgpy, write
from wgpy.demo.testbed import Namespace, wg_keypair
from wgpy.io.uapi_path import socket_path

PID = os.getpid() % 100000
NAME = f"we{PID}"


@pytest.fixture
def ns() -> Iterator[Namespace]:
    n = Namespace(f"wgpy-qe{PID}")
    try:
        yield n
    finally:
        n.close()
        socket_path(NAME).unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("Table = 99999999999\n", ":3: Table: "),
        ("[Peer]\nPublicKey = {peer}\nEndpoint = nowhere.invalid:51820\n",
         ":5: Endpoint: cannot resolve `nowhere.invalid'"),
        ("# caf\xe9 is fine in a comment\nListenPort = 5\xff\n",
         ":4: file: byte 0xff at column 15 is not UTF-8"),
    ],
)  # fmt: skip
def test_up_with_a_bad_config_fails_cleanly_and_changes_nothing(
    ns: Namespace, tmp_path: Path, body: str, where: str
) -> None:
    priv, _ = wg_keypair()
    _, peer = wg_keypair()
    text = f"[Interface]\nPrivateKey = {priv}\n" + body.format(peer=peer)
    conf = tmp_path / f"{NAME}.conf"
    write(conf, "")
    conf.write_bytes(text.encode("latin-1"))
    before = snapshot(ns)
    started = time.monotonic()
    done = wgpy(ns, "up", str(conf))
    assert time.monotonic() - started < 10
    assert done.returncode == 1
    assert done.stderr.startswith(f"wgpy up: {conf}{where}"), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert snapshot(ns) == before and not socket_path(NAME).exists()
