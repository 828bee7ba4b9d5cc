"""Pre-warmed compile workers (pytest_mlcjit.compiler.warm): every compile is a fork of a worker
that imported TVM once, and still a process of its own.

Real TVM compiles of the tiny model, real processes and real signals throughout. The
factory below reports, from inside the compile, what it sees: the state a previous
compile may have left (a module global, a monkeypatched ``tvm.compile``), the worker it
was forked from (its launcher's parent), its ``sys.path``, environment, working directory
and umask. Several tests drive the engine in this test process (``JIT`` with
``compile_workers``, or a pytest run in this process); the kill tests drive it in a
separate process (the conftest driver) so that it can be killed, and the crash test runs
pytest in a subprocess (the worker must exit with its test process). The default tier kills
each role of a compile's tree once, at a fixed moment (its factory running, held by a
file); the ``reliability`` tier kills them at random moments in a loop.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultmodels import add_hold_model, alive, hold_request

from conftest import Engine, Project, outcomes, wait_until
from pytest_mlcjit import JIT, CompileError, Settings, TVMModel
from pytest_mlcjit.compiler.warm import client as workers

pytestmark = pytest.mark.skipif(not workers.supported(),
                                reason="pre-warmed compile workers need Linux")

#: The factory: reports what it sees to ``out`` (JSON), sets a module global of a helper
#: and monkeypatches ``tvm.compile`` (the next compile must see neither), then misbehaves
#: on request (``crash``: exit, segv, sleep, raise).
STATE_MODEL = '''
import ctypes
import json
import os
import sys
import time

import tvm
from tvm.relax.frontend import nn

import statehelper


class Tiny(nn.Module):
    def __init__(self, hidden):
        self.fc = nn.Linear(8, hidden)

    def forward(self, x):
        return nn.relu(self.fc(x))


def _parent_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def _cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\\0", b" ").decode(errors="replace")


def build(hidden=4, out="", crash=""):
    counter = os.environ.get("MLCJIT_TEST_COUNT")
    if counter:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()} hidden={hidden}\\n")
    seen = {"global": statehelper.VALUE,
            "patched": bool(getattr(tvm.compile, "mlcjit_test_patched", False)),
            "pid": os.getpid(), "worker": _parent_of(os.getppid()), "cwd": os.getcwd(),
            "worker_cmd": _cmdline(_parent_of(os.getppid())),
            "path": list(sys.path), "mark": os.environ.get("MLCJIT_TEST_MARK"),
            "umask": os.umask(0o022), "helper": statehelper.BONUS}
    os.umask(seen["umask"])
    statehelper.VALUE = hidden
    original = tvm.compile

    def patched(*args, **kwargs):
        return original(*args, **kwargs)

    patched.mlcjit_test_patched = True
    tvm.compile = patched
    if out:
        with open(out, "w") as f:
            json.dump(seen, f)
    print(f"factory of hidden={hidden} says hello", flush=True)
    if crash == "exit":
        os._exit(3)
    if crash == "segv":
        ctypes.string_at(0)
    if crash == "sleep":
        time.sleep(600)
    if crash == "raise":
        raise RuntimeError(f"factory failed on purpose (hidden={hidden})")
    return Tiny(hidden + statehelper.BONUS), {
        "forward": {"x": nn.spec.Tensor((2, 8), "float32")}}
'''
STATE_HELPER = "VALUE = None\nBONUS = 0\n"


@pytest.fixture
def fresh_workers() -> Iterator[Callable[[], int]]:
    """No zygote of an earlier test: this test's start from none, and leave none. Yields
    how many zygotes this test started so far."""
    workers.shutdown()
    before = int(workers.pool_state()["started"])
    yield lambda: int(workers.pool_state()["started"]) - before
    workers.shutdown()


@pytest.fixture
def state_project(project: Project, monkeypatch: pytest.MonkeyPatch) -> Project:
    project.pytester.makepyfile(statemodel=STATE_MODEL, statehelper=STATE_HELPER)
    monkeypatch.syspath_prepend(str(project.pytester.path))
    monkeypatch.chdir(project.pytester.path)
    return project


def _spec(hidden: int, out: Path, crash: str = "") -> TVMModel:
    return TVMModel("statemodel:build", config={"hidden": hidden, "out": str(out),
                                                "crash": crash})


def _seen(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _processes(needle: bytes) -> list[int]:
    """Live processes whose command line contains ``needle``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "cmdline").read_bytes():
                with open(proc / "stat", "rb") as f:
                    if f.read().rpartition(b")")[2].split()[:1] not in ([b"Z"], [b"X"]):
                        found.append(int(proc.name))
        except OSError:
            continue
    return found


def _compile_processes(cache: Path) -> list[int]:
    """Launchers and compiles of this cache (their command lines name its staging)."""
    return _processes(str(cache / ".mlcjit" / "staging").encode())


def _zygotes_of(pid: int) -> list[int]:
    return _processes(f"(compile worker of {pid})".encode())


def test_two_compiles_of_one_worker_share_no_state(state_project: Project, tmp_path: Path,
                                                   fresh_workers: Callable[[], int]) -> None:
    """Two compiles forked from one warm worker see none of each other's state; a third,
    whose factory raises, is reported from that worker with its log."""
    engine = JIT(Settings(cache_dir=state_project.cache, compile_workers="on"))
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    engine.compile(_spec(3, first), "cpu")
    engine.compile(_spec(5, second), "cpu")
    a, b = _seen(first), _seen(second)
    state = workers.pool_state()
    assert fresh_workers() == 1, state
    assert state["pid"] is not None, state
    assert a["worker"] == b["worker"] == state["pid"], "one warm worker served both"
    assert a["pid"] != b["pid"], "each compile is a process of its own"
    assert (a["global"], a["patched"]) == (None, False)
    assert (b["global"], b["patched"]) == (None, False), \
        "the second compile saw the first one's module global or its patched tvm.compile"
    assert len(state_project.compiles()) == 2

    # A factory error, from the same warm worker.
    third = tmp_path / "third.json"
    with pytest.raises(CompileError) as info:
        engine.compile(_spec(7, third, "raise"), "cpu")
    assert _seen(third)["worker"] == state["pid"], "the warm worker ran it"
    assert "the compiler exited with code 1" in str(info.value)
    assert "RuntimeError: factory failed on purpose (hidden=7)" in str(info.value)
    assert info.value.log_path is not None
    log = Path(info.value.log_path).read_text()
    assert "factory of hidden=7 says hello" in log
    assert "Traceback" in log
    assert fresh_workers() == 1, "the worker outlived the error"


#: The compile timeouts of the crash test, tried in turn: far above a warm compile of the
#: tiny model (well under a second), so only the compile that sleeps reaches the first;
#: the next only where a loaded machine made a good compile reach it too.
CRASH_TIMEOUTS_S = (5, 60)


def test_crashes_fail_only_their_own_test_with_the_log(state_project: Project,
                                                       tmp_path: Path) -> None:
    """os._exit, a segfault and a compile that sleeps past the timeout, between two good
    compiles served by the same worker: each fails only its own tests, with its log; the
    worker lives on; nothing is left running, and the worker exits with its test process
    (a pytest subprocess, so that it can end). The timeout applies to every compile of the
    run: should a good one reach it on a loaded machine, the run is made again, with a
    fresh cache, under a longer one."""
    crashes = {3: "", 4: "exit", 5: "segv", 6: "sleep", 7: ""}
    for timeout in CRASH_TIMEOUTS_S:
        attempt = tmp_path / str(timeout)
        attempt.mkdir()
        cache = attempt / "cache"
        outs = {h: attempt / f"{h}.json" for h in sorted(crashes)}
        specs = [f'TVMModel("statemodel:build", config={{"hidden": {h}, '
                 f'"out": {str(outs[h])!r}, "crash": {crashes[h]!r}}})' for h in sorted(outs)]
        state_project.pytester.makepyfile(test_crashes=f'''
import pytest
from pytest_mlcjit import TVMModel

SPECS = [{", ".join(specs)}]


@pytest.mark.parametrize("i", range(2))
@pytest.mark.parametrize("compiled_model", SPECS, indirect=True,
                         ids=lambda s: s.config["crash"] or "ok")
def test_model(compiled_model, i):
    assert compiled_model.path.exists()
''')
        result = state_project.run_subprocess(
            "-p", "no:xdist", "--mlc-device=cpu", f"--mlc-jit-cache-dir={cache}",
            f"--mlc-jit-timeout={timeout}", "--mlc-jit-compile-workers=on", cache=False)
        if result.parseoutcomes().get("passed") == 4:
            break  # the good compiles ended within the timeout
    result.assert_outcomes(passed=4, errors=6)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "the compiler exited with code 3 (compiling statemodel-crash=exit-*",
        "the compiler exited with code -11 (compiling statemodel-crash=segv-*",
        f"timed out after {timeout}s (--mlc-jit-timeout) "
        "(compiling statemodel-crash=sleep-*"])
    assert out.count("factory of hidden=4 says hello") >= 1, "the exit's log is shown"
    assert out.count("factory of hidden=5 says hello") >= 1, "the segfault's log is shown"
    assert out.count("factory of hidden=6 says hello") >= 1, "the timeout's log is shown"
    good = [_seen(outs[3]), _seen(outs[7])]
    assert good[0]["worker"] == good[1]["worker"], "the worker outlived the crashes"
    assert all(_seen(outs[h])["worker"] == good[0]["worker"] for h in (4, 5, 6))
    assert _compile_processes(cache) == []
    wait_until(lambda: not alive(good[0]["worker"]),
               "the worker to exit with its test process", timeout=30)


def test_an_edited_factory_is_seen_by_the_next_compile(state_project: Project,
                                                       tmp_path: Path,
                                                       fresh_workers: Callable[[], int]) -> None:
    """Within one process and one worker: a helper module the factory imports is edited
    (the same key, new recorded inputs: compiled again), then the factory module itself
    (a new key); each next compile imports the edited code."""
    engine = JIT(Settings(cache_dir=state_project.cache, compile_workers="on"))
    outs = [tmp_path / f"{i}.json" for i in range(3)]
    engine.compile(_spec(3, outs[0]), "cpu")
    helper = state_project.pytester.path / "statehelper.py"
    helper.write_text("VALUE = None\nBONUS = 22  # edited\n")
    edited = engine.compile(_spec(3, outs[0]), "cpu")
    assert not edited.hit, "the helper's edit is a new input state"
    model = state_project.pytester.path / "statemodel.py"
    model.write_text(model.read_text().replace('"helper": statehelper.BONUS}',
                                               '"helper": statehelper.BONUS * 2}'))
    engine.compile(_spec(3, outs[1]), "cpu")
    assert _seen(outs[0])["helper"] == 22
    assert _seen(outs[1])["helper"] == 44
    assert edited.params["fc.weight"].shape == (25, 8), "the library is the edited model's"
    assert fresh_workers() == 1
    assert len(state_project.compiles()) == 3


def test_the_compile_sees_what_a_fresh_subprocess_sees(state_project: Project,
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        fresh_workers: Callable[[], int]) -> None:
    """The same spec compiled by a fresh subprocess (workers off: no worker is started) and
    by a warm worker: the same sys.path, environment, working directory and umask inside
    the compile, and the same recorded inputs (so the same entry)."""
    monkeypatch.setenv("MLCJIT_TEST_MARK", "from the test process")
    seen = {}
    entries = {}
    started = {}
    old = os.umask(0o027)
    try:
        for mode in ("off", "on"):
            out = tmp_path / "seen.json"  # the same config, so the same key
            engine = JIT(Settings(cache_dir=tmp_path / f"cache-{mode}", compile_workers=mode))
            model = engine.compile(_spec(3, out), "cpu")
            started[mode] = fresh_workers()
            seen[mode] = _seen(out)
            inputs = model.manifest["inputs"]
            entries[mode] = (model.digest, [(m["path"], m["sha256"]) for m in inputs["modules"]],
                             inputs["files"], inputs["dists"])
    finally:
        os.umask(old)
    off, on = seen["off"], seen["on"]
    assert started == {"off": 0, "on": 1}, "workers off start no worker"
    assert on["worker"] == workers.pool_state()["pid"], "the warm worker compiled it"
    assert off["worker"] == os.getpid(), "workers off: a launcher of this process"
    assert on["path"] == off["path"], json.dumps({"on": on["path"], "off": off["path"]}, indent=0)
    assert (on["mark"], on["cwd"], on["umask"]) == (off["mark"], off["cwd"], off["umask"]) == (
        "from the test process", str(state_project.pytester.path), 0o027)
    assert entries["on"] == entries["off"], "warm or not, the same recorded inputs"


@pytest.mark.parametrize("how", ["default", "option", "env", "ini"])
def test_workers_can_be_turned_off(state_project: Project, tmp_path: Path, how: str,
                                   monkeypatch: pytest.MonkeyPatch,
                                   fresh_workers: Callable[[], int]) -> None:
    """With workers off (--mlc-jit-compile-workers, MLC_JIT_COMPILE_WORKERS, ini), the
    compile's launcher is a child of the test process; by default, of a warm worker. The
    pytest run is in this process, so the launcher's parent is known exactly: this
    process, or this process's warm worker."""
    out = tmp_path / "seen.json"
    state_project.pytester.makepyfile(test_one=f'''
from pytest_mlcjit import TVMModel
import pytest


@pytest.mark.mlc_model(TVMModel("statemodel:build", config={{"hidden": 3, "out": {str(out)!r}}}))
def test_one(compiled_model):
    assert compiled_model.path.exists()
''')
    args = ["-p", "no:xdist", "--mlc-device=cpu"]
    if how == "option":
        args.append("--mlc-jit-compile-workers=off")
    elif how == "env":
        monkeypatch.setenv("MLC_JIT_COMPILE_WORKERS", "off")
    elif how == "ini":
        state_project.pytester.makeini("[pytest]\nmlc_jit_compile_workers = off\n")
    state_project.run(*args).assert_outcomes(passed=1)
    assert len(state_project.compiles()) == 1
    seen = _seen(out)
    if how == "default":
        assert fresh_workers() == 1
        assert seen["worker"] == workers.pool_state()["pid"], seen["worker_cmd"]
        assert "pytest_mlcjit.compiler.warm" in seen["worker_cmd"]
    else:
        assert fresh_workers() == 0, "no worker was started"
        assert seen["worker"] == os.getpid(), seen["worker_cmd"]


def test_a_worker_that_dies_is_replaced(state_project: Project, tmp_path: Path,
                                        fresh_workers: Callable[[], int]) -> None:
    engine = JIT(Settings(cache_dir=state_project.cache, compile_workers="on"))
    engine.compile(_spec(3, tmp_path / "a.json"), "cpu")
    first = workers.pool_state()["pid"]
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: workers.pool_state()["pid"] is None, "the worker to die")
    engine.compile(_spec(5, tmp_path / "b.json"), "cpu")
    state = workers.pool_state()
    assert fresh_workers() == 2, state
    assert state["pid"] not in (None, first), state
    assert _seen(tmp_path / "b.json")["worker"] == state["pid"]


# -- random kills: the test process, the worker, the launcher, the compile ---------------------
ROLES = ("test process", "worker", "launcher", "compile")
ROUNDS = 12
SAFETY_S = 120.0


def _chain(driver: int, cache: Path) -> dict[str, int]:
    """The live processes of one driver's compile, by role."""
    found: dict[str, int] = {}
    zygotes = _zygotes_of(driver)
    if zygotes:
        found["worker"] = zygotes[0]
    running = _compile_processes(cache)
    for pid in running:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                parent = int(f.read().rpartition(b")")[2].split()[1])
        except OSError:
            continue
        found["compile" if parent in running else "launcher"] = pid  # a launcher's child
    return found


@pytest.mark.reliability
def test_random_kills_leave_no_partial_entry_and_no_process(engine: Engine, project: Project,
                                                            tmp_path: Path) -> None:
    """The test process, its warm worker, a compile's launcher or the compile itself is
    SIGKILLed at a random moment (the worker still importing TVM, the compile starting or
    running): no manifest names a partial library, no process of the tree is left, the
    lock is free, and the next run compiles the library and loads it. A killed worker
    takes no compile with it."""
    seed = int(os.environ.get("MLCJIT_KILL_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    tag = f"(seed {seed}; rerun with MLCJIT_KILL_SEED={seed})"
    landed: Counter[str] = Counter()
    drivers: list[int] = []
    libraries = 0
    for n in range(ROUNDS):
        role = ROLES[n % len(ROLES)]
        hidden = 10 + n
        # The test process at any moment of its run; the others at a random moment of
        # their life (the worker: from importing TVM on; the launcher and the compile:
        # from their start to the compile's end).
        delay = rng.uniform(0.0, 2.5 if role == "test process" else 0.9)
        stderr = tmp_path / f"stderr-{n}.txt"
        entries = sorted((project.cache / "tvm").glob("*"))
        with open(stderr, "w") as err:
            driver = engine.popen([{"hidden": hidden, "sleep": 1.0}], stderr=err)
        drivers.append(driver.pid)
        where = f"round {n}: kill the {role} at {delay:.2f}s {tag}"
        try:
            if role != "test process":
                wait_until(lambda d=driver, r=role: r in _chain(d.pid, project.cache)
                           or d.poll() is not None, f"the {role} to start")
            time.sleep(delay)  # the random moment of the kill (not a synchronisation)
            chain = _chain(driver.pid, project.cache)
            victim = driver.pid if role == "test process" else chain.get(role)
            if victim is not None and driver.poll() is None:
                os.kill(victim, signal.SIGKILL)
                landed[role] += 1
            out, _ = driver.communicate(timeout=SAFETY_S)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.communicate()
        events = outcomes(out, events=True)
        if not events:
            # Killed while still starting (a loaded machine), before it asked for its key:
            # it can have taken no lock and written no entry.
            assert role == "test process", where
            assert driver.returncode == -signal.SIGKILL, where
            assert sorted((project.cache / "tvm").glob("*")) == entries, where
        elif role == "worker" and driver.returncode == 0:
            (result,) = outcomes(out)
            assert result["ok"], f"a killed worker failed a compile: {result} {where}"
        wait_until(lambda d=driver.pid: not _chain(d, project.cache),
                   f"every process of {where} to die", timeout=60)
        # The whole cache, from its files: every manifest names a whole library, no lock
        # is held, nothing is left that no manifest names (but a killed publish's). The
        # killed driver published its library, whole, or nothing.
        published = engine.check_cache().libraries - libraries
        assert published in (0, 1), where
        assert published or not any(r["ok"] for r in outcomes(out)), where
        # The next run (another config: its own key) compiles it and loads it.
        (again,) = engine.run([{"hidden": hidden}], check=True)
        assert again["ok"], (again, where)
        assert again["checked"], (again, where)
        libraries += published + 1
        assert engine.check_cache().libraries == libraries, where
    assert not any(_zygotes_of(d) for d in drivers), "a worker outlived its test process"
    assert _compile_processes(project.cache) == []
    assert sum(landed.values()) >= ROUNDS * 3 // 4, f"too few kills landed: {dict(landed)} {tag}"
    print(f"\nkills that landed {tag}: {dict(landed)}", file=sys.stderr)


def test_each_role_killed_mid_compile(engine: Engine, project: Project,
                                      tmp_path: Path) -> None:
    """One driver, three compiles, each held in its factory (until a file appears) while
    one process of its tree is SIGKILLed: the launcher, the compile (each fails that
    compile alone, with no partial entry), the warm worker (the compile it forked goes on
    and publishes). Then nothing of the trees is left, no lock is held, the cache holds
    its invariants, and the next process compiles the two failed libraries once each
    and loads all three. (The test process itself: the test below.)"""
    add_hold_model(project)
    releases = {role: tmp_path / f"release-{role}" for role in ("launcher", "compile", "worker")}
    hidden = {"launcher": 11, "compile": 12, "worker": 13}
    requests = [hold_request(hidden[role], hold=str(releases[role])) for role in releases]
    with engine.popen(requests) as driver:
        try:
            for role, release in releases.items():
                wait_until(lambda r=role: f"hidden={hidden[r]}" in "\n".join(project.compiles())
                           or driver.poll() is not None, f"the compile killed at its {role}")
                chain = _chain(driver.pid, project.cache)
                assert set(chain) == {"worker", "launcher", "compile"}, (role, chain)
                os.kill(chain[role], signal.SIGKILL)
                if role == "worker":
                    wait_until(lambda p=chain[role]: not alive(p), "the worker to die")
                    assert alive(chain["compile"]), "the compile outlived its worker"
                    release.touch()  # it goes on, and publishes
                else:
                    wait_until(lambda c=chain: not (alive(c["compile"]) or alive(c["launcher"])),
                               f"the compile's tree to die with its {role}")
            out, err = driver.communicate(timeout=SAFETY_S)
        finally:
            for release in releases.values():
                release.touch()
            if driver.poll() is None:
                driver.kill()
                driver.communicate()
    assert driver.returncode == 0, err
    *failed, kept = outcomes(out)
    assert kept["ok"], f"a killed worker failed its compile: {kept}"
    assert kept["sha256"] == kept["manifest_sha256"], kept
    for result in failed:
        assert result["error"] == "CompileError", result
        assert "the compiler exited with code -9" in result["message"], result
    wait_until(lambda: not _zygotes_of(driver.pid) and not _compile_processes(project.cache),
               "the driver's workers and compiles to end with it")
    state = engine.check_cache()
    assert [m["sha256"] for m in state.manifests] == [kept["sha256"]], state
    assert state.unpublished == [], state
    assert len(project.compiles()) == 3
    again = engine.run(requests, check=True)
    assert [r["hit"] for r in again] == [False, False, True], again
    assert all(r["checked"] for r in again), again
    assert len(project.compiles()) == 5, "each failed library compiled once more"
    assert engine.check_cache(staging=False).libraries == 3


def test_killed_test_process_takes_its_worker_and_compile_along(engine: Engine,
                                                                project: Project,
                                                                tmp_path: Path) -> None:
    add_hold_model(project)
    driver = engine.popen([hold_request(4, hold=str(tmp_path / "never"))])
    try:
        wait_until(lambda: "compile" in _chain(driver.pid, project.cache)
                   or driver.poll() is not None, "the compile to run")
        chain = _chain(driver.pid, project.cache)
        assert set(chain) == {"worker", "launcher", "compile"}, chain
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=SAFETY_S)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    wait_until(lambda: not any(alive(pid) for pid in chain.values()),
               "the worker, the launcher and the compile to die with the test process",
               timeout=60)
