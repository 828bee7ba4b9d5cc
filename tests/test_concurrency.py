"""Concurrent processes and locks (the reliability suite, docs/explanation/reliability.md): real
processes, real signals, real compiles.

* Killed processes never leave a partial entry, a held lock or a running compiler. The
  engine's test-only fault points (``MLCJIT_TEST_PAUSE``, ``MLCJIT_TEST_STOP``, see
  pytest_mlcjit/_util/fs.py) announce each step of a compile on stderr and pause there, or
  stop the process at one of them, which makes even the publish step a point a test can
  hit. The default tier SIGKILLs one key's compile once at each named point, in order, the
  driver stopped at that point (the test reads the announcements as they are written, kills,
  then checks where the kill landed); the ``reliability`` tier kills at random points and
  random delays after them. A waiter is killed while it waits, and a pytest-xdist
  worker kills itself mid-compile while the other worker waits for the key.
* A waiter that exceeds --mlc-jit-lock-timeout fails with a message naming the key and
  the process that holds the lock (pid, host, since when); after the holder dies, the
  lock is free and the next request compiles.
* ``reliability``: eight processes, fifty requests each, over five keys, in random order,
  on a cold cache: each key is compiled exactly once (counted by the factory itself), and
  every library a request returns is whole (its SHA-256 and size are checked by the
  process that got it). The default tier's case of that invariant: a holder and two
  waiters of one key here, and tests/test_xdist.py (xdist workers, two pytest processes).

After every kill the whole cache is checked from its files (:meth:`conftest.Engine.check_cache`):
every manifest names a whole library, nothing else is left but what a killed publish may
leave (a pending manifest and what it names, a dead process's temporary file), no lock is
held, no staging directory has a live owner.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from faultmodels import add_hold_model, alive, hold_request
from filelock import FileLock

from conftest import Engine, Project, compilers_running, outcomes, wait_until

#: The fault points of one compile, in the order the engine reaches them.
POINTS = ("lock-wait", "locked", "staging", "compile", "compiled", "publish:staged",
          "publish:library", "published")
SAFETY_S = 120.0


def _announced(text: str, pid: int) -> list[str]:
    """The fault points ``pid`` announced in ``text`` (its stderr)."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "mlcjit-test-point" and parts[2] == str(pid):
            found.append(parts[1])
    return found


def _tree_gone(driver: int, cache: Path) -> bool:
    """Whether no compile of ``cache`` and no compile worker of ``driver`` runs."""
    needle = f"(compile worker of {driver})".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes() and alive(int(proc.name)):
                    return False
            except OSError:
                continue
    return not [pid for pid in compilers_running(cache, "") if alive(pid)]


@dataclasses.dataclass
class Killed:
    status: int | None
    #: The fault points it announced, in order (the last: where the kill landed).
    points: list[str]
    #: The key's digest (its "request" event).
    digest: str


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The rest of ``proc``'s stdout and stderr, read through its file objects (a line
    iterator may have read ahead), once it has ended (killed after SAFETY_S)."""
    assert proc.stdout is not None
    assert proc.stderr is not None
    timer = threading.Timer(SAFETY_S, proc.kill)
    timer.start()
    try:
        err = proc.stderr.read()
        out = proc.stdout.read()
        proc.wait()
    finally:
        timer.cancel()
    return out, err


def _kill_if_running(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()


def _read_until(proc: subprocess.Popen[str], point: str) -> list[str]:
    """Read ``proc``'s stderr as it is written until it announces ``point``; the points it
    announced."""
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:
        seen += _announced(line, proc.pid)
        if seen[-1:] == [point]:
            return seen
    raise AssertionError(f"{proc.pid} ended before {point}: announced {seen}")


def _kill_at(engine: Engine, request: dict[str, Any], point: str, *, env: dict[str, str],
             once: Any = None, **job: Any) -> Killed:
    """Start a driver with the fault points on (``env``: ``MLCJIT_TEST_STOP`` or
    ``MLCJIT_TEST_PAUSE``) and SIGKILL it once it announces ``point`` (its stderr is read as
    it is written), or, with ``once``, as soon as ``once()`` holds after that. Returns
    where it was killed; waits until its process tree is gone."""
    with engine.popen([request], env=env, **job) as proc:
        try:
            seen = _read_until(proc, point)
            if once is not None:
                wait_until(lambda: once() or proc.poll() is not None, f"after {point}")
            proc.kill()
            out, err = _finish(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
    wait_until(lambda: _tree_gone(proc.pid, engine.project.cache),
               f"the compile tree of a driver killed at {point} to die with it")
    events = outcomes(out, events=True)
    assert events, err[-3000:]
    return Killed(proc.returncode, seen + _announced(err, proc.pid), str(events[0]["digest"]))


def _files(directory: Path) -> dict[str, bytes]:
    """The entries' files in ``directory`` (libraries, logs, manifests, pending and
    temporary manifests; not the key's variants records, which are written before a
    publish starts), by name, with their bytes."""
    if not directory.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


# -- SIGKILL of the lock holder: once at each fault point, then at random points ---------------
def test_sigkill_at_each_fault_point_in_turn(engine: Engine, project: Project) -> None:
    """One key, one driver per fault point in order, each SIGKILLed there: stopped at the
    point (``MLCJIT_TEST_STOP``), so the kill lands exactly there; at ``compile``, once its
    factory runs, inside the compiler subprocess. After each kill the lock is free, the
    compile's tree is gone and the whole cache holds its invariants; before
    ``publish:staged`` nothing in the entry's directory changed; a kill at
    ``publish:library`` leaves the library named only by a pending manifest. The compile
    killed at ``published`` had committed: the entry is whole, and the next process hits
    and loads it without compiling. Each kill's compile ran once (the factory's counter)."""
    request = {"hidden": 6}
    entries = project.cache / "tvm"
    commit = POINTS.index("published")
    for i, point in enumerate(POINTS):
        before, compiles = _files(entries), len(project.compiles())
        killed = _kill_at(
            engine, request, point,
            env={"MLCJIT_TEST_PAUSE": "0", "MLCJIT_TEST_SLEEP": "600"} if point == "compile"
            else {"MLCJIT_TEST_STOP": point},
            once=(lambda n=compiles: len(project.compiles()) > n)
            if point == "compile" else None)
        where = f"kill at {point}: announced {killed.points}, status {killed.status}"
        assert killed.status == -signal.SIGKILL, where
        assert killed.points == list(POINTS[:i + 1]), where
        assert engine.lock_is_free(killed.digest), where
        state = engine.check_cache()
        ran = POINTS.index("compile") <= i
        assert len(project.compiles()) == compiles + ran, where
        committed = [m for m in state.manifests if m["key_digest"] == killed.digest]
        if i < POINTS.index("publish:staged"):
            assert _files(entries) == before, f"{where}: the entry's files changed"
        if i < commit:
            assert committed == [], where
        if point == "publish:library":
            assert {p.suffix for p in state.unpublished} == {".so", ".log"}, (where, state)
            (pending,) = state.pending
            assert pending["key_digest"] == killed.digest, where
    # The last kill (at "published") came after the commit point of a compile that found
    # every earlier kill's leftovers: the pending manifest is replaced, the earlier staging
    # directories cleaned; only the killed compile's own is left, abandoned.
    assert len(committed) == 1, state
    assert state.pending == [], state
    assert state.unpublished == [], state
    assert len(state.staging) == 1, state
    compiles = len(project.compiles())
    (reader,) = engine.run([request], policy="READONLY", check=True)
    assert reader["hit"], reader
    assert reader["checked"], reader
    assert reader["sha256"] == committed[0]["sha256"], reader
    assert len(project.compiles()) == compiles, "the reader compiled nothing"


#: Where random kills are aimed (the compile itself, the longest step, three times as often).
TARGETS = ("locked", "staging", "compile", "compile", "compile", "compiled", "publish:staged",
           "publish:library")
RANDOM_PAUSE_S = 0.1
COMPILE_WINDOW_S = 1.5
KILLS = 20
KILLS_PER_KEY = 5


def _kill_after(engine: Engine, hidden: int, point: str, delay: float,
                stderr: Path) -> Killed:
    """Start a compile, SIGKILL it ``delay`` s after it announces ``point``."""
    with open(stderr, "w") as err:
        proc = engine.popen([{"hidden": hidden}], env={"MLCJIT_TEST_PAUSE": str(RANDOM_PAUSE_S)},
                            stderr=err)
    try:
        wait_until(lambda: point in _announced(stderr.read_text(errors="replace"), proc.pid)
                   or proc.poll() is not None, f"point {point}")
        time.sleep(delay)  # the random moment of the kill (not a synchronisation)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=SAFETY_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (event,) = outcomes(out, events=True)[:1]
    return Killed(proc.returncode, _announced(stderr.read_text(errors="replace"), proc.pid),
                  str(event["digest"]))


@pytest.mark.reliability
def test_sigkill_of_the_lock_holder_at_random_points(
    engine: Engine, project: Project, tmp_path: Path
) -> None:
    seed = int(os.environ.get("MLCJIT_KILL_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    tag = f"(seed {seed}; rerun with MLCJIT_KILL_SEED={seed})"
    kills: collections.Counter[str] = collections.Counter()
    unpublished = committed = 0
    keys: list[int] = []
    hidden = 9
    entries = project.cache / "tvm"
    while sum(kills.values()) < KILLS:
        assert len(keys) < 3 * KILLS // KILLS_PER_KEY, f"too few kills landed mid-compile {tag}"
        hidden += 1
        keys.append(hidden)
        for _ in range(KILLS_PER_KEY):
            point = rng.choice(TARGETS)
            delay = rng.uniform(0, COMPILE_WINDOW_S if point == "compile" else RANDOM_PAUSE_S)
            n = sum(kills.values()) + committed
            before = _files(entries)
            killed = _kill_after(engine, hidden, point, delay, tmp_path / f"stderr-{n}.txt")
            seen = killed.points
            where = f"kill {n} at {point}+{delay:.3f}s, last point {seen[-1:]} {tag}"
            assert killed.status in (0, -signal.SIGKILL), where
            assert "locked" in seen, where
            assert engine.lock_is_free(killed.digest), where
            wait_until(lambda d=killed.digest: not compilers_running(project.cache, d),
                       f"the compiler of {where} to die with its parent")
            # The whole cache: every manifest names a whole library, nothing else is left
            # but a killed publish's pending manifest (and what it names) or temp file.
            state = engine.check_cache()
            mine = [m for m in state.manifests if m["key_digest"] == killed.digest]
            if mine:
                assert POINTS.index(seen[-1]) >= POINTS.index("publish:library"), where
                committed += 1  # killed after the commit point, or too late: not mid-compile
                break
            if POINTS.index(seen[-1]) < POINTS.index("publish:staged"):
                # Killed before publishing: the entry's files are as they were, but for the
                # temporary manifest a publish writes before its "publish:staged" point (a
                # dot file never read; prune and clear remove a dead writer's).
                after = {n: b for n, b in _files(entries).items()
                         if not (n.startswith(".") and n.endswith(".tmp") and n not in before)}
                assert after == before, where
            unpublished += len(state.unpublished) > 0
            assert killed.status == -signal.SIGKILL, where
            kills[seen[-1]] += 1
        else:
            # The next request compiles it exactly once, and it is whole.
            before_compiles = len(project.compiles())
            result, again = engine.run([{"hidden": hidden}] * 2, fresh=True)
            assert result["ok"], result
            assert not result["hit"], result
            assert result["sha256"] == result["manifest_sha256"], result
            assert again["hit"], again
            assert len(project.compiles()) == before_compiles + 1, tag
    # A killed compile's staging dir goes with the next compile (its lock is free).
    (last,) = engine.run([{"hidden": hidden + 1}])
    assert last["ok"], last
    engine.check_cache(staging=False)
    checked = engine.run([{"hidden": h} for h in keys], policy="READONLY", check=True)
    assert all(r.get("hit") and r.get("checked") for r in checked), [
        r for r in checked if not (r.get("hit") and r.get("checked"))]
    # Shown with -s / in the report: where the kills landed (the last point announced).
    print(f"\nkill points {tag}: {sum(kills.values())} mid-compile {dict(kills)}, "
          f"{committed} after the commit point, {unpublished} kills left a library only a "
          "pending manifest names (never loaded, replaced by the next compile)",
          file=sys.stderr)


def test_sigkill_of_a_waiter(engine: Engine, project: Project, tmp_path: Path) -> None:
    """A holder compiles (its factory held until released), two waiters wait for its lock,
    one of them is SIGKILLed while it waits: the holder keeps its lock and publishes, the
    other waiter gets the holder's bytes (a hit after its wait), the key compiles once."""
    add_hold_model(project)
    release = tmp_path / "release"
    request = hold_request(4, hold=str(release))
    pause = {"MLCJIT_TEST_PAUSE": "0.001"}
    with contextlib.ExitStack() as stack:
        stack.callback(release.touch)  # last: whatever happened, nothing stays held
        holder = stack.enter_context(engine.popen([request]))
        stack.callback(_kill_if_running, holder)
        wait_until(lambda: bool(project.compiles()) or holder.poll() is not None,
                   "the holder to compile")
        (owner,) = (project.cache / ".mlcjit" / "locks").glob("*.owner")
        assert json.loads(owner.read_text())["pid"] == holder.pid
        victim, survivor = (stack.enter_context(engine.popen([request], env=pause))
                            for _ in range(2))
        for proc in (victim, survivor):
            stack.callback(_kill_if_running, proc)
        assert _read_until(victim, "lock-wait") == ["lock-wait"]
        assert _read_until(survivor, "lock-wait") == ["lock-wait"]
        victim.send_signal(signal.SIGKILL)
        _, rest = _finish(victim)
        assert victim.returncode == -signal.SIGKILL
        assert "locked" not in _announced(rest, victim.pid), "it was killed while waiting"
        assert json.loads(owner.read_text())["pid"] == holder.pid, "the holder kept its lock"
        release.touch()
        out, err_text = _finish(holder)
        assert holder.returncode == 0, err_text
        (result,) = outcomes(out)
        assert result["ok"], result
        assert not result["hit"]
        assert result["sha256"] == result["manifest_sha256"]
        out, err_text = _finish(survivor)
        assert survivor.returncode == 0, err_text
        (waited,) = outcomes(out)
        assert "locked" in _announced(err_text, survivor.pid), "it waited, then took the lock"
        assert waited["hit"], waited
        assert waited["sha256"] == result["sha256"], "the waiter got the holder's bytes"
    assert len(project.compiles()) == 1
    state = engine.check_cache(staging=False)
    assert [m["sha256"] for m in state.manifests] == [result["sha256"]]


#: In the pytester project: the worker that holds the key's lock while its factory runs
#: (the factory waits for RELEASE), once the board shows another process waiting for a key,
#: releases the factory (for the next compile) and SIGKILLs itself.
KILLER_CONFTEST = """
import glob
import json
import os
import signal
import tempfile
import threading
import time

import pytest

LOCKS = {locks!r}
MARKS = {marks!r}
RELEASE = {release!r}
COUNTER = os.environ["MLCJIT_TEST_COUNT"]


def lock_owner():
    for path in glob.glob(os.path.join(LOCKS, "*.owner")):
        try:
            with open(path) as f:
                return json.load(f)["pid"]
        except (OSError, ValueError):
            pass
    return None


def waiting():
    \"\"\"A process other than this one with a "wait" job on this run's board.\"\"\"
    board = os.path.join(tempfile.gettempdir(), f"pytest-mlcjit-{{os.getuid()}}")
    for path in glob.glob(os.path.join(board, "*.json")):
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if record["pid"] != os.getpid() and any(
                j["kind"] == "wait" and "ended" not in j for j in record["jobs"]):
            return record["pid"]
    return None


@pytest.fixture(autouse=True, scope="session")
def _die_once_mid_compile():
    def watch():
        while not os.path.exists(os.path.join(MARKS, "killed")):
            if lock_owner() == os.getpid() and os.path.exists(COUNTER):
                waiter = waiting()
                if waiter is not None:
                    try:
                        fd = os.open(os.path.join(MARKS, "killed"), os.O_CREAT | os.O_EXCL
                                     | os.O_WRONLY)
                    except FileExistsError:
                        return
                    os.write(fd, json.dumps({{"killer": os.getpid(),
                                             "waiter": waiter}}).encode())
                    os.close(fd)
                    open(RELEASE, "w").close()
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
"""

HOLD_TESTS = """
import pytest
from pytest_mlcjit import TVMModel

SPEC = TVMModel("holdmodel:build", config={{"hidden": 4, "hold": {release!r}}})


@pytest.mark.parametrize("i", range(6))
@pytest.mark.mlc_model(SPEC)
def test_held(compiled_model, i):
    assert compiled_model.path.exists()
"""


def test_killed_xdist_worker(engine: Engine, project: Project,
                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under ``-n 2``, the worker compiling the key (its factory held) SIGKILLs itself once
    the other worker waits for that key (seen on the run's progress board): xdist reports
    the test as crashed, the other worker takes the lock and compiles, the other five tests
    pass, and the cache is whole (the next run: six hits, no compile)."""
    marks, release = tmp_path / "marks", tmp_path / "release"
    marks.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # this run's board alone
    add_hold_model(project)
    project.pytester.makeconftest(KILLER_CONFTEST.format(
        locks=str(project.cache / ".mlcjit" / "locks"), marks=str(marks),
        release=str(release)))
    project.pytester.makepyfile(test_held=HOLD_TESTS.format(release=str(release)))
    result = project.run("-n", "2", "--mlc-device=cpu")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(["*crashed while running*test_held*"])
    killed = json.loads((marks / "killed").read_text())
    assert killed["waiter"] != killed["killer"], "the other worker waited for the key"
    assert len(project.compiles()) == 2, ("the killed compile, then the other worker's",
                                          project.compiles(), result.stdout.str())
    project.pytester.makeconftest("")
    nxt = project.run("--mlc-device=cpu")
    nxt.assert_outcomes(passed=6)
    nxt.stdout.fnmatch_lines(["6 requests: 6 hits"])
    assert len(project.compiles()) == 2
    state = engine.check_cache(staging=False)
    assert len(state.manifests) == 1, state


# -- lock waits beyond --mlc-jit-lock-timeout -------------------------------------------
def test_lock_wait_timeout_names_the_holder(engine: Engine, project: Project) -> None:
    project.write_tests([{"hidden": 4}])
    holder = engine.popen([{"hidden": 4}], env={"MLCJIT_TEST_SLEEP": "600"})
    try:
        locks = project.cache / ".mlcjit" / "locks"
        wait_until(lambda: any(locks.glob("*.owner")) and bool(project.compiles()),
                   "the holder to be compiling")
        (owner,) = locks.glob("*.owner")
        digest = owner.name.split(".")[0]
        record = json.loads(owner.read_text())
        assert record["pid"] == holder.pid
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["since"]))
        result = project.run("--mlc-device=cpu", "--mlc-jit-lock-timeout=1")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines([
            f"LockTimeoutError: timed out after 1s waiting for the lock of key {digest} "
            f"(TVMModel('tinymodel:build', config={{'hidden': 4}}) for target "
            f"{{\"kind\": \"llvm\"}}): held by pid {holder.pid} on {socket.gethostname()} "
            f"since {since} (*s ago); raise --mlc-jit-lock-timeout or check that process",
        ])
        assert len(project.compiles()) == 1, "the waiter compiled nothing"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=120)
    wait_until(lambda: not compilers_running(project.cache, digest),
               "the holder's compiler to die with it")
    assert engine.lock_is_free(digest)
    project.run("--mlc-device=cpu", "--mlc-jit-lock-timeout=60").assert_outcomes(passed=1)
    assert len(project.compiles()) == 2
    assert project.manifests()[0]["key_digest"] == digest  # the lock is the key's


def test_lock_timeout_with_a_stale_or_missing_holder_record(engine: Engine,
                                                             project: Project) -> None:
    """The lock held (by this process) but its record stale or gone: the message says so
    rather than naming the wrong process."""
    (probe,) = engine.run([{"hidden": 4}], policy="READONLY")
    digest = re.search(r"for key ([0-9a-f]{64})", probe["message"]).group(1)  # type: ignore[union-attr]
    locks = project.cache / ".mlcjit" / "locks"
    locks.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with FileLock(locks / f"{digest}.lock", thread_local=False):
        (locks / f"{digest}.owner").write_text(json.dumps(
            {"pid": dead.pid, "host": socket.gethostname(), "since": time.time()}))
        (stale,) = engine.run([{"hidden": 4}], lock_timeout=0.5)
        (locks / f"{digest}.owner").unlink()
        (unknown,) = engine.run([{"hidden": 4}], lock_timeout=0.5)
    assert stale["error"] == "LockTimeoutError", stale
    assert f"held by pid {dead.pid} on {socket.gethostname()}" in stale["message"]
    assert "(that process has exited: the record is stale, the holder unknown)" in \
        stale["message"]
    assert unknown["error"] == "LockTimeoutError", unknown
    assert f"waiting for the lock of key {digest}" in unknown["message"]
    assert ": holder unknown;" in unknown["message"]
    assert project.compiles() == []


# -- stress: eight processes on a cold cache ---------------------------------------------
PROCESSES = 8
REQUESTS = 50
HIDDEN = (4, 5, 6, 7, 8)


@pytest.mark.reliability
def test_cold_cache_under_eight_processes(engine: Engine, project: Project,
                                          tmp_path: Path) -> None:
    seed = int(os.environ.get("MLCJIT_STRESS_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    tag = f"(seed {seed}; rerun with MLCJIT_STRESS_SEED={seed})"
    ready, go = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    plans = []
    for _ in range(PROCESSES):
        plan = [{"hidden": h} for h in HIDDEN for _ in range(REQUESTS // len(HIDDEN))]
        rng.shuffle(plan)
        plans.append(plan)
    # A new engine per request: every request does the full lock-free lookup and checksum.
    procs = [engine.popen(plan, fresh=True, ready=str(ready), go=str(go)) for plan in plans]
    try:
        wait_until(lambda: len(list(ready.iterdir())) == PROCESSES,  # all imported
                   "the drivers to start")
        go.touch()  # start them together
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
            results.append(outcomes(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    served = [r for rs in results for r in rs]
    assert len(served) == PROCESSES * REQUESTS
    failed = [r for r in served if not r["ok"]]
    assert failed == [], f"{tag}: {failed[:3]}"
    for r in served:
        assert r["sha256"] == r["manifest_sha256"], f"{tag}: a partial library was returned: {r}"
        assert r["size"] == r["manifest_size"], f"{tag}: {r}"
    per_key = collections.Counter(line.split()[1] for line in project.compiles())
    assert per_key == {f"hidden={h}": 1 for h in HIDDEN}, f"{tag}: compiled {per_key}"
    assert sum(not r["hit"] for r in served) == len(HIDDEN), tag
    for hidden in HIDDEN:
        shas = {r["sha256"] for r in served if r["config"]["hidden"] == hidden}
        assert len(shas) == 1, f"{tag}: every process got the same bytes"
    checked = engine.run([{"hidden": h} for h in HIDDEN], policy="READONLY", check=True)
    assert all(r["hit"] and r["checked"] for r in checked), checked
    assert list((project.cache / ".mlcjit" / "staging").iterdir()) == []
