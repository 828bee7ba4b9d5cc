"""An interrupt, a timeout or the death of the test process stops a compile's whole process
tree: the compiler, its children, and theirs, even one that left the process group.

Each compile runs under a launcher (``pytest_mlcjit.build._launcher``) that stays its parent, is a
child subreaper (orphans of the tree come back to it), kills the tree on SIGTERM, SIGINT,
SIGHUP and when the test process dies, and is stopped by the runner on timeout and on
interrupt, the background prefetch's compile included. The model's factory starts a child
in a session of its own (a grandchild of the compile that no process-group kill reaches)
and then waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from faultmodels import add_hold_model, alive, hold_request, read_pid, staging_dirs

from conftest import Engine, Project, wait_until
from pytest_mlcjit import JIT, CompileError, Settings, TVMModel

#: The bound the issue names: from the interrupt to the end of the run.
EXIT_BOUND_S = 2.0
SAFETY_S = 300.0

INTERRUPTED_TESTS = '''
import pytest
from pytest_mlcjit import TVMModel

SPECS = [TVMModel("holdmodel:build", config={{"hidden": h, "child": f"{pids}/{{h}}",
                                             "hold": "{never}"}}) for h in (3, 5)]


@pytest.mark.parametrize("compiled_model", SPECS, indirect=True)
@pytest.mark.parametrize("i", range(3))
def test_model(compiled_model, i):
    assert compiled_model.path.exists()
'''


def _compile_processes(cache: Path) -> list[int]:
    """Compilers and their launchers: processes whose command line names a staging
    directory of this cache."""
    needle = str(cache / ".mlcjit" / "staging").encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes() and alive(int(proc.name)):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


SLEEPING_TESTS = """
import time
from pathlib import Path


def test_sleeps():
    Path({started!r}).touch()
    time.sleep(600)
"""


def _interrupt(run: subprocess.Popen[bytes], stopped: Any = lambda: True
               ) -> tuple[float, float, str]:
    """SIGINT to the run's process group; (seconds until ``stopped()`` held, seconds until
    the run exited, its output)."""
    start = time.monotonic()
    os.killpg(run.pid, signal.SIGINT)
    stop_time: float | None = None
    while run.poll() is None:
        if stop_time is None and stopped():
            stop_time = time.monotonic() - start
        assert time.monotonic() - start < SAFETY_S, "the run did not exit after SIGINT"
        time.sleep(0.01)
    exited = time.monotonic() - start
    out = run.communicate()[0].decode(errors="replace")
    if stop_time is None:
        assert stopped(), "still running after the run exited"
        stop_time = exited
    return stop_time, exited, out


def _pytest(project: Project, workers: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
         f"--mlc-jit-cache-dir={project.cache}", "--mlc-device=cpu", "-n", workers, *args],
        cwd=project.pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)


def _baseline(project: Project, workers: str, tmp_path: Path) -> float:
    """How long the same kind of run takes to exit after SIGINT when nothing compiles (a
    test that sleeps): pytest's and xdist's own share, on this machine, now."""
    started = tmp_path / "sleeping"
    project.pytester.makepyfile(test_sleeping=SLEEPING_TESTS.format(started=str(started)))
    run = _pytest(project, workers, "test_sleeping.py")
    try:
        wait_until(lambda: started.exists() or run.poll() is not None, "the sleeping test")
        return _interrupt(run)[1]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
        (project.pytester.path / "test_sleeping.py").unlink()


@pytest.mark.parametrize("workers", ["2", "0"], ids=["xdist-prefetch", "no-xdist"])
def test_sigint_stops_every_compile_within_two_seconds(
        project: Project, tmp_path: Path, workers: str) -> None:
    """SIGINT to the process group of a run (Ctrl-C in a terminal) while two libraries
    compile, with ``-n 2`` in the workers' background prefetch threads, without xdist in
    the test itself: within 2 s every compile is dead, its grandchild included; the run
    exits within 2 s of what the same run needs when nothing compiles (measured first:
    pytest's and xdist's own teardown); no staging directory is left, and nothing is
    remembered as a failure. Before, under -n 2 the run took 5.4 s (the prefetch waited
    for its compile: here, one that never ends), the grandchildren lived on, and staging
    stayed behind."""
    add_hold_model(project)
    baseline = _baseline(project, workers, tmp_path)
    pids = tmp_path / "pids"
    pids.mkdir()
    project.pytester.makepyfile(test_interrupted=INTERRUPTED_TESTS.format(
        pids=pids, never=tmp_path / "never"))
    expected = 2 if workers == "2" else 1
    run = _pytest(project, workers)
    grandchildren: list[int] = []
    try:
        wait_until(lambda: len(list(pids.glob("[0-9]"))) == expected or run.poll() is not None,
                   "the compiles to be running", timeout=SAFETY_S)
        assert run.poll() is None, run.communicate()[0].decode()
        grandchildren = [read_pid(p) for p in pids.glob("[0-9]")]
        assert all(alive(pid) for pid in grandchildren)
        stopped, exited, out = _interrupt(run, lambda: not any(
            alive(pid) for pid in grandchildren) and not _compile_processes(project.cache))
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
        for pid in grandchildren:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    print(f"\n-n {workers}: after SIGINT, every compile was dead in {stopped:.2f}s, the run "
          f"exited in {exited:.2f}s (with nothing compiling: {baseline:.2f}s)")
    assert stopped < EXIT_BOUND_S, f"compiles still ran {stopped:.2f}s after SIGINT:\n{out}"
    assert exited < baseline + EXIT_BOUND_S, \
        f"the run took {exited:.2f}s to exit after SIGINT ({baseline:.2f}s idle):\n{out}"
    assert staging_dirs(project.cache) == []
    assert list((project.cache / ".mlcjit" / "staging").iterdir()) == [], "staging locks"
    assert list((project.cache / ".mlcjit" / "failed").iterdir()) == [], \
        "an interrupt is not remembered as the model's failure"


def test_sigkill_of_the_test_process_kills_the_whole_tree(
        engine: Engine, project: Project, tmp_path: Path) -> None:
    """SIGKILL of the process that asked for the compile: the launcher gets its parent's
    death signal and kills the tree, the grandchild in its own session included. Before,
    only the direct child died (PR_SET_PDEATHSIG); its children were orphaned."""
    add_hold_model(project)
    pidfile = tmp_path / "grandchild"
    driver = engine.popen([hold_request(5, child=str(pidfile), hold=str(tmp_path / "never"))])
    try:
        wait_until(lambda: pidfile.exists() or driver.poll() is not None, "the grandchild")
        grandchild = read_pid(pidfile)
        assert alive(grandchild)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.communicate(timeout=SAFETY_S)
    try:
        wait_until(lambda: not alive(grandchild) and not _compile_processes(project.cache),
                   "the compile's tree to die with the test process", timeout=60)
    finally:
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_a_timeout_kills_the_whole_tree(project: Project, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--mlc-jit-timeout: the compile fails with a timeout, and by then its whole tree is
    dead and its staging directory gone. Before, the process group was killed, and a
    grandchild in a session of its own lived on."""
    add_hold_model(project)
    monkeypatch.syspath_prepend(str(project.pytester.path))
    pidfile = tmp_path / "grandchild"
    engine = JIT(Settings(cache_dir=project.cache, compile_timeout=20))
    spec = TVMModel("holdmodel:build", config={"hidden": 5, "child": str(pidfile),
                                               "hold": str(tmp_path / "never")})
    try:
        with pytest.raises(CompileError, match=r"timed out after 20s \(--mlc-jit-timeout\)"):
            engine.compile(spec, "cpu")
        assert pidfile.exists(), "the factory ran"
        assert not alive(read_pid(pidfile)), "the grandchild outlived the timeout"
        assert _compile_processes(project.cache) == []
        assert staging_dirs(project.cache) == []
    finally:
        if pidfile.exists() and alive(pid := read_pid(pidfile)):
            os.kill(pid, signal.SIGKILL)
