"""The architecture as a test: the core is sans-I/O, and the floors import downward only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import wgpy

BANNED_MODULES = {"socket", "select", "selectors", "threading", "asyncio", "time", "secrets"}
PACKAGE = Path(wgpy.__file__).parent
# Each floor may import those below it, never those above.
FLOORS = ["core", "io", "daemon", "tools", "embed", "rootless", "demo", "server"]
# The rooms above every floor: they may import any floor, and no floor may import them.
TOP = ["cli.py", "sim.py", "__init__.py", "__main__.py"]


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


def above(level: int) -> tuple[str, ...]:
    """The module names a file on FLOORS[level] may not import: the floors above it, the
    top rooms, and the package root itself (whose names load the whole library)."""
    tops = tuple(f"wgpy.{name.removesuffix('.py')}" for name in TOP if name != "__init__.py")
    return (*(f"wgpy.{f}" for f in FLOORS[level + 1 :]), *tops)


def upward(names: set[str], level: int) -> list[str]:
    return [n for n in names if n == "wgpy" or n.startswith(above(level))]


def test_floors_import_downward_only() -> None:
    for level, floor in enumerate(FLOORS):
        paths = list((PACKAGE / floor).glob("*.py"))
        assert paths, f"no modules on the {floor} floor"
        for path in paths:
            for _, names in imports(path):
                bad = upward(names, level)
                assert not bad, f"{floor}/{path.name} imports {bad} from a floor above"


def test_top_rooms_and_the_loaders_import_no_package_root() -> None:
    """cli.py, sim.py, `__init__.py` and `_version.py` stand above the floors (or beside
    them), and none imports `wgpy` itself: the version comes from `wgpy._version`."""
    for name in [*TOP, "_version.py"]:
        for _, names in imports(PACKAGE / name):
            assert "wgpy" not in names, f"{name} imports the package root"
    # sim.py is a core toy: it stands on the core alone.
    for _, names in imports(PACKAGE / "sim.py"):
        bad = [n for n in names if n.startswith("wgpy.") and not n.startswith("wgpy.core")]
        assert not bad, f"sim.py imports {bad}"


def test_the_native_loader_imports_the_extension_not_the_package() -> None:
    found = {n for _, names in imports(PACKAGE / "core" / "native.py") for n in names}
    assert "wgpy._native" in found and "wgpy" not in found, found


# What `import wgpy.core.device` may load besides wgpy.core: the package root (light: its
# names load lazily), the version, the extension, `cryptography` with its bindings, and
# the standard library's basics. Never the I/O: the second set says so by name.
ALLOWED_PREFIXES = ("wgpy.core.", "cryptography.", "_openssl.", "re.", "typing.", "collections.",
                    "importlib.", "os.")  # fmt: skip
ALLOWED = {
    "wgpy", "wgpy.core", "wgpy._version", "wgpy._native", "cryptography", "_cffi_backend",
    "_openssl", "__future__", "_blake2", "_hashlib", "hashlib", "hmac", "_sha512", "base64",
    "binascii", "_struct", "struct", "enum", "_collections", "collections",
    "_collections_abc", "_typing", "typing", "types", "abc", "_functools", "functools",
    "_operator", "operator", "itertools", "keyword", "reprlib", "copyreg", "contextlib",
    "_sre", "re", "ipaddress", "math", "_random", "random", "_bisect", "bisect", "warnings",
    "importlib", "os", "stat", "_stat", "posixpath", "genericpath",
    # dataclasses (the events), and what it loads
    "dataclasses", "inspect", "ast", "_ast", "dis", "opcode", "_opcode", "tokenize", "token",
    "linecache", "copy", "weakref", "_weakrefset",
    "_sha2", "_tokenize", "_opcode_metadata",  # the same basics, as Python 3.12 and 3.13 split them
}  # fmt: skip
NEVER = {"asyncio", "socket", "_socket", "select", "selectors", "threading", "subprocess",
         "signal", "logging", "ctypes", "fcntl", "ssl", "queue", "concurrent"}  # fmt: skip


def test_importing_the_core_loads_nothing_above_it() -> None:
    """A fresh interpreter without site (whose .pth files may import anything) and with
    the path this one has: what importing the core loads is the core's doing."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import wgpy.core.device, wgpy.core.native\n"
        "wgpy.core.native.load()\n"
        "print(*sorted(set(sys.modules) - before))\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), *sys.path])}
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         timeout=60, check=True, env=env)  # fmt: skip
    loaded = set(run.stdout.split())
    assert {"wgpy.core.device", "cryptography"} <= loaded, run.stdout
    assert not loaded & NEVER, f"importing the core loads {sorted(loaded & NEVER)}"
    extra = [m for m in loaded if m not in ALLOWED and not m.startswith(ALLOWED_PREFIXES)]
    assert not extra, f"importing the core loads {extra}"


MAX_FUNCTION_LINES = 60
# Functions allowed past the limit, each with why; a fixed one must leave this list.
LONG_FUNCTIONS_LEFT: set[str] = set()


def test_no_function_over_60_lines() -> None:
    """Short functions (STYLE.md): none in src/wgpy over 60 lines, decorators and
    docstring included (the C module is not Python and not walked)."""
    paths = list(PACKAGE.rglob("*.py"))
    assert len(paths) >= 40
    long, seen = [], set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = (node.end_lineno or node.lineno) - first + 1
                name = f"{path.relative_to(PACKAGE)}:{node.name}"
                if lines > MAX_FUNCTION_LINES and name in LONG_FUNCTIONS_LEFT:
                    seen.add(name)
                elif lines > MAX_FUNCTION_LINES:
                    long.append(name)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
    assert seen == LONG_FUNCTIONS_LEFT, f"short now, strike: {LONG_FUNCTIONS_LEFT - seen}"
