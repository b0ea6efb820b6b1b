"""The benchmarks measure the wgpy they are told to: a before/after comparison runs one
script against two trees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
# what each script is run with: its quickest run (the wgpy given stops it at import anyway)
ARGS = {"core.py": ["--seconds", "0.01", "--junk"], "flood.py": ["--help"],
        "intake.py": ["--help"]}  # fmt: skip


@pytest.mark.parametrize("script", sorted(ARGS))
@pytest.mark.parametrize("how", ["PYTHONPATH", "--src"])
def test_a_bench_measures_the_tree_it_is_given(script: str, how: str, tmp_path: Path) -> None:
    """A tree whose wgpy says who it is when imported: the benchmark must import that one,
    not the checkout's own src/ beside it."""
    (tmp_path / "wgpy").mkdir()
    (tmp_path / "wgpy" / "__init__.py").write_text('raise SystemExit("the tree given")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path)} if how == "PYTHONPATH" else None
    given = ["--src", str(tmp_path)] if how == "--src" else []
    done = subprocess.run([sys.executable, str(BENCH / script), *given, *ARGS[script]],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert (done.returncode, done.stderr.strip()) == (1, "the tree given"), done.stdout


def test_latency_pairs_each_repetition_with_the_baselines_same_repetition() -> None:
    """bench/latency.py's ratio by repetition: rep k of a pairing against rep k of the
    baseline (the machine's drift between repetitions cancels), a rep with no reply left
    out."""
    sys.path.insert(0, str(BENCH))
    try:
        import latency
    finally:
        sys.path.remove(str(BENCH))
    ours = latency.Samples([0.5, 0.9], [0.5, 0.9, float("nan")])
    base = latency.Samples([0.4, 0.6], [0.4, 0.6, 0.5])  # drifted up by half in rep 2
    assert latency.by_repetition(ours, base) == "1.38x (1.25-1.50)"
    assert latency.by_repetition(latency.Samples([1.0], [float("nan")] * 3), base) == ""


def test_the_flood_attacker_imports_the_tree_measured() -> None:
    """bench/flood.py's attacker child (`flood.py attack`, run in X) is told the tree the
    victim runs (`--src`), and its parser takes it: else it imported PYTHONPATH's or the
    checkout's wgpy, whatever --src said."""
    sys.path.insert(0, str(BENCH))
    try:
        import flood
    finally:
        sys.path.remove(str(BENCH))
    argv = flood.attacker_command("00" * 32, "a", 0, 1.0, "10.210.1.2", "c")
    assert argv[argv.index("--src") + 1] == flood.SRC
    assert flood.attack_parser().parse_args(argv[2:]).src == flood.SRC


def test_a_folder_named_wgpy_that_is_no_package_is_not_the_tree(tmp_path: Path) -> None:
    """A PYTHONPATH entry holding a `wgpy` folder with no `__init__.py` (a checkout named
    wgpy, say) is passed over for the next entry that holds the package."""
    (tmp_path / "repo" / "wgpy").mkdir(parents=True)
    (tmp_path / "tree" / "wgpy").mkdir(parents=True)
    (tmp_path / "tree" / "wgpy" / "__init__.py").write_text("")
    path = os.pathsep.join([str(tmp_path / "repo"), str(tmp_path / "tree")])
    code = "import sys, tree; sys.argv[1:] = []; print(tree.given())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{BENCH}{os.pathsep}{path}"},
                          timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == str(tmp_path / "tree")
