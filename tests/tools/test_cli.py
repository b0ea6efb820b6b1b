"""The `wgpy` command line: argparse on every command, `--help` everywhere, status 2 on a
usage error (the commands that need root are run in tests/integration)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from wgpy import cli
from wgpy.core.crypto import decode_key

# run and proxy parse their own arguments (rootless/session.py)
OURS = sorted(set(cli.COMMANDS) - {"run", "proxy"})


@pytest.mark.parametrize("command", OURS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: wgpy {command}")


@pytest.mark.parametrize("command", OURS)
def test_an_unknown_option_is_a_usage_error(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    needs_config = command in ("up", "down", "strip", "save")
    assert cli.main([command, *(["x.conf"] if needs_config else []), "--no-such-option"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: wgpy {command}") and "--no-such-option" in err


@pytest.mark.parametrize(
    "argv",
    [["up"], ["down", "a", "b"], ["show", "a", "b", "--json"], ["up", "x.conf", "--metrics"],
     ["genkey", "extra"], ["-f"], ["wg0", "--keylog"], ["wg0", "wg1"], ["--met=1", "wg0"]],
)  # fmt: skip
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage: wgpy" in capsys.readouterr().err


def test_the_overview_and_the_daemons_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "wgpy COMMAND --help" in capsys.readouterr().out
    assert cli.main([]) == 2
    capsys.readouterr()
    assert cli.main(["-f", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: wgpy [-f] IFNAME") and "--metrics" in out


def test_keys(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.main(["genkey"]) == 0
    private = capsys.readouterr().out.strip()
    assert len(decode_key(private)) == 32
    monkeypatch.setattr("sys.stdin", io.StringIO(private + "\n"))
    assert cli.main(["pubkey"]) == 0
    assert len(decode_key(capsys.readouterr().out.strip())) == 32


def test_strip_prints_what_wg_setconf_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "wgx.conf"
    conf.write_text("[Interface]\nAddress = 10.0.0.1/24\nListenPort = 7\n")
    conf.chmod(0o600)
    assert cli.main(["strip", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "ListenPort = 7" in out and "Address" not in out
