"""Run part of a test inside a network namespace."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pyroute2 import netns as pyroute2_netns

from wgpy.demo.testbed import Namespace


@contextlib.contextmanager
def inside(ns: Namespace) -> Iterator[None]:
    """This thread in namespace `ns`: sockets it opens and programs it starts live there
    (and /proc/sys/net files it opens are that namespace's)."""
    pyroute2_netns.pushns(ns.name)
    try:
        yield
    finally:
        pyroute2_netns.popns()
