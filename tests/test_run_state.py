"""State belongs to a run, not to the process: two pytest runs in one process (as pytester
runs them, as an IDE or a notebook runs pytest twice) leave nothing of the first in the
second. The board of jobs, the cancellation of waits after an interrupt, and the
warn-once bookkeeping of writes the cache can do without all start afresh."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from conftest import Project, wait_until

#: A conftest for the pytester project: at the end of each run, what this process's engine
#: holds (its board's jobs, whether its waits are cancelled), appended to a file.
SPY = '''
import json
import pytest
from pytest_mlcjit.plugin.session import state_key


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    state = session.config.stash.get(state_key, None)
    if state is None or not state.engine_made:
        return
    engine = state.engine
    with open({out!r}, "a") as f:
        f.write(json.dumps({{"jobs": engine.board.record()["jobs"],
                            "cancelled": engine.builds.cancelled.is_set(),
                            "run_id": engine.settings.run_id}}) + "\\n")
'''

TESTS = '''
import os
import pytest
from pytest_mlcjit import TVMModel


@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={{"hidden": {hidden}}}))
def test_one(compiled_model):
    assert compiled_model.path.exists()
    if os.environ.get("MLCJIT_TEST_INTERRUPT"):
        raise KeyboardInterrupt
'''


def _spied(project: Project) -> list[dict[str, Any]]:
    out = project.pytester.path / "spy.jsonl"
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_later_run_in_the_same_process_starts_from_nothing_of_the_earlier(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three runs in one process. Run 1 cannot write a usage record (a best-effort write):
    it says so once. Run 2 is interrupted (Ctrl-C in a test, with a prefetch running): its
    waits are cancelled. Run 3 must behave as a first run: the failed write is said again
    (once), its wait for a key another process holds is not cancelled, and its board holds
    its own jobs only."""
    project.pytester.makeconftest(SPY.format(out=str(project.pytester.path / "spy.jsonl")))
    project.pytester.makepyfile(test_state=TESTS.format(hidden=4))
    args = ["--mlc-device=cpu", "-p", "no:xdist", "-W", "default"]
    project.run(*args).assert_outcomes(passed=1)
    (manifest,) = project.manifests()
    usage = project.cache / ".mlcjit" / "usage" / manifest["digest"]
    usage.unlink()
    usage.mkdir()  # the one usage record can no longer be written: a best-effort failure

    first = project.run(*args)
    first.assert_outcomes(passed=1)
    assert _warned(first) == 1, first.stdout.str()

    monkeypatch.setenv("MLCJIT_TEST_INTERRUPT", "1")
    interrupted = project.run(*args, "--mlc-jit-prefetch=on")
    monkeypatch.delenv("MLCJIT_TEST_INTERRUPT")
    assert interrupted.ret == pytest.ExitCode.INTERRUPTED, interrupted.stdout.str()
    assert _spied(project)[-1]["cancelled"] is True, "run 2 was interrupted: its waits stop"

    holder = _hold_key_lock(project, manifest["key_digest"])
    third = project.run(*args, "--mlc-jit-policy=REDO")
    assert holder.wait(timeout=120) == 0, "the holder saw run 3 wait, then let go"
    third.assert_outcomes(passed=1)
    spy = _spied(project)[-1]
    assert spy["cancelled"] is False, "run 3's waits are its own"
    assert _warned(third) == 1, "the failed write is said again, once, in run 3"
    jobs = spy["jobs"]
    assert [j["id"] for j in jobs] == list(range(1, len(jobs) + 1)), jobs
    assert [j["kind"] for j in jobs] == ["wait", "compile"], jobs
    assert len(project.compiles()) == 2, "run 3 (REDO) compiled after its wait"


def _warned(result: pytest.RunResult) -> int:
    return sum("could not record the use of" in line for line in result.outlines)


#: Holds a key's lock in a cache until a process of this user announces, on the progress
#: board, that it waits for that key; then lets go (exit 0), or gives up after a minute.
HOLDER = """
import glob, json, os, sys, tempfile, time
from pytest_mlcjit.cache.store.local import LocalStore

cache, digest, ready = sys.argv[1:4]
board = os.path.join(tempfile.gettempdir(), f"pytest-mlcjit-{os.getuid()}")
store = LocalStore(cache).open_for_writing()
with store.lock(digest, timeout=10):
    open(ready, "w").close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in glob.glob(os.path.join(board, "*.json")):
            try:
                record = json.load(open(path))
            except (OSError, ValueError):
                continue
            if any(j.get("kind") == "wait" and j.get("digest") == digest
                   and "ended" not in j for j in record.get("jobs", [])):
                sys.exit(0)
        time.sleep(0.01)
sys.exit(3)
"""


def _hold_key_lock(project: Project, digest: str) -> subprocess.Popen[str]:
    """A process holding ``digest``'s lock in the project's cache until a run waits for
    it (:data:`HOLDER`)."""
    ready = project.pytester.path / "holding"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(project.cache), digest,
                             str(ready)], text=True)
    wait_until(ready.exists, "the lock holder to hold the lock")
    return proc


def test_runs_in_one_process_number_their_jobs_from_one(project: Project) -> None:
    """Each run's board is its own: the second run's jobs are numbered from 1 again, and
    it holds no job of the first."""
    project.pytester.makeconftest(SPY.format(out=str(project.pytester.path / "spy.jsonl")))
    for hidden in (5, 6):
        project.pytester.makepyfile(test_state=TESTS.format(hidden=hidden))
        project.run("--mlc-device=cpu", "-p", "no:xdist").assert_outcomes(passed=1)
    first, second = _spied(project)[-2:]
    assert first["run_id"] != second["run_id"]
    for spy in (first, second):
        jobs = spy["jobs"]
        assert jobs
        assert [j["id"] for j in jobs] == list(range(1, len(jobs) + 1))
    assert {j["digest"] for j in first["jobs"]}.isdisjoint(
        {j["digest"] for j in second["jobs"]})
