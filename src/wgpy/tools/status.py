"""`wgpy show [IFNAME] --json`: a daemon's status as JSON (fields: docs/status.md).

A wgpy daemon answers the wgpy-only UAPI request `wgpy_status=1` with one line of JSON.
The standard `get` stays as it is, so the real `wg` tool is unaffected. Another userspace
WireGuard (wireguard-go) refuses that request; for it the status holds what `get` does.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from wgpy.core.crypto import encode_key, public_key
from wgpy.tools import uapi_client


def fetch(ifname: str) -> dict[str, Any]:
    """The status of `ifname`'s daemon; raises uapi_client.UapiClientError."""
    try:
        lines = uapi_client.request(ifname, "wgpy_status=1\n\n")
    except uapi_client.UapiClientError:
        # not wgpy (wireguard-go closes the connection on an unknown request): what the
        # standard get says; if the daemon cannot be reached at all, get raises that
        return _from_get(ifname)
    if not lines:
        raise uapi_client.UapiClientError(f"{ifname}: empty status")
    status: dict[str, Any] = json.loads(lines[0])
    return status


def _from_get(ifname: str) -> dict[str, Any]:
    dev = uapi_client.get(ifname)
    return {
        "interface": ifname,
        "implementation": None,
        "public_key": encode_key(public_key(dev.private_key)) if dev.private_key else None,
        "listen_port": dev.listen_port,
        "fwmark": dev.fwmark,
        "peers": [
            {
                "public_key": encode_key(p.public_key),
                "preshared_key": p.preshared_key is not None,
                "endpoint": p.endpoint,
                "allowed_ips": p.allowed_ips,
                "latest_handshake": int(p.last_handshake),
                "latest_handshake_ns": int(p.last_handshake * 1e9),
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
                "persistent_keepalive": p.persistent_keepalive,
            }
            for p in dev.peers
        ],
    }


def show_json(ifname: str | None) -> int:
    """One interface: its status object. None named: a list, one object per interface."""
    try:
        if ifname is not None:
            result: Any = fetch(ifname)
        else:
            result = [fetch(name) for name in uapi_client.interfaces()]
    except (uapi_client.UapiClientError, ValueError) as e:
        print(f"wgpy show: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0
