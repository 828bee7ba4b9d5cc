"""``--mlc-jit-trace PATH``: the run as Chrome trace-event JSON (Perfetto, chrome://tracing).

Checked from the file itself: its events are well formed, and their order is the run's:
per worker, a test's setup holds the compile or the wait it did, its call comes after, and
a worker's wait for a library starts while the other worker compiles it and ends once that
compile has ended. Only the order of recorded timestamps is asserted, never a duration.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from faultmodels import add_hold_model

from conftest import PYTEST_HEARING_SIGINT, Project, wait_until
from pytest_mlcjit.engine import activity

#: A safety limit against hangs (never a timing assertion).
SAFETY_S = 300.0
ROOT = Path(__file__).resolve().parent.parent

#: Two tests of one library; the second asks only once the first's compile runs (the
#: factory's counter has its line), so that one worker compiles and the other waits.
SHARED = '''
import os, pathlib, time
import pytest
from pytest_mlcjit import TVMModel

SPEC = TVMModel("holdmodel:build", config={{"hidden": 4, "hold": {hold!r}}})


@pytest.fixture
def once_compiling():
    counter = pathlib.Path(os.environ["MLCJIT_TEST_COUNT"])
    deadline = time.monotonic() + 300
    while not (counter.exists() and counter.read_text()):
        assert time.monotonic() < deadline, "the first test's compile did not start"
        time.sleep(0.01)


@pytest.mark.mlc_model(SPEC)
def test_first(compiled_model):
    pass


@pytest.mark.mlc_model(SPEC)
def test_second(once_compiling, compiled_model):
    pass
'''


def load_trace(path: Path) -> list[dict[str, Any]]:
    """The file's events, each checked against the trace-event format."""
    data = json.loads(path.read_text(encoding="utf-8"))
    events = data["traceEvents"]
    assert isinstance(events, list)
    for e in events:
        assert {"ph", "ts", "pid", "tid", "name"} <= e.keys(), e
        assert e["ph"] in ("X", "M"), e
        assert isinstance(e["ts"], int), e
        assert isinstance(e["pid"], int), e
        if e["ph"] == "X":
            assert isinstance(e["dur"], int), e
            assert e["dur"] >= 0, e
            assert isinstance(e["cat"], str), e
            assert isinstance(e["args"], dict), e
    return events


def names(events: list[dict[str, Any]], what: str) -> dict[tuple[int, int], str]:
    """(pid, tid) → name given by the metadata events ``what`` (process or thread)."""
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e["ph"] == "M" and e["name"] == what}


def end(e: dict[str, Any]) -> int:
    return int(e["ts"]) + int(e["dur"])


def inside(inner: dict[str, Any], outer: dict[str, Any]) -> bool:
    return outer["ts"] <= inner["ts"] and end(inner) <= end(outer)


def release_when_waited_for(hold: Path, cache: Path) -> threading.Thread:
    """A thread that creates ``hold`` once a process of the run (its jobs on the board)
    waits for a compile of ``cache``."""
    board = activity.default_board()
    assert board is not None

    def waiting() -> bool:
        return any(job.get("kind") == "wait" and "ended" not in job
                   and job.get("root") == str(cache)
                   for record in activity.read_board(board) for job in record["jobs"])

    def release() -> None:
        try:
            wait_until(waiting, "a worker waiting for the compile", timeout=SAFETY_S)
        finally:
            hold.touch()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def test_n2_trace_puts_the_wait_inside_the_other_workers_compile(
        project: Project, shared: Path, tmp_path: Path) -> None:
    """A cold ``-n 2`` run of two tests sharing one library, with a file:// remote: one
    worker compiles it (the compile held until the other is seen waiting) and uploads it,
    the other waits. The trace has one process per worker with a main-thread track; on
    each, the test's setup holds the compile and the upload, or the wait, and the call
    follows the setup; the wait starts after the compile started and before it ended, and
    ends once the library was published: after the compile and its upload ended."""
    add_hold_model(project)
    hold = tmp_path / "hold"
    project.pytester.makepyfile(test_shared=SHARED.format(hold=str(hold)))
    trace = tmp_path / "trace.json"
    releaser = release_when_waited_for(hold, project.cache)
    try:
        result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=off",
                             f"--mlc-jit-trace={trace}")
    finally:
        hold.touch()
        releaser.join(timeout=60)
    result.assert_outcomes(passed=2)
    assert len(project.compiles()) == 1, "one compile, counted by the factory"
    events = load_trace(trace)
    processes = names(events, "process_name")
    workers = {pid: name.split()[0] for (pid, _), name in processes.items()}
    assert sorted(workers.values()) == ["gw0", "gw1"], processes
    threads = names(events, "thread_name")
    spans = [e for e in events if e["ph"] == "X"]
    (compile_,) = [e for e in spans if e["cat"] == "compile"]
    # (Each lock taken is a wait, an untroubled one short: the other worker's is the one.)
    (wait,) = [e for e in spans if e["cat"] == "wait" and e["pid"] != compile_["pid"]]
    assert "holdmodel-hidden=4" in compile_["name"]
    assert compile_["args"]["outcome"] == "done"
    (upload,) = [e for e in spans if e["cat"] == "upload"]
    assert (upload["pid"], upload["tid"], upload["name"]) == (
        compile_["pid"], compile_["tid"], compile_["name"].replace("compile", "upload", 1))
    assert upload["args"]["root"] == shared.as_uri()
    assert end(compile_) <= upload["ts"]
    assert len(list((shared / "entries").rglob("*.json"))) == 1, "uploaded, seen from outside"
    for job, test in ((compile_, "test_first"), (upload, "test_first"),
                      (wait, "test_second")):
        assert threads[(job["pid"], job["tid"])] == "main"
        mine = [e for e in spans if e["pid"] == job["pid"] and e["tid"] == job["tid"]]
        (setup,) = [e for e in mine if e["name"] == f"setup {test}[cpu]"]
        (call,) = [e for e in mine if e["name"] == f"call {test}[cpu]"]
        assert inside(job, setup), (job, setup)
        assert end(setup) <= call["ts"], (setup, call)
    assert compile_["ts"] <= wait["ts"] <= end(compile_) <= end(upload) <= end(wait), (
        compile_, upload, wait)
    # The compile worker's track holds the compile as it ran in its own process.
    (worker_span,) = [e for e in spans if e["cat"] == "compile-worker"]
    assert threads[(worker_span["pid"], worker_span["tid"])] == "compile worker 0"
    assert (worker_span["pid"], worker_span["ts"], worker_span["dur"]) == (
        compile_["pid"], compile_["ts"], compile_["dur"])


INTERRUPTED = '''
import pytest
from pytest_mlcjit import TVMModel


@pytest.mark.mlc_model(TVMModel("holdmodel:build", config={{"hidden": 4, "hold": {never!r}}}))
def test_held(compiled_model):
    pass
'''


STOPPED = '''
import pytest
from pytest_mlcjit import TVMModel


@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 4}))
def test_stopped(compiled_model):
    raise KeyboardInterrupt
'''


def test_a_run_stopped_by_keyboardinterrupt_writes_a_valid_trace(
        project: Project, warm_template: Path, tmp_path: Path) -> None:
    """Ctrl-C's KeyboardInterrupt raised in a test (in this process; the real signal, in a
    subprocess, is the reliability tier's case below): the run ends interrupted and the
    trace is valid JSON with what the run did up to there."""
    project.warm(warm_template)  # hidden=4
    project.pytester.makepyfile(test_stop=STOPPED)
    trace = tmp_path / "trace.json"
    result = project.run("-p", "no:xdist", "--mlc-device=cpu", f"--mlc-jit-trace={trace}")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    spans = [e for e in load_trace(trace) if e["ph"] == "X"]
    (setup,) = [e for e in spans if e["name"] == "setup test_stopped[cpu]"]
    (call,) = [e for e in spans if e["name"] == "call test_stopped[cpu]"]
    assert end(setup) <= call["ts"]
    assert not [e for e in spans if e["cat"] == "compile"], "a hit"


@pytest.mark.reliability
def test_a_run_stopped_with_ctrl_c_still_writes_a_valid_trace(
        project: Project, tmp_path: Path) -> None:
    """SIGINT to a ``-n 2`` run (its process group, as Ctrl-C) while its test's compile
    holds on a worker: the run ends interrupted and the trace is valid JSON holding that
    worker's interrupted compile inside the test's setup (its events reach the controller
    through the run's board when the interrupted workers' output does not)."""
    add_hold_model(project)
    project.pytester.makepyfile(test_stopped=INTERRUPTED.format(never=str(tmp_path / "never")))
    trace = tmp_path / "trace.json"
    run = subprocess.Popen(
        [*PYTEST_HEARING_SIGINT, "-p", "no:cacheprovider", "-n", "2", "--mlc-jit-prefetch=off",
         f"--mlc-jit-cache-dir={project.cache}", "--mlc-device=cpu", f"--mlc-jit-trace={trace}"],
        cwd=project.pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: project.compiles() or run.poll() is not None,
                   "the compile to start", timeout=SAFETY_S)
        assert run.poll() is None, run.communicate()[0].decode()
        os.killpg(run.pid, signal.SIGINT)
        out = run.communicate(timeout=SAFETY_S)[0].decode(errors="replace")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode == pytest.ExitCode.INTERRUPTED, out
    events = load_trace(trace)
    spans = [e for e in events if e["ph"] == "X"]
    (compile_,) = [e for e in spans if e["cat"] == "compile"]
    (setup,) = [e for e in spans if e["name"] == "setup test_held[cpu]"]
    assert compile_["args"]["outcome"] == "interrupted"
    assert compile_["pid"] == setup["pid"]
    assert inside(compile_, setup)
    assert names(events, "process_name")[(setup["pid"], 0)].startswith("gw")
    assert not [e for e in spans if e["cat"] == "call"], "the test never ran"


def test_the_docs_picture_is_drawn_from_a_valid_trace_of_four_workers() -> None:
    """docs/how-to/trace.md's picture: its trace (a real cold ``-n 4`` run of the examples,
    committed beside it) is a valid trace of four workers, and benchmarks/trace_svg.py
    draws one box per span of it."""
    events = load_trace(ROOT / "docs" / "images" / "examples-n4.trace.json")
    workers = sorted(name.split()[0] for name in names(events, "process_name").values())
    assert workers == ["gw0", "gw1", "gw2", "gw3"]
    assert {e["cat"] for e in events if e["ph"] == "X"} >= {"setup", "call", "compile", "wait"}
    spec = importlib.util.spec_from_file_location("trace_svg", ROOT / "benchmarks" / "trace_svg.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    svg = module.draw(events, "title")
    assert svg.count("<title>") == sum(e["ph"] == "X" for e in events)


def test_compiles_running_at_once_get_a_compile_worker_track_each() -> None:
    """Three compiles of one process, two of them at once (a test's and the prefetch's):
    the compile worker's tracks hold them without overlap, the third on the first track
    again once it is free; the threads keep their own spans."""
    from pytest_mlcjit.plugin.trace import COMPILE_WORKER_TID, document

    def span(name: str, start: float, end: float, tid: int) -> dict[str, Any]:
        return {"name": f"compile {name}", "cat": "compile", "start": start, "end": end,
                "tid": tid, "args": {}}

    part = {"pid": 7, "worker": "gw0", "threads": {"1": "main", "2": "prefetch"},
            "events": [span("a", 10.0, 14.0, 1), span("b", 11.0, 12.0, 2),
                       span("c", 14.0, 15.0, 2)]}
    trace = document([part], started=10.0)["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in trace if e["name"] == "thread_name"}
    lanes = sorted((e["tid"], e["ts"], e["ts"] + e["dur"], e["name"]) for e in trace
                   if e.get("cat") == "compile-worker")
    assert lanes == [(COMPILE_WORKER_TID, 0, 4_000_000, "compiling a"),
                     (COMPILE_WORKER_TID, 4_000_000, 5_000_000, "compiling c"),
                     (COMPILE_WORKER_TID + 1, 1_000_000, 2_000_000, "compiling b")]
    assert names[COMPILE_WORKER_TID] == "compile worker 0"
    assert names[COMPILE_WORKER_TID + 1] == "compile worker 1"
    assert len([e for e in trace if e.get("cat") == "compile"]) == 3
