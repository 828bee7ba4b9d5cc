"""The zygote: ``python -m pytest_mlcjit.compiler.warm.zygote CONTROL_FD PARENT_PID [ROOM]``.

It imports TVM (:data:`WARM_MODULES`) and nothing else, says hello, then forks a launcher
per compile socket the test process hands it; each launcher forks the compile, which
becomes ``python -m MODULE ARGS`` with the request's environment, ``sys.path``, working
directory and umask. See :mod:`pytest_mlcjit.compiler.warm` for the design. A child-process
entry point: only the standard library, :mod:`..proctree` and :mod:`.protocol`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib
import os
import runpy
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from types import FrameType
from typing import Any

from pytest_mlcjit.compiler.proctree import (
    PR_SET_CHILD_SUBREAPER,
    PR_SET_PDEATHSIG,
    REAP_LIMIT_S,
    BoundedLog,
    drain,
    kill_tree,
    prctl,
)
from pytest_mlcjit.compiler.warm.protocol import frame, recv_frame
from pytest_mlcjit.errors import LauncherStop

#: What a zygote imports before it forks anything: what the TVM compile child imports
#: before it starts recording the factory's inputs (so recorded inputs do not depend on
#: whether a compile ran warm).
WARM_MODULES = ("tvm", "tvm.relax")


#: How often an idle zygote reaps its exited launchers.
REAP_EVERY_S = 1.0


# -- the zygote ----------------------------------------------------------------------------------
_BASE_PATH: list[str] = []


def _set_title(words: list[str]) -> None:
    """Make ``/proc/self/cmdline`` (what ``ps`` shows) read ``words``, within the room of
    the original command line (Linux; best effort)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5))
        room = end - start
        if room <= 1:
            return

        data = b"\0".join(os.fsencode(w) for w in words)[:room - 1]
        ctypes.memmove(start, data + b"\0" * (room - len(data)), room)
    except (OSError, ValueError, IndexError):
        return


def _base_path() -> list[str]:
    """This interpreter's ``sys.path`` without what ``-m`` and ``PYTHONPATH`` added: the
    part every fresh interpreter of this Python gets (stdlib, site-packages, .pth)."""
    added = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    rest = sys.path[0 if os.environ.get("PYTHONSAFEPATH") else 1:]
    return [p for p in rest if os.path.abspath(p) not in added]


def fresh_sys_path(env: Mapping[str, str], cwd: str, base: list[str]) -> list[str]:
    """The ``sys.path`` of a fresh ``python -m`` started in ``cwd`` with ``env``:
    ``PYTHONPATH`` then ``base``, made absolute and without duplicates (as :mod:`site`
    leaves them), after the working directory that ``-m`` puts first (unless
    ``PYTHONSAFEPATH``), which is not deduplicated."""
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    out: dict[str, None] = {}
    for path in (*extra, *base):
        out.setdefault(os.path.normpath(os.path.join(cwd, path)) if path else cwd, None)
    return ([] if env.get("PYTHONSAFEPATH") else [cwd]) + list(out)


def serve(ctrl_fd: int, parent: int) -> int:
    """The zygote: import TVM, say hello, then fork a launcher per compile socket received
    until the control socket closes."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return 1
    _set_title([sys.executable, "-m", "pytest_mlcjit.compiler.warm.zygote",
                f"(compile worker of {parent})"])
    ctrl = socket.socket(fileno=ctrl_fd)
    _BASE_PATH[:] = _base_path()
    error = None

    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # no TVM: compiles import what they need
            error = f"{type(exc).__name__}: {exc}"
            break
    threads = threading.active_count()
    ctrl.sendall(frame({"pid": os.getpid(), "threads": threads, "warm": error is None,
                         "error": error}))
    if threads > 1:
        return 0
    launchers: set[int] = set()
    while True:
        # Launchers are reaped here (not ignored): their CPU time then counts in this
        # process's, and so in the test process's once it reaps this one.
        ready, _, _ = select.select([ctrl], [], [], REAP_EVERY_S)
        _reap_launchers(launchers)
        if not ready:
            continue
        msg, fds, _flags, _addr = socket.recv_fds(ctrl, 16, 4)
        if not msg:  # the test process is done (or gone): its launchers stop on their own
            _reap_launchers(launchers, wait=REAP_LIMIT_S)
            return 0
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            continue
        try:
            pid = os.fork()
        except OSError:
            os.close(fds[0])
            continue
        if pid == 0:
            code = 70
            try:
                ctrl.close()
                code = _launcher(fds[0])
            finally:
                os._exit(code)
        launchers.add(pid)
        os.close(fds[0])


def _reap_launchers(launchers: set[int], wait: float = 0.0) -> None:
    """Reap the launchers that have exited; with ``wait``, wait up to that long for all."""
    deadline = time.monotonic() + wait
    while launchers:
        for pid in list(launchers):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                launchers.discard(pid)
        if not launchers or time.monotonic() >= deadline:
            return
        time.sleep(0.01)


# -- the launcher: one per compile, a fork of the zygote -----------------------------------------
def _launcher(conn_fd: int) -> int:
    os.setsid()  # its own session and process group: killpg(pid) reaches it
    conn = socket.socket(fileno=conn_fd)
    job = recv_frame(conn)
    if job is None:
        return 0
    _set_title(list(job["argv"]))
    prctl(PR_SET_CHILD_SUBREAPER, 1)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise LauncherStop(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    stopped: LauncherStop | None = None
    status = 0
    pid = 0
    sink: BoundedLog | None = None
    read_end = -1
    try:
        conn.sendall(frame({"pid": os.getpid()}))
        out = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        sink = BoundedLog(out, int(job["head"]), int(job["tail"]))
        read_end, write_end = os.pipe()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            _compile(job, me, (read_end, write_end, conn_fd, out))
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        os.close(write_end)
        status = _pump(read_end, conn, sink, pid)
    except LauncherStop as exc:
        stopped = exc
    except OSError as exc:
        with contextlib.suppress(OSError):
            conn.sendall(frame({"error": f"{type(exc).__name__}: {exc}"}))
        return 0
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the clean-up below is bounded: let it end
    reaped = stopped is None
    kill_tree(None if reaped or not pid else pid)
    if sink is not None:
        if read_end >= 0:
            drain(read_end, sink)
        sink.close()
    reply = {"stopped": stopped.signum} if stopped is not None else {"status": status}
    with contextlib.suppress(OSError):
        conn.sendall(frame(reply))
    return 0


def _pump(fd: int, conn: socket.socket, sink: BoundedLog, pid: int) -> int:
    """Copy the compile's output to the log until it exits (its wait status); raise
    ``_Stop`` when our socket closes or speaks: the test process is gone, or wants it
    stopped."""
    try:
        exited: int | None = os.pidfd_open(pid)
    except (AttributeError, OSError):
        exited = None
    watch: list[Any] = [fd, conn] + ([exited] if exited is not None else [])
    try:
        while True:
            ready, _, _ = select.select(watch, [], [], None if exited is not None else 0.05)
            if fd in ready:
                data = os.read(fd, 1 << 16)
                if data:
                    sink.write(data)
                else:
                    watch.remove(fd)  # every writer closed it; the compile may still run
            if conn in ready:
                raise LauncherStop(signal.SIGTERM)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
    finally:
        if exited is not None:
            os.close(exited)


# -- the compile: a fork of the launcher -----------------------------------------------------------
def _compile(job: dict[str, Any], launcher: int, fds: tuple[int, int, int, int]) -> None:
    """Become the compile the job describes, then exit (never returns)."""
    read_end, write_end, conn_fd, log_fd = fds
    try:
        os.setpgid(0, 0)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(write_end, 1)
        os.dup2(write_end, 2)
        for fd in (null, read_end, write_end, conn_fd, log_fd):
            os.close(fd)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher:
            os._exit(137)
        os.umask(int(job["umask"]))
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        sys.path[:] = fresh_sys_path(job["env"], job["cwd"], _BASE_PATH)

        importlib.invalidate_caches()
    except BaseException as exc:  # said in the log, then exit
        with contextlib.suppress(OSError):
            os.write(2, f"pytest-mlcjit: cannot start {job.get('module')}: {exc}\n".encode())
        os._exit(127)
    os._exit(run_module(job["module"], list(job["args"])))


def run_module(module: str, args: list[str]) -> int:
    """Run ``module`` as ``python -m module args`` would, in this process; its exit code
    (what ``SystemExit`` said; 1 and the traceback on stderr for another exception), once
    non-daemon threads are done, ``atexit`` handlers have run and output is flushed."""
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException as exc:  # reported as the interpreter would, from runpy down
        with contextlib.suppress(BaseException):
            tb = exc.__traceback__
            sys.excepthook(type(exc), exc, tb.tb_next if tb is not None else None)
        code = 1
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined] # as the interpreter does at exit
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(BaseException):
        print(code, file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m pytest_mlcjit.workers CONTROL_FD PARENT_PID [ROOM]",
              file=sys.stderr)
        return 2
    return serve(int(argv[0]), int(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
