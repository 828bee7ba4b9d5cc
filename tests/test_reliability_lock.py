"""A waiter that exceeds --mlc-jit-lock-timeout fails with a message naming the key and
the process that holds the lock (pid, host, since when); after the holder dies, the lock
is free and the next request compiles."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time

from filelock import FileLock

from conftest import Engine, Project, compilers_running, wait_until


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
    assert project.manifests()[0]["digest"] == digest


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
