"""Without root: a WireGuard tunnel as the only network of a user namespace.

`userns` makes the namespaces (and says clearly why it can't), `session` composes it all
for `wgpy run` and `wgpy proxy` (an embed `Interface` serves the tunnel inside), `proxy`
is `wgpy proxy` (`spec` reads what to serve, `serve` serves clients within limits,
`socks`, `udp`, `http` and `forward` speak to them, `outside` makes sockets on the
caller's side), and `launch` is the same from a program (`wgpy.run`, `wgpy.Proxy`).
"""
