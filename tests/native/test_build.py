"""The native module is built wherever it can be, and builds without a warning.

setup.py makes wgpy._native optional (pure-Python wgpy works without a compiler), so a
failed build is only a warning there, and every other native test skips without it.
These tests are what turn a failed build into a red CI on a machine with gcc, Python's
headers and OpenSSL's (libssl-dev): unless WGPY_NATIVE=0 asks for the pure path.
"""

from __future__ import annotations

import glob
import importlib
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NATIVE_DIR = os.path.join(ROOT, "src", "native")  # the C, a file per job
PACKAGE = os.path.join(ROOT, "src", "wgpy")
MODULES = ("wgpy._native", "wgpy._classify")  # _classify: the handshake intake
SOURCES = sorted(glob.glob(os.path.join(NATIVE_DIR, "*.c")))
PROBE = "#include <Python.h>\n#include <openssl/evp.h>\n"


def _compile(*flags: str, source: str = "-", code: str = "") -> subprocess.CompletedProcess[str]:
    include = sysconfig.get_paths()["include"]
    return subprocess.run(
        ["gcc", "-fsyntax-only", *flags, f"-I{include}", "-x", "c", source],
        input=code,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _why_not_buildable() -> str | None:
    if os.environ.get("WGPY_NATIVE") == "0":
        return "WGPY_NATIVE=0: the pure-Python path"
    if shutil.which("gcc") is None:
        return "no gcc"
    if _compile(code=PROBE).returncode != 0:
        return "no Python or OpenSSL headers (python3-dev, libssl-dev)"
    return None


WHY_NOT = _why_not_buildable()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.mark.parametrize("name", MODULES)
def test_the_native_module_is_built(name: str) -> None:
    """gcc and the headers are here, so the module must be: a build that failed quietly
    (setup.py's optional=True) fails here, not in a sea of skipped native tests."""
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        pytest.fail(f"{name} did not build: {e} (python3 setup.py build_ext --inplace)")
    assert module.__file__ is not None
    assert os.path.dirname(module.__file__) == PACKAGE, module.__file__


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_the_native_source_compiles_without_warnings(source: str) -> None:
    """setup.py builds without -Werror (a new compiler's new warning must not drop the
    module); here a warning is an error, so it is seen and fixed."""
    done = _compile("-Wall", "-Wextra", "-Werror", "-ffp-contract=off", source=source)
    assert done.returncode == 0, done.stderr[-3000:]
