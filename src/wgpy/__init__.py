"""wgpy: a complete, fast userspace WireGuard in Python.

The library (see docs/api.md):

- `Config`, `PeerConfig`: the wg-quick file model (`Config.from_file`, `from_text`,
  `build`, `text()`); `ConfigError` names file, line and key.
- `Interface(config, name)`: a real TUN interface served from a background thread, as a
  context manager (`with` / `async with`); `peers()`, `set_peer()`, `remove_peer()`,
  `drops()`; events (`Event`, `EventKind`) as callbacks, `wait_for()` and `events()`.
- `run(config, command)`: a command whose only network is the tunnel, without root;
  `Proxy(config, socks=..., forward=[...], ...)`: `wgpy proxy` (SOCKS5, HTTP, TCP and
  UDP forwards, exposed ports, the health endpoint) into the tunnel, without root.
- `wgpy.sim`: an in-memory network of core devices with a fake clock.

The names are loaded when first used (PEP 562), so that `import wgpy.core.device` (which
imports this package first) loads the core and nothing above it: no threads, sockets or
asyncio until a program asks for `wgpy.Interface`. tests/core/test_purity.py checks it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from wgpy._version import __version__

if TYPE_CHECKING:
    from wgpy.core.events import EventKind
    from wgpy.core.output import Drop
    from wgpy.embed.interface import (
        Event,
        Interface,
        PeerState,
        generate_private_key,
        public_key_of,
    )
    from wgpy.rootless.launch import Proxy, run
    from wgpy.rootless.userns import NamespaceError
    from wgpy.tools.config import Config, ConfigError, InterfaceConfig, PeerConfig

# Each public name, and the module that defines it.
_WHERE = {
    "Drop": "wgpy.core.output",
    "EventKind": "wgpy.core.events",
    "Event": "wgpy.embed.interface",
    "Interface": "wgpy.embed.interface",
    "PeerState": "wgpy.embed.interface",
    "generate_private_key": "wgpy.embed.interface",
    "public_key_of": "wgpy.embed.interface",
    "Proxy": "wgpy.rootless.launch",
    "run": "wgpy.rootless.launch",
    "NamespaceError": "wgpy.rootless.userns",
    "Config": "wgpy.tools.config",
    "ConfigError": "wgpy.tools.config",
    "InterfaceConfig": "wgpy.tools.config",
    "PeerConfig": "wgpy.tools.config",
}

__all__ = [
    "Config",
    "ConfigError",
    "Drop",
    "Event",
    "EventKind",
    "Interface",
    "InterfaceConfig",
    "NamespaceError",
    "PeerConfig",
    "PeerState",
    "Proxy",
    "__version__",
    "generate_private_key",
    "public_key_of",
    "run",
]


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562); later reads find it in the module."""
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'wgpy' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
