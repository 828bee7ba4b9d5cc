"""Benchmark 6, the cold path: per-compile overhead, the compile schedule, known failures.

Three parts, each a ratio of things measured side by side in the same run (the variants
alternate, their order rotating every repetition), printed as Markdown tables:

(a) ``cold``: a cold ``pytest -n W`` run of M tiny distinct models (N tests each) with the
    plugin, against the physical limit: compiling the same M libraries in W processes
    that import TVM once each (the same build, export and ``tvm.compile`` the plugin's
    compile does), plus the same tests with ``-p no:mlcjit`` loading those prebuilt
    libraries from known paths. Target: cold / (in-process + plugin-off) <= 1.3.
(b) ``makespan``: one long and several short compiles (the factory sleeps: 8 s and eight
    of 1 s by default) on W workers, the long one last in first-use order; the tests wait
    until every library is published, so that all compiles are the background
    prefetch's (W compile slots: the schedule under test). Three variants, in an order
    that rotates every repetition: "no record", a cold run on a fresh cache (no compile
    times on record: first-use order); "on record", a run on a cache that a first run
    (before the repetitions, without xdist) left its compile times in, after a data file
    the factory reads changed (a new input state of every key: all compile again, with
    times on record); and "limit", W processes that import TVM once and then run the best
    schedule of the same jobs (exact, over the configured sleeps), each job the same
    factory, export and ``tvm.compile``. Every time is taken by this benchmark: a job
    starts when the factory is called (the factory writes the time), a plugin run's
    makespan ends when this script sees the last of its K libraries published (a
    manifest is written last; polled every 10 ms), the limit's when its last library is
    exported. Target: on record / limit <= 1.1.
(c) ``failures``: a warm run of K good models plus F models whose factory raises (their
    tests marked xfail), after a first run recorded the failures, against the warm run
    of the K good models alone. Target: <= 1.05.

Every figure is the median of per-repetition ratios; nothing is read from the plugin
(compiles are counted by the factory, libraries on the filesystem).

    python benchmarks/bench_coldpath.py               # full: every part, 5 reps
    python benchmarks/bench_coldpath.py --parts b     # one part
    python benchmarks/bench_coldpath.py --quick       # CI: small sizes, 1 rep, (c) without
                                                      # xdist
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _benchlib import (
    COMPILE_PY,
    Checks,
    FileWatcher,
    Run,
    bench_env,
    best_assignment,
    common_args,
    count_lines,
    print_header,
    pytest_argv,
    pytest_help,
    ratio_of,
    rotate,
    run_timed,
    spread,
    table,
    work_dir,
)

COLD_TARGET = 1.3
MAKESPAN_TARGET = 1.1
FAILURES_TARGET = 1.05

#: A tiny Relax model (one Linear + relu) that counts its builds, optionally sleeps (a
#: stand-in for a long compile), reads ``inputs.txt`` (a recorded input: changing it makes
#: a new input state of every key), and raises when asked to (a model under development).
MODEL_PY = '''\
import os
import time

from tvm.relax.frontend import nn

HERE = os.path.dirname(os.path.abspath(__file__))


class Tiny(nn.Module):
    def __init__(self, hidden):
        self.fc = nn.Linear(8, hidden)

    def forward(self, x):
        return nn.relu(self.fc(x))


def build(hidden=4, sleep=0.0, broken=False):
    counter = os.environ.get("MLCJIT_BENCH_COUNT")
    if counter:  # one line per compile, with the time the job started
        with open(counter, "a") as f:
            f.write(f"{os.getpid()} hidden={hidden} start={time.time()!r}\\n")
    with open(os.path.join(HERE, "inputs.txt")) as f:
        f.read()
    if broken:
        raise NotImplementedError(f"operator not supported yet (hidden={hidden})")
    time.sleep(sleep)
    return Tiny(hidden), {"forward": {"x": nn.spec.Tensor((2, 8), "float32")}}
'''

#: The body of every test, the same in every variant: load the library into a Relax VM and
#: run ``forward`` once with constant parameters.
BODY_PY = '''\
import numpy as np
import tvm
from tvm import relax


def run_forward(path, params, hidden):
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), dev)
    args = [tvm.runtime.tensor(np.full((2, 8), 0.5, dtype="float32"), dev)]
    args += [tvm.runtime.tensor(np.full(p["shape"], 0.01, dtype=p["dtype"]), dev)
             for p in params]
    out = vm["forward"](*args)
    assert tuple(out.numpy().shape) == (2, hidden)
'''

PLUGIN_TEST_PY = '''\
import pytest

from benchbody import run_forward
from pytest_mlcjit import TVMModel

CONFIGS = {configs!r}
MARKS = {marks!r}
SPECS = [pytest.param(TVMModel("benchmodel:build", config=c), id=f"h{{c['hidden']}}",
                      marks=[pytest.mark.xfail(reason="broken model", strict=True)]
                      if m else []) for c, m in zip(CONFIGS, MARKS)]


@pytest.mark.parametrize("i", range({n_tests}))
@pytest.mark.parametrize("compiled_model", SPECS, indirect=True)
def test_model(compiled_model, i):
    run_forward(compiled_model.path, compiled_model.param_specs,
                compiled_model.spec.config["hidden"])
'''

#: The plugin-off variant: the same tests, the libraries from a JSON list of known paths.
PATHS_TEST_PY = '''\
import json
import os
from pathlib import Path

import pytest

from benchbody import run_forward

CONFIGS = {configs!r}
PATHS = json.loads(Path(os.environ["BENCH_LIB_PATHS"]).read_text())


@pytest.fixture
def lib(request):
    entry = PATHS[str(request.param["hidden"])]
    return Path(entry["path"]), entry["params"], request.param["hidden"]


@pytest.mark.parametrize("i", range({n_tests}))
@pytest.mark.parametrize("lib", CONFIGS, indirect=True, ids=lambda c: f"h{{c['hidden']}}")
def test_model(lib, i):
    run_forward(*lib)
'''

#: The in-process limit: ``python inproc.py OUT_DIR W CONFIGS_JSON`` starts W processes,
#: each importing TVM once and compiling its share (i mod W) of the configs with the
#: suite's own ``benchcompile`` (the same build, export and tvm.compile as the plugin's
#: compile child), then waits for them.
INPROC_PY = '''\
import json
import subprocess
import sys
from pathlib import Path

from benchcompile import _compile_library


def compile_share(out, index, count, configs):
    paths = {}
    for config in configs[index::count]:
        lib = out / f"h{config['hidden']}.so"
        paths[str(config["hidden"])] = {"path": str(lib),
                                        "params": _compile_library(config, lib)}
    (out / f"paths{index}.json").write_text(json.dumps(paths))


if __name__ == "__main__":
    out, count, configs = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    if len(sys.argv) > 4:
        compile_share(out, int(sys.argv[4]), count, configs)
        sys.exit(0)
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:4], str(i)])
             for i in range(count)]
    sys.exit(max(p.wait() for p in procs))
'''


#: (b) The limit: ``python limit.py OUT ASSIGNMENT_JSON`` (a list per worker of configs)
#: starts one process per worker; each imports TVM and the model and compiles a throwaway
#: config (TVM's one-time set-up), says it is ready, waits for the others, then compiles
#: its configs in order (the same factory, export and tvm.compile as the plugin's compile
#: child: the suite's own ``benchcompile``), and writes each job's (start, end) times.
LIMIT_PY = '''\
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchcompile import _compile_library


def compile_one(out, config):
    _compile_library(config, out / f"h{config['hidden']}-{os.getpid()}.so")


def work(out, index, configs):
    compile_one(out, {"hidden": 3})  # untimed: TVM's one-time set-up of a first compile
    (out / f"ready{index}").touch()
    while not (out / "go").exists():
        time.sleep(0.002)
    spans = []
    for config in configs:
        start = time.time()
        compile_one(out, config)
        spans.append([start, time.time()])
    (out / f"spans{index}.json").write_text(json.dumps(spans))


if __name__ == "__main__":
    out, assignment = Path(sys.argv[1]), json.loads(sys.argv[2])
    if len(sys.argv) > 3:
        index = int(sys.argv[3])
        work(out, index, assignment[index])
        sys.exit(0)
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:3], str(i)])
             for i in range(len(assignment))]
    while not all((out / f"ready{i}").exists() for i in range(len(procs))):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.002)
    (out / "go").touch()
    sys.exit(max(p.wait() for p in procs))
'''


#: (b) Holds every test until the cache holds $BENCH_HOLD manifests, so that every compile
#: is the background prefetch's (W compile slots, the schedule under test), not a test's
#: own on-demand compile running beside it.
HOLD_CONFTEST_PY = '''\
import os
import pathlib
import time

import pytest


@pytest.fixture(autouse=True)
def _hold_until_prefetched():
    wanted = int(os.environ.get("BENCH_HOLD", "0"))
    libraries = pathlib.Path(os.environ["BENCH_CACHE"]) / "tvm"
    deadline = time.monotonic() + 600
    while len(list(libraries.glob("*.manifest.json"))) < wanted:
        assert time.monotonic() < deadline, "prefetch did not publish every library"
        time.sleep(0.05)
'''


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--parts", default="a,b,c",
                        help="which parts to run: a (cold), b (makespan), c (failures); "
                        "default a,b,c")
    parser.add_argument("--workers", type=int, default=2, help="xdist workers W (default 2)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--models", type=int, default=16,
                        help="(a) tiny distinct models M (default 16)")
    parser.add_argument("--tests", type=int, default=2,
                        help="(a), (c) tests per model N (default 2)")
    parser.add_argument("--long", type=float, default=8.0,
                        help="(b) the long compile's factory sleep, s (default 8)")
    parser.add_argument("--short", type=float, default=1.0,
                        help="(b) each short compile's factory sleep, s (default 1)")
    parser.add_argument("--shorts", type=int, default=8,
                        help="(b) how many short compiles (default 8)")
    parser.add_argument("--good", type=int, default=16, help="(c) good models K (default 16)")
    parser.add_argument("--broken", type=int, default=4,
                        help="(c) models whose factory raises F (default 4)")
    parser.add_argument("--failures-workers", type=int, default=None,
                        help="(c) xdist workers (default: --workers)")
    args = parser.parse_args(argv)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts <= {"a", "b", "c"}:
        parser.error("--parts takes a comma-separated subset of a,b,c")
    if args.quick:
        args.reps, args.models, args.tests = 1, 4, 1
        args.long, args.short, args.shorts = 1.0, 0.2, 3
        args.good, args.broken = 3, 2
        args.failures_workers = 0  # (c) is not about xdist: one process, no TVM imports
    if args.failures_workers is None:
        args.failures_workers = args.workers
    return args


def write_suite(root: Path, configs: list[dict[str, Any]], n_tests: int, *,
                broken: list[bool] | None = None, paths: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    (root / "benchmodel.py").write_text(MODEL_PY, encoding="utf-8")
    (root / "benchbody.py").write_text(BODY_PY, encoding="utf-8")
    (root / "benchcompile.py").write_text(COMPILE_PY, encoding="utf-8")
    (root / "inproc.py").write_text(INPROC_PY, encoding="utf-8")
    (root / "limit.py").write_text(LIMIT_PY, encoding="utf-8")
    (root / "inputs.txt").write_text("0\n", encoding="utf-8")
    (root / "conftest.py").write_text("# no conftest needed\n", encoding="utf-8")
    marks = broken or [False] * len(configs)
    text = (PATHS_TEST_PY.format(configs=configs, n_tests=n_tests) if paths else
            PLUGIN_TEST_PY.format(configs=configs, marks=marks, n_tests=n_tests))
    (root / "test_bench.py").write_text(text, encoding="utf-8")
    return root


def plugin_run(suite: Path, cache: Path, workers: int, counter: Path, *extra: str,
               basetemp: Path, hold: int = 0) -> Run:
    argv = pytest_argv("-n", str(workers), f"--basetemp={basetemp}", "--mlc-device=cpu",
                       f"--mlc-jit-cache-dir={cache}", *extra)
    return run_timed(argv, cwd=suite, env=bench_env(MLCJIT_BENCH_COUNT=str(counter),
                                                    BENCH_HOLD=str(hold),
                                                    BENCH_CACHE=str(cache)))


# -- (a) cold run of many tiny models -----------------------------------------------------------
def part_cold(args: argparse.Namespace, root: Path, checks: Checks) -> None:
    m, n, w = args.models, args.tests, args.workers
    print(f"## (a) cold: M={m} tiny models x N={n} tests, -n {w}, {args.reps} rep(s)\n",
          flush=True)
    configs = [{"hidden": 4 + i} for i in range(m)]
    plugin_suite = write_suite(root / "cold-plugin", configs, n)
    paths_suite = write_suite(root / "cold-paths", configs, n, paths=True)
    res: dict[str, list[float]] = {k: [] for k in (
        "cold", "inproc", "off", "limit", "cold_cpu", "limit_cpu")}
    for rep in range(args.reps):
        rep_dir = root / f"cold-rep{rep}"
        rep_dir.mkdir()
        this: dict[str, float] = {}
        for variant in rotate(["plugin", "limit"], rep):
            if variant == "plugin":
                counter = rep_dir / "compiles.txt"
                cold = plugin_run(plugin_suite, rep_dir / "cache", w, counter,
                                  basetemp=rep_dir / "bt")
                if checks.run_ok(cold, f"(a) rep {rep} plugin cold run"):
                    this["cold"], this["cold_cpu"] = cold.seconds, cold.cpu_seconds
                checks.expect(count_lines(counter) == m,
                              f"(a) rep {rep}: {count_lines(counter)} compiles, expected {m}")
            else:
                libs = rep_dir / "libs"
                libs.mkdir()
                inproc = run_timed([sys.executable, "inproc.py", str(libs), str(w),
                                    json.dumps(configs)], cwd=paths_suite, env=bench_env())
                checks.run_ok(inproc, f"(a) rep {rep} in-process compiles")
                merged: dict[str, Any] = {}
                for part in libs.glob("paths*.json"):
                    merged.update(json.loads(part.read_text()))
                checks.expect(len(merged) == m, f"(a) rep {rep}: {len(merged)} prebuilt libs")
                (libs / "paths.json").write_text(json.dumps(merged))
                off = run_timed(pytest_argv("-n", str(w), "-p", "no:mlcjit",
                                            f"--basetemp={rep_dir / 'bt-off'}"),
                                cwd=paths_suite,
                                env=bench_env(BENCH_LIB_PATHS=str(libs / "paths.json")))
                if checks.run_ok(off, f"(a) rep {rep} plugin-off run") and inproc.ok:
                    this.update(inproc=inproc.seconds, off=off.seconds,
                                limit=inproc.seconds + off.seconds,
                                limit_cpu=inproc.cpu_seconds + off.cpu_seconds)
        if len(this) != len(res):
            continue  # a variant failed (reported): no ratio for this rep
        for key, value in this.items():
            res[key].append(value)
        print(f"rep {rep}: plugin cold {this['cold']:.2f}s (CPU {this['cold_cpu']:.1f}s); "
              f"in-process compiles {this['inproc']:.2f}s + plugin-off run {this['off']:.2f}s "
              f"= {this['limit']:.2f}s (CPU {this['limit_cpu']:.1f}s); ratio "
              f"{this['cold'] / this['limit']:.2f}", flush=True)
    fig = checks.figure("(a) cold run / (in-process compiles + plugin-off run)",
                        ratio_of(res["cold"], res["limit"]), COLD_TARGET)
    cpu = checks.figure("(a) CPU time: cold run / (in-process compiles + plugin-off run)",
                        ratio_of(res["cold_cpu"], res["limit_cpu"]))
    print()
    print(table(["plugin cold s", "in-process compiles s", "plugin-off run s", "limit s",
                 "cold / limit", "CPU: cold / limit", f"target <= {COLD_TARGET}"],
                [[spread(res["cold"]), spread(res["inproc"]), spread(res["off"]),
                  spread(res["limit"]), f"{fig.ratio:.2f}x", f"{cpu.ratio:.2f}x",
                  fig.verdict()]]))
    print(flush=True)


# -- (b) makespan of a mix of compile times -----------------------------------------------------
def _starts(counter: Path) -> list[float]:
    """The start times the factory wrote, one per compile."""
    try:
        lines = counter.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return [float(line.rpartition("start=")[2]) for line in lines if "start=" in line]


def _plugin_makespan(suite: Path, cache: Path, w: int, k: int, rep_dir: Path, *,
                     checks: Checks, what: str) -> tuple[float, float] | None:
    """One plugin run of the K jobs; (makespan, pytest wall s): the first factory call to
    the moment this script saw the K-th new library published."""
    counter = rep_dir / "compiles.txt"
    before = len(list((cache / "tvm").glob("*.manifest.json")))
    with FileWatcher(cache / "tvm", "*.manifest.json", before + k) as seen:
        run = plugin_run(suite, cache, w, counter, basetemp=rep_dir / "bt", hold=before + k)
    ok = checks.run_ok(run, what)
    starts = _starts(counter)
    checks.expect(len(starts) == k, f"{what}: {len(starts)} compiles, expected {k}")
    checks.expect(seen.reached is not None, f"{what}: {k} new libraries were not published")
    if not ok or not starts or seen.reached is None:
        return None
    return seen.reached - min(starts), run.seconds


def _limit_makespan(suite: Path, configs: list[dict[str, Any]], assignment: list[list[int]],
                    rep_dir: Path, *, checks: Checks, what: str) -> tuple[float, float] | None:
    """The best schedule run for real by W processes; (makespan, process wall s)."""
    out = rep_dir / "limit"
    out.mkdir(parents=True)
    jobs = [[configs[i] for i in worker] for worker in assignment]
    run = run_timed([sys.executable, "limit.py", str(out), json.dumps(jobs)], cwd=suite,
                    env=bench_env())
    if not checks.run_ok(run, what):
        return None
    spans = [span for part in out.glob("spans*.json") for span in json.loads(part.read_text())]
    checks.expect(len(spans) == len(configs), f"{what}: {len(spans)} libraries")
    if not spans:
        return None
    return max(e for _, e in spans) - min(s for s, _ in spans), run.seconds


def part_makespan(args: argparse.Namespace, root: Path, checks: Checks) -> None:
    w = args.workers
    sleeps = [args.short] * args.shorts + [args.long]  # the long one is used last
    k = len(sleeps)
    print(f"## (b) makespan: {args.shorts} compiles sleeping {args.short:g}s and one sleeping "
          f"{args.long:g}s (used last), -n {w}, {args.reps} rep(s)\n", flush=True)
    configs = [{"hidden": 4 + i, "sleep": s} for i, s in enumerate(sleeps)]
    suite = write_suite(root / "makespan", configs, 1)
    (suite / "conftest.py").write_text(HOLD_CONFTEST_PY, encoding="utf-8")
    assignment = best_assignment(sleeps, w)
    on_record = root / "makespan-on-record"
    (suite / "inputs.txt").write_text("first run\n", encoding="utf-8")
    # Without xdist (cheaper): it only has to leave every job's compile time on record.
    first = plugin_run(suite, on_record, 0, root / "makespan-first.txt",
                       basetemp=root / "makespan-first-bt")
    checks.run_ok(first, "(b) the first run (puts the compile times on record)")
    variants = ("no record", "on record", "limit")
    span: dict[str, list[float]] = {v: [] for v in variants}
    wall: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.reps):
        this: dict[str, tuple[float, float]] = {}
        for variant in rotate(list(variants), rep):
            rep_dir = root / f"makespan-rep{rep}" / variant.replace(" ", "-")
            rep_dir.mkdir(parents=True)
            what = f"(b) rep {rep} {variant}"
            if variant == "limit":
                got = _limit_makespan(suite, configs, assignment, rep_dir, checks=checks,
                                      what=what)
            else:
                if variant == "on record":  # a new input state of every key
                    (suite / "inputs.txt").write_text(f"rep {rep}\n", encoding="utf-8")
                cache = on_record if variant == "on record" else rep_dir / "cache"
                got = _plugin_makespan(suite, cache, w, k, rep_dir, checks=checks,
                                       what=what)
            if got is not None:
                this[variant] = got
        if len(this) != len(variants):
            continue
        for variant, (s, wall_s) in this.items():
            span[variant].append(s)
            wall[variant].append(wall_s)
        lim = this["limit"][0]
        print(f"rep {rep}: makespan no record {this['no record'][0]:.2f}s "
              f"({this['no record'][0] / lim:.2f}x), on record {this['on record'][0]:.2f}s "
              f"({this['on record'][0] / lim:.2f}x), limit {lim:.2f}s", flush=True)
    print()
    rows = []
    for variant, what, target in (
            ("no record", "cold, nothing on record (first-use order)", None),
            ("on record", "the first run's compile times on record (new input state)",
             MAKESPAN_TARGET)):
        fig = checks.figure(f"(b) {variant}: makespan / limit", ratio_of(span[variant],
                                                                         span["limit"]),
                            target)
        rows.append([variant, what, spread(span[variant]), f"{fig.ratio:.2f}x",
                     spread(wall[variant]), fig.verdict() if target else "-"])
    rows.append(["limit", f"{w} processes with TVM imported run the best schedule "
                 f"{[[sleeps[i] for i in a] for a in assignment]}", spread(span["limit"]),
                 "1x", spread(wall["limit"]), ""])
    print(table(["variant", "what", "makespan s", "makespan / limit", "process wall s",
                 f"target <= {MAKESPAN_TARGET}"], rows))
    print(flush=True)


# -- (c) a warm run with known failures ---------------------------------------------------------
def part_failures(args: argparse.Namespace, root: Path, checks: Checks) -> None:
    k, f, n, w = args.good, args.broken, args.tests, args.failures_workers
    print(f"## (c) known failures: K={k} good models + F={f} broken (xfail), N={n} tests "
          f"each, warm, -n {w}, {args.reps} rep(s)\n", flush=True)
    good = [{"hidden": 4 + i} for i in range(k)]
    bad = [{"hidden": 100 + i, "broken": True} for i in range(f)]
    with_bad = write_suite(root / "failures-all", good + bad, n,
                           broken=[False] * k + [True] * f)
    only_good = write_suite(root / "failures-good", good, n)
    remembers = "--mlc-jit-retry-failed" in pytest_help(only_good)
    cache, counter = root / "failures-cache", root / "failures-compiles.txt"
    # Warm the cache and record the failures: a failure is known once it failed twice alike
    # (one failure may have been transient), so the suite with them runs twice.
    for i, suite in enumerate((only_good, with_bad, with_bad)):
        first = plugin_run(suite, cache, w, counter, basetemp=root / f"bt-first-{i}")
        checks.run_ok(first, f"(c) warming run {i} in {suite.name}")
    checks.expect(count_lines(counter) == k + 2 * f,
                  f"(c) the warming runs compiled {count_lines(counter)}, expected {k + 2 * f}")
    res: dict[str, list[float]] = {"good": [], "all": [], "recompiled": []}
    for rep in range(args.reps):
        times: dict[str, float] = {}
        for variant in rotate(["good", "all"], rep):
            suite = only_good if variant == "good" else with_bad
            before = count_lines(counter)
            run = plugin_run(suite, cache, w, counter, basetemp=root / f"bt-{rep}-{variant}")
            if checks.run_ok(run, f"(c) rep {rep} {variant}"):
                times[variant] = run.seconds
            recompiled = count_lines(counter) - before
            if variant == "all":
                res["recompiled"].append(recompiled)
                if remembers:
                    checks.expect(recompiled == 0, f"(c) rep {rep}: a known failure was "
                                                   f"compiled again ({recompiled} compiles)")
                checks.expect(f"{f * n} xfailed" in run.output,
                              f"(c) rep {rep}: expected {f * n} xfailed\n{run.tail()}")
            else:
                checks.expect(recompiled == 0, f"(c) rep {rep}: the warm run compiled")
        if len(times) != 2:
            continue
        res["good"].append(times["good"])
        res["all"].append(times["all"])
        print(f"rep {rep}: good only {times['good']:.2f}s, with {f} known failures "
              f"{times['all']:.2f}s ({res['recompiled'][-1]:g} compiled again), ratio "
              f"{times['all'] / times['good']:.3f}", flush=True)
    fig = checks.figure(f"(c) warm run with {f} known failures / without",
                        ratio_of(res["all"], res["good"]), FAILURES_TARGET)
    print()
    print(table(["K good only s", f"K good + {f} known failures s", "compiled again per run",
                 "ratio", f"target <= {FAILURES_TARGET}"],
                [[spread(res["good"]), spread(res["all"]), spread(res["recompiled"], "{:.0f}"),
                  f"{fig.ratio:.3f}x", fig.verdict()]]))
    if not remembers:
        print("(this plugin has no --mlc-jit-retry-failed: failures are compiled again on "
              "every run)")
    print(flush=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print_header("bench_coldpath: per-compile overhead, compile schedule, known failures",
                 f"parts {','.join(sorted(args.parts))}, W={args.workers}, "
                 f"{args.reps} rep(s){' (quick)' if args.quick else ''}")
    checks = Checks(quick=args.quick)
    with work_dir(args, "coldpath") as root:
        if "a" in args.parts:
            part_cold(args, root, checks)
        if "b" in args.parts:
            part_makespan(args, root, checks)
        if "c" in args.parts:
            part_failures(args, root, checks)
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
