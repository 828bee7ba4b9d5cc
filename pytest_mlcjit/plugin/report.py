"""What the plugin prints at the end of a run that used it (the header line is
:meth:`..session.RunState.header_line`, printed by every run): a summary section
(each request's outcome, the slowest compiles, what the size cap pruned); the JSON report
(``--mlc-jit-report``); and the messages of a test whose compile failed or was
interrupted."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_mlcjit._util.fs import write_json_atomic
from pytest_mlcjit.cache.store.remote import redact_url
from pytest_mlcjit.engine.activity import describe_target, read_board
from pytest_mlcjit.engine.failures import read_end
from pytest_mlcjit.engine.stats import OUTCOMES, Stats
from pytest_mlcjit.errors import REMEMBERED_NOTE, CompileError
from pytest_mlcjit.plugin.progress import holder
from pytest_mlcjit.plugin.session import RunState
from pytest_mlcjit.units import format_size, plural

if TYPE_CHECKING:
    from pytest_mlcjit.cache.store.remote_stats import RemoteStats
    from pytest_mlcjit.engine.activity import Board

#: Lines of the compile log a failed test's report section shows.
LOG_SECTION_LINES = 50
#: ... read from at most its last this many bytes (a log may be many megabytes).
LOG_SECTION_BYTES = 1 << 16
#: With no --mlc-jit-durations, the slowest compiles are listed when one took this long.
SLOW_COMPILE_S = 10.0
DEFAULT_DURATIONS = 5
#: The format of the JSON report.
REPORT_VERSION = 1


# -- the summary ------------------------------------------------------------------------------
def accounting_line(s: Stats) -> str:
    """The summary's line of counts (:meth:`.Stats.accounting_line`)."""
    return s.accounting_line()


def durations_lines(s: Stats, wanted: int | None) -> list[str]:
    """The slowest compiles, like ``--durations``: ``wanted`` of them (0: all); by
    default five, when one took over :data:`SLOW_COMPILE_S`."""
    compiled = [r for r in s.library_records() if r.compiles or r.compile_failed]
    if not compiled:
        return []
    if wanted is None:
        if compiled[0].compile_seconds <= SLOW_COMPILE_S:
            return []
        wanted = DEFAULT_DURATIONS
    shown = compiled if wanted == 0 else compiled[:wanted]
    head = ("slowest compiles" if len(shown) < len(compiled) else "compiles") + \
        f" ({len(shown)} of {len(compiled)}):"
    lines = [head]
    for r in shown:
        what = r.spec or r.digest[:12]
        note = ", failed" if r.outcome == "failed" else (
            ", ahead of time" if r.prefetched else "")
        lines.append(f"  {r.compile_seconds:8.2f}s  {what} ({describe_target(r.target)}) on "
                     f"{r.worker}{note}  {r.digest[:12]}")
    return lines


def saved_lines(s: Stats) -> list[str]:
    """``hits saved 12.30s of compiling (2 libraries found in the cache, by their recorded
    compile times)``: what the libraries found in the cache took to compile when they were
    (:attr:`.Stats.saved_seconds`; the run history keeps it, ``pytest-mlcjit stats``
    shows it)."""
    saved = [r for r in s.libraries.values()
             if r.saved_seconds and not r.compiles and not r.compile_failed]
    if s.saved_seconds < 0.005:
        return []
    return [f"hits saved {s.saved_seconds:.2f}s of compiling "
            f"({plural(len(saved), 'library', 'libraries')} found in the cache, by their "
            "recorded compile times)"]


def gpu_lines(s: Stats) -> list[str]:
    """``GPU lock: 3.20s waiting for it, 5.10s holding it`` (``--mlc-jit-gpu-lock``)."""
    if not (s.gpu_wait_seconds or s.gpu_hold_seconds):
        return []
    return [f"GPU lock: {s.gpu_wait_seconds:.2f}s waiting for it, "
            f"{s.gpu_hold_seconds:.2f}s holding it"]


def remote_lines(remote: RemoteStats, url: str | None, *, required: bool = False
                 ) -> list[str]:
    """The remote tier's line and each of its warnings. It counts libraries (each
    transferred once), never requests: the accounting line's ``remote hits`` are the
    requests those libraries served. Then the writes not made, and, with
    ``--mlc-jit-remote-required``, that they fail the run (:func:`remote_failure`)."""
    if not url:
        return []

    def libraries(n: int) -> str:
        return plural(n, "library", "libraries")

    parts = []
    if remote.downloads:
        parts.append(f"{libraries(remote.downloads)} downloaded "
                     f"({format_size(remote.download_bytes)}, "
                     f"{remote.download_seconds:.2f}s)")
    if remote.downloads_refused:
        parts.append(f"{libraries(remote.downloads_refused)} refused after download")
    if remote.uploads:
        parts.append(f"{libraries(remote.uploads)} uploaded "
                     f"({format_size(remote.upload_bytes)})")
    if remote.uploads_failed:
        parts.append(f"{plural(remote.uploads_failed, 'write')} not made")
    if remote.quarantined:
        parts.append(f"{plural(remote.quarantined, 'refused entry', 'refused entries')} "
                     "set aside (quarantine/)")
    if remote.load_checks:
        parts.append(f"{plural(remote.load_checks, 'load check')} "
                     f"({remote.load_check_seconds:.2f}s)")
    if remote.errors:
        parts.append(plural(remote.errors, "error"))
    lines = [f"remote {redact_url(url)}: {', '.join(parts) or 'nothing transferred'}"]
    lines += [f"warning: {w}" for w in remote.warnings]
    lines += [f"warning: write not made: {why}" for why in remote.upload_failures]
    if required and (failure := remote_failure(remote)) is not None:
        lines.append(f"error: {failure}")
    return lines


def remote_failure(remote: RemoteStats) -> str | None:
    """Why a run with ``--mlc-jit-remote-required`` fails although its tests may have
    passed: writes it could not make (an upload that failed in a background prefetch, or
    whose test passed all the same); None if there were none."""
    if not remote.uploads_failed:
        return None
    return (f"{plural(remote.uploads_failed, 'write')} to the remote not made, and "
            "--mlc-jit-remote-required is set: the run fails")


def fail_if_remote_required(session: Any, state: RunState) -> None:
    """With ``--mlc-jit-remote-required``, a write not made fails the run (exit status
    1, unless it already failed otherwise); the summary says why. Called by the
    controller once the workers' statistics are in, before the JSON report is written."""
    stats = state.stats()
    if (state.options.remote_required and state.options.remote and stats is not None
            and remote_failure(stats.remote) is not None
            and session.exitstatus in (0, 5)):  # OK, NO_TESTS_COLLECTED
        session.exitstatus = 1  # TESTS_FAILED: what the run was for did not happen


def summary_lines(state: RunState) -> list[str]:
    s = state.stats()
    lines = []
    if s is not None and s.requests:
        lines.append(accounting_line(s))
        lines += saved_lines(s)
    if s is not None:
        lines += gpu_lines(s)
        lines += durations_lines(s, state.options.durations)
        lines += remote_lines(s.remote, state.options.remote,
                              required=state.options.remote_required)
    if state.report_written:
        lines.append(state.report_written)
    return lines + _prune_lines(state)


def _prune_lines(state: RunState) -> list[str]:
    cap = state.options.max_size
    lines = []
    for result in state.pruned:
        if isinstance(result, str):
            lines.append(result)
            continue
        line = (f"--mlc-jit-max-size={format_size(cap or 0)}: {result.root} is "
                f"{format_size(result.total_after)}")
        if result.evicted or result.quarantine_removed:
            evicted = plural(len(result.evicted), "least recently used entry",
                             "least recently used entries")
            line += f" after evicting {evicted} ({format_size(result.freed)})"
        if result.over_cap:
            line += (f"; still over the cap: kept {len(result.kept_in_use)} used by this run "
                     f"and {len(result.kept_locked)} being compiled")
        lines.append(line)
    return lines


def write_summary(terminalreporter: Any, state: RunState) -> None:
    lines = summary_lines(state)
    if not lines:
        return
    terminalreporter.write_sep("-", "pytest-mlcjit")
    for line in lines:
        terminalreporter.write_line(line)


# -- the JSON report ------------------------------------------------------------------------
def report_data(state: RunState, *, exitstatus: int) -> dict[str, Any]:
    """The run's accounting as plain data: ``requests``, ``outcomes`` (every kind, summing
    to ``requests``) and ``libraries`` (one record per library), merged across workers;
    with a remote tier, ``remote``: its URL and :class:`.RemoteStats` (libraries
    ``downloads`` and ``uploads``, writes not made ``uploads_failed`` with their first
    reasons ``upload_failures``, ``downloads_refused``, ``quarantined``, ``load_checks``,
    ``errors``, ``warnings``...), else null."""
    s = state.stats() or Stats()
    libraries = [{
        "spec": r.spec, "digest": r.digest, "target": r.target,
        "outcome": r.outcome, "requests": r.requests,
        "outcomes": {k: r.outcomes.get(k, 0) for k in OUTCOMES},
        "compile_seconds": round(r.compile_seconds, 3),
        "wait_seconds": round(r.wait_seconds, 3),
        "saved_seconds": round(r.saved_seconds, 3),
        "size": r.size, "worker": r.worker, "prefetched": r.prefetched,
    } for r in s.library_records()]
    return {
        "version": REPORT_VERSION, "run_id": state.options.run_id,
        "policy": state.options.policy.value, "prepare": state.options.prepare,
        "exitstatus": exitstatus,
        "requests": s.requests, "outcomes": {k: s.outcomes.get(k, 0) for k in OUTCOMES},
        "compiles": s.compiles, "prefetched": s.prefetched,
        "compile_seconds": round(s.compile_seconds, 3),
        "wait_seconds": round(s.wait_seconds, 3), "corrupt": s.corrupt,
        # the recorded compile time of the libraries found in the cache, once each
        "saved_seconds": round(s.saved_seconds, 3),
        # microseconds: a short test's hold is still counted
        "gpu_wait_seconds": round(s.gpu_wait_seconds, 6),
        "gpu_hold_seconds": round(s.gpu_hold_seconds, 6),
        "libraries": libraries,
        "remote": None if not state.options.remote else {
            "url": redact_url(state.options.remote), **s.remote.to_json(),
            "download_seconds": round(s.remote.download_seconds, 3),
            "load_check_seconds": round(s.remote.load_check_seconds, 3)},
    }


def write_report(state: RunState, path: Path, *, exitstatus: int) -> tuple[str, bool]:
    """Write the JSON report; the summary's line about it (where, or why not) and whether
    it was written.

    A new path or a regular file is written all at once (a temp file renamed over it); a
    symlink, a FIFO, a device (``/dev/stdout``) is opened and written as it is, as
    ``--junitxml`` does, so that it stays what it is (a FIFO's writer waits for a reader).
    """
    data = report_data(state, exitstatus=exitstatus)
    try:
        if path.is_symlink() or (path.exists() and not path.is_file()):
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        else:
            with contextlib.suppress(FileExistsError):  # a file, not a directory: the
                path.parent.mkdir(parents=True, exist_ok=True)  # write says so
            write_json_atomic(path, data)
    except OSError as exc:
        return f"--mlc-jit-report: could not write {path}: {exc.strerror or exc}", False
    return f"JSON report: {path}", True


# -- a test's failure ---------------------------------------------------------------------
#: The last line of a traceback, or a tool's error line.
_CAUSE_RE = re.compile(
    r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Fault|Failure|Timeout)\b.*"
    r"|(?:error|fatal error|ERROR|FATAL):.*)$")


def _log_tail(path: str | None, lines: int = LOG_SECTION_LINES) -> list[str] | None:
    if not path:
        return None
    text = read_end(path, LOG_SECTION_BYTES)
    return None if text is None else text.rstrip().splitlines()[-lines:]


def cause(log_lines: list[str], fallback: str) -> str:
    """Why a compile failed in one line: the last exception line of its log (the last line
    of a traceback), else ``fallback``."""
    for line in reversed(log_lines):
        if _CAUSE_RE.match(line.strip()):
            return line.strip()
    return fallback


def compile_failure(exc: CompileError, model: str, target: str
                    ) -> tuple[str, tuple[str, str] | None]:
    """A failed compile's message, first line first for ``-rE``: the cause, then the model;
    and the report section (title, the log's last lines), when the log is there. Made from
    the error's fields (its log, its cause, whether it was remembered)."""
    head = exc.head()
    why = exc.cause or (head.splitlines()[0] if head else type(exc).__name__)
    tail = _log_tail(exc.log_path)
    lines = [f"{cause(tail or [], why)} (compiling {model} for {target})", head]
    if exc.remembered:
        lines.append(REMEMBERED_NOTE)
    section = None
    if tail is not None:
        lines.append(f'(the last {len(tail)} lines of its log are in the section '
                     f'"mlcjit compile log" below)')
        section = (f"mlcjit compile log: {exc.log_path} (last {len(tail)} lines)",
                   "\n".join(tail))
    return "\n".join(lines), section


def interruption(exc: BaseException, info: Mapping[str, Any], board: Board) -> str:
    """What a compile (or a wait for one) that pytest-timeout or Ctrl-C interrupted
    tells the reader: the model, how long it had run, what became of it, and the fix."""
    seconds = float(info.get("seconds") or 0)
    what = f"{info.get('model')} ({info.get('target')})"
    reason = str(exc).strip().rstrip(".")
    reason = f"{reason}: " if reason else ""  # a KeyboardInterrupt says its own name
    fix = ("To keep slow compiles out of test timeouts, compile first with "
           "`pytest --mlc-jit-prepare` (same arguments), or have pytest-timeout time only "
           "the test function: `timeout_func_only = true` in the ini file, or "
           "@pytest.mark.timeout(..., func_only=True).")
    if info.get("kind") == "wait":

        directory = board.path
        records = [board.record(), *(read_board(directory) if directory else [])]
        who = holder(info, records, str(board.run_id))
        return (f"{reason}interrupted after {seconds:.1f}s waiting for the compile of "
                f"{what}, which goes on\nIt is {who}; it is cached when it ends.\n{fix}")
    if info.get("kind") == "download":
        return (f"{reason}interrupted while downloading {what} after {seconds:.1f}s; nothing "
                "was cached\nThe download was stopped: the next run looks for it again.\n"
                f"{fix}")
    return (f"{reason}interrupted while compiling {what} after {seconds:.1f}s; nothing was "
            "cached\nThe compile was killed: the next run compiles it again from the "
            f"start.\n{fix}")
