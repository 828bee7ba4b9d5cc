"""Live progress: what is compiling, downloading or waiting for another's compile, once it
has lasted :data:`LONG_S` seconds.

Only the controller draws (or the one process, without xdist). Workers publish their jobs
on the board (:mod:`.activity`); a background thread here reads them every
:data:`POLL_S` seconds, with this process's own, and shows the long ones:

* on a terminal, one status line redrawn in place (``\\r``, clear-line), erased before
  pytest writes anything: pytest's terminal writer is wrapped, so every write of its own
  erases the line first. When pytest's cursor is in the middle of a line (the dots of
  ``-q``, a ``-v`` test id), the status goes on the line below and the cursor comes back.
  It writes to its own copy of the terminal's descriptor, so pytest's output capture
  (which redirects descriptor 1 while a test runs) does not swallow it.
* elsewhere (CI logs), plain lines: one when a job has lasted 2s, one when it ends (with
  its duration), and a heartbeat at most every :data:`HEARTBEAT_S` seconds while one runs.
  A plain line never goes inside pytest's line (a ``-v`` test id waiting for its
  ``PASSED``, the dots of a test file): it waits until pytest ends that line, at most
  :data:`LINE_WAIT_S` seconds (5 times the delay when that is less); a line that waited
  so long goes on a line of its own, and pytest's unfinished ``-v`` test id is written
  again under it, so that the id and its ``PASSED`` stay on one line. When pytest ends a
  line while a long job is shown, the jobs are looked at once more, so that a compile
  that ended during a test is said right under that test's line.

Nothing is shown while nothing takes long.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache.layout import owner_file
from pytest_mlcjit.cache.locks import owner_record
from pytest_mlcjit.device.gpu_lock import describe_holder
from pytest_mlcjit.device.gpu_lock import holder as lock_holder
from pytest_mlcjit.engine import activity
from pytest_mlcjit.engine.activity import Board
from pytest_mlcjit.engine.settings import Settings

#: A job is shown once it has lasted this long, in seconds (by default; settable:
#: ``mlc_jit_progress_delay``).
LONG_S = 2.0
#: How often the board is read (``mlc_jit_progress_interval``).
POLL_S = 0.5
#: At most one "still running" line this often, on a non-terminal.
HEARTBEAT_S = 30.0
#: How long a plain line waits for pytest to end its line before it interrupts it.
LINE_WAIT_S = 10.0

CLEAR_LINE = "\x1b[K"


# -- what is going on ---------------------------------------------------------------------
def _label(record: Mapping[str, Any], job: Mapping[str, Any]) -> str:
    worker = str(record.get("worker") or "main")
    if job.get("background"):
        return "prefetch" if worker == "main" else f"{worker} prefetch"
    return worker


def _owner(root: str, digest: str) -> Mapping[str, Any] | None:
    return owner_record(owner_file(root, digest))


def holder(job: Mapping[str, Any], records: Iterable[Mapping[str, Any]], run_id: str) -> str:
    """Whose compile a ``wait`` job waits for: a compile of the same key on the board
    (worker, pid, host), else the lock's owner record (pid, host)."""
    records = list(records)

    def who(record: Mapping[str, Any], background: bool = False) -> str:
        name = _label(record, {"background": background})
        if record.get("run_id") != run_id:
            name = ("another pytest run" if name == "main"
                    else f"{name} of another pytest run")
        return f"{name} (pid {record.get('pid')} on {record.get('host')})"

    for record in records:
        for other in record.get("jobs", ()):
            if (other.get("kind") in ("compile", "download") and "ended" not in other
                    and other.get("digest") == job.get("digest")
                    and other.get("root") == job.get("root")):
                verb = "compiled" if other["kind"] == "compile" else "downloaded"
                return f"{verb} by {who(record, bool(other.get('background')))}"
    owner = _owner(str(job.get("root")), str(job.get("digest")))
    if owner is None:
        return "holder unknown"
    for record in records:
        if record.get("pid") == owner.get("pid") and record.get("host") == owner.get("host"):
            return f"locked by {who(record)}"
    return f"locked by pid {owner.get('pid')} on {owner.get('host')}"


def _no_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "worker": "main", "jobs": []}


def gather(run_id: str, board: Path | None, now: float, local: Board | None = None,
           long_s: float = LONG_S) -> list[dict[str, Any]]:
    """This run's jobs (this process's, from ``local``, and, from the board, its
    workers'), each with a ``key``, a ``label`` and, for a wait that is long, its
    ``holder``."""
    own = local.record() if local is not None else _no_record()
    records = activity.read_board(board) if board is not None else []
    others = [r for r in records
              if (r.get("pid"), r.get("host")) != (own["pid"], own["host"])]
    views = []
    for record in [own, *(r for r in others if r.get("run_id") == run_id)]:
        for job in record["jobs"]:
            if not isinstance(job, dict) or not isinstance(job.get("started"), int | float):
                continue
            view = {**job, "key": (record.get("host"), record.get("pid"), job.get("id")),
                    "label": _label(record, job)}
            if job.get("kind") == "wait" and "ended" not in job and \
                    now - job["started"] >= long_s:
                view["holder"] = holder(job, [own, *others], run_id)
            elif job.get("kind") == "gpu" and "ended" not in job and \
                    now - job["started"] >= long_s:
                view["holder"] = gpu_holder(job, run_id)
            views.append(view)
    return views


def gpu_holder(job: Mapping[str, Any], run_id: str) -> str:
    """Who holds the GPU lock a ``gpu`` job waits for: ``held by gw3``."""
    return describe_holder(lock_holder(Path(str(job.get("root")))), run_id)


def describe(view: Mapping[str, Any], now: float | None = None) -> str:
    """What a job is doing, in a few words (a ``gpu`` wait with its seconds, at ``now``)."""
    what = f"{view.get('model')} ({view.get('target')})"
    kind = view.get("kind")
    if kind == "gpu":
        device = "" if view.get("model") in (None, "gpu") else f" of {view.get('model')}"
        seconds = "" if now is None else f", {now - view['started']:.0f}s"
        return (f"[{view['label']}] waiting for the GPU lock{device} "
                f"({view.get('holder', 'holder unknown')}{seconds})")
    if kind == "wait":
        return f"[{view['label']}] waiting for {what}, {view.get('holder', 'holder unknown')}"
    verb = "downloading" if kind == "download" else "compiling"
    return f"[{view['label']}] {verb} {what}"


def end_line(view: Mapping[str, Any], now: float) -> str:
    what = f"{view.get('model')} ({view.get('target')})"
    label, kind = view["label"], view.get("kind")
    if "ended" not in view:  # its process is gone, or its record was cut
        return f"mlcjit: {describe(view)}: ended after about {now - view['started']:.0f}s"
    seconds = float(view.get("seconds") or view["ended"] - view["started"])
    outcome = view.get("outcome")
    if kind == "compile" and outcome == "done" and view.get("rc", 0) != 0:
        # The compiler's process ended (the job did) but failed: its exit status says so.
        outcome = "timed out" if view.get("rc") is None else "failed"
    if kind in ("wait", "gpu"):
        tail = "" if outcome == "done" else f" ({outcome})"
        what = "the GPU lock" if kind == "gpu" else what
        return f"mlcjit: [{label}] waited {seconds:.1f}s for {what}{tail}"
    noun = "download" if kind == "download" else "compile"
    if kind == "download" and view.get("found") is False and outcome == "done":
        return f"mlcjit: [{label}] asked the remote for {what}: no entry fits ({seconds:.1f}s)"
    if outcome == "done":
        verb = "downloaded" if kind == "download" else "compiled"
        return f"mlcjit: [{label}] {verb} {what} in {seconds:.1f}s"
    return f"mlcjit: [{label}] {noun} of {what} {outcome} after {seconds:.1f}s"


class Tracker:
    """Decides what to show, from successive views of the jobs (a pure state machine)."""

    def __init__(self, *, long_s: float = LONG_S, heartbeat_s: float = HEARTBEAT_S,
                 since: float | None = None) -> None:
        self.long_s, self.heartbeat_s = long_s, heartbeat_s
        self.since = time.time() if since is None else since
        self.announced: dict[Any, Mapping[str, Any]] = {}
        self.finished: set[Any] = set()
        self.last_line: float = 0.0

    def long(self, views: Iterable[Mapping[str, Any]], now: float) -> list[Mapping[str, Any]]:
        return sorted((v for v in views
                       if "ended" not in v and now - v["started"] >= self.long_s),
                      key=lambda v: v["started"])

    def status(self, views: Iterable[Mapping[str, Any]], now: float) -> str:
        """The one status line of a terminal ("" when nothing is long)."""
        long = self.long(views, now)
        compiles = {(v.get("digest"), v.get("root")) for v in long
                    if v.get("kind") not in ("wait", "gpu")}
        waiters: dict[Any, list[str]] = {}
        for v in long:  # a wait for a compile shown anyway: folded into it
            if v.get("kind") == "wait" and (v.get("digest"), v.get("root")) in compiles:
                waiters.setdefault((v.get("digest"), v.get("root")), []).append(v["label"])
        parts = []
        for v in long:
            key = (v.get("digest"), v.get("root"))
            if v.get("kind") == "wait" and key in compiles:
                continue
            text = (describe(v, now) if v.get("kind") == "gpu"
                    else f"{describe(v)} {now - v['started']:.0f}s")
            if key in waiters and v.get("kind") != "wait":
                text += f" ({', '.join(waiters.pop(key))} waiting)"
            parts.append(text)
        return "mlcjit: " + " | ".join(parts) if parts else ""

    def lines(self, views: list[dict[str, Any]], now: float) -> list[str]:
        """The plain lines for a non-terminal: long jobs' starts and ends, heartbeats."""
        out: list[str] = []
        current = {v["key"]: v for v in views}
        for key, seen in list(self.announced.items()):
            view = current.get(key)
            if view is None or "ended" in view:
                out.append(end_line(view or seen, now))
                del self.announced[key]
                self.finished.add(key)
        for view in views:
            key = view["key"]
            if key in self.announced or key in self.finished:
                continue
            if "ended" in view:  # long, but it ended between two looks
                if view["ended"] >= self.since and \
                        float(view.get("seconds") or 0) >= self.long_s:
                    out.append(end_line(view, now))
                self.finished.add(key)
            elif now - view["started"] >= self.long_s:
                out.append(f"mlcjit: {describe(view, now)}" if view.get("kind") == "gpu" else
                           f"mlcjit: {describe(view)}: running for "
                           f"{now - view['started']:.0f}s")
                self.announced[key] = view
        running = self.long(views, now)
        if out:
            self.last_line = now
        elif running and now - self.last_line >= self.heartbeat_s:
            out.append("mlcjit: still running: " + "; ".join(
                describe(v, now) if v.get("kind") == "gpu" else
                f"{describe(v)} {now - v['started']:.0f}s" for v in running))
            self.last_line = now
        for job in running:  # keep the newest view (a holder found later)
            self.announced[job["key"]] = job
        return out


# -- the terminal -----------------------------------------------------------------------------
def fallback_width() -> int:
    """The width of a terminal that reports none (a pty made without a size, as ``script``
    and some CI systems make): ``COLUMNS``, else 80, as :func:`shutil.get_terminal_size`."""
    with contextlib.suppress(ValueError):
        if (columns := int(os.environ.get("COLUMNS", ""))) > 0:
            return columns
    return 80


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


class Screen:
    """Writes beside pytest's own output without garbling it (see the module's doc)."""

    def __init__(self, tw: Any, *, live: bool,
                 line_ended: Callable[[], None] | None = None,
                 keep_line: Callable[[], bool] = lambda: False) -> None:
        self.tw, self.live = tw, live
        #: Called (in pytest's thread) when pytest has ended a line.
        self.line_ended = line_ended
        #: Whether pytest's unfinished line is to be written again after a plain line
        #: that interrupts it (a ``-v`` test id, waiting for its outcome).
        self.keep_line = keep_line
        self.lock = threading.RLock()
        #: Plain lines waiting for pytest to end its line, and since when.
        self.pending: list[str] = []
        self.pending_since = 0.0
        self.drawn = ""  # "", "here" (at column 0) or "below" (the line under the cursor)
        self.text = ""
        self.col = 0
        try:
            self.fd: int | None = os.dup(tw._file.fileno())
        except (AttributeError, OSError, ValueError):  # not a real file (in-process runs)
            self.fd = None
        self._write, self._write_raw = tw.write, getattr(tw, "write_raw", None)
        tw.write = self._pytest_write
        if self._write_raw is not None:  # what pytest writes unformatted (pytest 8.1+)
            tw.write_raw = self._pytest_write_raw

    def _pytest_write(self, msg: str, **kwargs: Any) -> None:
        with self.lock:
            self._erase()
            self._write(msg, **kwargs)
            if self.fd is not None:  # before a capture can redirect it; see the module doc
                with contextlib.suppress(OSError, ValueError):
                    self.tw.flush()
            ended = "\n" in msg and not self._current()[0]
        if ended:  # outside the lock: the display's thread takes its own lock, then this one
            if self.line_ended is not None:
                self.line_ended()
            with self.lock:
                self._write_pending()

    def _write_pending(self) -> None:
        if self.pending:
            self._raw("".join(f"{text}\n" for text in self.pending))
            self.pending.clear()

    def _pytest_write_raw(self, msg: str, **kwargs: Any) -> None:
        with self.lock:
            self._erase()
            if self._write_raw is not None:
                self._write_raw(msg, **kwargs)

    def _raw(self, text: str) -> None:
        data = text.encode("utf-8", errors="replace")
        if self.fd is None:
            with contextlib.suppress(OSError, ValueError):
                self.tw._file.write(text)
                self.tw._file.flush()
            return
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self.fd, data):]

    def _current(self) -> tuple[str, int]:
        """pytest's unfinished line, and its width."""
        line = str(getattr(self.tw, "_current_line", ""))
        last = line.rsplit("\r", 1)[-1]
        width = int(self.tw.width_of_current_line) if last == line else -1
        return last, width if width >= 0 else len(last)

    def _erase(self) -> None:
        if self.drawn == "here":
            self._raw("\r" + CLEAR_LINE)
        elif self.drawn == "below":
            self._raw(f"\x1b[1B\r{CLEAR_LINE}\x1b[1A\r" + (f"\x1b[{self.col}C" if self.col else ""))
        self.drawn, self.text = "", ""

    def width(self) -> int:
        """The terminal's width (asked of the terminal itself: while a test runs, pytest's
        capture makes descriptor 1 a file, and pytest would assume 80 columns)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                return os.get_terminal_size(self.fd).columns or fallback_width()
        return int(self.tw.fullwidth) or fallback_width()

    def draw(self, text: str) -> None:
        """Show ``text`` as the status line ("" erases it)."""
        with self.lock:
            width = self.width()
            text = _clip(text, width - 1)
            if text == self.text:
                return
            self._erase()
            if not text:
                return
            line, col = self._current()
            if not line:
                self._raw(f"\r{text}{CLEAR_LINE}")
                self.drawn = "here"
            elif col < width - 1:
                self._raw(f"\n{text}{CLEAR_LINE}\x1b[1A\r" + (f"\x1b[{col}C" if col else ""))
                self.drawn, self.col = "below", col
            else:
                return  # pytest's line fills the width: nowhere safe to draw
            self.text = text

    def line(self, text: str) -> None:
        """Print ``text`` as a line of its own: at once when pytest's cursor is at the
        start of a line, else once pytest ends its line (see :meth:`overdue`)."""
        with self.lock:
            self._erase()
            if not self.pending:
                self.pending_since = time.monotonic()
            self.pending.append(text)
            if not self._current()[0]:
                self._write_pending()

    def overdue(self, wait_s: float) -> None:
        """Print the lines that waited ``wait_s`` seconds for pytest to end its line
        anyway, under it; then pytest's unfinished ``-v`` test id again, for its outcome
        to follow (else pytest goes on at the start of the next line)."""
        with self.lock:
            if not self.pending or time.monotonic() - self.pending_since < wait_s:
                return
            line, _ = self._current()
            again = line if line and self.keep_line() else ""
            self._raw("\n" if line else "")
            self._write_pending()
            self._raw(again)
            if line and not again:
                self.tw._current_line = ""

    def close(self) -> None:
        with self.lock:
            self._erase()
            if self.pending and self._current()[0]:  # the run's last line: pytest is done
                self._raw("\n")  # with it, and goes on at the start of the next line
                self.tw._current_line = ""
            self._write_pending()
            for name, ours in (("write", self._pytest_write),
                               ("write_raw", self._pytest_write_raw)):
                if self.tw.__dict__.get(name) == ours:
                    delattr(self.tw, name)
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
                self.fd = None


# -- the display --------------------------------------------------------------------------
def is_live(mode: str, terminalreporter: Any) -> bool:
    """Whether to redraw a status line (a terminal), rather than print plain lines."""
    if mode == "on":
        return True
    return bool(terminalreporter.isatty) and os.environ.get("TERM") != "dumb"


class Progress:
    """The display's thread: reads the jobs every :data:`POLL_S` seconds and shows them."""

    def __init__(self, terminalreporter: Any, settings: Settings, *, board: str | None,
                 local: Callable[[], Board | None] = lambda: None) -> None:
        self.live = is_live(settings.progress, terminalreporter)
        self.run_id = settings.run_id
        self.board = Path(board) if board else None
        #: This process's own jobs (its engine's board, once it has an engine).
        self.local = local
        self.long_s, self.poll_s = settings.progress_delay, settings.progress_interval
        self.tracker = Tracker(long_s=self.long_s)
        self._ticking = threading.Lock()
        #: How long a plain line waits for pytest to end its line (see the module doc).
        self.line_wait_s = min(LINE_WAIT_S, 5 * self.long_s)
        self.screen = Screen(
            terminalreporter._tw, live=self.live,
            line_ended=None if self.live else self._line_ended,
            # a -v test id waits for its outcome (pytest's fspath is then the id's text)
            keep_line=lambda: isinstance(getattr(terminalreporter, "currentfspath", None),
                                         str))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlcjit-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception as exc:  # never break the run over its display
                self.screen.line(f"mlcjit: progress display stopped: {exc!r}")
                return

    def tick(self) -> None:
        with self._ticking:
            now = time.time()
            views = gather(self.run_id, self.board, now, self.local(), self.long_s)
            if self.live:
                self.screen.draw(self.tracker.status(views, now))
            else:
                for text in self.tracker.lines(views, now):
                    self.screen.line(text)
                self.screen.overdue(self.line_wait_s)

    def _line_ended(self) -> None:
        """pytest ended a line: while a long job is shown, look again now, so that its end
        line comes under the test it ended in (not under the next one)."""
        if self.tracker.announced and not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.tick()

    def stop(self) -> None:
        """Stop drawing: erase the status line (or print the last end lines), remove this
        run's records from the board, and give pytest its terminal writer back."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        if not self.live:
            with contextlib.suppress(Exception):
                self.tick()
        self.screen.close()
        if (local := self.local()) is not None:
            local.close()
        if self.board is not None:
            for record in activity.read_board(self.board):
                if record.get("run_id") == self.run_id:
                    with contextlib.suppress(OSError):
                        (self.board / f"{record.get('pid')}.json").unlink()
