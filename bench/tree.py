"""Which wgpy a benchmark measures: `--src DIR`'s, else the one PYTHONPATH holds, else this
checkout's src/. So `PYTHONPATH=/tmp/old/src python bench/X.py` and `python bench/X.py`
(or `--src`), run in turns, compare two versions; a benchmark that put its own src/ first
would measure this checkout both times, silently."""

from __future__ import annotations

import os
import sys

CHECKOUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../src"))


def given() -> str:
    """The tree: `--src DIR` (read before argparse: a benchmark imports wgpy before it
    parses), else the first PYTHONPATH entry that holds the wgpy package (not any folder of
    that name: a checkout called wgpy), else this checkout's."""
    for i, arg in enumerate(sys.argv):
        if arg == "--src" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--src="):
            return arg.split("=", 1)[1]
    for path in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if path and os.path.isfile(os.path.join(path, "wgpy", "__init__.py")):  # a package
            return path
    return CHECKOUT


def use() -> str:
    """Put the tree first on sys.path (before any wgpy is imported); returns it, for the
    processes the benchmark starts (their PYTHONPATH)."""
    tree = given()
    sys.path.insert(0, tree)
    return tree
