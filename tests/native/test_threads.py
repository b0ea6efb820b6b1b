"""The crypto threads: batches cut into chunks that worker threads seal and open, with the
answers (and each peer's order) exactly those of one thread: the pure backend's."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.native.reference import World, ip4, normalize, open_batch_ref
from tests.native.test_open import both
from wgpy.core.backend import Sealer
from wgpy.core.messages import DATA_HEADER
from wgpy.daemon.daemon import add_options, options_from
from wgpy.io.datapath import crypto_threads

native = pytest.importorskip(
    "wgpy._native", reason="wgpy._native is not built (python setup.py build_ext --inplace)"
)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def workers() -> Iterator[int]:
    native.set_threads(3)
    try:
        yield native.threads()
    finally:
        native.set_threads(0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**64), st.integers(1, 4), st.integers(1, 4))
def test_open_on_threads_matches_reference(seed: int, nsessions: int, nbatches: int) -> None:
    native.set_threads(3)
    try:
        rng = random.Random(seed)
        world = World(rng, nsessions, 1000.0, native)
        for _ in range(nbatches):
            buf, nbytes, seg = world.batch()
            both(world, buf, nbytes, seg)
            world.now += rng.choice([0.0, 0.5, 100.0])
    finally:
        native.set_threads(0)


def test_a_big_read_keeps_every_peers_order(workers: int) -> None:
    """Hundreds of datagrams of three sessions interleaved, opened on four threads: each
    session's packets come out in the order they came in, as one thread gives them."""
    assert workers == 3
    world = World(random.Random(7), 3, 1000.0, native)
    for s in (*world.native.values(), *world.ref.values()):
        s.expires = 1e9
    rng = world.rng
    grams = []
    for i in range(600):
        kp = rng.choice(world.kps)
        inner = ip4(bytes([10, 0, 0, 1 + i % 2]), bytes([10, 0, 0, 9]), 17, i.to_bytes(4, "big"))
        grams.append(world.seal(kp, inner, kp.send_counter))
    seg = max(len(g) for g in grams)
    buf = b"".join(g + bytes(seg - len(g)) for g in grams)
    got = native.open_batch(buf, len(buf), seg, world.native, world.now)
    want = open_batch_ref(buf, len(buf), seg, world.ref, world.now)
    assert normalize(got, world.names) == normalize(want, world.names)
    assert sum(len(p) for _, _, p in got[0]) > 500


def test_seal_on_threads_matches_and_reserves_each_counter_once(workers: int) -> None:
    packets = [random.Random(i).randbytes(i % 1500) for i in range(300)]
    c_sealer, py_sealer = native.Sealer(bytes(range(32)), 9, 5), Sealer(bytes(range(32)), 9, 5)
    assert c_sealer.seal(packets, 1420) == py_sealer.seal(packets, 1420)
    out: list[bytes] = []

    def work() -> None:
        for _ in range(30):
            out.extend(c_sealer.seal(packets[:40], 1420))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counters = [DATA_HEADER.unpack_from(d)[2] for d in out]
    assert len(set(counters)) == len(counters) == 3 * 30 * 40
    assert c_sealer.counter == 5 + 300 + len(counters)


def test_callers_on_several_threads_at_once(workers: int) -> None:
    """Two Python threads opening and sealing at the same time (one of them finds the
    pool busy and works alone): the same answers as the reference."""
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        try:
            world = World(random.Random(seed), 2, 1000.0, native)
            for _ in range(40):
                buf, nbytes, seg = world.batch()
                got = native.open_batch(buf, nbytes, seg, world.native, world.now)
                want = open_batch_ref(buf, nbytes, seg, world.ref, world.now)
                assert normalize(got, world.names) == normalize(want, world.names)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_set_threads() -> None:
    native.set_threads(2)
    assert native.threads() == 2
    native.set_threads(0)
    assert native.threads() == 0
    with pytest.raises(ValueError):
        native.set_threads(-1)
    tasks = settled_tasks()
    # several at once (each joins the old workers before it starts new ones): none leak
    callers = [threading.Thread(target=lambda k=k: [native.set_threads(k) for _ in range(30)])
               for k in range(4)]  # fmt: skip
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    native.set_threads(0)
    assert settled_tasks() == tasks


def settled_tasks() -> int:
    """The threads of this process, once two counts 20 ms apart agree: join returns when
    a thread has exited, a moment before the kernel reaps it and /proc forgets it (a
    count taken at once was one too many under load)."""
    count, deadline = len(os.listdir("/proc/self/task")), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.02)
        count, before = len(os.listdir("/proc/self/task")), count
        if count == before:
            break
    return count


def test_how_many_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WGPY_THREADS", raising=False)
    assert crypto_threads() == len(os.sched_getaffinity(0))
    assert crypto_threads(5) == 5
    monkeypatch.setenv("WGPY_THREADS", "3")
    assert crypto_threads() == 3 and crypto_threads(2) == 2
    with pytest.raises(ValueError):
        crypto_threads(0)
    parser = argparse.ArgumentParser()
    add_options(parser)
    assert options_from(parser.parse_args(["--threads", "4"])).threads == 4
    assert options_from(parser.parse_args([])).threads == 3  # WGPY_THREADS
    for bad in ("four", "0", "-1"):
        with pytest.raises(SystemExit):
            parser.parse_args([f"--threads={bad}"])


SINGLE_CORE = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
os.environ.pop("WGPY_THREADS", None)
from wgpy.io.datapath import backend
b = backend()
from wgpy import _native
print(b.threads, _native.threads(), len(os.listdir("/proc/self/task")))
"""


def test_a_single_core_runs_no_extra_thread() -> None:
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "WGPY_NATIVE": "1"}
    done = subprocess.run([sys.executable, "-c", SINGLE_CORE], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0", "1"]  # one thread: the caller's; no worker


BUSY_CORE = """
import os, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
os.environ["WGPY_THREADS"] = "3"
from wgpy.io.datapath import backend
from wgpy import _native
b = backend()
before = _native.spread()
sealer = _native.Sealer(bytes(32), 1)
end = time.monotonic() + 0.35  # past a measurement period (0.1 s), the core kept busy
while time.monotonic() < end:
    sealer.seal([bytes(1400)] * 44, 1420)
print(*before, *_native.spread())
"""


def test_a_batch_wakes_no_worker_where_no_cpu_is_spare() -> None:
    """The daemon's backend wakes workers only as far as the CPUs it may run on had time
    to spare: pinned to one core, none (they could only take the caller's own core)."""
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "WGPY_NATIVE": "1"}
    env.pop("WGPY_SPREAD", None)
    done = subprocess.run([sys.executable, "-c", BUSY_CORE], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "2", "True", "0"]  # all, until measured; then none


def test_spread(workers: int) -> None:
    """set_threads wakes any worker (the tests' choice, the workers always exercised);
    WGPY_SPREAD=all asks the daemon for the same; anything but spare or all is refused."""
    assert native.spread() == (False, workers)
    native.set_spread(True)
    assert native.spread() == (True, workers)  # all of them until a period is measured
    native.set_spread(False)
    assert native.spread() == (False, workers)
    native.set_spread(True)  # as a daemon or an Interface earlier in the process left it
    native.set_threads(workers)
    assert native.spread() == (False, workers)  # set_threads: any of them again
    with pytest.MonkeyPatch.context() as mp:
        from wgpy.io.datapath import backend

        mp.setenv("WGPY_NATIVE", "1")
        mp.setenv("WGPY_SPREAD", "all")
        assert not backend(4, start=False).spare_only
        mp.setenv("WGPY_SPREAD", "spare")
        assert backend(4, start=False).spare_only
        mp.setenv("WGPY_SPREAD", "some")
        with pytest.raises(ValueError, match="WGPY_SPREAD"):
            backend(4, start=False)


FAKE_STAT_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
static int redirect(const char *name, const char *path, int flags, int mode)
{
    int (*real)(const char *, int, ...) = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, name);
    if (strcmp(path, "/proc/stat") == 0)
        path = getenv("FAKE_STAT");
    return real(path, flags, mode);
}
#define HOOK(name) int name(const char *p, int flags, ...) { \
    va_list ap; va_start(ap, flags); int mode = va_arg(ap, int); va_end(ap); \
    return redirect(#name, p, flags, mode); }
HOOK(open)
HOOK(open64)
"""

# /proc/stat as LXCFS writes it in a container: its CPUs numbered from 0, whatever the
# host's numbers in our affinity mask (here: none of ours), and all of them idle
FAKE_STAT = "cpu  10 0 10 100000 0 0 0 0 0 0\ncpu900 10 0 10 50000 0 0 0 0 0 0\n" \
            "cpu901 10 0 10 50000 0 0 0 0 0 0\nintr 0\n"

SPARE_UNKNOWN = """
import os, time
os.environ["WGPY_THREADS"] = "3"
from wgpy.io.datapath import backend
from wgpy import _native
b = backend()
sealer = _native.Sealer(bytes(32), 1)
end = time.monotonic() + 0.35  # past a few measurement periods (0.1 s), then quiet
while time.monotonic() < end:
    sealer.seal([bytes(1400)] * 44, 1420)
    time.sleep(0.01)
print(*_native.spread())
"""


def test_workers_stay_wakeable_where_proc_stat_does_not_list_our_cpus(tmp_path: Path) -> None:
    """Where /proc/stat does not list every CPU of our affinity mask (LXCFS in a
    container), the idle time is unknown and the workers stay wakeable: before, it read as
    no idle time at all, and once one quiet period had passed no worker ran again."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to run on")
    (tmp_path / "shim.c").write_text(FAKE_STAT_SHIM)
    (tmp_path / "stat").write_text(FAKE_STAT)
    try:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "shim.so"),
                        str(tmp_path / "shim.c"), "-ldl"], check=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no C compiler")
    shim, stat = str(tmp_path / "shim.so"), str(tmp_path / "stat")
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "WGPY_NATIVE": "1",
           "LD_PRELOAD": shim, "FAKE_STAT": stat}  # fmt: skip
    env.pop("WGPY_SPREAD", None)
    done = subprocess.run([sys.executable, "-c", SPARE_UNKNOWN], capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "2"]
