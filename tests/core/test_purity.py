"""The core stays sans-I/O: no sockets, clocks, threads or OS randomness inside it."""

from __future__ import annotations

import ast
from pathlib import Path

import wgpy.core

BANNED_MODULES = {"socket", "select", "selectors", "threading", "asyncio", "time", "secrets"}


def test_core_imports_no_io_and_reads_no_clock() -> None:
    for path in Path(wgpy.core.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                names = set()
            assert not names & BANNED_MODULES, f"{path.name} imports {names & BANNED_MODULES}"
            if isinstance(node, ast.Attribute):
                assert node.attr != "urandom", f"{path.name} calls os.urandom"
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("wgpy.io", "wgpy.control")), path.name
