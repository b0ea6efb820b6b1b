"""`wgpy run` and `wgpy proxy` as an ordinary user (nobody), and as root, against wgpy and
wireguard-go peers; the clear errors; nothing left behind."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.rootless_bed import (
    NAME,
    NOBODY,
    PAGE,
    PEER_INNER,
    PEER_INNER6,
    SRC,
    Bed,
    connect_domain,
    connect_ipv4,
    free_port,
    socks_connect,
)
from wgpy.rootless import userns

CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}


@pytest.fixture(params=["wgpy", "wireguard-go"])
def bed(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Bed]:
    b = Bed("r" + request.param[0], request.param, workdir)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def wgpy_bed(workdir: Path) -> Iterator[Bed]:
    b = Bed("x", "wgpy", workdir)
    try:
        yield b
    finally:
        b.close()


def as_nobody(bed: Bed, upy: Path, *args: str) -> list[str]:
    """argv: in the caller's namespace, as nobody, `python -m wgpy ARGS`."""
    return bed.caller.argv([*NOBODY, str(upy), "-m", "wgpy", *args])


def run(
    argv: list[str], workdir: Path, timeout: float = 40, **kw: object
) -> subprocess.CompletedProcess[str]:
    env = {**CLEAN_ENV, "HOME": str(workdir), **kw.pop("env", {})}  # type: ignore[dict-item]
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=workdir,
        check=False,
        **kw,
    )  # type: ignore[call-overload, no-any-return]


def test_nobody_pings_fetches_and_resolves_through_the_tunnel(
    bed: Bed, upy: Path, workdir: Path
) -> None:
    before = bed.snapshot()
    fetch = (
        f"import urllib.request, socket; print(socket.gethostbyname('{NAME}')); "
        f"print(urllib.request.urlopen('http://{NAME}:8000/', timeout=10).read().decode())"
    )
    script = (
        f"id -u; ping -c 1 -W 5 {PEER_INNER} >/dev/null && echo pinged; "
        f"ping -6 -c 1 -W 5 {PEER_INNER6} >/dev/null && echo pinged6; "
        f'getent ahostsv4 {NAME} | head -1; {upy} -c "{fetch}"; exit 42'
    )
    done = run(as_nobody(bed, upy, "run", "-c", str(bed.config), "--", "sh", "-c", script), workdir)
    assert done.returncode == 42, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "65534"  # the command runs as the caller, not as root
    assert "pinged" in lines and "pinged6" in lines
    assert any(line.startswith(PEER_INNER) for line in lines[3:5])  # getent, via the tunnel
    assert PAGE.strip() in done.stdout
    assert bed.snapshot() == before


def test_root_runs_it_too_without_a_user_namespace(wgpy_bed: Bed, workdir: Path) -> None:
    bed = wgpy_bed
    before = bed.snapshot()
    argv = bed.caller.argv(
        [
            sys.executable,
            "-m",
            "wgpy",
            "run",
            "-c",
            str(bed.config),
            "--",
            "sh",
            "-c",
            f"ping -c 1 -W 5 {PEER_INNER} >/dev/null; echo $?; id -u",
        ]
    )
    done = run(argv, workdir, env={"PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "0"]
    assert bed.snapshot() == before


def test_signals_are_forwarded_and_nothing_stays(wgpy_bed: Bed, upy: Path, workdir: Path) -> None:
    bed = wgpy_bed
    before = bed.snapshot()
    argv = as_nobody(
        bed,
        upy,
        "run",
        "-c",
        str(bed.config),
        "--",
        "sh",
        "-c",
        "trap 'echo got-term; exit 7' TERM; echo started; while :; do sleep 0.1; done",
    )
    env = {**CLEAN_ENV, "HOME": str(workdir)}
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        os.kill(proc.pid, signal.SIGTERM)  # ip netns exec and setpriv exec: wgpy has its pid
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert "got-term" in out, err
    assert proc.returncode == 7
    assert bed.snapshot() == before


def test_the_command_dies_with_a_killed_wgpy(wgpy_bed: Bed, upy: Path, workdir: Path) -> None:
    bed = wgpy_bed
    argv = as_nobody(bed, upy, "run", "-c", str(bed.config), "--", "sh", "-c",
                     "echo started; exec sleep 62")  # fmt: skip
    env = {**CLEAN_ENV, "HOME": str(workdir)}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env, cwd=workdir)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        proc.kill()  # wgpy itself: no chance to clean up
        proc.wait(5)
        readable, _, _ = select.select([proc.stdout], [], [], 5)
        assert readable and proc.stdout.read() == ""  # EOF: the command holding it is gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    deadline = time.monotonic() + 5
    while subprocess.run(["pgrep", "-u", "65534", "-f", "^sleep 62$"], capture_output=True,
                         check=False).returncode == 0:  # fmt: skip
        assert time.monotonic() < deadline, "the command outlived wgpy"
        time.sleep(0.05)


def test_what_the_command_leaves_running_is_ended(wgpy_bed: Bed, upy: Path, workdir: Path) -> None:
    script = "sleep 60 & echo $!; setsid sleep 61 & exit 3"
    done = run(
        as_nobody(wgpy_bed, upy, "run", "-c", str(wgpy_bed.config), "--", "sh", "-c", script),
        workdir,
    )
    assert done.returncode == 3, done.stderr
    pid = int(done.stdout.split()[0])
    assert (
        not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )
    sleepers = subprocess.run(
        ["pgrep", "-u", "65534", "-f", "^sleep 6[01]$"], capture_output=True, text=True, check=False
    ).stdout
    assert sleepers == ""


def test_no_command_runs_the_shell(wgpy_bed: Bed, upy: Path, workdir: Path) -> None:
    done = run(
        as_nobody(wgpy_bed, upy, "run", "-c", str(wgpy_bed.config)),
        workdir,
        input=f"ping -c 1 -W 5 {PEER_INNER} >/dev/null && exit 5\nexit 1\n",
        env={"SHELL": "/bin/sh"},
    )
    assert done.returncode == 5, done.stderr


def test_a_bad_config_is_named_by_file_line_and_key(
    wgpy_bed: Bed, upy: Path, workdir: Path
) -> None:
    bad = workdir / "bad.conf"
    bad.write_text(wgpy_bed.client_config().replace(":51820", ""))
    bad.chmod(0o644)
    before = wgpy_bed.snapshot()
    done = run(as_nobody(wgpy_bed, upy, "run", "-c", str(bad), "--", "true"), workdir)
    assert done.returncode == 1
    assert f"{bad}:8: Endpoint:" in done.stderr
    bad.write_text(wgpy_bed.client_config().replace("10.231.0.2:", "nowhere.invalid:"))
    done = run(as_nobody(wgpy_bed, upy, "run", "-c", str(bad), "--", "true"), workdir)
    assert done.returncode == 1
    assert f"{bad}:8: Endpoint: cannot resolve `nowhere.invalid'" in done.stderr, done.stderr
    assert wgpy_bed.snapshot() == before


def _in_user_namespace_with_root(argv: list[str]) -> list[str]:
    """argv run inside a fresh user namespace where we are root over uids 0-65535: there
    user.max_user_namespaces is that namespace's own, so setting it changes nothing else."""
    helper = (
        "import os, sys\n"
        "from wgpy.rootless import userns\n"
        "r, w = os.pipe(); r2, w2 = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    userns.unshare(userns.CLONE_NEWUSER); os.write(w2, b'x'); os.read(r, 1)\n"
        "    os.execvp(sys.argv[1], sys.argv[1:])\n"
        "os.read(r2, 1)\n"
        "for f in ('uid_map', 'gid_map'):\n"
        "    open(f'/proc/{pid}/{f}', 'w').write('0 0 65536')\n"
        "os.write(w, b'x')\n"
        "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )
    return [sys.executable, "-c", helper, *argv]


def test_user_namespaces_disabled_gives_the_clear_message(
    wgpy_bed: Bed, upy: Path, workdir: Path
) -> None:
    bed = wgpy_bed
    before = bed.snapshot()
    nobody_run = [*NOBODY, str(upy), "-m", "wgpy", "run", "-c", str(bed.config), "--", "true"]
    sysctl = "/proc/sys/user/max_user_namespaces"
    old = Path(sysctl).read_text().strip()
    try:  # where this process may set it, set it (and restore it); else in a namespace
        Path(sysctl).write_text("0")
        argv = bed.caller.argv(nobody_run)
    except OSError:
        script = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"'
        argv = bed.caller.argv(
            _in_user_namespace_with_root(["sh", "-c", script, "sh", *nobody_run])
        )
    try:
        done = run(argv, workdir, env={"PYTHONPATH": str(SRC)})
    finally:
        if Path(sysctl).read_text().strip() != old:
            Path(sysctl).write_text(old)
    assert done.returncode == 1
    assert "user namespace" in done.stderr
    assert "user.max_user_namespaces = 0" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert bed.snapshot() == before


def test_sysctl_report_names_only_what_exists() -> None:
    report = userns.sysctl_report()
    for name, _ in userns.USERNS_SYSCTLS:
        exists = os.path.exists("/proc/sys/" + name.replace(".", "/"))
        assert (name in report) == exists


# ---- the proxy ----------------------------------------------------------------------


@pytest.fixture
def proxy(bed: Bed, upy: Path, workdir: Path) -> Iterator[tuple[Bed, int, int]]:
    socks_port, http_port = free_port(bed.caller.name), free_port(bed.caller.name)
    argv = as_nobody(
        bed,
        upy,
        "proxy",
        "-c",
        str(bed.config),
        "--socks",
        f"127.0.0.1:{socks_port}",
        "--http",
        f"127.0.0.1:{http_port}",
    )
    proc = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
        env={**CLEAN_ENV, "HOME": str(workdir)},
    )
    try:
        assert proc.stderr is not None
        for _ in range(2):
            line = proc.stderr.readline()
            assert "proxy on 127.0.0.1:" in line, line + proc.stderr.read()
        yield bed, socks_port, http_port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def test_socks5_fetches_a_page_behind_the_peer_by_name(proxy: tuple[Bed, int, int]) -> None:
    bed, port, _ = proxy
    s, head = socks_connect(bed.caller.name, port, connect_domain(NAME, 8000))
    with s:
        assert head == b"\x05\x00\x00\x01"
        s.sendall(f"GET / HTTP/1.0\r\nHost: {NAME}\r\n\r\n".encode())
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    assert body.startswith(b"HTTP/1.0 200") and body.endswith(PAGE.encode())


def test_socks5_errors_are_the_rfcs(proxy: tuple[Bed, int, int]) -> None:
    bed, port, _ = proxy
    ns = bed.caller.name
    cases = [
        (connect_ipv4(PEER_INNER, 8000, cmd=2), 0x07),  # BIND: command not supported
        (b"\x05\x01\x00\x05" + bytes(6), 0x08),  # address type 5: not supported
        (connect_ipv4(PEER_INNER, 8009), 0x05),  # nothing listens: connection refused
        (connect_domain("nowhere.test", 80), 0x04),  # NXDOMAIN: host unreachable
        (b"\x04\x01\x00\x01" + bytes(6), 0x01),  # a request that is not SOCKS5
    ]
    for request, code in cases:
        s, head = socks_connect(ns, port, request)
        with s:
            assert head[:2] == bytes([5, code]), (request, head)
    s, choice = socks_connect(ns, port, b"", methods=b"\x02")  # only user/password offered
    with s:
        assert choice == b"\x05\xff"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_through_socks5_hostname_and_http_connect(proxy: tuple[Bed, int, int]) -> None:
    bed, socks_port, http_port = proxy
    for how in (
        ["--socks5-hostname", f"127.0.0.1:{socks_port}"],
        ["-p", "-x", f"http://127.0.0.1:{http_port}"],
    ):
        out = bed.caller.run("curl", "-sS", "--max-time", "15", *how, f"http://{NAME}:8000/")
        assert out == PAGE


def test_library_asyncio_program(wgpy_bed: Bed, workdir: Path) -> None:
    """An asyncio program opens an interface, sees the handshake complete, moves data
    over TCP through the tunnel, and closes; the interface is gone after."""
    bed = wgpy_bed
    program = f"""
import asyncio, wgpy

async def main():
    config = wgpy.Config.from_file({str(bed.config)!r})
    async with wgpy.Interface(config, name="wglib0") as iface:
        events = iface.events(replay=True)
        reader, writer = await asyncio.wait_for(asyncio.open_connection({PEER_INNER!r}, 8000), 10)
        async with asyncio.timeout(10):
            async for event in events:
                if event.kind is wgpy.EventKind.HANDSHAKE_COMPLETED:
                    break
        writer.write(b"GET / HTTP/1.0\\r\\n\\r\\n")
        body = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        peer = iface.peers()[0]
        print(body.decode().endswith({PAGE!r}), peer.rx_bytes > 0, peer.tx_bytes > 0,
              event.peer == peer.public_key)

asyncio.run(main())
"""
    before = bed.snapshot()
    done = run(
        bed.caller.argv([sys.executable, "-c", program]), workdir, env={"PYTHONPATH": str(SRC)}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"] * 4
    assert bed.snapshot() == before  # the TUN, its addresses and routes went with it


def test_library_run_and_proxy_from_code(wgpy_bed: Bed, workdir: Path) -> None:
    bed = wgpy_bed
    program = f"""
import socket, wgpy
config = wgpy.Config.from_file({str(bed.config)!r})
status = wgpy.run(config, ["ping", "-c", "1", "-W", "5", {PEER_INNER!r}], stdout=-3)
with wgpy.Proxy(config, socks="127.0.0.1:0") as proxy:
    s = socket.create_connection(proxy.socks_address, timeout=10)
    s.sendall(b"\\x05\\x01\\x00")
    assert s.recv(2) == b"\\x05\\x00"
    to = socket.inet_aton({PEER_INNER!r}) + (8000).to_bytes(2, "big")
    s.sendall(b"\\x05\\x01\\x00\\x01" + to)
    print(status, s.recv(4)[1])
"""
    done = run(
        bed.caller.argv([sys.executable, "-c", program]), workdir, env={"PYTHONPATH": str(SRC)}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "0"]


def test_library_proxy_takes_what_the_command_line_takes(wgpy_bed: Bed, workdir: Path) -> None:
    """wgpy.Proxy with `wgpy proxy`'s other services and limits: a TCP forward, a UDP
    forward, the health endpoint with CheckAlive, the client cap and the idle timeout. Its
    sockets are opened by the caller, so port 0 works and their addresses are known."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in NAME.split("."))
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\0\0\x01\0\x01"
    program = f"""
import socket, time, urllib.error, urllib.request, wgpy
config = wgpy.Config.from_file({str(wgpy_bed.config)!r})
with wgpy.Proxy(config, socks=None, forward=["127.0.0.1:0={PEER_INNER}:8000"],
                udp_forward=["127.0.0.1:0={PEER_INNER}:53"], info="127.0.0.1:0",
                check_alive=[{PEER_INNER!r}], check_alive_interval=1, max_clients=4,
                idle_timeout=30) as proxy:
    s = socket.create_connection(proxy.forward_addresses[0], timeout=10)
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    page = b""
    while chunk := s.recv(4096):
        page += chunk
    print(page.endswith({PAGE.encode()!r}))
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(10)
    u.sendto({query!r}, proxy.udp_forward_addresses[0])
    print(socket.inet_ntoa(u.recv(512)[-4:]))
    url = "http://%s:%d/readyz" % proxy.info_address
    for _ in range(100):
        try:
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            break
        except urllib.error.HTTPError:  # 503 until the first pong
            time.sleep(0.1)
    print(body.replace(" ", ""))
    metrics = urllib.request.urlopen(url.replace("readyz", "metrics"), timeout=5).read()
    print(b"wgpy_proxy_clients" in metrics)
"""
    done = run(
        wgpy_bed.caller.argv([sys.executable, "-c", program]), workdir,
        env={"PYTHONPATH": str(SRC)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert lines[:2] == ["True", PEER_INNER] and lines[3] == "True", done.stdout
    assert lines[2].startswith(f'{{"{PEER_INNER}":') and not lines[2].endswith(":0}"), lines


# Run by wgpy.run as the command: every descriptor it has, and whether any reads the key.
LIST_FDS = """
import os, sys
key = sys.argv[1].encode()
for fd in sorted(int(n) for n in os.listdir("/proc/self/fd")):
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        continue  # listdir's own, closed by now
    try:
        data = os.pread(fd, 65536, 0)
    except OSError:
        data = b""
    print(fd, where, "KEY" if key in data else "-")
"""


def test_the_command_gets_no_descriptor_of_the_config(wgpy_bed: Bed, workdir: Path) -> None:
    """wgpy.run hands the config (private key included) to `wgpy run` in a memfd: closed
    there once read, so the command cannot read the key from it (nor the caller's other
    children: it is close-on-exec here)."""
    bed = wgpy_bed
    key = next(line.split("=", 1)[1].strip() for line in bed.config.read_text().splitlines()
               if line.startswith("PrivateKey"))  # fmt: skip
    program = f"""
import subprocess, sys, wgpy
config = wgpy.Config.from_file({str(bed.config)!r})
sys.exit(wgpy.run(config, [sys.executable, "-c", {LIST_FDS!r}, {key!r}]))
"""
    done = run(
        bed.caller.argv([sys.executable, "-c", program]), workdir, env={"PYTHONPATH": str(SRC)}
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()  # "FD WHERE KEY-or--"
    assert [line.split(" ")[0] for line in lines][:3] == ["0", "1", "2"], done.stdout
    assert not [line for line in lines if "wgpy-config" in line or line.endswith("KEY")], lines


COUNT_SIGINTS = """
import signal, sys, time
n = 0
def count(*_):
    global n
    n += 1
signal.signal(signal.SIGINT, count)
print("ready", flush=True)
time.sleep(2)
sys.exit(10 + n)
"""


def _on_a_terminal(argv: list[str], then: Callable[[int, int], None]) -> tuple[int, str]:
    """Run argv on a new pty with LOG_LEVEL=verbose; once it prints "ready", call
    then(pid, pty); (exit status, everything printed)."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.environ.update(PYTHONPATH=str(SRC), LOG_LEVEL="verbose")
        os.execvp(argv[0], argv)
    out, sent, status = b"", False, None
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    data = os.read(fd, 1024)
                except OSError:  # EIO: the terminal's other side closed
                    break
                if not data:
                    break
                out += data
            if b"ready" in out and not sent:
                then(pid, fd)
                sent = True
        if time.monotonic() < deadline:
            _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
        if status is None:  # still running after the deadline
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert sent and status is not None, out
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_ctrl_c_reaches_the_command_once_and_kill_is_forwarded(wgpy_bed: Bed) -> None:
    """The terminal sends SIGINT to its whole foreground group, wgpy included: wgpy must
    not send that one again. A SIGINT from elsewhere (kill) it forwards."""
    bed = wgpy_bed
    argv = bed.caller.argv([sys.executable, "-m", "wgpy", "run", "-c", str(bed.config), "--",
                            sys.executable, "-c", COUNT_SIGINTS])  # fmt: skip
    status, out = _on_a_terminal(argv, lambda pid, fd: os.write(fd, b"\x03"))  # Ctrl-C
    assert status == 11, out  # one SIGINT, and the command's status back
    assert "SIGINT from the terminal" in out and "forwarding SIGINT" not in out
    status, out = _on_a_terminal(argv, lambda pid, fd: os.kill(pid, signal.SIGINT))
    assert status == 11, out
    assert "forwarding SIGINT to the command" in out
