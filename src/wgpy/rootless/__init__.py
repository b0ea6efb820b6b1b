"""Without root: a WireGuard tunnel as the only network of a user namespace.

`userns` makes the namespaces (and says clearly why it can't), `netconf` sets the TUN up
inside, `session` composes it all for `wgpy run` and `wgpy proxy`; `serve` serves the proxy's
clients (within limits), `socks` speaks SOCKS5 and HTTP CONNECT to them.
"""
