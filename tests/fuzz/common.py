"""What every fuzz target shares: instrumented imports and the libFuzzer entry point.

A target is a module with `one_input(data: bytes) -> None` that raises on a finding; run as
a script (`python -m tests.fuzz.fuzz_offload [libFuzzer flags] [corpus dirs]`) it fuzzes
that function with atheris. Without atheris the module still imports (the regression
tests call `one_input` directly), just without coverage instrumentation.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

try:
    import atheris
except ImportError:  # the regression tests run without it
    atheris = None

CORPUS = Path(__file__).parent / "corpus"
TARGETS = ("device", "uapi", "config", "offload")


def instrumented() -> AbstractContextManager[object]:
    """Wrap the imports of the code under test: only wgpy gets coverage probes."""
    if atheris is None:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["wgpy"])  # type: ignore[no-any-return]


def fuzz(one_input: Callable[[bytes], None], argv: list[str] | None = None) -> None:
    """Hand `one_input` to libFuzzer with the command line's flags and corpus dirs."""
    if atheris is None:
        raise SystemExit("atheris is not installed: pip install atheris")
    atheris.Setup(sys.argv if argv is None else argv, one_input)
    atheris.Fuzz()
