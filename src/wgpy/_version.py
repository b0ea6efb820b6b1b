"""The version, alone, so that reading it imports nothing else (cli, daemon/status,
daemon/metrics and the package root all take it from here)."""

__version__ = "0.1.0"
