"""The architecture as a test: the core is sans-I/O, and the floors import downward only."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import wgpy

BANNED_MODULES = {"socket", "select", "selectors", "threading", "asyncio", "time", "secrets"}
PACKAGE = Path(wgpy.__file__).parent
# Each floor may import those below it, never those above.
FLOORS = ["core", "io", "daemon", "tools", "embed", "rootless", "demo", "server"]


def imports(path: Path) -> Iterator[tuple[ast.AST, set[str]]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield node, {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            yield node, {node.module or ""}
        else:
            yield node, set()


def test_core_imports_no_io_and_reads_no_clock() -> None:
    paths = list((PACKAGE / "core").glob("*.py"))
    assert len(paths) >= 10, "the purity test no longer sees the core's modules"
    for path in paths:
        for node, names in imports(path):
            tops = {n.split(".")[0] for n in names}
            assert not tops & BANNED_MODULES, f"{path.name} imports {tops & BANNED_MODULES}"
            if isinstance(node, ast.Attribute):
                assert node.attr != "urandom", f"{path.name} calls os.urandom"


def test_floors_import_downward_only() -> None:
    for level, floor in enumerate(FLOORS):
        above = tuple(f"wgpy.{f}" for f in FLOORS[level + 1 :])
        for path in (PACKAGE / floor).glob("*.py"):
            for _, names in imports(path):
                bad = [n for n in names if n.startswith(above)]
                assert not bad, f"{floor}/{path.name} imports {bad} from a floor above"
