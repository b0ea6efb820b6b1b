"""What a release carries: the wheel holds the `wgpy` package only (the C sources in
src/native/ are no package of their own), and the sdist holds everything the extensions
are built from, the shared header too, whatever setuptools makes it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _copy(to: Path) -> Path:
    """The project's tracked files (as a clean checkout has them), without build output."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True, timeout=60).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, to / name)
    return to


def _setup(where: Path, *args: str) -> None:
    subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=where, check=True,
                   capture_output=True, timeout=300)  # fmt: skip


def test_the_wheel_installs_no_top_level_native_package(tmp_path: Path) -> None:
    """setuptools finds namespace packages under src/: src/native/ would be installed
    as a top-level `native` package of C files beside wgpy."""
    project = _copy(tmp_path / "project")
    _setup(project, "build_py", "-d", str(tmp_path / "lib"))
    assert sorted(os.listdir(tmp_path / "lib")) == ["wgpy"]


def test_the_sdist_carries_the_native_sources_and_header(tmp_path: Path) -> None:
    project = _copy(tmp_path / "project")
    _setup(project, "sdist", "-d", str(tmp_path / "dist"))
    [sdist] = (tmp_path / "dist").iterdir()
    with tarfile.open(sdist) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    native = {p.relative_to(ROOT).as_posix() for p in (ROOT / "src" / "native").iterdir()
              if p.suffix in (".c", ".h")}  # fmt: skip
    assert "src/native/native.h" in native
    assert native <= names, native - names
