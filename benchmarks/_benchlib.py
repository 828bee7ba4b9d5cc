"""Shared helpers for the pytest-mlcjit benchmarks (not a benchmark itself).

Everything here works from outside the plugin: benchmark suites are generated into a
scratch directory and run with ``python -m pytest`` in a subprocess, compilations are
counted by the benchmark's own model factory (one line appended to a counter file per
call, in whatever process compiles), libraries are counted on the filesystem, and times
are measured by the benchmark itself (never read from the plugin's summary, manifests or
records). Every figure is a ratio of two quantities measured in the same repetition, the
variants alternating (their order rotates every repetition), and its verdict against the
stated target is computed (:meth:`Checks.figure`), printed as a ``verdict:`` line and
turned into the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: Environment variables that would change how the plugin or pytest behaves in a run.
_SCRUBBED_ENV = ("MLC_JIT_POLICY", "MLC_JIT_CACHE_DIR", "MLC_LLM_HOME", "MLC_DSO_SUFFIX",
                 "MLC_TEMP_DIR", "PYTEST_ADDOPTS", "PYTEST_PLUGINS",
                 "PYTEST_XDIST_AUTO_NUM_WORKERS", "MLCJIT_BENCH_COUNT",
                 # An installed plugin has its bytecode cached; measure that, not a fresh
                 # compile of every module on every start (this sandbox sets it to 1).
                 "PYTHONDONTWRITEBYTECODE")

#: Counts each factory call (= one compilation) in the file named by $MLCJIT_BENCH_COUNT.
MODEL_PY = '''\
"""Benchmark model: examples.models.transformer, counting each build (one build = one
compile; the line is written by whatever process compiles)."""
import os

from examples.models.transformer import build as _build


def build(**config):
    counter = os.environ.get("MLCJIT_BENCH_COUNT")
    if counter:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()} {sorted(config.items())}\\n")
    return _build(**config)
'''

#: The body of every benchmark test, identical in every variant: load the library into a
#: Relax VM and run ``forward`` once with constant parameters.
BODY_PY = '''\
import numpy as np
import tvm
from tvm import relax


def run_forward(path, params, config):
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), dev)
    seq, vocab = config.get("seq_len", 8), config.get("vocab_size", 64)
    tokens = (np.arange(seq, dtype="int32") % vocab).reshape(1, seq)
    args = [tvm.runtime.tensor(tokens, dev)]
    args += [tvm.runtime.tensor(np.full(p["shape"], 0.01, dtype=p["dtype"]), dev)
             for p in params]
    out = vm["forward"](*args)
    assert tuple(out.numpy().shape) == (1, seq, vocab)
'''

#: How the baselines compile (no plugin): the same build, export and tvm.compile the
#: plugin's compile subprocess does. $BENCH_COMPILE_MODE: "subprocess" (default: a fresh
#: python per compile, as the plugin does) or "inprocess" (in the test worker itself).
COMPILE_PY = '''\
import json
import os
import subprocess
import sys
from pathlib import Path


def _compile_library(config, out):
    """Build, export and ``tvm.compile`` ``config`` to the library ``out``; returns its
    parameter list (nothing else is written)."""
    import tvm

    from benchmodel import build

    module, spec = build(**config)
    mod, params = module.export_tvm(spec=spec)
    with tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(mod, target=tvm.target.Target("llvm"))
    executable.export_library(str(out))
    return [{"name": n, "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)}
            for n, p in params]


def _compile_here(config, out):
    meta = _compile_library(config, out)
    Path(str(out) + ".json").write_text(json.dumps(meta))


def compile_lib(config, out):
    """Compile ``config`` to ``out`` (and its parameter list to ``out + '.json'``)."""
    if os.environ.get("BENCH_COMPILE_MODE", "subprocess") == "inprocess":
        _compile_here(config, out)
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
    subprocess.run([sys.executable, __file__, json.dumps(config), str(out)], check=True,
                   env=env)


def load_meta(out):
    return json.loads(Path(str(out) + ".json").read_text())


if __name__ == "__main__":
    _compile_here(json.loads(sys.argv[1]), Path(sys.argv[2]))
'''

PLUGIN_TEST_PY = '''\
import pytest

from benchbody import run_forward
from pytest_mlcjit import TVMModel

CONFIGS = {configs!r}
IDS = {ids!r}
SPECS = [TVMModel("benchmodel:build", config=c) for c in CONFIGS]


@pytest.mark.parametrize("i", range({n_tests}))
@pytest.mark.parametrize("compiled_model", SPECS, indirect=True, ids=IDS)
def test_model(compiled_model, i):
    run_forward(compiled_model.path, compiled_model.param_specs, compiled_model.spec.config)
'''

BASELINE_TEST_PY = '''\
import pytest

from benchbody import run_forward

CONFIGS = {configs!r}
IDS = {ids!r}


@pytest.mark.parametrize("i", range({n_tests}))
@pytest.mark.parametrize("lib", CONFIGS, indirect=True, ids=IDS)
def test_model(lib, i):
    path, params, config = lib
    run_forward(path, params, config)
'''

#: (a) The pytest-xdist docs recipe: a session fixture computing under a FileLock in the
#: run's shared basetemp directory. Once per key per run; nothing persists between runs.
RECIPE_CONFTEST_PY = '''\
import pytest
from filelock import FileLock

from benchcompile import compile_lib, load_meta


def config_id(config):
    return "-".join(f"{k}{v}" for k, v in sorted(config.items()))


@pytest.fixture(scope="session")
def lib(request, tmp_path_factory, worker_id):
    config = request.param
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # shared by every worker of this run
    out = root / f"{config_id(config)}.so"
    with FileLock(str(out) + ".lock"):
        if not out.is_file():
            compile_lib(config, out)
    return out, load_meta(out), config
'''

#: (b) MLC-style JIT without a lock: on a miss each worker compiles into a temp dir and
#: moves the result into a persistent cache directory.
NOLOCK_CONFTEST_PY = '''\
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from benchcompile import compile_lib, load_meta

CACHE = Path(os.environ["BENCH_NOLOCK_CACHE"])


def config_id(config):
    return "-".join(f"{k}{v}" for k, v in sorted(config.items()))


@pytest.fixture(scope="session")
def lib(request):
    config = request.param
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"{config_id(config)}.so"
    if not out.is_file():
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".tmp-"))
        try:
            compile_lib(config, tmp / "lib.so")
            os.replace(tmp / "lib.so.json", str(out) + ".json")
            os.replace(tmp / "lib.so", out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out, load_meta(out), config
'''

#: The warm baseline: the same libraries, from a JSON list of known paths, no plugin.
PATHS_CONFTEST_PY = '''\
import json
import os
from pathlib import Path

import pytest

PATHS = json.loads(Path(os.environ["BENCH_LIB_PATHS"]).read_text())


def config_id(config):
    return "-".join(f"{k}{v}" for k, v in sorted(config.items()))


@pytest.fixture
def lib(request):
    entry = PATHS[config_id(request.param)]
    return Path(entry["path"]), entry["params"], request.param
'''

#: A prototype of background prefetching, from outside the plugin (public API only): in
#: each xdist worker, a session fixture takes the distinct (spec, device) pairs of the
#: collected tests, keeps those whose index in order of first use is this worker's modulo
#: the worker count, and compiles them in a thread through the session's ``mlc_jit``
#: engine (thread-safe; its per-key locks keep compilations at one per key).
PREFETCH_CONFTEST_PY = '''\
import os
import threading

import pytest


@pytest.fixture(scope="session", autouse=True)
def _bench_prefetch(request):
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    index = int(worker[2:])
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    engine = request.getfixturevalue("mlc_jit")
    wanted = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "compiled_model" in params:
            pair = (params["compiled_model"], params.get("mlc_device", "cpu"))
            if pair not in wanted:
                wanted.append(pair)
    mine = wanted[index::count]

    def work():
        for spec, device in mine:
            try:
                engine.compile(spec, device)
            except Exception:  # the test that needs it reports the error
                pass

    threading.Thread(target=work, name="bench-prefetch", daemon=True).start()
'''

SUITE_KINDS = {
    "plugin": (PLUGIN_TEST_PY, None),
    "plugin-prefetch": (PLUGIN_TEST_PY, PREFETCH_CONFTEST_PY),
    "recipe": (BASELINE_TEST_PY, RECIPE_CONFTEST_PY),
    "nolock": (BASELINE_TEST_PY, NOLOCK_CONFTEST_PY),
    "paths": (BASELINE_TEST_PY, PATHS_CONFTEST_PY),
}


# -- configs and suites ---------------------------------------------------------------------
def config_id(config: Mapping[str, Any]) -> str:
    """The same id the generated conftests use."""
    return "-".join(f"{k}{v}" for k, v in sorted(config.items()))


def make_configs(k: int, layers: Sequence[int]) -> list[dict[str, int]]:
    """``k`` distinct transformer configs: layers cycled from ``layers``, seq_len 8, 9, ..."""
    return [{"layers": layers[i % len(layers)], "seq_len": 8 + i} for i in range(k)]


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def write_suite(root: Path, kind: str, configs: Sequence[Mapping[str, Any]],
                n_tests: int) -> Path:
    """Write a runnable test directory of ``kind`` (a key of :data:`SUITE_KINDS`)."""
    test_py, conftest_py = SUITE_KINDS[kind]
    root.mkdir(parents=True, exist_ok=True)
    (root / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")  # pins the rootdir
    (root / "benchmodel.py").write_text(MODEL_PY, encoding="utf-8")
    (root / "benchbody.py").write_text(BODY_PY, encoding="utf-8")
    (root / "benchcompile.py").write_text(COMPILE_PY, encoding="utf-8")
    conftest = conftest_py or "# the plugin variant needs no conftest\n"
    (root / "conftest.py").write_text(conftest, encoding="utf-8")
    ids = [config_id(c) for c in configs]
    (root / "test_bench.py").write_text(
        test_py.format(configs=[dict(c) for c in configs], ids=ids, n_tests=n_tests),
        encoding="utf-8")
    return root


def count_lines(path: Path) -> int:
    """Lines in a counter file (0 if it does not exist)."""
    try:
        return len(path.read_text(encoding="utf-8").splitlines())
    except FileNotFoundError:
        return 0


def manifests(cache: Path, backend: str = "tvm") -> list[dict[str, Any]]:
    """Every manifest under ``cache/<backend>`` (read back as JSON)."""
    return [json.loads(p.read_text(encoding="utf-8"))
            for p in sorted((cache / backend).glob("*.manifest.json"))]


def libraries(cache: Path) -> int:
    """Libraries (``*.so``) in ``cache/tvm``."""
    return len(list((cache / "tvm").glob("*.so")))


# -- running --------------------------------------------------------------------------------
def bench_env(**extra: str) -> dict[str, str]:
    """Our environment without settings that change the plugin, with the repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


@dataclasses.dataclass
class Run:
    """One timed subprocess."""

    argv: list[str]
    seconds: float
    returncode: int
    output: str
    #: User + system CPU seconds of the whole process tree (workers, compilers) that ran:
    #: far less sensitive than wall time to other load on a shared machine.
    cpu_seconds: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


def run_timed(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str],
              timeout: float = 1800.0) -> Run:
    """Run ``argv`` to completion; its wall time from launch to exit, and the CPU time of
    its process tree (every descendant is waited for by its parent, so the kernel adds its
    usage to ours when ``argv`` exits; call this from one thread at a time)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(list(argv), cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return Run(list(argv), seconds, proc.returncode, proc.stdout, cpu)


def pytest_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]


def xdist_args(workers: int) -> list[str]:
    return ["-n", str(workers)] if workers > 0 else ["-p", "no:xdist"]


_HELP_CACHE: dict[str, str] = {}


def pytest_help(cwd: Path) -> str:
    """``pytest --help`` with the plugin loaded (to detect options that exist today)."""
    key = str(cwd)
    if key not in _HELP_CACHE:
        _HELP_CACHE[key] = run_timed(pytest_argv("--help"), cwd=cwd, env=bench_env()).output
    return _HELP_CACHE[key]


# -- statistics and output ------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``median [min..max]`` (just the value for one repetition)."""
    if not values:
        return "n/a"
    med = fmt.format(median(values))
    if len(values) == 1:
        return med
    return f"{med} [{fmt.format(min(values))}..{fmt.format(max(values))}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (pasteable into docs/explanation/benchmarks.md)."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])


def rotate(items: Sequence[str], rep: int) -> list[str]:
    """``items`` rotated by ``rep`` (the order of variants changes every repetition)."""
    k = rep % len(items)
    return [*items[k:], *items[:k]]


def best_makespan(times: Sequence[float], workers: int) -> float:
    """The optimal makespan of independent jobs ``times`` on ``workers`` identical workers
    (branch and bound over LPT order; exact for the small K used here)."""
    jobs = sorted(times, reverse=True)
    if not jobs or workers <= 0:
        return 0.0
    if workers >= len(jobs):
        return jobs[0]
    loads = [0.0] * workers
    for t in jobs:  # LPT: an upper bound to start from
        loads[loads.index(min(loads))] += t
    best = max(loads)
    lower = max(jobs[0], sum(jobs) / workers)
    if len(jobs) > 16:
        return best
    loads = [0.0] * workers

    def place(i: int) -> None:
        nonlocal best
        if i == len(jobs):
            best = min(best, max(loads))
            return
        seen: set[float] = set()
        for w in range(workers):
            if loads[w] in seen or loads[w] + jobs[i] >= best:
                continue  # same load as a worker tried already, or no better than best
            seen.add(loads[w])
            loads[w] += jobs[i]
            place(i + 1)
            loads[w] -= jobs[i]
            if best <= lower + 1e-12:
                return

    place(0)
    return best


def best_assignment(times: Sequence[float], workers: int) -> list[list[int]]:
    """An optimal assignment of jobs ``times`` (by index) to ``workers`` identical
    workers, each worker's jobs longest first (exhaustive with pruning: for K <= 12)."""
    order = sorted(range(len(times)), key=lambda i: -times[i])
    best_loads: list[list[int]] = [[] for _ in range(workers)]
    for i in order:  # LPT to start from
        min(best_loads, key=lambda js: sum(times[j] for j in js)).append(i)
    best = max(sum(times[j] for j in js) for js in best_loads)
    if len(times) > 12:
        return best_loads
    loads = [0.0] * workers
    jobs: list[list[int]] = [[] for _ in range(workers)]

    def place(k: int) -> None:
        nonlocal best, best_loads
        if k == len(order):
            if max(loads) < best:
                best, best_loads = max(loads), [list(js) for js in jobs]
            return
        i, seen = order[k], set()
        for w in range(workers):
            if loads[w] in seen or loads[w] + times[i] >= best:
                continue
            seen.add(loads[w])
            loads[w] += times[i]
            jobs[w].append(i)
            place(k + 1)
            jobs[w].pop()
            loads[w] -= times[i]

    place(0)
    return best_loads


class FileWatcher:
    """Polls ``pattern`` under ``root`` (every 10 ms, in a thread) while something runs, and
    records when the number of matching files first reached ``count``: the benchmark's own
    observation of when the last library was published (a manifest is written last)."""

    def __init__(self, root: Path, pattern: str, count: int) -> None:
        import threading

        self.root, self.pattern, self.count = root, pattern, count
        self.reached: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            if len(list(self.root.glob(self.pattern))) >= self.count:
                self.reached = time.time()
                return
            self._stop.wait(0.01)

    def __enter__(self) -> FileWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the machine ----------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_lines() -> list[str]:
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"command: python {shlex.join(sys.argv)}",
        f"machine: nproc={nproc}, cpu={cpu_model()}, {platform.system()} {platform.release()}",
        f"python {platform.python_version()}, apache-tvm {_version('apache-tvm')}, "
        f"pytest {_version('pytest')}, pytest-xdist {_version('pytest-xdist')}, "
        f"pytest-mlcjit {_version('pytest-mlcjit')}",
        f"load average at start: {loadavg()}",
    ]


def print_header(title: str, what: str) -> None:
    print(f"# {title}")
    print(what)
    for line in machine_lines():
        print(f"  {line}")
    print(flush=True)


# -- arguments and scratch space ------------------------------------------------------------
def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, one or two rounds (CI): checks correctness and "
                        "prints every figure's computed verdict without enforcing it")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scratch directory (default: a new temp dir, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")


@contextlib.contextmanager
def work_dir(args: argparse.Namespace, name: str) -> Iterator[Path]:
    """The benchmark's scratch directory (made fresh; removed unless --keep or given)."""
    if args.work_dir is not None:
        path = Path(args.work_dir).absolute() / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=f"mlcjit-{name}-"))
    try:
        yield path
    finally:
        if args.keep:
            print(f"(scratch kept in {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class Figure:
    """One reported figure: a ratio of two quantities the benchmark measured in the same
    repetitions, and its verdict against ``target`` (``ratio <= target``, or ``<`` when
    ``strict``), or no target."""

    name: str
    ratio: float
    target: float | None = None
    strict: bool = False

    @property
    def rounded(self) -> float:
        """The ratio as printed (4 decimals): the verdict is computed from this value."""
        return round(self.ratio, 4)

    @property
    def measured(self) -> bool:
        return self.ratio == self.ratio and self.ratio not in (float("inf"), float("-inf"))

    @property
    def met(self) -> bool | None:
        """Whether the target is met (None without a target)."""
        if self.target is None:
            return None
        if not self.measured:
            return False
        return self.rounded < self.target if self.strict else self.rounded <= self.target

    def verdict(self) -> str:
        if self.target is None:
            return "no target"
        if not self.measured:
            return "not measured"
        if self.met:
            return "met"
        return f"missed by {self.rounded / self.target - 1:.1%}" if self.target else "missed"

    def line(self) -> str:
        ratio = f"{self.rounded:.4f}" if self.measured else str(self.ratio).lower()
        if self.target is None:
            return f"verdict: {self.name} = {ratio}x, no target"
        op = "<" if self.strict else "<="
        return f"verdict: {self.name} = {ratio}x, target {op} {self.target:g}x: {self.verdict()}"


def ratio_of(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of the per-repetition ratios ``numerators[i] / denominators[i]`` (each
    pair measured side by side in one repetition); NaN unless both have the same length."""
    if len(numerators) != len(denominators):
        return float("nan")
    pairs = [(a, b) for a, b in zip(numerators, denominators, strict=True) if b > 0]
    return median([a / b for a, b in pairs]) if pairs else float("nan")


class Checks:
    """Correctness checks and figures: collected, printed at the end, and the exit status.

    Exit status: 1 when a correctness check failed; else 3 when a figure missed its target
    (not in ``--quick``: one or two rounds of tiny models on a shared CI machine measure
    nothing worth a verdict, so there a missed target is printed and not enforced; the
    quick-mode test checks that every verdict is computed from its ratio); else 0.
    """

    def __init__(self, *, quick: bool = False) -> None:
        self.failed: list[str] = []
        self.figures: list[Figure] = []
        self.quick = quick

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.failed.append(message)
            print(f"CHECK FAILED: {message}", flush=True)

    def run_ok(self, run: Run, what: str) -> bool:
        if not run.ok:
            self.expect(False, f"{what} exited {run.returncode}: {shlex.join(run.argv)}\n"
                               f"{run.tail()}")
        return run.ok

    def figure(self, name: str, ratio: float, target: float | None = None, *,
               strict: bool = False) -> Figure:
        """Record a figure (printed with its verdict by :meth:`exit_code`)."""
        fig = Figure(name, ratio, target, strict)
        self.figures.append(fig)
        return fig

    def exit_code(self) -> int:
        if self.figures:
            print("\nFigures (ratios of quantities measured side by side in the same "
                  "repetitions; median of the per-repetition ratios):")
            for fig in self.figures:
                print(fig.line())
        if self.failed:
            print(f"\n{len(self.failed)} check(s) failed")
            return 1
        print("\nall correctness checks passed")
        missed = [f for f in self.figures if f.met is False]
        if not missed:
            if any(f.target is not None for f in self.figures):
                print("all targets met")
            return 0
        names = "; ".join(f"{f.name} ({f.verdict()})" for f in missed)
        if self.quick:
            print(f"{len(missed)} target(s) missed, not enforced in --quick: {names}")
            return 0
        print(f"{len(missed)} target(s) missed: {names}")
        return 3
