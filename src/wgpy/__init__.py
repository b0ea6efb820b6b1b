"""wgpy: a complete, fast userspace WireGuard in Python.

The library (see docs/api.md):

- `Config`, `PeerConfig`: the wg-quick file model (`Config.from_file`, `from_text`,
  `build`, `text()`); `ConfigError` names file, line and key.
- `Interface(config, name)`: a real TUN interface served from a background thread, as a
  context manager (`with` / `async with`); `peers()`, `set_peer()`, `remove_peer()`,
  `drops()`; events (`Event`, `EventKind`) as callbacks, `wait_for()` and `events()`.
- `run(config, command)`: a command whose only network is the tunnel, without root;
  `Proxy(config, socks=...)`: a SOCKS5 proxy into the tunnel, without root.
- `wgpy.sim`: an in-memory network of core devices with a fake clock.
"""

__version__ = "0.1.0"

from wgpy.core.output import Drop, EventKind
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
