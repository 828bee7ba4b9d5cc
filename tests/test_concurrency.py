"""Concurrent processes and locks (the reliability suite, docs/reliability.md): real
processes, real signals, real compiles.

* Killed processes never leave a partial entry, a held lock or a running compiler. A
  compile is SIGKILLed at randomized points. The engine's test-only fault points
  (``MLCJIT_TEST_PAUSE``, see pytest_mlcjit/fsutil.py) announce each step of a compile on
  stderr and pause there, which makes even the publish step a window a test can hit; the
  delay after the announcement is random, so a kill may also land inside the next step
  (for ``compile``: anywhere in the compiler subprocess). A waiter is killed while it
  waits, and a pytest-xdist worker kills itself mid-compile while the other worker needs
  the key.
* A waiter that exceeds --mlc-jit-lock-timeout fails with a message naming the key and
  the process that holds the lock (pid, host, since when); after the holder dies, the
  lock is free and the next request compiles.
* Eight processes, fifty requests each, over five keys, in random order, on a cold cache:
  each key is compiled exactly once (counted by the factory itself), and every library a
  request returns is whole (its SHA-256 and size are checked by the process that got it).

tests/test_xdist.py covers one compilation per key across xdist workers and two
independent pytest processes.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from conftest import Engine, Project, compilers_running, outcomes, wait_until
from pytest_mlcjit.key import file_sha256

pytestmark = pytest.mark.reliability


# -- SIGKILL: the lock holder at random points, a waiter, an xdist worker -------------------
#: The fault points of one compile, in the order the engine reaches them.
POINTS = ("lock-wait", "locked", "staging", "compile", "compiled", "publish:staged",
          "publish:library", "published")
#: Where kills are aimed (the compile itself, the longest step, three times as often).
TARGETS = ("locked", "staging", "compile", "compile", "compile", "compiled", "publish:staged",
           "publish:library")
PAUSE_S = 0.1
COMPILE_WINDOW_S = 1.5
KILLS = 20
KILLS_PER_KEY = 5
SAFETY_S = 120.0


def _points(stderr: Path, pid: int) -> list[str]:
    """The fault points ``pid`` announced so far."""
    found = []
    for line in stderr.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "mlcjit-test-point" and parts[2] == str(pid):
            found.append(parts[1])
    return found


def _kill_at(engine: Engine, hidden: int, point: str, delay: float,
             stderr: Path) -> tuple[int | None, list[str], str]:
    """Start a compile, SIGKILL it ``delay`` s after it announces ``point``.

    Returns (its exit status, the points it announced, the key's digest)."""
    with open(stderr, "w") as err:
        proc = engine.popen([{"hidden": hidden}], env={"MLCJIT_TEST_PAUSE": str(PAUSE_S)},
                            stderr=err)
    try:
        wait_until(lambda: point in _points(stderr, proc.pid) or proc.poll() is not None,
                   f"point {point}")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=SAFETY_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (event,) = outcomes(out, events=True)[:1]
    return proc.returncode, _points(stderr, proc.pid), str(event["digest"])


def test_sigkill_of_the_lock_holder_at_random_points(
    engine: Engine, project: Project, tmp_path: Path
) -> None:
    seed = int(os.environ.get("MLCJIT_KILL_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    tag = f"(seed {seed}; rerun with MLCJIT_KILL_SEED={seed})"
    kills: collections.Counter[str] = collections.Counter()
    orphans = committed = 0
    keys: list[int] = []
    hidden = 9
    engine.learn_inputs()  # where each key's entry will be, before its compile finishes
    while sum(kills.values()) < KILLS:
        assert len(keys) < 3 * KILLS // KILLS_PER_KEY, f"too few kills landed mid-compile {tag}"
        hidden += 1
        keys.append(hidden)
        orphan: bytes | None = None  # a library no manifest names, left by an earlier kill
        for _ in range(KILLS_PER_KEY):
            point = rng.choice(TARGETS)
            delay = rng.uniform(0, COMPILE_WINDOW_S if point == "compile" else PAUSE_S)
            n = sum(kills.values()) + committed
            status, seen, digest = _kill_at(engine, hidden, point, delay,
                                            tmp_path / f"stderr-{n}.txt")
            where = f"kill {n} at {point}+{delay:.3f}s, last point {seen[-1:]} {tag}"
            assert status in (0, -signal.SIGKILL), where
            assert "locked" in seen, where
            library, manifest = engine.paths(digest)
            # A manifest only ever names a whole library.
            if manifest.exists():
                data = json.loads(manifest.read_text())
                assert file_sha256(library) == data["sha256"], where
                assert POINTS.index(seen[-1]) >= POINTS.index("publish:library"), where
            elif POINTS.index(seen[-1]) < POINTS.index("publish:staged"):
                # Killed before publishing: the entry's files are as they were.
                assert (library.read_bytes() if library.exists() else None) == orphan, where
            elif library.exists():  # killed between the two renames of publish
                orphans += 1
                orphan = library.read_bytes()
            assert engine.lock_is_free(digest), where
            wait_until(lambda d=digest: not compilers_running(project.cache, d),
                       f"the compiler of {where} to die with its parent")
            if manifest.exists():
                committed += 1  # killed after the commit point, or too late: not mid-compile
                break
            assert status == -signal.SIGKILL, where
            kills[seen[-1]] += 1
        else:
            # The next request compiles it exactly once, and it is whole.
            before = len(project.compiles())
            result, again = engine.run([{"hidden": hidden}] * 2, fresh=True)
            assert result["ok"], result
            assert not result["hit"], result
            assert result["sha256"] == result["manifest_sha256"], result
            assert again["hit"], again
            assert len(project.compiles()) == before + 1, tag
    # A killed compile's staging dir goes with the next compile (its lock is free).
    (last,) = engine.run([{"hidden": hidden + 1}])
    assert last["ok"], last
    staging = project.cache / ".mlcjit" / "staging"
    assert list(staging.iterdir()) == [], "every killed compile's staging dir was cleaned"
    checked = engine.run([{"hidden": h} for h in keys], policy="READONLY", check=True)
    assert all(r.get("hit") and r.get("checked") for r in checked), [
        r for r in checked if not (r.get("hit") and r.get("checked"))]
    # Shown with -s / in the report: where the kills landed (the last point announced).
    print(f"\nkill points {tag}: {sum(kills.values())} mid-compile {dict(kills)}, "
          f"{committed} after the commit point, {orphans} unnamed libraries left by a kill "
          "between the renames (never loaded, replaced by the next compile)", file=sys.stderr)


def test_sigkill_of_a_waiter(engine: Engine, project: Project, tmp_path: Path) -> None:
    holder = engine.popen([{"hidden": 4}], env={"MLCJIT_TEST_SLEEP": "3"})
    owners = project.cache / ".mlcjit" / "locks"
    wait_until(lambda: any(owners.glob("*.owner")), "the holder to take the lock")
    (owner,) = owners.glob("*.owner")
    assert json.loads(owner.read_text())["pid"] == holder.pid
    stderr = tmp_path / "waiter.txt"
    with open(stderr, "w") as err:
        waiter = engine.popen([{"hidden": 4}], env={"MLCJIT_TEST_PAUSE": "0.01"}, stderr=err)
    wait_until(lambda: "lock-wait" in _points(stderr, waiter.pid), "the waiter to wait")
    time.sleep(0.3)
    waiter.send_signal(signal.SIGKILL)
    waiter.communicate(timeout=SAFETY_S)
    assert waiter.returncode == -signal.SIGKILL
    assert "locked" not in _points(stderr, waiter.pid), "it was killed while waiting"
    assert json.loads(owner.read_text())["pid"] == holder.pid, "the holder kept its lock"
    out, err_text = holder.communicate(timeout=SAFETY_S)
    assert holder.returncode == 0, err_text
    (result,) = outcomes(out)
    assert result["ok"], result
    assert not result["hit"]
    assert result["sha256"] == result["manifest_sha256"]
    assert len(project.compiles()) == 1
    (later,) = engine.run([{"hidden": 4}])
    assert later["hit"], later
    assert len(project.compiles()) == 1


#: In the pytester project: the first worker that holds the key's lock while its factory runs
#: (the compile is in progress), once another worker has started a test, SIGKILLs itself.
KILLER_CONFTEST = '''
import json
import os
import signal
import threading
import time

import pytest

LOCKS = {locks!r}
MARKS = {marks!r}
COUNTER = os.environ["MLCJIT_TEST_COUNT"]


def lock_owner():
    for name in os.listdir(LOCKS) if os.path.isdir(LOCKS) else []:
        if name.endswith(".owner"):
            try:
                with open(os.path.join(LOCKS, name)) as f:
                    return json.load(f)["pid"]
            except (OSError, ValueError):
                pass
    return None


def others_started():
    mine = f"{{os.getpid()}}.started"
    return any(n.endswith(".started") and n != mine for n in os.listdir(MARKS))


@pytest.fixture(autouse=True, scope="session")
def _die_once_mid_compile():
    os.makedirs(MARKS, exist_ok=True)
    open(os.path.join(MARKS, f"{{os.getpid()}}.started"), "w").close()

    def watch():
        while True:
            if lock_owner() == os.getpid() and os.path.exists(COUNTER) and others_started():
                try:
                    os.close(os.open(os.path.join(MARKS, "killed"), os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
'''


def test_killed_xdist_worker(project: Project, monkeypatch: pytest.MonkeyPatch,
                             tmp_path: Path) -> None:
    locks = project.cache / ".mlcjit" / "locks"
    project.pytester.makeconftest(KILLER_CONFTEST.format(locks=str(locks),
                                                         marks=str(tmp_path / "marks")))
    project.write_tests([{"hidden": 4}], per_config=6)
    monkeypatch.setenv("MLCJIT_TEST_SLEEP", "1")  # the factory sleeps: the kill lands in it
    result = project.run("-n", "2", "--mlc-device=cpu")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(["*crashed while running*test_forward*"])
    assert (tmp_path / "marks" / "killed").exists()
    assert len(project.compiles()) == 2, ("the killed compile, then the other worker's",
                                          project.compiles(), result.stdout.str())
    assert len(project.manifests()) == 1
    assert list((project.cache / ".mlcjit" / "staging").iterdir()) == []
    monkeypatch.delenv("MLCJIT_TEST_SLEEP")
    nxt = project.run("-n", "2", "--mlc-device=cpu")
    nxt.assert_outcomes(passed=6)
    nxt.stdout.fnmatch_lines(["6 requests: 6 hits"])
    assert len(project.compiles()) == 2


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
        deadline = time.monotonic() + 120
        while len(list(ready.iterdir())) < PROCESSES:  # all imported: start them together
            assert time.monotonic() < deadline, "the drivers did not start"
            time.sleep(0.01)
        go.touch()
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
