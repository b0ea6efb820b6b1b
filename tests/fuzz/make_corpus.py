"""Write the seed corpus under tests/fuzz/corpus/<target>/ (checked in; rerun to refresh).

    sudo PYTHONPATH=src:. python -m tests.fuzz.make_corpus

Every seed is a real message, request, file or buffer:
- device: the datagrams of the deterministic world in world.py, as the devices made them
  (initiations, responses, a cookie reply, data, a keepalive), framed as fuzz_device reads;
- uapi: the requests that the real `wg` tool sends (set, setconf, addconf, syncconf, show),
  recorded on a UAPI socket that answers like a daemon;
- config: wg-quick files from the tests, and what `wg showconf` prints;
- offload: TUN reads the kernel made (TSO super-packets read from a TUN with
  IFF_VNET_HDR, with tests/io/test_offload.py's namespace harness), plain reads, and the
  decrypted-packet trains that the tests coalesce.
Needs root (for the TUN and the UAPI socket directory) and `wg`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

from tests.fuzz import fuzz_device, fuzz_offload, world
from tests.fuzz.common import CORPUS
from tests.fuzz.fuzz_uapi import configured_host
from wgpy.daemon import uapi
from wgpy.io.uapi_path import socket_path
from wgpy.tools import config


def write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# ---- device -------------------------------------------------------------------------


def device_seeds() -> None:
    w = world.build()
    rec = fuzz_device.record
    every = {**w.pending, **w.other}
    for name, data in every.items():
        write("device", name, rec(0, data))
    p = w.pending
    a, c, s = 0, 1, 2  # source indices into world.SOURCES
    # whole exchanges, in order
    write("device", "seq-rekey-then-data",
          rec(a | 4, p["initiation-a"]) + rec(a | 0x40 | 4, p["data-a"]))  # fmt: skip
    write("device", "seq-cookie-then-response",
          rec(c | 4, p["cookie-reply-c"]) + rec(c | 0x30, p["response-c"]))  # fmt: skip
    write("device", "batch-data-keepalive-v6",
          rec(a, p["data-a"]) + rec(a, p["keepalive-a"]) + rec(a, p["data-a-v6"]))  # fmt: skip
    write("device", "roaming-data-from-stranger", rec(s, p["data-a"]))
    # a flood of the stranger's initiations (rate-limited); then A's under load (a cookie)
    write("device", "flood-then-initiation",
          rec(s | 8 | 4, every["initiation-stranger"]) + rec(a, p["initiation-a"]))  # fmt: skip
    write("device", "under-load-initiation", rec(a | 0x80, p["initiation-a"]))
    write("device", "under-load-response", rec(c | 0x80, p["response-c"]))
    write("device", "replayed-data", rec(a | 4, every["seen-2-type4"]) + rec(a, p["data-a"]))


# ---- uapi: what `wg` really sends -------------------------------------------------------


class Recorder:
    """A UAPI socket that records requests and answers like a daemon (get: a configured
    in-memory device)."""

    def __init__(self, ifname: str) -> None:
        self.path = socket_path(ifname)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.requests: list[bytes] = []
        self.host = configured_host()
        self.done = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.done:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            with conn:
                buffer = b""
                while chunk := conn.recv(1 << 16):
                    buffer += chunk
                    while b"\n\n" in buffer:
                        raw, buffer = buffer.split(b"\n\n", 1)
                        self.requests.append(raw + b"\n\n")
                        request = raw.decode("utf-8", "replace").split("\n")
                        answer = (
                            uapi.render_get(self.host) if request[0] == "get=1" else "errno=0\n\n"
                        )
                        conn.sendall(answer.encode())

    def close(self) -> None:
        self.done = True
        self.thread.join(5)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def uapi_seeds() -> None:
    ifname = "wgfuzzcap0"
    keys = [subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
            for _ in range(3)]  # fmt: skip
    pubs = [subprocess.run(["wg", "pubkey"], input=k, capture_output=True, text=True,
                           check=True).stdout.strip() for k in keys]  # fmt: skip
    psk = subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout
    conf = (
        f"[Interface]\nPrivateKey = {keys[0].strip()}\nListenPort = 51820\nFwMark = 0x42\n\n"
        f"[Peer]\nPublicKey = {pubs[1]}\nPresharedKey = {psk.strip()}\n"
        f"AllowedIPs = 10.0.0.2/32, fd00::2/128\nEndpoint = 192.0.2.1:51820\n"
        f"PersistentKeepalive = 25\n\n"
        f"[Peer]\nPublicKey = {pubs[2]}\nAllowedIPs = 0.0.0.0/0, ::/0\n"
        f"Endpoint = [2001:db8::1]:51821\n"
    )
    rec = Recorder(ifname)
    outputs: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wg.conf"
        path.write_text(conf)
        key = Path(tmp) / "key"
        key.write_text(keys[1])
        pskf = Path(tmp) / "psk"
        pskf.write_text(psk)
        commands = {
            "setconf": ["setconf", ifname, str(path)],
            "addconf": ["addconf", ifname, str(path)],
            "syncconf": ["syncconf", ifname, str(path)],
            "set-many": ["set", ifname, "listen-port", "4242", "fwmark", "off",
                         "private-key", str(key), "peer", pubs[1], "preshared-key", str(pskf),
                         "endpoint", "[fd00::9]:7", "persistent-keepalive", "off",
                         "allowed-ips", "10.1.0.0/16,fd01::/64"],
            "set-remove": ["set", ifname, "peer", pubs[2], "remove"],
            "show": ["show", ifname, "dump"],
            "showconf": ["showconf", ifname],
        }  # fmt: skip
        try:
            for name, argv in commands.items():
                n = len(rec.requests)
                done = subprocess.run(["wg", *argv], capture_output=True, text=True, timeout=10)
                outputs[name] = done.stdout
                if done.returncode:
                    print(name, done.stderr)
                for i, request in enumerate(rec.requests[n:]):
                    write("uapi", f"wg-{name}-{i}", request)
        finally:
            rec.close()
    write("config", "wg-showconf.conf", outputs["showconf"].encode())
    write("config", "setconf.conf", conf.encode())


# ---- config -------------------------------------------------------------------------


def config_seeds() -> None:
    from tests.tools import test_config

    write("config", "good.conf", test_config.GOOD.encode())
    write("config", "stripped.conf", config.strip(test_config.GOOD).encode())
    write("config", "rendered.conf", config.render(config.parse(test_config.GOOD)).encode())
    write("config", "minimal.conf", f"[Interface]\nPrivateKey = {test_config.PRIV}\n".encode())


# ---- offload --------------------------------------------------------------------------


def offload_seeds() -> None:
    from tests.io import test_offload as t

    packets = t.kernel_traffic()
    reads = t.through_kernel(t.coalesce(packets), "tso")  # what the kernel hands a TUN read
    seen: set[bytes] = set()
    for i, buf in enumerate(reads):
        kind = "tso" if buf[1] else "plain"
        digest = hashlib.sha256(buf[10:40]).digest()
        if kind == "plain" and digest in seen:
            continue
        seen.add(digest)
        write("offload", f"kernel-read-{i:02d}-{kind}", b"\0" + (1420).to_bytes(2, "big") + buf)
    odd = 1 | 2  # coalesce, with UDP
    trains = {
        "tcp-v4-run": t.flow(6, 1000, last=300, last_flags=t.ACK | t.PSH),
        "tcp-v6-options": t.flow(4, 1200, t.V6, options=b"\x01\x01\x08\x0a" + bytes(8)),
        "mixed": [*t.flow(3, 500), t.udp(b"dns"), *t.flow(3, 700, t.V6, ports=(5, 6))],
        "udp-run": t.udp_flow([300] * 4 + [120]),
    }
    for name, train in trains.items():
        write("offload", f"coalesce-{name}", bytes([odd]) + fuzz_offload.frame(train))


def main() -> None:
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    device_seeds()
    uapi_seeds()
    config_seeds()
    offload_seeds()
    total = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    for d in sorted(CORPUS.iterdir()):
        print(f"{d.name}: {len(list(d.iterdir()))} seeds")
    print(f"{total} bytes")
    assert total < 200_000


if __name__ == "__main__":
    os.umask(0o022)
    main()
