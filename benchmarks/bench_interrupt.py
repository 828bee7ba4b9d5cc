"""Benchmark 8, interrupt latency: Ctrl-C while compiles run, against plain pytest-xdist.

SIGINT to the process group of a ``pytest -n W`` run (Ctrl-C in a terminal) whose tests
wait for compiles that never end (the model's factory starts a grandchild in a session of
its own, then waits: with ``-n 2`` the compiles are the workers' background prefetch's,
without xdist the test's own), against the same SIGINT to plain pytest-xdist
(``-p no:mlcjit``) whose tests sleep, the two alternating every round. Measured by this
script from the SIGINT: when the run's process exits, and when the last compile process
(the factory's process and its grandchild) is gone.

Figures (median of the per-round ratios, against plain pytest-xdist's exit in the same
round): the plugin run's exit, target <= 2.0x (it replaces the old test's bound, "within
2 s of the same run with nothing compiling", which was a wall-clock assertion); every
compile gone, target <= 1.0x (the compiles are dead before plain pytest-xdist has even
finished stopping). Checked after
every plugin run, from the outside: no compile process or grandchild is left, no staging
directory, no library published, and nothing remembered as the model's failure.

    python benchmarks/bench_interrupt.py            # full: W=2 and 0, 7 rounds
    python benchmarks/bench_interrupt.py --quick    # CI: W=2, 2 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _benchlib import (
    Checks,
    bench_env,
    common_args,
    parse_ints,
    print_header,
    pytest_argv,
    ratio_of,
    rotate,
    spread,
    table,
    work_dir,
    xdist_args,
)

EXIT_TARGET = 2.0
STOPPED_TARGET = 1.0
SAFETY_S = 120.0

#: A compile that never ends: the factory writes its pid, starts a grandchild in a session
#: of its own (which no process-group kill reaches) and writes that pid too, then waits.
MODEL_PY = '''\
import os
import subprocess
import sys
import time


def build(hidden=4):
    pids = os.environ["BENCH_PIDS"]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
    for name, pid in ((f"grandchild-{hidden}", child.pid), (f"factory-{hidden}", os.getpid())):
        with open(os.path.join(pids, name + ".tmp"), "w") as f:
            f.write(str(pid))
        os.replace(os.path.join(pids, name + ".tmp"), os.path.join(pids, name))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise RuntimeError("bench_interrupt: the compile was not interrupted")
'''

PLUGIN_TEST_PY = '''\
import pytest

from pytest_mlcjit import TVMModel

SPECS = [TVMModel("benchmodel:build", config={{"hidden": h}}) for h in {hiddens!r}]


@pytest.mark.parametrize("compiled_model", SPECS, indirect=True)
@pytest.mark.parametrize("i", range(3))
def test_model(compiled_model, i):
    assert compiled_model.path.exists()
'''

#: Plain pytest-xdist: the same number of tests, each announcing it runs, then sleeping.
PLAIN_TEST_PY = '''\
import os
import time
from pathlib import Path

import pytest


@pytest.mark.parametrize("h", {hiddens!r})
@pytest.mark.parametrize("i", range(3))
def test_sleeps(h, i):
    Path(os.environ["BENCH_PIDS"], f"started-{{os.getpid()}}").touch()
    time.sleep(600)
'''


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--workers", type=parse_ints, default=[2, 0],
                        help="xdist worker counts (0: without xdist; default 2,0)")
    parser.add_argument("--reps", type=int, default=7, help="rounds (default 7)")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.reps = [2], 2
    return args


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[:1]
    except OSError:
        return False
    return state not in ([b"Z"], [b"X"])


def read_pids(pids: Path, prefix: str) -> list[int]:
    return [int(p.read_text()) for p in pids.glob(f"{prefix}-*") if not p.name.endswith(".tmp")]


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[bytes]) -> bool:
    """Wait (a safety limit, not a measurement) until ``condition()``; False if the run
    ended first or the limit passed."""
    deadline = time.monotonic() + SAFETY_S
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def interrupt(proc: subprocess.Popen[bytes], compiles: list[int]) -> tuple[float, float]:
    """SIGINT to the run's process group; (seconds until it exited, seconds until none of
    ``compiles`` ran), polled every 5 ms."""
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    exited = stopped = None
    deadline = start + SAFETY_S
    while (exited is None or stopped is None) and time.monotonic() < deadline:
        now = time.monotonic() - start
        if stopped is None and not any(alive(pid) for pid in compiles):
            stopped = now
        if exited is None and proc.poll() is not None:
            exited = now
        time.sleep(0.005)
    return (float("nan") if exited is None else exited,
            float("nan") if stopped is None else stopped)


def one_run(variant: str, suite: Path, run_dir: Path, workers: int, *, expected: int,
            checks: Checks) -> tuple[float, float] | None:
    """Start a run, wait until its compiles (or sleeping tests) run, interrupt it."""
    pids, cache = run_dir / "pids", run_dir / "cache"
    pids.mkdir(parents=True)
    extra = (["-p", "no:mlcjit"] if variant == "plain" else
             ["--mlc-device=cpu", f"--mlc-jit-cache-dir={cache}"])
    log = (run_dir / "output.txt").open("wb")
    proc = subprocess.Popen(
        pytest_argv(*xdist_args(workers), f"--basetemp={run_dir / 'bt'}", *extra), cwd=suite,
        env=bench_env(BENCH_PIDS=str(pids)), stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)
    compiles: list[int] = []
    try:
        if variant == "plain":
            ready = wait_for(lambda: len(list(pids.glob("started-*"))) >= expected, proc)
        else:
            ready = wait_for(lambda: len(read_pids(pids, "factory")) >= expected
                             and len(read_pids(pids, "grandchild")) >= expected, proc)
            compiles = read_pids(pids, "factory") + read_pids(pids, "grandchild")
        if not ready:
            checks.expect(False, f"{variant} run (W={workers}) did not start its tests: "
                                 f"{(run_dir / 'output.txt').read_text(errors='replace')[-3000:]}")
            return None
        exited, stopped = interrupt(proc, compiles)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        leftovers = [pid for pid in read_pids(pids, "factory") + read_pids(pids, "grandchild")
                     if alive(pid)]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    what = f"{variant} W={workers}"
    checks.expect(proc.returncode is not None and exited < SAFETY_S,
                  f"{what}: the run did not exit within {SAFETY_S:g}s of SIGINT")
    if variant == "plugin":
        checks.expect(not leftovers, f"{what}: compile processes left running: {leftovers}")
        control = cache / ".mlcjit"
        for sub in ("staging", "failed"):
            left = sorted(p.name for p in (control / sub).glob("*"))
            checks.expect(not left, f"{what}: {sub} left behind: {left}")
        published = sorted(p.name for p in (cache / "tvm").glob("*.so"))
        checks.expect(not published, f"{what}: a library was published: {published}")
    return exited, stopped


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # A process started in the background by a shell (``cmd &``, some CI runners) ignores
    # SIGINT, and an ignored signal stays ignored across exec: the runs would never see the
    # Ctrl-C. A handled one is reset to the default in every program this one starts.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print_header("bench_interrupt: SIGINT while compiles run, vs plain pytest-xdist",
                 f"workers {args.workers}, {args.reps} round(s), plugin and plain "
                 "pytest-xdist alternating")
    checks = Checks(quick=args.quick)
    rows = []
    with work_dir(args, "interrupt") as root:
        for workers in args.workers:
            hiddens = [3 + 2 * i for i in range(max(workers, 1))]
            # With -n W each worker's prefetch compiles one of the W libraries; without
            # xdist the first test compiles one.
            expected = max(workers, 1)
            suites = {}
            for variant, test_py in (("plugin", PLUGIN_TEST_PY), ("plain", PLAIN_TEST_PY)):
                suite = root / f"w{workers}-{variant}"
                suite.mkdir()
                (suite / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
                (suite / "benchmodel.py").write_text(MODEL_PY, encoding="utf-8")
                (suite / "test_bench.py").write_text(test_py.format(hiddens=hiddens),
                                                     encoding="utf-8")
                suites[variant] = suite
            exits: dict[str, list[float]] = {"plugin": [], "plain": []}
            stops: list[float] = []
            for rep in range(args.reps):
                this: dict[str, tuple[float, float]] = {}
                for variant in rotate(["plugin", "plain"], rep):
                    got = one_run(variant, suites[variant], root / f"w{workers}-{rep}-{variant}",
                                  workers, expected=expected, checks=checks)
                    if got is not None and got[0] == got[0] and got[1] == got[1]:
                        this[variant] = got
                if len(this) != 2:
                    continue
                exits["plugin"].append(this["plugin"][0])
                exits["plain"].append(this["plain"][0])
                stops.append(this["plugin"][1])
                print(f"W={workers} round {rep}: after SIGINT, plugin: compiles gone in "
                      f"{this['plugin'][1]:.2f}s, run ended in {this['plugin'][0]:.2f}s; plain "
                      f"pytest-xdist ended in {this['plain'][0]:.2f}s", flush=True)
            label = f"W={workers}" if workers else "no xdist"
            exit_fig = checks.figure(f"{label}: SIGINT to the end of the run, plugin with "
                                     "compiles running / plain pytest-xdist",
                                     ratio_of(exits["plugin"], exits["plain"]), EXIT_TARGET)
            stop_fig = checks.figure(f"{label}: SIGINT to every compile gone / plain "
                                     "pytest-xdist's end of the run",
                                     ratio_of(stops, exits["plain"]), STOPPED_TARGET)
            rows.append([label, spread(exits["plain"]), spread(exits["plugin"]),
                         f"{exit_fig.ratio:.2f}x", exit_fig.verdict(), spread(stops),
                         f"{stop_fig.ratio:.2f}x", stop_fig.verdict()])
    print()
    print(table(["workers", "plain pytest-xdist: SIGINT to end s", "plugin: SIGINT to end s",
                 "plugin / plain", f"target <= {EXIT_TARGET}x", "plugin: compiles gone s",
                 "gone / plain end", f"target <= {STOPPED_TARGET}x"], rows))
    print("\nValues are median [min..max] over rounds; ratios are medians of per-round ratios.")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
