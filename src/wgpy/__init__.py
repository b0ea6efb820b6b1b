"""wgpy: a complete, fast userspace WireGuard in Python."""

__version__ = "0.1.0"
