"""Linux I/O layer: TUN, UDP (GSO/GRO) and the event loop."""
