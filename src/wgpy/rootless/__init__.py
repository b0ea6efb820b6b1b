"""Without root: a WireGuard tunnel as the only network of a user namespace.

`userns` makes the namespaces (and says clearly why it can't), `session` composes it all
for `wgpy run` and `wgpy proxy` (an embed `Interface` serves the tunnel inside), `socks` is
the proxy, and `launch` is the same from a program (`wgpy.run`, `wgpy.Proxy`).
"""
