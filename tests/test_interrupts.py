"""An interrupt, a timeout or the death of the test process stops a compile's whole process
tree: the compiler, its children, and theirs, even one that left the process group.

Each compile runs under a launcher (``pytest_mlcjit.compiler._launcher``) that stays its
parent, is a child subreaper (orphans of the tree come back to it), kills the tree on
SIGTERM, SIGINT, SIGHUP and when the test process dies, and is stopped by the runner on
timeout and on interrupt, the background prefetch's compile included. The model's factory
starts a child in a session of its own (a grandchild of the compile that no process-group
kill reaches) and then waits. No assertion depends on how long anything took: each test
asserts what is left once the run, or the compile, has ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from faultmodels import add_hold_model, alive, hold_request, read_pid, staging_dirs

from conftest import PYTEST_HEARING_SIGINT, Engine, Project, wait_until
from pytest_mlcjit import JIT, CompileError, Settings, TVMModel

#: A safety limit against hangs (never a timing assertion).
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


def _compile_processes(cache: Path) -> dict[int, int]:
    """pid → parent pid of the launchers and compiles of this cache: the live processes
    whose command line names one of its staging directories (each renames itself to the
    command it runs)."""
    needle = str(cache / ".mlcjit" / "staging").encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "cmdline").read_bytes() and alive(int(proc.name)):
                    stat = (proc / "stat").read_bytes().rpartition(b")")[2].split()
                    found[int(proc.name)] = int(stat[1])
            except (OSError, IndexError, ValueError):
                continue
    return found


def _compiles(cache: Path) -> list[int]:
    """The compiles (a process of this cache under another, its launcher) alive now. A
    launcher reaps its whole tree before it reports how the compile ended, so none may be
    left once the run (or the request) has ended; the launcher itself exits right after
    its report (see :func:`_nothing_left_of`)."""
    found = _compile_processes(cache)
    return [pid for pid, parent in found.items() if parent in found]


def _nothing_left_of(cache: Path) -> None:
    """Wait (a safety limit, not a timing assertion) until no launcher or compile of
    ``cache`` is left: a launcher is gone a moment after its report."""
    wait_until(lambda: not _compile_processes(cache), "the launchers to exit", timeout=60)


def _pytest(project: Project, workers: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*PYTEST_HEARING_SIGINT, "-p", "no:cacheprovider",
         f"--mlc-jit-cache-dir={project.cache}", "--mlc-device=cpu", "-n", workers, *args],
        cwd=project.pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.parametrize("workers", ["2", "0"], ids=["xdist-prefetch", "no-xdist"])
def test_sigint_ends_the_run_and_leaves_no_compile_or_grandchild(
        engine: Engine, project: Project, tmp_path: Path, workers: str) -> None:
    """SIGINT to the process group of a run (Ctrl-C in a terminal) while two libraries
    compile, with ``-n 2`` in the workers' background prefetch threads, without xdist in
    the test itself, each compile holding (until a file that never comes) with a
    grandchild in a session of its own: the run ends, and when it has ended no compile
    and no grandchild is left, nothing is half-written in the cache (no library, no
    manifest, no staging directory), and nothing is remembered as a failure. Before, under
    -n 2 the prefetch waited for its compile (here, one that never ends), the
    grandchildren lived on, and staging stayed behind."""
    add_hold_model(project)
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
        assert len(_compiles(project.cache)) >= expected
        os.killpg(run.pid, signal.SIGINT)
        out = run.communicate(timeout=SAFETY_S)[0].decode(errors="replace")
        # The run has ended: what it leaves is all there is now.
        left = [pid for pid in grandchildren if alive(pid)]
        compiles = _compiles(project.cache)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
        for pid in grandchildren:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert run.returncode == pytest.ExitCode.INTERRUPTED, out
    assert left == [], f"grandchildren outlived the run:\n{out}"
    assert compiles == [], f"compiles outlived the run:\n{out}"
    _nothing_left_of(project.cache)
    assert len(project.compiles()) == expected, "each compile had started"
    assert staging_dirs(project.cache) == []
    assert list((project.cache / ".mlcjit" / "staging").iterdir()) == [], "staging locks"
    contents = engine.check_cache(staging=False)  # every file of the cache accounted for
    assert (contents.manifests, contents.pending, contents.temporary) == ([], [], []), \
        "nothing half-written"
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


def test_a_timeout_kills_the_whole_tree(engine: Engine, project: Project, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--mlc-jit-timeout: the compile fails with a timeout, and by then its whole tree is
    dead and its staging directory gone. Before, the process group was killed, and a
    grandchild in a session of its own lived on.

    The limit must outlast the factory's start (it starts the grandchild first thing),
    which no limit guarantees on a loaded machine: a short one first, and a longer one
    only if the factory had not started when the short one ran out."""
    add_hold_model(project)
    monkeypatch.syspath_prepend(str(project.pytester.path))
    pidfile = tmp_path / "none"
    try:
        for limit in (1, 5, 30):
            pidfile = tmp_path / f"grandchild-{limit}"
            jit = JIT(Settings(cache_dir=project.cache, compile_timeout=limit))
            spec = TVMModel("holdmodel:build", config={"hidden": 5, "child": str(pidfile),
                                                       "hold": str(tmp_path / "never")})
            with pytest.raises(CompileError,
                               match=rf"timed out after {limit}s \(--mlc-jit-timeout\)"):
                jit.compile(spec, "cpu")
            if pidfile.exists():
                break
        assert pidfile.exists(), "the factory never ran"
        assert not alive(read_pid(pidfile)), "the grandchild outlived the timeout"
        assert _compiles(project.cache) == []
        _nothing_left_of(project.cache)
        assert staging_dirs(project.cache) == []
        contents = engine.check_cache(staging=False)
        assert (contents.manifests, contents.pending, contents.temporary) == ([], [], [])
    finally:
        for path in tmp_path.glob("grandchild-*"):
            if alive(pid := read_pid(path)):
                os.kill(pid, signal.SIGKILL)
