"""`wgpy server` for real: the server in a namespace, NAT to an "internet" namespace, a
client added through the command line (wireguard-go, set up by `wgpy up`) and one through
the web API (`wgpy run` as nobody, with the config from a one-time link), pings and HTTP
through the server, disable/remove/expiry cutting a client off, a restart keeping every
client, and the page in Debian's chromium (QR code read back with zbar, screenshots).

            10.201.N.0/24                      10.202.0.0/24
 client N  --------------  server (wgsvPID)  ----------------  internet (HTTP :8000)
 (wca/wcd: wireguard-go;     10.8.0.1, NAT      no route back to 10.8.0.0/24: only
  bob: wgpy run)                                masquerading lets replies through
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import eventually
from tests.integration.netns import inside
from tests.integration.rootless_bed import NOBODY, unprivileged_python
from tests.server.webclient import PASSWORD, Browser
from wgpy.core.crypto import public_key
from wgpy.demo.testbed import Namespace, veth
from wgpy.io.uapi_path import socket_path
from wgpy.tools import uapi_client
from wgpy.tools.config import Config

pytest.importorskip("fastapi")

PID = os.getpid() % 10000
WGPY = [sys.executable, "-m", "wgpy"]
INTERNET, INTERNET6 = "10.202.0.2", "fd99::2"
WEB = "127.0.0.1:51821"


class World:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dir = workdir / "registry"
        self.ifname = f"wgsv{PID}"
        self.namespaces: list[Namespace] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients: dict[str, Namespace] = {}
        self.logs = 0
        self.server = self._ns("s")
        self.net = self._ns("i")
        veth(self.server, self.net, f"svi{PID}", f"ins{PID}")
        self.server.add_address(f"svi{PID}", "10.202.0.1/24")
        self.net.add_address(f"ins{PID}", f"{INTERNET}/24")
        self.server.add_address(f"svi{PID}", "fd99::1/64")
        self.net.add_address(f"ins{PID}", f"{INTERNET6}/64")
        (workdir / "www").mkdir()
        (workdir / "www" / "index.html").write_text("hello from the internet\n")
        self.http = self.net.popen("python3", "-m", "http.server", "--bind", INTERNET,
                                   "--directory", str(workdir / "www"), "8000",
                                   stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        self.client_ns(1)  # the endpoint, 10.201.1.1, lives on its veth
        self.cli("server", "init", "--endpoint", "10.201.1.1:51820", "--interface",
                 self.ifname, "--subnet", "10.8.0.0/24,fd42:42::/64")  # fmt: skip
        self.cli("client", "passwd", input=PASSWORD + "\n")

    def _ns(self, tag: str) -> Namespace:
        ns = Namespace(f"wgpysv-{PID}-{tag}")
        self.namespaces.append(ns)
        return ns

    def client_ns(self, n: int) -> Namespace:
        """Namespace cN, joined to the server by veth on 10.201.N.0/24, routed through it."""
        ns = self._ns(f"c{n}")
        veth(self.server, ns, f"svc{n}-{PID}", f"cl{n}-{PID}")
        self.server.add_address(f"svc{n}-{PID}", f"10.201.{n}.1/24")
        ns.add_address(f"cl{n}-{PID}", f"10.201.{n}.2/24")
        ns.run("ip", "route", "add", "default", "via", f"10.201.{n}.1")
        return ns

    def cli(self, *args: str, input: str | None = None, check: bool = True) -> str:
        done = subprocess.run([*WGPY, *args, "--dir", str(self.dir)], input=input,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"wgpy {' '.join(args)}: {done.stderr}")
        return done.stdout + done.stderr

    def start(self) -> None:
        self.logs += 1
        with open(self.log_path(), "wb") as log:
            proc = self.server.popen(*WGPY, "server", "run", "--dir", str(self.dir),
                                     "--web", WEB, "--allowed-host", "vpn.test",
                                     stdout=log, stderr=log)  # fmt: skip
        self.proc = proc
        eventually(lambda: b" up, listening" in self.log_path().read_bytes()
                   or proc.poll() is not None, 15, "the server")  # fmt: skip
        assert proc.poll() is None, self.log()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        self.proc = None
        return code

    def log_path(self) -> Path:
        return self.workdir / f"server-{self.logs}.log"

    def log(self) -> str:
        return self.log_path().read_text(errors="replace")

    def peers(self) -> dict[bytes, uapi_client.PeerStatus]:
        return {p.public_key: p for p in uapi_client.get(self.ifname).peers}

    def wait_for_peer(self, config: str) -> None:
        """Until the server carries the client: a first handshake that arrives before it
        does is retried only after 5 s (REKEY_TIMEOUT)."""
        private = Config.from_text(config).interface.private_key
        assert private is not None
        key = public_key(private)
        eventually(lambda: key in self.peers(), 5, "the server to add the client")

    def browser(self) -> Browser:
        b = Browser(f"http://{WEB}")
        with inside(self.server):
            eventually(lambda: b.login() == 200, 10, "the web page")
        return b

    def up_wireguard_go(self, n: int, name: str, config: str) -> Namespace:
        """Client `name` in namespace cN: wireguard-go, set up by `wgpy up` as wg-quick."""
        ns = self.clients[name] = self.client_ns(n) if n != 1 else self.namespaces[2]
        self.wait_for_peer(config)
        path = self.workdir / f"wc{name[0]}{PID}.conf"
        path.write_text(config)
        path.chmod(0o600)
        ns.run("env", "WGPY_USERSPACE_IMPLEMENTATION=wireguard-go", *WGPY, "up", str(path))
        return ns

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.stop()  # SIGTERM: the server undoes what it made
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.kill()
        self.http.wait()
        for ns in self.namespaces:
            ns.close()
        # daemons killed with their namespace leave their sockets (one folder for all)
        for name in [self.ifname, *(f"wc{n[0]}{PID}" for n in self.clients)]:
            with contextlib.suppress(OSError):
                socket_path(name).unlink()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    workdir = Path(tempfile.mkdtemp(prefix="wgpy-server-", dir="/tmp"))
    workdir.chmod(0o755)
    w = None
    try:
        w = World(workdir)
        w.start()
        yield w
    finally:
        if w is not None:
            w.close()
        shutil.rmtree(workdir, ignore_errors=True)


def ping(ns: Namespace, target: str, count: int = 1, interval: str = "0.2",
         timeout: float = 3) -> bool:  # fmt: skip
    done = subprocess.run(ns.argv(["ping", "-n", "-q", "-c", str(count), "-i", interval,
                                   "-W", "1", target]),
                          capture_output=True, timeout=timeout + count, check=False)  # fmt: skip
    return done.returncode == 0


def test_a_cli_client_on_wireguard_go_reaches_the_server_and_the_internet(world: World) -> None:
    config = world.cli("client", "add", "alice")
    assert "PrivateKey = " in config and "Endpoint = 10.201.1.1:51820" in config
    c1 = world.up_wireguard_go(1, "alice", config)
    eventually(lambda: ping(c1, "10.8.0.1"), 10, "ping to the server")
    assert ping(c1, "fd42:42::1")
    assert ping(c1, INTERNET)  # only NAT lets the reply find its way back
    assert ping(c1, INTERNET6)  # ... in IPv6 too (the internet has no route to fd42:42::/64)
    page = c1.run("curl", "-sS", "-m", "5", f"http://{INTERNET}:8000/")
    assert page == "hello from the internet\n"
    listing = world.cli("client", "list")
    assert "alice" in listing and "online" in listing.split("alice", 1)[1].split("\n")[0]


def test_the_page_answers_its_own_names_only(world: World) -> None:
    """`--allowed-host vpn.test`: that name, the addresses and localhost reach the page;
    any other name (a rebound one) gets 421."""
    for host, status in (("vpn.test", 200), ("localhost:51821", 200), (WEB, 200),
                         ("evil.example:51821", 421)):  # fmt: skip
        b = Browser(f"http://{WEB}")
        b.headers["Host"] = host
        with inside(world.server):
            assert b.login() == status, host


def test_a_web_client_runs_as_nobody_with_the_downloaded_config(world: World) -> None:
    b = world.browser()
    with inside(world.server):
        bob = b.json("POST", "/api/clients", {"name": "bob"}, 201)
        link = b.json("POST", f"/api/clients/{bob['id']}/link", expect=201)
        status, _, config = Browser(f"http://{WEB}").call("POST", link["url"])
    assert status == 200
    world.wait_for_peer(config.decode())
    path = world.workdir / "bob.conf"
    path.write_bytes(config)
    path.chmod(0o644)  # nobody reads it
    upy = unprivileged_python(world.workdir)
    c2 = world.clients["bob"] = world.client_ns(2)
    fetch = f"import urllib.request; print(urllib.request.urlopen('http://{INTERNET}:8000/', " \
            "timeout=10).read().decode(), end='')"
    done = subprocess.run(c2.argv([*NOBODY, str(upy), "-m", "wgpy", "run", "-c", str(path),
                                   "--", str(upy), "-c", fetch]),
                          capture_output=True, text=True, timeout=60, cwd=world.workdir,
                          env={"PATH": os.environ["PATH"], "HOME": str(world.workdir)},
                          check=False)  # fmt: skip
    assert done.stdout == "hello from the internet\n", done.stderr
    with inside(world.server):
        seen = b.json("GET", f"/api/clients/{bob['id']}")
    assert seen["online"] and seen["rx_bytes"] > 0 and seen["tx_bytes"] > 0


def test_changes_lose_no_packet_of_other_clients_and_disable_cuts_off(world: World) -> None:
    c1 = world.clients["alice"]
    assert ping(c1, "10.8.0.1")
    flood = subprocess.Popen(c1.argv(["ping", "-n", "-q", "-c", "60", "-i", "0.05", "10.8.0.1"]),
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for name in ("carol", "erin"):
            world.cli("client", "add", name)
        world.cli("client", "disable", "carol")
        world.cli("client", "remove", "erin")
        eventually(lambda: len(world.peers()) == 2, 5, "two peers left")  # alice, bob
        out, _ = flood.communicate(timeout=15)
    finally:
        flood.kill()
    assert " 0% packet loss" in out, out

    alice = world.cli("client", "show", "alice")
    world.cli("client", "disable", "alice")
    t0 = time.monotonic()
    eventually(lambda: len(world.peers()) == 1, 5, "alice off the device")
    assert time.monotonic() - t0 < 2  # the server looks every half second
    assert not ping(c1, "10.8.0.1")
    assert "disabled" in world.cli("client", "list")
    world.cli("client", "enable", "alice")
    eventually(lambda: len(world.peers()) == 2, 5, "alice back")
    assert world.cli("client", "show", "alice") == alice  # same keys, same addresses
    world.cli("client", "remove", "bob")
    eventually(lambda: len(world.peers()) == 1, 5, "bob removed")


def test_expiry_cuts_a_client_off(world: World) -> None:
    expires = (datetime.now(UTC) + timedelta(seconds=8)).isoformat(timespec="seconds")
    config = world.cli("client", "add", "dave", "--expires", expires)
    c3 = world.up_wireguard_go(3, "dave", config)
    eventually(lambda: ping(c3, "10.8.0.1"), 5, "dave online")
    eventually(lambda: not ping(c3, "10.8.0.1", timeout=1), 10, "dave expired")
    assert "expired" in world.cli("client", "list")
    assert datetime.now(UTC) >= datetime.fromisoformat(expires)


def test_a_damaged_registry_row_takes_neither_the_server_nor_other_clients_down(
    world: World,
) -> None:
    # a row this program cannot read (a hand edit, a newer wgpy's value): the sync must
    # go on failing loudly, not end the server and with it every client's tunnel
    c1 = world.clients["alice"]  # re-enabled above: her next handshake brings her back
    eventually(lambda: ping(c1, INTERNET, timeout=1), 25, "alice through the server")
    world.cli("client", "add", "gus")
    eventually(lambda: len(world.peers()) == 2, 5, "gus on the device")  # and alice
    with contextlib.closing(sqlite3.connect(world.dir / "wgpy.db")) as db, db:
        db.execute("UPDATE clients SET addresses = 'garbage' WHERE name = 'gus'")
        db.execute("UPDATE settings SET revision = revision + 1")
    time.sleep(1.5)  # three looks at the registry
    assert world.proc is not None and world.proc.poll() is None, world.log()
    assert len(world.peers()) == 2 and ping(c1, INTERNET)
    assert "damaged" in world.cli("client", "list", check=False)
    world.cli("client", "remove", "gus")  # the way out the error names
    eventually(lambda: len(world.peers()) == 1, 5, "gus off the device")
    assert "damaged" in world.log()


def test_a_restart_keeps_every_client_and_undoes_its_changes(world: World) -> None:
    before = world.cli("client", "list")
    keys = set(world.peers())
    assert world.stop() == 0
    assert not world.server.has_link(world.ifname)
    assert "wgpy-server" not in world.server.run("nft", "list", "tables")
    world.start()
    assert set(world.peers()) == keys
    assert world.cli("client", "list").split("\n")[1:] and "alice" in before
    c1 = world.clients["alice"]
    path = world.workdir / f"wca{PID}.conf"  # the client restarts too: the server's
    c1.run(*WGPY, "down", str(path))  # sessions went with its process
    c1.run("env", "WGPY_USERSPACE_IMPLEMENTATION=wireguard-go", *WGPY, "up", str(path))
    eventually(lambda: ping(c1, INTERNET), 10, "alice through the restarted server")


def chromium() -> tuple[str, str] | None:
    for browser in ("chromium", "chromium-browser"):
        if shutil.which(browser) and shutil.which("chromedriver"):
            return str(shutil.which(browser)), str(shutil.which("chromedriver"))
    return None


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium and chromium-driver")
@pytest.mark.skipif(shutil.which("zbarimg") is None, reason="needs zbarimg (zbar-tools)")
def test_the_page_in_a_real_browser(world: World) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("WGPY_SCREENSHOTS", world.workdir))
    driver = _open_chromium(world, webdriver)
    try:
        with inside(world.server):
            wait = WebDriverWait(driver, 15)
            driver.get(f"http://{WEB}/")
            wait.until(lambda d: d.find_element(By.ID, "password").is_displayed())
            driver.find_element(By.ID, "password").send_keys(PASSWORD)
            driver.find_element(By.CSS_SELECTOR, "#login button").click()
            wait.until(lambda d: d.find_element(By.ID, "new-name").is_displayed())
            driver.find_element(By.ID, "new-name").send_keys("frank")
            driver.find_element(By.CSS_SELECTOR, "#add button").click()
            card = wait.until(lambda d: _card(d, "frank"))
            card.find_element(By.CLASS_NAME, "show-qr").click()
            qr = card.find_element(By.CLASS_NAME, "qr")
            wait.until(lambda d: qr.is_displayed() and d.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth > 0", qr))
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", qr)
            png = qr.screenshot_as_png
        (world.workdir / "qr.png").write_bytes(png)
        config = world.cli("client", "show", "frank")
        decoded = subprocess.run(["zbarimg", "--raw", "-q", "-"], input=png,
                                 capture_output=True, timeout=20, check=True).stdout  # fmt: skip
        assert decoded.decode().rstrip("\n") == config.rstrip("\n")

        c4 = world.up_wireguard_go(4, "frank", config)
        traffic = subprocess.Popen(c4.argv(["ping", "-q", "-c", "80", "-i", "0.1", "-s", "1200",
                                            INTERNET]), stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            with inside(world.server):
                wait.until(lambda d: "online" in _card(d, "frank").find_element(
                    By.CLASS_NAME, "dot").get_attribute("class"))
                first = _rx(_card(driver, "frank"))
                WebDriverWait(driver, 10).until(lambda d: _rx(_card(d, "frank")) > first)
                time.sleep(3)  # a few seconds of chart
                card = _card(driver, "frank")
                card.find_element(By.CLASS_NAME, "show-qr").click()  # hide it again
                driver.execute_script("window.scrollTo(0, 0)")
                driver.save_screenshot(str(shots / "server-light.png"))
                driver.find_element(By.ID, "theme").click()
                assert driver.execute_script("return document.documentElement.dataset.theme") \
                    == "dark"
                time.sleep(0.5)
                driver.save_screenshot(str(shots / "server-dark.png"))
        finally:
            traffic.kill()
            traffic.wait()
        _rename_expire_and_link_in_the_page(world, driver)
        _disable_and_delete_in_the_page(world, driver, c4)
    finally:
        with inside(world.server):
            driver.quit()
    assert (shots / "server-light.png").stat().st_size > 10000


def _rename_expire_and_link_in_the_page(world: World, driver: Any) -> None:
    """Rename (its prompt), Set expiry (the date input) and One-time link, as a person
    would; the link then works once, without a session."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 5)
    with inside(world.server):
        _card(driver, "frank").find_element(By.CLASS_NAME, "rename").click()
        prompt = driver.switch_to.alert
        prompt.send_keys("frankie")
        prompt.accept()
        wait.until(lambda d: _card(d, "frankie") is not None)
        card = _card(driver, "frankie")
        card.find_element(By.CLASS_NAME, "expires").send_keys("12312099")
        card.find_element(By.CLASS_NAME, "set-expiry").click()
        wait.until(lambda d: _card(d, "frankie").find_element(By.CLASS_NAME, "expiry").text
                   == "expires 2099-12-31")  # fmt: skip
        card.find_element(By.CLASS_NAME, "link").click()
        wait.until(lambda d: "/download/" in _card(d, "frankie").find_element(
            By.CLASS_NAME, "link-out").text)
        url = _card(driver, "frankie").find_element(By.CLASS_NAME, "link-out").text.split()[-1]
        page = driver.current_window_handle
        driver.switch_to.new_window("tab")  # opening the link spends nothing: a page
        driver.get(url)  # with the button whose POST gets the file
        button = driver.find_element(By.CSS_SELECTOR, "form[method=post] button")
        assert button.text == "Download the configuration"
        shots = Path(os.environ.get("WGPY_SCREENSHOTS", world.workdir))
        driver.save_screenshot(str(shots / "server-download.png"))
        driver.close()
        driver.switch_to.window(page)
        status, _, config = Browser("").call("POST", url)
        assert (status, Browser("").call("POST", url)[0]) == (200, 404)
    assert config.decode() == world.cli("client", "show", "frankie")


def _disable_and_delete_in_the_page(world: World, driver: Any, client: Namespace) -> None:
    """The page's Disable cuts the client off at once; its Delete (after the confirm
    dialog) removes it from the page, the registry and the device."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert ping(client, INTERNET)
    before = set(world.peers())
    with inside(world.server):
        _card(driver, "frankie").find_element(By.CLASS_NAME, "toggle").click()
        WebDriverWait(driver, 5).until(
            lambda d: _card(d, "frankie").find_element(By.CLASS_NAME, "toggle").text == "Enable")
    # one peer fewer (frankie), the others (alice, when the whole file runs) staying
    eventually(lambda: len(set(world.peers()) & before) == len(before) - 1, 3,
               "frankie off the device")  # fmt: skip
    assert not ping(client, INTERNET)
    with inside(world.server):
        _card(driver, "frankie").find_element(By.CLASS_NAME, "delete").click()
        driver.switch_to.alert.accept()
        names = "return [...document.querySelectorAll('.client .name')].map(e => e.textContent)"
        WebDriverWait(driver, 5).until(lambda d: "frankie" not in d.execute_script(names))
    assert "frank" not in world.cli("client", "list")


def _open_chromium(world: World, webdriver: Any) -> Any:
    browser, driver_path = chromium() or ("", "")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1400", f"--user-data-dir={world.workdir / 'chromium'}"):
        options.add_argument(arg)
    with inside(world.server):  # chromedriver and chromium run in the server's namespace
        service = webdriver.ChromeService(executable_path=driver_path)
        return webdriver.Chrome(options=options, service=service)


def _card(driver: object, name: str) -> object:
    from selenium.webdriver.common.by import By

    for card in driver.find_elements(By.CSS_SELECTOR, ".client"):  # type: ignore[attr-defined]
        if card.find_element(By.CLASS_NAME, "name").text == name:
            return card
    return None


def _rx(card: object) -> float:
    """The card's received bytes, from its text ("↓ 1.50 KiB")."""
    from selenium.webdriver.common.by import By

    number, _, unit = card.find_element(By.CLASS_NAME, "rx").text[2:].partition(" ")  # type: ignore[attr-defined]
    return float(number) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


def test_signals_during_the_clean_up_do_not_cut_it_short(world: World) -> None:
    # an impatient second Ctrl-C, or a supervisor that repeats its SIGTERM: once the
    # server is undoing what it made, it finishes (SIGKILL remains for the impatient)
    proc = world.proc
    assert proc is not None
    world.proc = None
    while proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.005)
    assert proc.returncode == 0, world.log()
    assert not world.server.has_link(world.ifname)
    assert "wgpy-server" not in world.server.run("nft", "list", "tables")
    world.start()


def test_a_killed_server_takes_its_interface_with_it(world: World) -> None:
    assert world.proc is not None and world.server.has_link(world.ifname)
    world.proc.kill()  # SIGKILL: no clean-up of its own
    world.proc.wait()
    world.proc = None
    eventually(lambda: not world.server.has_link(world.ifname), 5, "the daemon to follow")
    eventually(lambda: not socket_path(world.ifname).exists(), 5, "the socket to go")
    with socket.socket(socket.AF_UNIX) as stale:  # as a daemon killed with -9 leaves it
        stale.bind(str(socket_path(world.ifname)))
    world.start()  # the stale socket and the table left are replaced; every client is back
    assert {c.split()[0] for c in world.cli("client", "list").split("\n")[1:] if c} == {
        "alice", "carol", "dave"}
    assert len(world.peers()) == 1  # alice: carol is disabled, dave expired
