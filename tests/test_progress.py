"""Live progress: what is compiling, downloading or waiting for another's compile, shown
once it lasts 2 seconds: on a terminal (a real pseudo-terminal here, its screen emulated
with pyte) one status line redrawn in place and gone at the end; elsewhere plain start
and end lines, without control sequences; nothing when nothing takes long."""

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
from pathlib import Path
from typing import Any

import pytest

from conftest import Project, accounting, wait_until
from pytest_mlcjit.engine import activity
from pytest_mlcjit.plugin.progress import Tracker, holder

HOST = socket.gethostname()


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
def test_two_threads_starting_jobs_at_once_leave_both_on_the_board(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's prefetch thread starts a compile while its test thread starts a wait:
    the board must show both. Before, a thread could write its record, read before the
    other's job began, after the other's: the compile vanished from the board until it
    ended, and a log got its end line but never its start line (seen in CI). Here the
    first publisher is held between reading its record and renaming its file while the
    second publishes."""
    board = activity.Board(run_id="r", worker="gw0", directory=tmp_path, publish=True)
    held, second_done, first_done = threading.Event(), threading.Event(), threading.Event()
    real_replace = os.replace

    def slow_first_replace(src: Any, dst: Any) -> None:
        if threading.current_thread().name == "first" and not held.is_set():
            held.set()
            second_done.wait(timeout=1.0)  # the second publisher waits for this one now
            real_replace(src, dst)
            first_done.set()
            return
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", slow_first_replace)  # activity renames with it
    stop = threading.Event()

    def first() -> None:
        with board.doing("wait", model="m", target="llvm", digest="d", root="r"):
            stop.wait(timeout=30)

    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert held.wait(timeout=30)
        with board.doing("compile", model="m", target="llvm", digest="d", root="r",
                            background=True):
            second_done.set()
            thread_alive = thread.is_alive()
            assert first_done.wait(timeout=30)
            (record,) = activity.read_board(tmp_path)
            kinds = sorted(job["kind"] for job in record["jobs"])
    finally:
        stop.set()
        thread.join(timeout=30)
    assert thread_alive
    assert kinds == ["compile", "wait"]


# -- a real pseudo-terminal -----------------------------------------------------------------
COLS, ROWS = 160, 60
STATUS_RE = re.compile(r"mlcjit: \[(gw\d|main)( prefetch)?\] compiling tinymodel-hidden=4 "
                       r"\(llvm\) (\d+)s")


def run_in_pty(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
               ) -> tuple[list[list[str]], list[str], bytes]:
    """Run ``argv`` on a pseudo-terminal; the screens seen every 0.25s (pyte emulates the
    terminal), the final screen, and every byte written."""
    pyte = pytest.importorskip("pyte")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    screen = pyte.Screen(COLS, ROWS)
    stream = pyte.ByteStream(screen)
    screens, raw = [], b""
    deadline = time.monotonic() + timeout
    next_look = time.monotonic()
    try:
        while True:
            assert time.monotonic() < deadline, raw.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    data = b""
                if not data:
                    break
                raw += data
                stream.feed(data)
            if time.monotonic() >= next_look:
                screens.append([line.rstrip() for line in screen.display])
                next_look += 0.25
    finally:
        os.close(master)
        proc.kill()
        proc.wait()
    return screens, [line.rstrip() for line in screen.display], raw


@pytest.mark.parametrize("mode", [["-n", "2", "-v"], ["-p", "no:xdist", "-q"]],
                         ids=["n2-verbose", "no-xdist-quiet"])
def test_a_terminal_shows_the_compile_live_and_ends_clean(project: Project,
                                                          mode: list[str]) -> None:
    project.write_tests([{"hidden": 4}], per_config=1)
    env = {**os.environ, "MLCJIT_TEST_SLEEP": "10", "TERM": "xterm"}
    for name in ("COLUMNS", "LINES", "CI", "BUILD_NUMBER"):  # pytest reads these
        env.pop(name, None)
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--mlc-device=cpu",
            f"--mlc-jit-cache-dir={project.cache}", *mode]
    screens, final, raw = run_in_pty(argv, project.pytester.path, env)
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
    assert len(set(seconds)) >= 4, seconds  # it is redrawn as the compile goes on
    assert min(seconds) >= 2
    # At the end: no status left, pytest's own lines intact.
    text = "\n".join(final)
    assert "mlcjit: [" not in text
    if "-v" in mode:
        assert re.search(r"^\[gw\d\] \[100%\] PASSED test_tiny.py::test_forward"
                         r"\[cpu-tinymodel-hidden=4-0\]$", text, re.MULTILINE), text
    else:
        assert re.search(r"^\. +\[100%\]$", text, re.MULTILINE), text
    assert re.search(r"^1 request: 1 (compiled|waited|hit)(;.*)?$", text, re.MULTILINE), text
    assert re.search(r"^=+ 1 passed in [\d.]+s =+$|^1 passed in [\d.]+s$", text,
                     re.MULTILINE), text
    assert len(project.compiles()) == 1


# -- not a terminal ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [["-p", "no:xdist"], ["-n", "2"]], ids=["no-xdist", "n2"])
def test_a_log_gets_plain_start_and_end_lines(project: Project, mode: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    project.write_tests([{"hidden": 4}], per_config=2)
    monkeypatch.setenv("MLCJIT_TEST_SLEEP", "4")
    result = project.run("--mlc-device=cpu", *mode)
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    assert "\x1b" not in out
    assert "\r" not in out
    worker = r"gw\d( prefetch)?" if "-n" in mode else "main"
    result.stdout.re_match_lines([
        rf"^mlcjit: \[{worker}\] compiling tinymodel-hidden=4 \(llvm\): running for \d+s$",
        rf"^mlcjit: \[{worker}\] compiled tinymodel-hidden=4 \(llvm\) in \d+\.\ds$"])
    ours = [line for line in result.outlines if line.startswith("mlcjit: [")]
    starts = [line for line in ours if re.search(r": running for \d+s$", line)]
    assert len(starts) * 2 == len(ours), "one start and one end line per long job"

    monkeypatch.delenv("MLCJIT_TEST_SLEEP")
    warm = project.run("--mlc-device=cpu", *mode)
    warm.assert_outcomes(passed=2)
    assert not [line for line in warm.outlines if line.startswith("mlcjit: [")], \
        "nothing takes long: nothing is shown"


def test_a_second_process_says_whose_compile_it_waits_for(project: Project) -> None:
    project.write_tests([{"hidden": 4}], per_config=1)
    staging = project.cache / ".mlcjit" / "staging"
    first = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
         "--mlc-device=cpu", f"--mlc-jit-cache-dir={project.cache}"],
        cwd=project.pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "MLCJIT_TEST_SLEEP": "8"})
    try:
        wait_until(lambda: staging.is_dir() and any(staging.iterdir()), "the first compile")
        second = project.run("-p", "no:xdist", "--mlc-device=cpu")
        out = first.communicate(timeout=300)[0]
    finally:
        first.kill()
    assert first.returncode == 0, out
    second.assert_outcomes(passed=1)
    second.stdout.re_match_lines([
        rf"^mlcjit: \[main\] waiting for tinymodel-hidden=4 \(llvm\), compiled by another "
        rf"pytest run \(pid {first.pid} on {re.escape(HOST)}\): running for \d+s$",
        r"^mlcjit: \[main\] waited \d+\.\ds for tinymodel-hidden=4 \(llvm\)$"])
    assert accounting(second) == {"requests": 1, "waited": 1}
    assert "1 request: 1 compiled" in out
