"""The GPU check of issue 20, in one go: run it on a machine with an NVIDIA GPU.

    python benchmarks/gpu_check.py [--workers 4] [--work-dir DIR] [--keep] [--require-gpu]

From a fresh clone with the package installed (``pip install -e ".[test]"``), nothing from
the network, every subprocess bounded by a timeout, everything written under the work dir
(a temp dir removed afterwards unless ``--keep``; the GPU lock files too:
``TVM_TEST_LOCK_DIR`` is the work dir's ``locks/``). Parts:

(a) **The lock.** The example suite (``examples/``) plus a generated suite of ``gpu``-marked
    tests that run a compiled model and a ``tvm.runtime.tensor`` round trip on the GPU for
    ``--hold`` seconds each, in one ``pytest --mlc-device=cpu,cuda -n N
    --mlc-jit-gpu-lock=on`` run on a fresh cache, while a side process takes TVM's own
    lock (``tvm.testing.run_with_gpu_lock``) a few times for GPU work of its own. Every
    holder's call phase is recorded (time.time(), pid, worker, device): the generated
    tests' bodies write theirs, the examples' are written by a ``pytest_pyfunc_call``
    wrapper (innermost, so inside the lock). Reported: the pairs of different holders on
    the same GPU whose intervals overlap (must be 0) and each GPU's idle fraction over
    the run (1 - union of the holders' intervals / the run's wall time). A control run
    of the generated suite with ``--mlc-jit-gpu-lock=off`` (and one GPU) must show
    overlaps, or the measure could not have seen any.
(b) **The CUDA libraries.** Each CUDA library the run left in the cache (``pytest-mlcjit
    list --json``) is requested again through ``JIT.compile(..., policy=READONLY)`` (the
    same key, no compile), loaded and run on the GPU, and compared with numpy's
    reference (``examples/reference.py``) and with the same spec's CPU library.
(c) **MLC golden name** for ``cuda:0``, where ``mlc_llm`` is importable: the library file
    the plugin names for an MLC model directory on ``cuda:0`` is the one MLC-LLM computes
    with its own config classes (MD5 of the six-field key), and, where
    ``mlc_llm.interface.jit.jit`` is there, the one MLC's own JIT finds under
    ``MLC_JIT_POLICY=READONLY``. Without ``mlc_llm``: ``mlc=skipped``.
(d) One summary line, last: ``gpu_check: PASS overlaps=0 idle=0.83 cuda_libraries=5/5
    mlc=skipped ...``; exit 0 on PASS, 1 on FAIL.

Without an NVIDIA GPU (``nvidia-smi -L`` lists none, or TVM's probe sees no ``cuda:0``) it
prints ``gpu_check: SKIP no NVIDIA GPU (...)`` and exits 0, or 2 with ``--require-gpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent

EXIT_PASS, EXIT_FAIL, EXIT_NO_GPU = 0, 1, 2
#: Environment variables that would change the runs: removed from the subprocesses'.
SCRUBBED_ENV = ("MLC_JIT_POLICY", "MLC_JIT_CACHE_DIR", "MLC_JIT_GPU_LOCK", "MLC_JIT_REMOTE",
                "MLC_LLM_HOME", "MLC_DSO_SUFFIX", "MLC_TEMP_DIR", "PYTEST_ADDOPTS",
                "PYTEST_PLUGINS", "TVM_TEST_TARGETS", "CUDA_VISIBLE_DEVICES")
#: The plugin options the check needs, and which part of issue 20 brings each.
NEEDED_OPTIONS = {"--mlc-jit-gpu-lock": "the GPU lock (must-have 1)"}
OPTIONAL_OPTIONS = {"--mlc-jit-gpu-assign": "one GPU per worker (must-have 2)"}


# -- the figures: pure functions, unit-tested on hand-made intervals ------------------------
class Interval(NamedTuple):
    """One holder's call phase on one GPU."""

    holder: str  # a test's node id, or the side process's n-th hold
    device: str  # cuda:0
    start: float
    end: float
    pid: int = 0
    worker: str = ""


def overlapping_pairs(intervals: Iterable[Interval]) -> list[tuple[Interval, Interval]]:
    """Pairs of intervals of different holders on the same device that overlap (a shared
    instant is no overlap: one ended as the other began)."""
    by_device: dict[str, list[Interval]] = {}
    for iv in intervals:
        by_device.setdefault(iv.device, []).append(iv)
    pairs = []
    for ivs in by_device.values():
        ivs.sort(key=lambda iv: (iv.start, iv.end))
        for i, a in enumerate(ivs):
            for b in ivs[i + 1:]:
                if b.start >= a.end:
                    break
                if a.holder != b.holder:
                    pairs.append((a, b))
    return pairs


def busy_seconds(intervals: Iterable[Interval]) -> float:
    """The length of the union of the intervals."""
    total, end = 0.0, float("-inf")
    for iv in sorted(intervals, key=lambda iv: iv.start):
        if iv.end <= end:
            continue
        total += iv.end - max(iv.start, end)
        end = iv.end
    return total


def idle_fractions(intervals: Iterable[Interval], wall_start: float,
                   wall_end: float) -> dict[str, float]:
    """Per device: 1 - (union of its holders' intervals, clipped to the run) / the run's
    wall time."""
    wall = wall_end - wall_start
    by_device: dict[str, list[Interval]] = {}
    for iv in intervals:
        clipped = iv._replace(start=max(iv.start, wall_start), end=min(iv.end, wall_end))
        if clipped.end > clipped.start:
            by_device.setdefault(iv.device, []).append(clipped)
        else:
            by_device.setdefault(iv.device, [])
    if wall <= 0:
        return dict.fromkeys(by_device, 1.0)
    return {dev: 1.0 - busy_seconds(ivs) / wall for dev, ivs in sorted(by_device.items())}


def read_intervals(records: Path) -> list[Interval]:
    """Every ``*.jsonl`` line under ``records``: ``{"holder", "device", "start", "end",
    "pid", "worker"}``."""
    out = []
    for path in sorted(records.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                out.append(Interval(str(d["holder"]), str(d["device"]), float(d["start"]),
                                    float(d["end"]), int(d.get("pid", 0)),
                                    str(d.get("worker", ""))))
    return out


def summary_line(verdict: str, fields: Mapping[str, object]) -> str:
    return " ".join(["gpu_check:", verdict, *(f"{k}={v}" for k, v in fields.items())])


# -- what the runs are made of ---------------------------------------------------------------
RECORDER = '''\
"""Loaded with -p by gpu_check.py: records the call phase of each gpu-marked test whose
module does not record itself, innermost around the test function (inside the GPU lock)."""
import json, os, time
import pytest

def _device(item):
    for name in ("compiled_model", "mlc_device"):
        value = getattr(item, "funcargs", {}).get(name)
        value = getattr(value, "device", value)
        if value is not None:
            return f"{value.kind}:{value.index}"
    return "cuda:0"

@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_pyfunc_call(pyfuncitem):
    own = getattr(pyfuncitem.module, "GPU_CHECK_SELF_RECORDING", False)
    if own or pyfuncitem.get_closest_marker("gpu") is None:
        return (yield)
    start = time.time()
    try:
        return (yield)
    finally:
        end = time.time()
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        line = json.dumps({"holder": pyfuncitem.nodeid, "device": _device(pyfuncitem),
                           "start": start, "end": end, "pid": os.getpid(), "worker": worker})
        with open(os.path.join(os.environ["GPU_CHECK_RECORDS"], f"{worker}.jsonl"), "a") as f:
            f.write(line + "\\n")
'''

HOLD_SUITE = '''\
"""Generated by gpu_check.py: gpu-marked tests that run a compiled model and a tensor round
trip on their GPU for GPU_CHECK_HOLD seconds, and record their own call phase."""
import json, os, time
import numpy as np
import pytest
from pytest_mlcjit import TVMModel

GPU_CHECK_SELF_RECORDING = True
MLP = TVMModel("examples.models.mlp:build", config={"hidden": 32})  # the examples' own


@pytest.mark.parametrize("i", range(int(os.environ.get("GPU_CHECK_TESTS", "8"))))
@pytest.mark.mlc_devices("cuda")
@pytest.mark.mlc_model(MLP)
def test_holds_the_gpu(compiled_model, i):
    import tvm
    start = time.time()
    assert compiled_model.device.kind == "cuda"
    dev = compiled_model.tvm_device()
    x = np.random.default_rng(i).standard_normal((2, 16)).astype("float32")
    block = np.arange(1 << 20, dtype="float32") + i
    rounds = 0
    while rounds == 0 or time.time() - start < float(os.environ["GPU_CHECK_HOLD"]):
        out = compiled_model.run("forward", x)
        assert out.shape == (2, 4) and np.isfinite(out).all()
        back = tvm.runtime.tensor(block, device=dev).numpy()
        np.testing.assert_array_equal(back, block)
        rounds += 1
    end = time.time()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    device = compiled_model.device
    line = json.dumps({"holder": f"test_holds_the_gpu[{i}]",
                       "device": f"{device.kind}:{device.index}", "start": start,
                       "end": end, "pid": os.getpid(), "worker": worker, "rounds": rounds})
    with open(os.path.join(os.environ["GPU_CHECK_RECORDS"], f"{worker}.jsonl"), "a") as f:
        f.write(line + "\\n")
'''

TVM_STYLE_HOLDER = '''\
"""Generated by gpu_check.py: takes TVM's own GPU lock (tvm.testing.run_with_gpu_lock) for
GPU work, COUNT times, HOLD seconds each, once the STARTED file exists."""
import json, os, sys, time
import numpy as np
import tvm
from tvm.testing import run_with_gpu_lock

records, count, hold, started = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.time() + 600
while not os.path.exists(started) and time.time() < deadline:
    time.sleep(0.05)
block = np.arange(1 << 20, dtype="float32")

def work(n):
    start = time.time()
    while time.time() - start < hold:
        np.testing.assert_array_equal(tvm.runtime.tensor(block, device=tvm.cuda(0)).numpy(), block)
    return {"holder": f"tvm.testing.run_with_gpu_lock#{n}", "device": "cuda:0", "start": start,
            "end": time.time(), "pid": os.getpid(), "worker": "tvm-style"}

for n in range(count):
    line = json.dumps(run_with_gpu_lock(work, n))
    with open(os.path.join(records, "tvm-style.jsonl"), "a") as f:
        f.write(line + "\\n")
    time.sleep(hold)  # let the suite's tests in between
'''


# -- running things --------------------------------------------------------------------------
class Ran(NamedTuple):
    rc: int  # -9 when the timeout killed it
    out: str
    seconds: float
    start: float
    end: float


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra)
    return env


def run(argv: Sequence[str], *, timeout: float, cwd: Path = REPO,
        env: Mapping[str, str] | None = None, log: Path | None = None) -> Ran:
    """Run ``argv`` in its own process group, killed whole at ``timeout``; its output (also
    written to ``log``)."""
    start = time.time()
    with subprocess.Popen(list(argv), cwd=cwd, env=dict(env or clean_env()), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            out, _ = proc.communicate()
            out += f"\n[gpu_check: killed after the {timeout:g}s timeout]\n"
            rc = -9
    end = time.time()
    if log is not None:
        log.write_text(f"$ {' '.join(argv)}\n{out}", encoding="utf-8")
    return Ran(rc, out, end - start, start, end)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def find_gpu(timeout: float) -> tuple[str | None, int, str]:
    """(why there is no usable NVIDIA GPU, or None; how many nvidia-smi lists; cuda:0's
    arch as TVM's probe gives it)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi not found", 0, ""
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return f"nvidia-smi -L timed out after {timeout:g}s", 0, ""
    gpus = [line for line in proc.stdout.splitlines() if line.startswith("GPU ")]
    if proc.returncode != 0 or not gpus:
        why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no GPU listed"]
        return f"nvidia-smi -L: {why[0]}", 0, ""
    from pytest_mlcjit.device import Device, probe

    presence = probe([Device("cuda")], timeout=timeout)["cuda"]
    if not presence.present:
        reason = presence.reason
        return (reason if reason.startswith("TVM sees no") else f"TVM sees no cuda:0: {reason}",
                len(gpus), "")
    print(f"GPUs (nvidia-smi -L): {len(gpus)}; TVM's probe: cuda:0 present, {presence.arch}")
    for line in gpus:
        print(f"  {line}")
    return None, len(gpus), str(presence.arch or "")


def plugin_options(timeout: float) -> set[str]:
    ran = run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
              timeout=timeout)
    wanted = {*NEEDED_OPTIONS, *OPTIONAL_OPTIONS, "--mlc-jit-require-devices"}
    return {o for o in wanted if o in ran.out}


# -- (a) the lock ----------------------------------------------------------------------------
def part_lock(work: Path, args: argparse.Namespace, options: set[str],
              fields: dict[str, object], failures: list[str]) -> None:
    missing = [f"{o} ({what})" for o, what in NEEDED_OPTIONS.items() if o not in options]
    if missing:
        failures.append("the plugin lacks " + ", ".join(missing))
        fields["overlaps"] = "n/a"
        return
    suite, plugins, records = work / "suite", work / "plugins", work / "records"
    for d in (suite, plugins, records, work / "locks"):
        d.mkdir(parents=True, exist_ok=True)
    (plugins / "gpu_check_recorder.py").write_text(RECORDER, encoding="utf-8")
    (suite / "test_gpu_check_holds.py").write_text(HOLD_SUITE, encoding="utf-8")
    (work / "tvm_style_holder.py").write_text(TVM_STYLE_HOLDER, encoding="utf-8")
    env = clean_env(
        PYTHONPATH=os.pathsep.join([str(plugins), str(REPO),
                                    *filter(None, [os.environ.get("PYTHONPATH")])]),
        GPU_CHECK_RECORDS=str(records), GPU_CHECK_HOLD=str(args.hold),
        GPU_CHECK_TESTS=str(args.tests), TVM_TEST_LOCK_DIR=str(work / "locks"))
    base = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"),
            f"--rootdir={REPO}", "-p", "gpu_check_recorder", "-p", "no:cacheprovider",
            "-q", "-rfEs", f"--mlc-jit-cache-dir={work / 'cache'}", "--mlc-device=cpu,cuda",
            "-n", str(args.workers)]
    started = work / "suite-started"
    side_log = work / "tvm-style.log"
    with side_log.open("w") as out:
        side = subprocess.Popen(
            [sys.executable, str(work / "tvm_style_holder.py"), str(records), "4",
             str(args.hold), str(started)], cwd=work, env=env, start_new_session=True,
            stdout=out, stderr=subprocess.STDOUT)
    try:
        # The side process starts its holds once the first holder has been recorded:
        # the suite is in its call phases by then.
        ran = _run_suite([*base, f"--mlc-jit-report={work / 'report.json'}"], env,
                         records=records, started=started, args=args, work=work)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            side.wait(timeout=max(5.0, 8 * args.hold + 10))
        if side.poll() is None:
            os.killpg(side.pid, 9)
            side.wait()
            failures.append("the tvm.testing.run_with_gpu_lock side process did not end")
        elif side.returncode != 0:
            failures.append(f"the tvm.testing.run_with_gpu_lock side process exited "
                            f"{side.returncode} (log: {side_log})")
            print(tail(side_log.read_text(encoding="utf-8", errors="replace")))
    print(f"(a) pytest examples + generated suite, -n {args.workers}, lock on: exit {ran.rc}, "
          f"{ran.seconds:.1f}s (log: {work / 'pytest-lock-on.log'})")
    if ran.rc != 0:
        failures.append(f"the run with the lock on exited {ran.rc}")
        print(tail(ran.out))
    intervals = read_intervals(records)
    _report_intervals("lock on", intervals, ran, fields, failures, main=True)
    report = _read_json(work / "report.json")
    gpu_fields = {k: v for k, v in (report or {}).items() if "gpu" in k.lower()}
    print(f"    JSON report's GPU fields: {json.dumps(gpu_fields) if gpu_fields else 'none'}")
    # The lock files there once the first holder ended, before the side process ran.
    made = _read_json_list(started)
    print(f"    lock files in {work / 'locks'} after the first holder: {made}")
    fields["lockfile"] = "ok" if made else "missing"
    if not made:
        failures.append(f"no gpu*.lock in {work / 'locks'} after the first GPU test: the "
                        "plugin took no lock in TVM_TEST_LOCK_DIR")
    # The control: the same generated suite, lock off, every worker on one GPU.
    control_records = work / "records-control"
    control_records.mkdir()
    argv = [*base, "--mlc-jit-gpu-lock=off", str(suite)]
    if "--mlc-jit-gpu-assign" in options:
        argv.append("--mlc-jit-gpu-assign=off")
    ran = run(argv, timeout=args.timeout, env={**env, "GPU_CHECK_RECORDS": str(control_records)},
              log=work / "pytest-lock-off.log")
    control = [iv for iv in read_intervals(control_records) if iv.device != "cpu"]
    pairs = len(overlapping_pairs(control))
    fields["control_overlaps"] = pairs
    print(f"    control, lock off: exit {ran.rc}, {len(control)} holders, {pairs} overlapping "
          "pairs (must be > 0: else the measure could not see an overlap)")
    if ran.rc != 0 or pairs == 0:
        failures.append(f"control run (lock off): exit {ran.rc}, {pairs} overlaps")


def _run_suite(base: list[str], env: dict[str, str], *, records: Path, started: Path,
               args: argparse.Namespace, work: Path) -> Ran:
    """The main run; a thread-free watcher: the side process waits for ``started``, which
    is touched as soon as a record appears (polled while pytest runs)."""
    argv = [*base, "--mlc-jit-gpu-lock=on", str(REPO / "examples"), str(work / "suite")]
    log = work / "pytest-lock-on.log"
    start = time.time()
    with (log.open("w") as out,
          subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                           start_new_session=True) as proc):
        rc: int | None = None
        while rc is None:
            try:
                rc = proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                if time.time() - start > args.timeout:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                    rc = -9
                elif not started.exists() and any(records.glob("*.jsonl")):
                    # before the side process takes TVM's lock: the plugin made these
                    locks = sorted(p.name for p in (work / "locks").glob("gpu*.lock"))
                    started.write_text(json.dumps(locks), encoding="utf-8")
    started.touch()
    end = time.time()
    return Ran(rc, log.read_text(encoding="utf-8", errors="replace"), end - start, start, end)


def _report_intervals(what: str, intervals: list[Interval], ran: Ran,
                      fields: dict[str, object], failures: list[str], *, main: bool) -> None:
    gpu = [iv for iv in intervals if iv.device != "cpu"]
    pairs = overlapping_pairs(gpu)
    idle = idle_fractions(gpu, ran.start, ran.end)
    tvm_style = sum(1 for iv in gpu if iv.worker == "tvm-style")
    print(f"    {len(gpu)} GPU holders ({tvm_style} through tvm.testing.run_with_gpu_lock), "
          f"workers {sorted({iv.worker for iv in gpu})}, devices {sorted(idle)}")
    for dev, frac in idle.items():
        busy = busy_seconds(iv for iv in gpu if iv.device == dev)
        print(f"    {dev}: held {busy:.2f}s of the run's {ran.end - ran.start:.2f}s: idle "
              f"{frac:.2f}")
    for a, b in pairs[:10]:
        print(f"    OVERLAP on {a.device}: {a.holder} ({a.worker}, {a.start:.3f}-{a.end:.3f}) "
              f"and {b.holder} ({b.worker}, {b.start:.3f}-{b.end:.3f})")
    if main:
        fields["overlaps"] = len(pairs)
        fields["holders"] = len(gpu)
        fields["idle"] = ("/".join(f"{v:.2f}" for v in idle.values()) if idle else "n/a")
        if pairs:
            failures.append(f"{what}: {len(pairs)} overlapping holder pairs")
        if not gpu:
            failures.append(f"{what}: no GPU test ran (nothing recorded)")
        elif tvm_style == 0:
            failures.append(f"{what}: the tvm.testing.run_with_gpu_lock holder never held")


def _read_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- (b) the CUDA libraries ------------------------------------------------------------------
def part_libraries(work: Path, args: argparse.Namespace, fields: dict[str, object],
                   failures: list[str]) -> None:
    cache = work / "cache"
    ran = run([sys.executable, "-m", "pytest_mlcjit", "list", "--json",
               f"--cache-dir={cache}"], timeout=60, env=clean_env())
    try:
        entries = json.loads(ran.out)["entries"]
    except (ValueError, KeyError, TypeError):
        failures.append(f"pytest-mlcjit list --json failed (exit {ran.rc})")
        print(tail(ran.out))
        fields["cuda_libraries"] = "n/a"
        return
    cuda = [e for e in entries if _target_kind(e.get("target")) == "cuda"]
    jobs = work / "libraries.json"
    jobs.write_text(json.dumps(cuda), encoding="utf-8")
    ran = run([sys.executable, __file__, "--run-libraries", str(jobs), str(cache), args.arch],
              timeout=args.timeout, env=clean_env(PYTHONPATH=str(REPO)),
              log=work / "libraries.log")
    results = [json.loads(line[len("LIBRARY "):]) for line in ran.out.splitlines()
               if line.startswith("LIBRARY ")]
    ok = sum(1 for r in results if r["ok"])
    other = sum(1 for r in results if r["ok"] is None)
    due = len(cuda) - other
    print(f"(b) CUDA libraries in the cache: {len(cuda)} ({other} for another arch); loaded "
          f"and run on the GPU: {ok} (exit {ran.rc}, {ran.seconds:.1f}s)")
    for r in results:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[r["ok"]]
        print(f"    {mark} {r['model']} {r['target']}: {r['detail']}")
    fields["cuda_libraries"] = f"{ok}/{due}"
    if ran.rc != 0 or ok != due or due == 0:
        failures.append(f"CUDA libraries: {ok} of {due} ran and matched"
                        + (f" (exit {ran.rc})" if ran.rc else ""))
        if ran.rc:
            print(tail(ran.out))


def _target_kind(text: object) -> str:
    """The kind of a listed entry's target (a JSON object, or a bare kind)."""
    try:
        target = json.loads(str(text))
    except ValueError:
        target = str(text)
    if isinstance(target, dict):
        return str(target.get("kind", ""))
    return str(target).split()[0] if str(target).strip() else ""


def run_libraries(jobs: Path, cache: Path, arch: str) -> int:
    """In a subprocess: each listed CUDA entry requested again READONLY (its key, so the
    very entry), run on cuda, compared with numpy's reference and the CPU library. An
    entry built for another arch than this GPU's (``arch``) is not run: ``ok`` None."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from examples.reference import mlp_forward, transformer_forward
    from pytest_mlcjit import JIT, Settings, TVMModel

    engine = JIT(Settings(cache_dir=cache, policy="ON"))  # type: ignore[arg-type]
    for entry in json.loads(jobs.read_text(encoding="utf-8")):
        result = {"model": entry["model"], "target": entry["target"], "ok": False}
        try:
            manifest = json.loads(Path(entry["library"]).with_name(
                Path(entry["library"]).name.replace(".so", ".manifest.json")).read_text())
            key = manifest["key"]
            built_for = key["target"].get("arch") if isinstance(key["target"], dict) else None
            if arch and built_for and built_for != arch:
                result.update(ok=None, detail=f"not run: built for {built_for}, this GPU is "
                              f"{arch}")
                print("LIBRARY " + json.dumps(result), flush=True)
                continue
            spec = TVMModel(key["factory"], config=key["config"], target=key["target"],
                            opt_level=key["opt_level"])
            gpu = engine.compile(spec, "cuda", policy="READONLY")
            if gpu.path != Path(entry["library"]):
                raise AssertionError(f"the READONLY request found {gpu.path}, not the "
                                     f"listed {entry['library']}")
            cpu = engine.compile(TVMModel(key["factory"], config=key["config"],
                                          opt_level=key["opt_level"]), "cpu")
            config = key["config"]
            if key["factory"].endswith("mlp:build"):
                x = np.random.default_rng(0).standard_normal(
                    (config.get("batch", 2), 16)).astype("float32")
                expected = mlp_forward(gpu.params, x)
            else:
                x = np.random.default_rng(0).integers(0, config.get("vocab_size", 64),
                                                      size=(1, 8)).astype("int32")
                expected = transformer_forward(gpu.params, x, heads=config.get("heads", 2))
            out = gpu.run("forward", x)
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(out, cpu.run("forward", x, params=gpu.params),
                                       rtol=1e-4, atol=1e-5)
            result.update(ok=True, detail=f"on {gpu.device}: matches numpy and the CPU "
                          f"library (max |diff| {float(np.max(np.abs(out - expected))):.2e})")
        except Exception as exc:  # every failure is reported, per library
            result["detail"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print("LIBRARY " + json.dumps(result), flush=True)
    engine.close()
    return 0


# -- (c) the MLC golden name -----------------------------------------------------------------
MLC_CHAT_CONFIG = {
    "model_type": "llama", "quantization": "q4f16_1", "version": "0.1.0",
    "model_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                     "num_key_value_heads": 4, "head_dim": 16, "num_hidden_layers": 2,
                     "rms_norm_eps": 1e-5, "vocab_size": 256, "context_window_size": 512,
                     "prefill_chunk_size": 128, "tensor_parallel_shards": 1,
                     "max_batch_size": 4, "position_embedding_base": 10000.0},
    "vocab_size": 256, "context_window_size": 512, "sliding_window_size": -1,
    "prefill_chunk_size": 128, "attention_sink_size": -1, "tensor_parallel_shards": 1,
    "pipeline_parallel_stages": 1, "conv_template": {"name": "llama-2"},
}
MLC_OVERRIDES = {"context_window_size": 256, "prefill_chunk_size": 64}


def part_mlc(work: Path, args: argparse.Namespace, fields: dict[str, object],
             failures: list[str]) -> None:
    if importlib.util.find_spec("mlc_llm") is None:
        print("(c) MLC golden name for cuda:0: skipped (mlc_llm not installed)")
        fields["mlc"] = "skipped"
        return
    home = work / "mlc-home"
    model = work / "mlc-model"
    model.mkdir(parents=True)
    (model / "mlc-chat-config.json").write_text(json.dumps(MLC_CHAT_CONFIG), encoding="utf-8")
    ran = run([sys.executable, __file__, "--run-mlc", str(model), str(home)],
              timeout=args.timeout,
              env=clean_env(PYTHONPATH=str(REPO), MLC_LLM_HOME=str(home),
                            MLC_CACHE_DIR=str(home), MLC_JIT_POLICY="READONLY"),
              log=work / "mlc.log")
    lines = [line for line in ran.out.splitlines() if line.startswith("MLC ")]
    print(f"(c) MLC golden name for cuda:0 (exit {ran.rc}, {ran.seconds:.1f}s):")
    for line in lines:
        print(f"    {line[4:]}")
    passed = ran.rc == 0 and any(line.startswith("MLC golden name: ok") for line in lines)
    fields["mlc"] = "ok" if passed else "FAIL"
    if not passed:
        failures.append("the MLC golden-name check failed")
        print(tail(ran.out))


def run_mlc(model: Path, home: Path) -> int:
    """In a subprocess with MLC_LLM_HOME=home and MLC_JIT_POLICY=READONLY."""
    import dataclasses
    import hashlib

    from mlc_llm.interface.compiler_flags import ModelConfigOverride, OptimizationFlags
    from mlc_llm.model import MODELS

    from pytest_mlcjit import JIT, Settings
    from pytest_mlcjit.compiler.backends.mlc import MLCModel

    engine = JIT(Settings(cache_dir=home, policy="READONLY"))  # type: ignore[arg-type]
    req = engine.request(MLCModel(model, overrides=MLC_OVERRIDES), "cuda:0")
    ours = engine.paths(req).library
    print(f"MLC the plugin's library: {ours}")
    # MLC's recipe, from mlc_llm's own classes, written here apart from the plugin.
    chat = json.loads((model / "mlc-chat-config.json").read_text(encoding="utf-8"))
    model_type, quantization = chat.pop("model_type"), chat.pop("quantization")
    config = chat.pop("model_config")
    config.update(chat)
    names = [f.name for f in dataclasses.fields(ModelConfigOverride)]
    config.update({k: v for k, v in MLC_OVERRIDES.items() if k in names})
    key = {"model_config": MODELS[model_type].config.from_dict(config).asdict(),
           "overrides": ";".join(f"{n}={MLC_OVERRIDES[n]}" for n in names
                                 if MLC_OVERRIDES.get(n) is not None),
           "opt": repr(OptimizationFlags.from_str("O2")), "device": "cuda:0",
           "model_type": model_type, "quantization": quantization}
    md5 = hashlib.md5(json.dumps(key, sort_keys=True, indent=2).encode("utf-8")).hexdigest()
    suffix = os.environ.get("MLC_DSO_SUFFIX") or ("dylib" if sys.platform == "darwin" else "so")
    golden = home / "model_lib" / f"{md5}.{suffix}"
    ok = golden == ours
    print(f"MLC golden name: {'ok' if ok else 'MISMATCH'}: MLC's recipe gives {golden.name}")
    # Held out: MLC's own JIT, READONLY, must find the plugin's file (a placeholder).
    try:
        import tvm
        from mlc_llm.interface.jit import jit
    except ImportError as exc:
        print(f"MLC held-out: not run (no mlc_llm.interface.jit: {exc})")
        return 0 if ok else 1
    ours.parent.mkdir(parents=True, exist_ok=True)
    ours.write_bytes(b"")
    try:
        found = jit(model_path=model, overrides={**MLC_OVERRIDES, "opt": "O2"},
                    device=tvm.cuda(0))
    except TypeError as exc:
        print(f"MLC held-out: not run (this mlc_llm's jit() takes other arguments: {exc})")
        return 0 if ok else 1
    except Exception as exc:  # READONLY found no file of that name
        print(f"MLC held-out: MISMATCH: MLC's JIT did not find {ours.name}: {exc}")
        return 1
    path = Path(str(getattr(found, "model_lib_path", found)))
    same = path.resolve() == ours.resolve()
    print(f"MLC held-out: {'ok' if same else 'MISMATCH'}: MLC's JIT returned {path}")
    return 0 if ok and same else 1


# -- the whole check -------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4, help="xdist workers (default 4)")
    parser.add_argument("--work-dir", type=Path, help="scratch dir (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--require-gpu", action="store_true",
                        help="exit 2 instead of 0 when there is no NVIDIA GPU")
    parser.add_argument("--tests", type=int, default=8, help="generated GPU tests (default 8)")
    parser.add_argument("--hold", type=float, default=0.5,
                        help="seconds each generated test works on the GPU (default 0.5)")
    parser.add_argument("--timeout", type=float, default=420.0,
                        help="limit of each pytest run and each part (default 420s)")
    parser.add_argument("--run-libraries", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--run-mlc", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_libraries:
        jobs, cache, arch = args.run_libraries
        return run_libraries(Path(jobs), Path(cache), arch)
    if args.run_mlc:
        return run_mlc(*args.run_mlc)

    why, count, args.arch = find_gpu(timeout=60)
    if why is not None:
        print(f"gpu_check: SKIP no NVIDIA GPU ({why})")
        return EXIT_NO_GPU if args.require_gpu else EXIT_PASS
    made = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if made else args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}")
    fields: dict[str, object] = {}
    failures: list[str] = []
    start = time.time()
    try:
        options = plugin_options(timeout=120)
        for option, what in {**NEEDED_OPTIONS, **OPTIONAL_OPTIONS}.items():
            print(f"plugin option {option} ({what}): "
                  f"{'present' if option in options else 'MISSING'}")
        part_lock(work, args, options, fields, failures)
        part_libraries(work, args, fields, failures)
        part_mlc(work, args, fields, failures)
    finally:
        if made and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    fields["gpus"] = count
    fields["seconds"] = f"{time.time() - start:.0f}"
    for failure in failures:
        print(f"FAIL: {failure}")
    first = ("overlaps", "idle", "cuda_libraries", "mlc")
    ordered = {k: fields.get(k, "n/a") for k in first}
    ordered.update((k, v) for k, v in fields.items() if k not in first)
    print(summary_line("FAIL" if failures else "PASS", ordered))
    return EXIT_FAIL if failures else EXIT_PASS


if __name__ == "__main__":
    sys.exit(main())
