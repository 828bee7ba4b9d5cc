"""Subprocess launcher: ``python -m pytest_mlcjit.compiler._launcher [opts] PARENT -- argv...``.

It stays the parent of the command it runs, so that the command's whole process tree
dies with it, whatever the tree does:

* it is a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``): a descendant whose parent
  dies is re-parented to it, not to init, so nothing the compile starts escapes it, not
  even a daemon that double-forks or calls ``setsid``;
* it asks for SIGTERM when its parent, the test process, dies (``PR_SET_PDEATHSIG``; a
  SIGKILL of the test process included), and on SIGTERM, SIGINT or SIGHUP it SIGKILLs
  every descendant (found by walking ``/proc``), reaps them all, and exits;
* when the command exits, it kills what the command left running, and exits as the
  command did (the same code, or the same signal);
* the command's output (stdout and stderr) goes through it into the log (``--log``),
  bounded: the first ``--head`` bytes and the last ``--tail`` bytes are kept, with a line
  in between saying how much was cut.

Elsewhere than Linux it runs the command in its own process group and kills that group.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from types import FrameType

from pytest_mlcjit.compiler.proctree import (
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    BoundedLog,
    drain,
    kill_tree,
    prctl,
)
from pytest_mlcjit.errors import LauncherStop

USAGE = ("usage: python -m pytest_mlcjit.compiler._launcher [--log PATH --head BYTES --tail BYTES] "
         "PARENT_PID -- argv...")


def _parse(argv: list[str]) -> tuple[int, str | None, int, int, list[str]] | None:
    log, head, tail = None, 256 * 1024, 1024 * 1024
    args = list(argv)
    try:
        while args and args[0].startswith("--") and args[0] != "--":
            option, value = args.pop(0), args.pop(0)
            if option == "--log":
                log = value
            elif option == "--head":
                head = int(value)
            elif option == "--tail":
                tail = int(value)
            else:
                return None
        parent, sep, *command = args
        if sep != "--" or not command:
            return None
        return int(parent), log, head, tail, command
    except (IndexError, ValueError):
        return None


def main(argv: list[str]) -> int:
    parsed = _parse(argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    parent, log_path, head, tail, command = parsed
    prctl(PR_SET_CHILD_SUBREAPER, 1)

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise LauncherStop(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 128 + signal.SIGTERM
    out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log_path else 1
    sink = BoundedLog(out, head, tail)
    read_end, write_end = os.pipe()
    me = os.getpid()
    pid = 0
    stopped: LauncherStop | None = None
    status = 0
    try:
        pid = os.fork()
        if pid == 0:  # the command: its own process group, dying with the launcher
            _exec(command, me, read_end, write_end)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also here: no window in which a kill of the group misses
        os.close(write_end)
        status = _pump(read_end, sink, pid)
    except LauncherStop as exc:
        stopped = exc
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the clean-up below is bounded: let it end
    # On a stop: everything. Else whatever the command left running (its group only where
    # /proc cannot show descendants: once the command is reaped, its id may be reused).
    reaped = stopped is None and os.path.isdir("/proc/self")
    kill_tree(None if reaped or not pid else pid)
    drain(read_end, sink)
    sink.close()
    if stopped is not None:
        return 128 + stopped.signum
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)  # exit as the command did
        return 128 + sig
    return os.waitstatus_to_exitcode(status)


def _exec(command: list[str], launcher: int, read_end: int, write_end: int) -> None:
    """In the forked child: become the command (never returns)."""
    try:
        os.setpgid(0, 0)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        os.close(read_end)
        os.close(write_end)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher:
            os._exit(137)
        os.execv(command[0], command)  # noqa: S606 - exec of an argument list, no shell
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(2, f"pytest-mlcjit: cannot run {command[0]}: {exc}\n".encode())
    os._exit(127)


def _pump(fd: int, sink: BoundedLog, pid: int) -> int:
    """Copy the command's output to the log until it exits; its wait status."""
    open_ = True
    while True:
        if open_:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                data = os.read(fd, 1 << 16)
                if data:
                    sink.write(data)
                else:
                    open_ = False  # every writer closed it; the command may still run
        else:
            time.sleep(0.05)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
