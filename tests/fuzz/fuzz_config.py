"""Fuzz target: wg-quick config files (`config.parse`, `config.strip`).

Input: a file's bytes, read by `config.read` (any bytes in comments, UTF-8 elsewhere).
Invariants: `read` and `parse` raise nothing but ConfigError; `strip` never raises; a file
that parses also parses after `strip` with the same wg(8) settings, renders back to
itself (`render`), and gives a `to_uapi` body that the daemon's `parse_set` accepts.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tempfile

from tests.fuzz.common import fuzz, instrumented

with instrumented():
    from wgpy.core.endpoint import split_endpoint
    from wgpy.daemon.uapi import parse_set
    from wgpy.tools import config


def no_dns(endpoint: str) -> str:
    """`to_uapi`'s resolver without name lookups: names become a documentation address."""
    host, port = split_endpoint(endpoint)
    try:
        return config.resolve_endpoint(endpoint) if _is_address(host) else f"192.0.2.1:{port}"
    except ValueError:
        return f"192.0.2.1:{port}"


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def wg_settings(cfg: config.Config) -> object:
    i = cfg.interface
    return (i.private_key, i.listen_port, i.fwmark, cfg.peers)


def shown(cfg: config.Config) -> config.Config:
    """`cfg` as `render` writes it: like `wg showconf`, a zero ListenPort or FwMark is not
    written (0 is what the device has when neither is set)."""
    i = cfg.interface
    i.listen_port, i.fwmark = i.listen_port or None, i.fwmark or None
    return cfg


_DIR = tempfile.mkdtemp(prefix="wgpy-fuzz-config-")
_FILE = os.path.join(_DIR, "wgfuzz.conf")


def one_input(data: bytes) -> None:
    with open(_FILE, "wb") as f:
        f.write(data)
    try:
        text = config.read(_FILE)
    except config.ConfigError:
        return
    stripped = config.strip(text)
    try:
        cfg = config.parse(text, "fuzz.conf")
    except config.ConfigError:
        return
    assert wg_settings(config.parse(stripped, "stripped.conf")) == wg_settings(cfg)
    assert shown(config.parse(config.render(cfg), "rendered.conf")) == shown(cfg)
    parse_set(config.to_uapi(cfg, resolve=no_dns).splitlines())


if __name__ == "__main__":
    fuzz(one_input, sys.argv)
