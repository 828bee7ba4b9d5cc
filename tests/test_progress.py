"""Live progress: what is compiling, downloading or waiting for another's compile, shown
once it lasts ``mlc_jit_progress_delay`` seconds (2 by default; 0.1 in these runs): on a
terminal (a real pseudo-terminal here, its screen emulated with pyte) one status line
redrawn in place and gone at the end; elsewhere plain start and end lines, without
control sequences; nothing when nothing takes long.

No test here waits for time to pass to see a job: each compile holds (until a file
exists) and is let go only once the display has shown what the test looks for. The
second-process test is also where two independent pytest processes on one cold key
compile it once (tests/test_xdist.py is about xdist workers). A pty variant under
``-n 2`` and a plain-line variant without xdist are in the reliability tier.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faultmodels import HELD_MODEL

from conftest import Project, accounting, wait_until
from pytest_mlcjit.engine import activity
from pytest_mlcjit.plugin.progress import Tracker, holder

HOST = socket.gethostname()
#: A safety limit against hangs (never a timing assertion).
SAFETY_S = 300.0
#: The display's thresholds in these runs: a job is shown once it lasts 0.1 s.
FAST = ("-o", "mlc_jit_progress_delay=0.1", "-o", "mlc_jit_progress_interval=0.05")


HELD_TESTS = '''
import pytest
from pytest_mlcjit import TVMModel


@pytest.mark.parametrize("i", range({n}))
@pytest.mark.mlc_model(TVMModel("heldmodel:build", config={{"hidden": 4}}))
def test_held(compiled_model, i):
    assert compiled_model.path.exists()
'''


def held_project(project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                 tests: int = 1) -> Path:
    """Write the held model and ``tests`` tests of it; the hold file (not there yet)."""
    project.pytester.makepyfile(heldmodel=HELD_MODEL, test_held=HELD_TESTS.format(n=tests))
    hold = tmp_path / "hold"
    monkeypatch.setenv("MLCJIT_TEST_HOLD", str(hold))
    return hold


def pytest_argv(project: Project, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--mlc-device=cpu",
            f"--mlc-jit-cache-dir={project.cache}", *FAST, *args]


def run_releasing(argv: list[str], cwd: Path, hold: Path,
                  release: Callable[[str], bool]) -> tuple[int, list[str]]:
    """Run ``argv`` with its output on a pipe (not a terminal), line by line; create
    ``hold`` once ``release(line)`` is true of a line. Its exit status and lines."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)
    watchdog = threading.Timer(SAFETY_S, proc.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not hold.exists() and release(lines[-1]):
                hold.touch()
        proc.wait()
    finally:
        watchdog.cancel()
        hold.touch()
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return proc.returncode, lines


# -- the state machine, on a fake clock -------------------------------------------------------
def job(kind: str = "compile", *, started: float = 100.0, label: str = "gw1", key: int = 1,
        digest: str = "d" * 64, **more: Any) -> dict[str, Any]:
    return {"key": ("h", 1, key), "label": label, "kind": kind, "model": "mlp-hidden=128",
            "target": "llvm", "digest": digest, "root": "/c", "started": started, **more}


def test_nothing_is_shown_until_a_job_lasts_two_seconds() -> None:
    tracker = Tracker(since=0)
    views = [job()]
    assert tracker.lines(views, 101.9) == []
    assert tracker.status(views, 101.9) == ""
    assert tracker.lines(views, 102.0) == [
        "mlcjit: [gw1] compiling mlp-hidden=128 (llvm): running for 2s"]
    assert tracker.status(views, 107.2) == "mlcjit: [gw1] compiling mlp-hidden=128 (llvm) 7s"
    assert tracker.lines(views, 110.0) == []
    ended = [job(ended=112.4, seconds=12.4, outcome="done")]
    assert tracker.lines(ended, 112.5) == ["mlcjit: [gw1] compiled mlp-hidden=128 (llvm) in 12.4s"]
    assert tracker.lines(ended, 113.0) == [], "each end once"
    assert tracker.status(ended, 113.0) == ""


def test_short_jobs_print_nothing_and_long_ones_seen_only_ended_print_their_end() -> None:
    tracker = Tracker(since=0)
    assert tracker.lines([job(ended=101.0, seconds=1.0, outcome="done")], 101.5) == []
    failed = job(key=2, ended=105.0, seconds=5.0, outcome="failed")
    assert tracker.lines([failed], 105.2) == [
        "mlcjit: [gw1] compile of mlp-hidden=128 (llvm) failed after 5.0s"]


def test_a_download_that_found_nothing_is_not_called_downloaded() -> None:
    """The remote's listing runs in the download job; when no entry fits, the end line says
    so (issue 19: it said "downloaded")."""
    tracker = Tracker(since=0)
    got = job("download", ended=103.0, seconds=3.0, outcome="done")
    nothing = job("download", key=2, ended=103.0, seconds=3.0, outcome="done", found=False)
    assert tracker.lines([got, nothing], 103.1) == [
        "mlcjit: [gw1] downloaded mlp-hidden=128 (llvm) in 3.0s",
        "mlcjit: [gw1] asked the remote for mlp-hidden=128 (llvm): no entry fits (3.0s)"]


def test_a_heartbeat_at_most_every_30_seconds() -> None:
    tracker = Tracker(since=0)
    views = [job(), job("wait", key=2, label="gw0", started=101.0, holder="compiled by gw1")]
    assert len(tracker.lines(views, 103.0)) == 2  # both started
    assert tracker.lines(views, 120.0) == []
    (beat,) = tracker.lines(views, 133.0)
    assert beat == ("mlcjit: still running: [gw1] compiling mlp-hidden=128 (llvm) 33s; "
                    "[gw0] waiting for mlp-hidden=128 (llvm), compiled by gw1 32s")
    assert tracker.lines(views, 150.0) == []
    assert len(tracker.lines(views, 163.5)) == 1
    gone = tracker.lines([], 170.0)  # their process died: no end of theirs was seen
    assert gone == ["mlcjit: [gw1] compiling mlp-hidden=128 (llvm): ended after about 70s",
                    "mlcjit: [gw0] waiting for mlp-hidden=128 (llvm), compiled by gw1: ended "
                    "after about 69s"]


def test_the_status_line_folds_a_wait_into_the_compile_it_waits_for() -> None:
    tracker = Tracker(since=0)
    views = [job(label="gw0 prefetch"), job("wait", key=2, label="gw0", started=101.0),
             job("wait", key=3, label="gw1", digest="e" * 64, started=100.5,
                 holder="locked by pid 7 on h")]
    assert tracker.status(views, 105.0) == (
        "mlcjit: [gw0 prefetch] compiling mlp-hidden=128 (llvm) 5s (gw0 waiting) | "
        "[gw1] waiting for mlp-hidden=128 (llvm), locked by pid 7 on h 4s")


def test_whose_compile_a_wait_is_for(tmp_path: Path) -> None:
    digest = "a" * 64
    wait = {"kind": "wait", "digest": digest, "root": str(tmp_path)}
    compile_job = {"kind": "compile", "digest": digest, "root": str(tmp_path),
                   "background": True}
    other_run: dict[str, Any] = {"pid": 5, "host": HOST, "worker": "gw1", "run_id": "r2",
                                 "jobs": [compile_job]}
    assert holder(wait, [other_run], "r1") == (
        f"compiled by gw1 prefetch of another pytest run (pid 5 on {HOST})")
    plain = {**other_run, "worker": "main", "jobs": [{**compile_job, "background": False}]}
    assert holder(wait, [plain], "r1") == f"compiled by another pytest run (pid 5 on {HOST})"
    assert holder(wait, [], "r1") == "holder unknown"
    locks = tmp_path / ".mlcjit" / "locks"
    locks.mkdir(parents=True)
    (locks / f"{digest}.owner").write_text(json.dumps({"pid": 9, "host": "far", "since": 1}))
    assert holder(wait, [], "r1") == "locked by pid 9 on far"
    same_run = {"pid": 9, "host": "far", "worker": "gw3", "run_id": "r1", "jobs": []}
    assert holder(wait, [same_run], "r1") == "locked by gw3 (pid 9 on far)"


# -- the board: what a process publishes ----------------------------------------------------
class WatchedLock:
    """A lock that says (``contended``) when a thread comes for it while another holds
    it, then waits for it as the lock it wraps would."""

    def __init__(self, lock: Any, contended: threading.Event) -> None:
        self.lock, self.contended = lock, contended

    def __enter__(self) -> WatchedLock:
        if not self.lock.acquire(blocking=False):
            self.contended.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_two_threads_starting_jobs_at_once_leave_both_on_the_board(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's prefetch thread starts a compile while its test thread starts a wait:
    the board must show both. Before, a thread could write its record, read before the
    other's job began, after the other's: the compile vanished from the board until it
    ended, and a log got its end line but never its start line (seen in CI). Here the
    first publisher is held between reading its record and renaming its file until the
    second publisher has either published (the race: the first then renames its older
    record over it) or is seen waiting for the board's publish lock (the board's private
    lock is wrapped to tell: an observer, not a stand-in; it still locks)."""
    board = activity.Board(run_id="r", worker="gw0", directory=tmp_path, publish=True)
    contended = threading.Event()
    monkeypatch.setattr(board, "_publish_lock", WatchedLock(board._publish_lock, contended))
    held, second_done, first_done = threading.Event(), threading.Event(), threading.Event()
    real_replace = os.replace

    def slow_first_replace(src: Any, dst: Any) -> None:
        if threading.current_thread().name == "first" and not held.is_set():
            held.set()
            wait_until(lambda: second_done.is_set() or contended.is_set(),
                       "the second publisher to publish or to wait", timeout=60)
            real_replace(src, dst)
            first_done.set()
            return
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", slow_first_replace)  # activity renames with it
    stop = threading.Event()

    def first() -> None:
        with board.doing("wait", model="m", target="llvm", digest="d", root="r"):
            stop.wait(timeout=60)

    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert held.wait(timeout=60)
        with board.doing("compile", model="m", target="llvm", digest="d", root="r",
                         background=True):
            second_done.set()
            thread_alive = thread.is_alive()
            assert first_done.wait(timeout=60)
            (record,) = activity.read_board(tmp_path)
            kinds = sorted(job["kind"] for job in record["jobs"])
    finally:
        stop.set()
        thread.join(timeout=60)
    assert thread_alive
    assert contended.is_set(), "the second publisher waited for the first"
    assert kinds == ["compile", "wait"]


# -- a real pseudo-terminal -----------------------------------------------------------------
COLS, ROWS = 160, 60
STATUS_RE = re.compile(r"mlcjit: \[(gw\d|main)( prefetch)?\] compiling heldmodel-hidden=4 "
                       r"\(llvm\) (\d+)s")


def run_in_pty(argv: list[str], cwd: Path, env: dict[str, str],
               look: Callable[[list[str]], None]) -> tuple[list[list[str]], list[str], bytes]:
    """Run ``argv`` on a pseudo-terminal, its screen emulated (pyte) and shown to
    ``look`` at every change; the screens seen, the final screen, every byte written."""
    pyte = pytest.importorskip("pyte")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    screen = pyte.Screen(COLS, ROWS)
    stream = pyte.ByteStream(screen)
    screens, raw = [], b""
    deadline = time.monotonic() + SAFETY_S
    try:
        while True:
            assert time.monotonic() < deadline, raw.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the other side is closed
                data = b""
            if not data:
                break
            raw += data
            stream.feed(data)
            screens.append([line.rstrip() for line in screen.display])
            look(screens[-1])
    finally:
        os.close(master)
        proc.kill()
        proc.wait()
    return screens, [line.rstrip() for line in screen.display], raw


@pytest.mark.parametrize("mode", [
    pytest.param(["-p", "no:xdist", "-q"], id="no-xdist-quiet"),
    pytest.param(["-n", "2", "-v"], id="n2-verbose", marks=pytest.mark.reliability),
])
def test_a_terminal_shows_the_compile_live_and_ends_clean(
        project: Project, mode: list[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """The compile holds until the status line has shown two different numbers of
    seconds (it is redrawn as the compile goes on), then ends: no status is left, and
    pytest's own lines are intact."""
    hold = held_project(project, monkeypatch, tmp_path)
    env = {**os.environ, "TERM": "xterm"}
    for name in ("COLUMNS", "LINES", "CI", "BUILD_NUMBER"):  # pytest reads these
        env.pop(name, None)
    shown: set[int] = set()

    def look(lines: list[str]) -> None:
        shown.update(int(m.group(3)) for line in lines if (m := STATUS_RE.search(line)))
        if len(shown) >= 2:
            hold.touch()

    try:
        screens, final, raw = run_in_pty(pytest_argv(project, *mode), project.pytester.path,
                                         env, look)
    finally:
        hold.touch()
    # During the compile: the model, the worker, and a number of seconds that grows.
    seen = []
    for lines in screens:
        found = [m for line in lines if (m := STATUS_RE.search(line))]
        assert len(found) <= 1, lines
        if found:
            seen.append((found[0].group(1), int(found[0].group(3))))
    workers = {w for w, _ in seen}
    assert workers <= ({"gw0", "gw1"} if "-n" in mode else {"main"}), workers
    assert workers, raw.decode(errors="replace")
    seconds = [s for _, s in seen]
    assert seconds == sorted(seconds), seconds
    assert len(set(seconds)) >= 2, seconds  # redrawn as the compile went on
    # At the end: no status left, pytest's own lines intact.
    text = "\n".join(final)
    assert "mlcjit: [" not in text
    if "-v" in mode:
        assert re.search(r"^\[gw\d\] \[100%\] PASSED test_held.py::test_held\[cpu-0\]$",
                         text, re.MULTILINE), text
    else:
        assert re.search(r"^\. +\[100%\]$", text, re.MULTILINE), text
    assert re.search(r"^1 request: 1 (compiled|waited|hit)(;.*)?$", text, re.MULTILINE), text
    assert re.search(r"^=+ 1 passed in [\d.]+s =+$|^1 passed in [\d.]+s$", text,
                     re.MULTILINE), text
    assert len(project.compiles()) == 1
    assert len(project.libraries()) == 1


# -- not a terminal ---------------------------------------------------------------------------
LINE_RE = re.compile(r"^mlcjit: \[(?P<label>[^]]+)\] (?:(?P<start>compiling|waiting for) "
                     r"heldmodel-hidden=4 \(llvm\).*: running for \d+s|(?P<end>compiled|waited)"
                     r" .*heldmodel-hidden=4 \(llvm\).*)$")


def start_end_pairs(lines: list[str]) -> dict[tuple[str, str], list[str]]:
    """(label, kind) → the sequence of "start"/"end" lines of the display's own lines,
    each checked to be one of them."""
    jobs: dict[tuple[str, str], list[str]] = {}
    for line in lines:
        if not line.startswith("mlcjit: ["):
            continue
        m = LINE_RE.match(line)
        assert m, line
        word = m["start"] or m["end"]
        kind = "compile" if word.startswith("compil") else "wait"
        jobs.setdefault((m["label"], kind), []).append("start" if m["start"] else "end")
    return jobs


@pytest.mark.parametrize("mode", [
    pytest.param(["-n", "2"], id="n2"),
    pytest.param(["-p", "no:xdist"], id="no-xdist", marks=pytest.mark.reliability),
])
def test_a_log_gets_plain_start_and_end_lines(project: Project, mode: list[str],
                                              monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """Output on a pipe: the compile holds until its start line is printed, then ends and
    gets its end line; no control sequence anywhere; every start line has its end line
    (a job that was long but ended between two looks gets its end line only). A warm run
    shows nothing."""
    hold = held_project(project, monkeypatch, tmp_path, tests=2)
    if "-n" not in mode:
        mode = [*mode, "--mlc-jit-prefetch=on"]  # the prefetch compiles, the tests wait
    worker = r"gw\d( prefetch)?" if "-n" in mode else "(main|prefetch)"
    start_re = re.compile(rf"^mlcjit: \[{worker}\] compiling heldmodel-hidden=4 \(llvm\): "
                          r"running for \d+s$")
    ret, lines = run_releasing(pytest_argv(project, *mode), project.pytester.path, hold,
                               lambda line: start_re.match(line) is not None)
    out = "\n".join(lines)
    assert ret == 0, out
    assert "\x1b" not in out
    assert "\r" not in out
    pytest.LineMatcher(lines).re_match_lines([
        start_re.pattern,
        rf"^mlcjit: \[{worker}\] compiled heldmodel-hidden=4 \(llvm\) in \d+\.\ds$"])
    jobs = start_end_pairs(lines)
    assert [seq for (_, kind), seq in jobs.items() if kind == "compile"] == [["start", "end"]]
    for seq in jobs.values():
        assert seq in (["start", "end"], ["end"]), jobs
    assert len(project.compiles()) == 1

    warm = project.run("--mlc-device=cpu", *FAST)
    warm.assert_outcomes(passed=2)
    assert not [line for line in warm.outlines if line.startswith("mlcjit: [")], \
        "nothing takes long: nothing is shown"
    assert len(project.compiles()) == 1


def test_a_second_process_waits_for_the_first_and_says_whose_compile_it_is(
        project: Project, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two independent pytest runs on one cold key: this process's (in-process) compiles
    it, holding; a second process, started once the compile runs, waits for it and says
    whose compile it waits for; the compile is let go once it has said so. One compile
    (the factory's counter), one library; one run compiled, the other waited."""
    hold = held_project(project, monkeypatch, tmp_path)
    outcome: dict[str, Any] = {}

    def second() -> None:
        try:
            wait_until(lambda: project.compiles() != [], "the first run's compile")
            outcome["ret"], outcome["lines"] = run_releasing(
                pytest_argv(project, "-p", "no:xdist"), project.pytester.path, hold,
                lambda line: ": running for" in line and "waiting for" in line)
        finally:
            hold.touch()

    thread = threading.Thread(target=second)
    thread.start()
    try:
        first = project.run("-p", "no:xdist", "--mlc-device=cpu", *FAST)
    finally:
        hold.touch()
        thread.join(timeout=SAFETY_S)
    first.assert_outcomes(passed=1)
    assert accounting(first) == {"requests": 1, "compiled": 1}
    out = "\n".join(outcome["lines"])
    assert outcome["ret"] == 0, out
    pytest.LineMatcher(outcome["lines"]).re_match_lines([
        rf"^mlcjit: \[main\] waiting for heldmodel-hidden=4 \(llvm\), compiled by another "
        rf"pytest run \(pid {os.getpid()} on {re.escape(HOST)}\): running for \d+s$",
        r"^mlcjit: \[main\] waited \d+\.\ds for heldmodel-hidden=4 \(llvm\)$",
        r"^1 request: 1 waited(;.*)?$"])
    assert len(project.compiles()) == 1, "one compile for the two processes"
    assert len(project.libraries()) == len(project.manifests()) == 1
