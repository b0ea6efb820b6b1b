"""Sans-I/O WireGuard protocol core: no sockets, no clocks, no threads."""
