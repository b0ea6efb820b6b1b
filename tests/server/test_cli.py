"""`wgpy server` and `wgpy client` without a running server: the registry's commands."""

from __future__ import annotations

import io
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from wgpy.cli import main
from wgpy.server import auth
from wgpy.server.store import SqliteRegistry
from wgpy.tools.config import Config

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "wgpy-server.service"


def wgpy(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_add_show_list_and_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    d = str(tmp_path / "reg")
    code, out, _ = wgpy(capsys, "server", "init", "--dir", d, "--endpoint", "[2001:db8::1]:443",
                        "--dns", "10.8.0.1", "--port", "51999", "--interface", "wgx")  # fmt: skip
    assert code == 0 and "port 51999" in out
    code, config, _ = wgpy(capsys, "client", "--dir", d, "add", "phone", "--expires", "2999-12-31")
    cfg = Config.from_text(config)
    assert code == 0 and cfg.peers[0].endpoint == "[2001:db8::1]:443"
    assert wgpy(capsys, "client", "show", "phone", "--dir", d)[1] == config
    code, out, _ = wgpy(capsys, "client", "show", "phone", "--dir", d, "--qr")
    assert out.startswith(config) and "█" in out

    target = tmp_path / "phone.conf"
    assert wgpy(capsys, "client", "show", "phone", "--dir", d, "--out", str(target))[0] == 0
    assert target.read_text() == config and stat.S_IMODE(target.stat().st_mode) == 0o600

    code, out, err = wgpy(capsys, "client", "list", "--dir", d)
    assert "(wgx is not running)" in err
    assert out.split("\n")[1].split() == ["phone", "10.8.0.2,fd42:42::2", "offline", "never",
                                          "0", "B", "0", "B", "2999-12-31", "23:59"]  # fmt: skip
    assert wgpy(capsys, "client", "disable", "phone", "--dir", d)[0] == 0
    assert "disabled" in wgpy(capsys, "client", "list", "--dir", d)[1]
    assert wgpy(capsys, "client", "enable", "phone", "--dir", d)[0] == 0
    assert "offline" in wgpy(capsys, "client", "list", "--dir", d)[1]

    monkeypatch.setattr("sys.stdin", io.StringIO("a good password\n"))
    assert wgpy(capsys, "client", "passwd", "--dir", d)[0] == 0
    assert auth.verify_password("a good password", SqliteRegistry(d).password_hash())
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    code, _, err = wgpy(capsys, "server", "passwd", "--dir", d)
    assert code == 1 and "at least 8 characters" in err

    assert wgpy(capsys, "client", "remove", "phone", "--dir", d)[0] == 0
    code, _, err = wgpy(capsys, "client", "show", "phone", "--dir", d)
    assert code == 1 and err == "wgpy client: no client 'phone'\n"


def test_errors_are_one_line_and_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path)
    code, _, err = wgpy(capsys, "client", "list", "--dir", d)
    assert code == 1 and "run `wgpy server init`" in err
    code, _, err = wgpy(capsys, "server", "init", "--dir", d, "--endpoint", "nohost")
    assert code == 1 and "bad endpoint 'nohost'" in err
    assert not (tmp_path / "wgpy.db").exists()
    wgpy(capsys, "server", "init", "--dir", d, "--endpoint", "h.example:1",
         "--subnet", "10.0.0.0/30")  # fmt: skip
    assert wgpy(capsys, "client", "add", "a", "--dir", d)[0] == 0
    code, _, err = wgpy(capsys, "client", "add", "b", "--dir", d)
    assert code == 1 and err == "wgpy client: the pool 10.0.0.0/30 is full\n"
    code, _, err = wgpy(capsys, "server", "run", "--dir", d, "--web", "nonsense")
    assert code == 1 and "bad --web 'nonsense'" in err


def test_a_registry_that_cannot_be_opened_is_one_line_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # as a user who may not read /var/lib/wgpy/wgpy.db gets it (here: the name is a folder)
    (tmp_path / "wgpy.db").mkdir()
    code, _, err = wgpy(capsys, "client", "list", "--dir", str(tmp_path))
    assert code == 1 and err.startswith("wgpy client: cannot open the registry ")
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_the_server_needs_a_web_password_before_it_starts(tmp_path: Path) -> None:
    d = str(tmp_path)
    main(["server", "init", "--dir", d, "--endpoint", "h.example:1"])
    done = subprocess.run([sys.executable, "-m", "wgpy", "server", "run", "--web", "--dir", d],
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == "wgpy server: no web password yet: set one with `wgpy client passwd`\n"


def test_the_registry_commands_need_no_web_libraries() -> None:
    """Without the `wgpy[server]` extra only --qr and --web are missing."""
    code = ("import sys; from wgpy.server import cli, runner; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'segno', 'jinja2') "
            "if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=True)  # fmt: skip
    assert done.stdout == "[]\n"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_verify_accepts_the_server_unit(tmp_path: Path) -> None:
    shim = tmp_path / "wgpy"  # systemd's own PATH may not hold this checkout's wgpy
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m wgpy "$@"\n')
    shim.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=wgpy server run --web\n" in text
    unit = tmp_path / "wgpy-server.service"
    unit.write_text(text.replace("ExecStart=wgpy ", f"ExecStart={shim} "))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0 and "wgpy-server" not in done.stdout + done.stderr, done.stderr


def test_a_web_port_in_use_stops_the_server_before_it_starts_anything(tmp_path: Path) -> None:
    d = str(tmp_path)
    main(["server", "init", "--dir", d, "--endpoint", "h.example:1", "--interface", "wgnever"])
    SqliteRegistry(d).set_password_hash(auth.hash_password("a good password"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        web = f"127.0.0.1:{busy.getsockname()[1]}"
        done = subprocess.run([sys.executable, "-m", "wgpy", "server", "run", "--web", web,
                               "--dir", d], capture_output=True, text=True, timeout=30,
                              check=False)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == f"wgpy server: cannot listen on {web}: Address already in use\n"


def test_server_set_changes_what_new_files_say(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = str(tmp_path)
    wgpy(capsys, "server", "init", "--dir", d, "--endpoint", "old.example:51820")
    old = wgpy(capsys, "client", "add", "a", "--dir", d)[1]
    code, out, _ = wgpy(capsys, "server", "set", "--dir", d, "--endpoint", "new.example:443",
                        "--dns", "1.1.1.1,2606:4700:4700::1111")  # fmt: skip
    assert code == 0 and "endpoint new.example:443, port 51820" in out
    new = wgpy(capsys, "client", "show", "a", "--dir", d)[1]
    assert "Endpoint = old.example:51820" in old and "DNS" not in old
    assert "Endpoint = new.example:443" in new and "DNS = 1.1.1.1" in new
    assert SqliteRegistry(d).settings().dns == ("1.1.1.1", "2606:4700:4700::1111")
    assert wgpy(capsys, "server", "set", "--dir", d, "--port", "4500")[0] == 0
    assert SqliteRegistry(d).settings().listen_port == 4500
    bad_values = [(["--port", "70000"], "bad port 70000"), (["--endpoint", "x"], "bad endpoint"),
                  (["--dns", "x"], "bad DNS")]  # fmt: skip
    for bad, words in bad_values:
        code, _, err = wgpy(capsys, "server", "set", "--dir", d, *bad)
        assert code == 1 and words in err
    assert SqliteRegistry(d).settings().listen_port == 4500
