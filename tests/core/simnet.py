"""The in-memory network moved into the package as `wgpy.sim`; kept for the tests' imports."""

from wgpy.sim import WALL, Conditions, Node, SimNet, ipv4_packet, ipv6_packet, seal

__all__ = ["WALL", "Conditions", "Node", "SimNet", "ipv4_packet", "ipv6_packet", "seal"]
