"""wgpy.Interface in a namespace of its own: two interfaces of one process handshake over
loopback; peers change from many threads at once; closing from a callback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgpy.demo.testbed import Namespace

SRC = Path(__file__).resolve().parents[2] / "src"

PROGRAM = r"""
import os, threading, wgpy

ka, kb = wgpy.generate_private_key(), wgpy.generate_private_key()
a_cfg = wgpy.Config.build(ka, listen_port=52001, peers=[wgpy.PeerConfig.build(
    wgpy.public_key_of(kb), endpoint="127.0.0.1:52002", allowed_ips=["10.90.0.2/32"],
    persistent_keepalive=1)])
b_cfg = wgpy.Config.build(kb, listen_port=52002, peers=[wgpy.PeerConfig.build(
    wgpy.public_key_of(ka), allowed_ips=["10.90.0.1/32"])])

closed = threading.Event()
b = wgpy.Interface(b_cfg, name="wgtb", configure_network=False)

def on_b(event):
    if event.kind in (wgpy.EventKind.KEEPALIVE_SENT, wgpy.EventKind.HANDSHAKE_COMPLETED):
        if not closed.is_set():
            closed.set()
            b.close()          # from the loop thread itself

with wgpy.Interface(a_cfg, name="wgta", configure_network=False) as a:
    assert a.public_key == wgpy.public_key_of(ka) and a.listen_port == 52001
    b.add_event_callback(on_b)
    b.open()
    a.wait_for(wgpy.EventKind.HANDSHAKE_COMPLETED, timeout=10)
    assert closed.wait(10)
    b._thread.join(5)
    assert not b.running and not os.path.exists("/sys/class/net/wgtb")

    keys = [[wgpy.public_key_of(wgpy.generate_private_key()) for _ in range(100)] for _ in range(4)]
    def add(batch, t):
        for i, k in enumerate(batch):
            a.set_peer(k, allowed_ips=[f"10.91.{t}.{i}/32"], endpoint=("192.0.2.1", 1000 + i))
    threads = [threading.Thread(target=add, args=(k, t)) for t, k in enumerate(keys)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert len(a.peers()) == 401
    assert a.peer(keys[2][7]).allowed_ips == ["10.91.2.7/32"]
    for k in keys[0]:
        a.remove_peer(k)
    assert len(a.peers()) == 301
    try:
        a.set_peer(wgpy.public_key_of(ka))
    except ValueError:
        pass
    else:
        raise AssertionError("own key accepted")
assert not a.running and not os.path.exists("/sys/class/net/wgta")
print("ok")
"""


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    ns = Namespace(f"wgpyif-{os.getpid() % 100000}")
    try:
        yield ns
    finally:
        ns.close()


def test_interfaces_in_one_process(namespace: Namespace) -> None:
    done = subprocess.run(
        namespace.argv([sys.executable, "-c", PROGRAM]),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


FAILED_OPENS = r"""
import os, wgpy

def readers():
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            names.append(f.read().strip())
    return names.count("wgpy-udpread")

key = wgpy.generate_private_key()
cfg = wgpy.Config.build(key, peers=[wgpy.PeerConfig.build(wgpy.public_key_of(key))])
iface = wgpy.Interface(cfg, name="wgfail", configure_network=False)
fds = len(os.listdir("/proc/self/fd"))
for _ in range(3):  # its own key as a peer: _apply_config raises, the datapath was made
    try:
        iface.open()
    except ValueError:
        pass
    else:
        raise AssertionError("opened")
    assert readers() == 0, f"{readers()} reader threads left"
    assert len(os.listdir("/proc/self/fd")) == fds, "descriptors left"
iface.close()
print("ok")
"""


def test_a_failed_open_leaves_no_reader_thread(namespace: Namespace) -> None:
    """Interface.open failing after its datapath was made (the reader forced on: 3 crypto
    threads, WGPY_UDP_READER=1) stops the reader thread and closes its eventfd and the
    loop's epoll: an open tried again makes no second one beside the first."""
    from wgpy.core.native import load

    if load() is None:
        pytest.skip("wgpy._native is not built")
    env = {**os.environ, "PYTHONPATH": str(SRC), "WGPY_UDP_READER": "1", "WGPY_THREADS": "3"}
    done = subprocess.run(namespace.argv([sys.executable, "-c", FAILED_OPENS]),
                          capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
