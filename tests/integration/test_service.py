"""contrib/wgpy@.service, the counterpart of wg-quick@.service: systemd-analyze accepts it,
and its start, reload and stop commands do their job on a real interface."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgpy.demo.testbed import Namespace, wg_keypair
from wgpy.io.uapi_path import socket_path

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "wgpy@.service"
PID = os.getpid() % 100000


def exec_lines(text: str) -> dict[str, str]:
    """ExecStart, ExecStop and ExecReload of a unit."""
    found = {}
    for line in text.splitlines():
        key, eq, value = line.partition("=")
        if eq and key.startswith("Exec"):
            found[key] = value
    return found


def wgpy_shim(folder: Path) -> Path:
    """An executable `wgpy` that runs this checkout's wgpy with this Python."""
    folder.mkdir(exist_ok=True)
    shim = folder / "wgpy"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m wgpy "$@"\n')
    shim.chmod(0o755)
    return shim


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # systemd looks its commands up in its own fixed PATH, where this checkout's wgpy may
    # not be: the copy checked names a shim by its absolute path instead
    shim = wgpy_shim(tmp_path / "bin")
    text = UNIT.read_text()
    assert set(exec_lines(text)) == {"ExecStart", "ExecStop", "ExecReload"}
    text = text.replace("ExecStart=wgpy ", f"ExecStart={shim} ")
    text = text.replace("ExecStop=wgpy ", f"ExecStop={shim} ")
    unit = tmp_path / "wgpy@.service"
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wgpy@" not in done.stdout + done.stderr


@pytest.fixture
def ns() -> Iterator[Namespace]:
    namespace = Namespace(f"wgpy-s{PID}")
    try:
        yield namespace
    finally:
        namespace.close()
        socket_path(f"ws{PID}").unlink(missing_ok=True)


def test_start_reload_stop_commands(ns: Namespace, tmp_path: Path) -> None:
    """The unit's own command lines, as systemd runs them for wgpy@ws<pid>, in a namespace
    and a mount namespace where a test folder stands in for /etc/wireguard."""
    ifname = f"ws{PID}"
    confdir = tmp_path / "etc-wireguard"
    confdir.mkdir(mode=0o700)
    conf = confdir / f"{ifname}.conf"
    _, first = wg_keypair()
    _, second = wg_keypair()
    body = f"""[Interface]
PrivateKey = {wg_keypair()[0]}
Address = 10.201.0.1/24

[Peer]
PublicKey = {first}
AllowedIPs = 10.201.0.2/32
"""
    conf.write_text(body)
    conf.chmod(0o600)
    env = {**os.environ, "PATH": f"{wgpy_shim(tmp_path / 'bin').parent}:{os.environ['PATH']}"}
    lines = exec_lines(UNIT.read_text())

    def run(key: str) -> subprocess.CompletedProcess[str]:
        command = lines[key].replace("%i", ifname)
        script = f"mount --bind {confdir} /etc/wireguard && {command}"
        return subprocess.run(ns.argv(["unshare", "-m", "sh", "-c", script]), env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    try:
        done = run("ExecStart")
        assert done.returncode == 0, done.stderr
        assert ns.run("wg", "show", ifname, "peers").split() == [first]
        conf.write_text(body + f"\n[Peer]\nPublicKey = {second}\nAllowedIPs = 10.201.0.3/32\n")
        done = run("ExecReload")
        assert done.returncode == 0, done.stderr
        assert sorted(ns.run("wg", "show", ifname, "peers").split()) == sorted([first, second])
        assert "10.201.0.1/24" in ns.run("ip", "addr", "show", ifname)  # syncconf keeps it
        done = run("ExecStop")
        assert done.returncode == 0, done.stderr
        assert not ns.has_link(ifname)
    finally:
        if ns.has_link(ifname):
            run("ExecStop")
