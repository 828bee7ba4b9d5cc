"""The test process's side of the warm workers: its zygote (started on the first compile,
replaced when it dies or when a request's import environment differs), and each compile
running in a fork of it (:class:`WarmProcess`, the part of ``subprocess.Popen`` that
:mod:`..launch` uses). See :mod:`pytest_mlcjit.compiler.warm` for the design.

The pool is the process's (like a thread pool, it is a resource, not a run's state:
nothing of a run is kept in it), so a second run in the same process reuses the warm
zygote.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.compiler.warm.protocol import frame, recv_frame, split
from pytest_mlcjit.errors import CompileInterrupted

#: Environment variables (name prefixes) that can change how Python or TVM import, or
#: what the zygote inherits from the moment it starts: a request whose value of any of
#: them differs from the zygote's gets a new zygote. ``PYTHONPATH`` is not among them:
#: every compile sets its own ``sys.path`` from it; nor are this plugin's own settings
#: (:data:`OWN_ENV`), which change nothing TVM imports.
IMPORT_ENV = ("PYTHON", "TVM", "LD_", "DYLD_", "OMP_", "KMP_", "GOMP", "MKL_", "OPENBLAS",
              "GOTO", "CUDA", "NVIDIA", "HIP_", "ROCM", "VULKAN", "MALLOC", "LLVM", "NUMPY",
              "MLC_")
OWN_ENV = ("MLC_JIT_", "MLCJIT_")
#: How long a finished compile's launcher gets to exit after its last word.
LAUNCHER_EXIT_S = 5.0


#: How long the first compile waits for a new zygote to import TVM.
READY_TIMEOUT_S = 300.0


#: How long a compile waits for its launcher to say it runs.
START_TIMEOUT_S = 60.0


#: After this many zygotes failed to start in a process, it stops trying.
MAX_START_FAILURES = 2


#: Bytes of command line a zygote reserves, so that its forks can show what they run.
TITLE_ROOM = 4096


# -- the test process's side ---------------------------------------------------------------------
def supported() -> bool:
    """Whether compiles can run in warm workers here (Linux, with fork and fd passing)."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork")
            and hasattr(socket, "send_fds") and hasattr(socket, "AF_UNIX"))


def warm_module(argv: list[str]) -> str | None:
    """``MODULE`` if ``argv`` is ``[sys.executable, "-m", MODULE, ...]``, else None."""
    if len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m" and argv[2]:
        return argv[2]
    return None


def _import_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items()
            if k.startswith(IMPORT_ENV) and not k.startswith(OWN_ENV) and k != "PYTHONPATH"}


def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` would, for a moment,
    in every thread)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    return 0o022


class _Keeper:
    """A daemon thread that starts every zygote: ``PR_SET_PDEATHSIG`` fires when the
    *thread* that started a process ends, and this one lives as long as the process."""

    def __init__(self) -> None:
        self._calls: list[tuple[Callable[[], Any], list[Any], threading.Event]] = []
        self._wake = threading.Condition()
        threading.Thread(target=self._loop, name="mlcjit-workers", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._calls:
                    self._wake.wait()
                func, box, done = self._calls.pop(0)
            try:
                box.append((True, func()))
            except BaseException as exc:  # handed back to the caller
                box.append((False, exc))
            done.set()

    def call(self, func: Callable[[], Any]) -> Any:
        box: list[tuple[bool, Any]] = []
        done = threading.Event()
        with self._wake:
            self._calls.append((func, box, done))
            self._wake.notify()
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value


class Zygote:
    """One warm worker process of this test process, and the socket to reach it."""

    def __init__(self, env: Mapping[str, str], keeper: _Keeper) -> None:
        self.import_env = _import_env(env)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctrl = mine
        argv = [sys.executable, "-m", "pytest_mlcjit.compiler.warm.zygote", str(theirs.fileno()),
                str(os.getpid()), " " * TITLE_ROOM]
        try:
            self.proc: subprocess.Popen[bytes] = keeper.call(lambda: subprocess.Popen(
                argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                start_new_session=True))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.hello: dict[str, Any] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float, cancelled: Callable[[], bool]) -> dict[str, Any] | None:
        """Its hello (``{"pid", "threads", "warm", "error"}``) once it has imported TVM;
        None if it died or did not say it within ``timeout``. Polls ``cancelled``."""
        if self.hello is not None:
            return self.hello
        deadline = time.monotonic() + timeout
        buf = bytearray()
        while time.monotonic() < deadline:
            if cancelled():
                raise CompileInterrupted("interrupted while a compile worker started")
            ready, _, _ = select.select([self.ctrl], [], [], 0.1)
            if not ready:
                continue
            try:
                data = self.ctrl.recv(1 << 16)
            except OSError:
                return None
            if not data:
                return None
            buf += data
            for hello in split(buf):
                self.hello = hello
                return hello
        return None

    def send(self, conn: socket.socket) -> None:
        """Hand the zygote one compile's socket (it forks a launcher for it); OSError if
        the zygote is gone."""
        socket.send_fds(self.ctrl, [b"J"], [conn.fileno()])

    def close(self) -> None:
        """Let it go: it exits when its control socket closes (compiles in flight go on)."""
        with contextlib.suppress(OSError):
            self.ctrl.close()
        proc = self.proc
        threading.Thread(target=_reap, args=(proc,), name="mlcjit-reap", daemon=True).start()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()


class _Pool:
    """This process's zygote (one at a time), made on first use."""

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.keeper: _Keeper | None = None
        self.zygote: Zygote | None = None
        self.failures = 0
        #: Why warm workers are not used in this process any more, once that is so.
        self.broken: str | None = None
        #: The sockets of compiles in flight (closed in a forked child of this process).
        self.conns: set[socket.socket] = set()
        #: How many zygotes were started (the tests read it).
        self.started = 0

    def zygote_for(self, env: Mapping[str, str], cancelled: Callable[[], bool]) -> Zygote | None:
        """A ready zygote whose import environment is ``env``'s (call with ``mutex``)."""
        while self.broken is None:
            z = self.zygote
            if z is not None and (not z.alive() or z.import_env != _import_env(env)):
                self.drop()
                z = None
            if z is None:
                if self.keeper is None:
                    self.keeper = _Keeper()
                    atexit.register(_at_exit)
                try:
                    z = self.zygote = Zygote(env, self.keeper)
                except OSError:  # no process or descriptor to spare: a fresh subprocess
                    self._failed("the compile worker could not be started")
                    return None
                self.started += 1
            hello = z.wait_ready(READY_TIMEOUT_S, cancelled)
            if hello is not None and int(hello.get("threads", 1)) > 1:
                self.broken = (f"the compile worker runs {hello['threads']} Python threads "
                               "after importing TVM: forking it is unsafe")
            elif hello is not None:
                return z
            else:
                self._failed("the compile worker failed to start")
            self.drop(kill=True)
        return None

    def _failed(self, why: str) -> None:
        """A zygote failed to start: past :data:`MAX_START_FAILURES`, give up (``why``)."""
        self.failures += 1
        if self.failures >= MAX_START_FAILURES:
            self.broken = why

    def drop(self, *, kill: bool = False) -> None:
        """Let the zygote go, if there is one (``kill``: it is stuck or unusable, kill it
        too); call with ``mutex``."""
        z, self.zygote = self.zygote, None
        if z is not None:
            z.close()
            if kill:
                with contextlib.suppress(OSError):
                    z.proc.kill()


_pool = _Pool()


def _after_fork_in_child() -> None:
    """In a forked child of the test process nothing of this is its own: its copies of the
    sockets are closed (so that the zygote and the launchers still see the test process's
    end close when it dies), and it starts afresh."""
    global _pool  # noqa: PLW0603 - a forked child's own, empty state
    if _pool.zygote is not None:
        with contextlib.suppress(OSError):
            _pool.zygote.ctrl.close()
    for conn in list(_pool.conns):
        with contextlib.suppress(OSError):
            conn.close()
    _pool = _Pool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def pool_state() -> dict[str, Any]:
    """For tests and diagnostics: the zygote's pid (None if none), how many were started,
    and why warm workers are off in this process (None if they are not)."""
    z = _pool.zygote
    return {"pid": z.pid if z is not None and z.alive() else None, "started": _pool.started,
            "broken": _pool.broken}


class WarmProcess:
    """A compile running in a fork of this process's zygote: the part of
    :class:`subprocess.Popen` that :mod:`.runner` uses. ``pid`` is the launcher's, which
    leads its own process group."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str],
                 buf: bytearray | None = None) -> None:
        self.conn, self.pid, self.args = conn, pid, args
        self.returncode: int | None = None
        #: What was read from the socket and not parsed yet (the end may have come with
        #: the launcher's first frame).
        self._buf = buf if buf is not None else bytearray()

    def wait(self, timeout: float | None = None) -> int:
        code = self._read(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        """SIGTERM, SIGINT, SIGHUP: shut our end of its socket, which stops the launcher
        as those signals would (it kills its whole tree, reports and exits), without
        naming a pid; any other signal goes to the launcher."""
        if self.returncode is not None:
            return
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_WR)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def _read(self, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._parse()
        while self.returncode is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.conn], [], [], left)
            if not ready:
                return None
            try:
                data = self.conn.recv(1 << 16)
            except OSError:
                data = b""
            if not data:  # the launcher died without a word: killed
                self._done(-signal.SIGKILL)
                break
            self._buf += data
            self._parse()
        return self.returncode

    def _parse(self) -> None:
        for message in split(self._buf):
            if self.returncode is not None:
                return
            if "status" in message:
                self._done(os.waitstatus_to_exitcode(int(message["status"])))
            elif "stopped" in message:
                self._done(128 + int(message["stopped"]))
            elif "error" in message:
                self._done(127)

    def _done(self, code: int) -> None:
        self.returncode = code
        self._await_launcher_exit()
        _pool.conns.discard(self.conn)
        with contextlib.suppress(OSError):
            self.conn.close()

    def _await_launcher_exit(self) -> None:
        """After its last word the launcher exits: its end of the socket closes then (the
        kernel closes it), so wait for that, briefly, and a compile that returned has left
        no process behind, its launcher included."""
        deadline = time.monotonic() + LAUNCHER_EXIT_S
        with contextlib.suppress(OSError, ValueError):
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self.conn], [], [], left)
                if not ready or not self.conn.recv(1 << 16):
                    return


def start(argv: list[str], log_path: Path, *, env: Mapping[str, str], head: int, tail: int,
          cancelled: Callable[[], bool] = lambda: False) -> WarmProcess | None:
    """Start ``argv`` (``python -m MODULE ...``) in a fork of this process's zygote, its
    output appended to ``log_path`` (the first ``head`` and last ``tail`` bytes); None
    where warm workers cannot serve it (then run it as a fresh subprocess).
    CompileInterrupted if ``cancelled()`` turns true while a new zygote starts."""
    module = warm_module(argv)
    if module is None or not supported() or _pool.broken is not None:
        return None
    cwd = os.getcwd()
    job = {"module": module, "args": argv[3:], "argv": argv, "env": dict(env), "cwd": cwd,
           "umask": _umask(), "log": str(log_path), "head": head, "tail": tail}
    for _attempt in range(2):
        with _pool.mutex:
            z = _pool.zygote_for(env, cancelled)
            if z is None:
                return None
            conn, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                z.send(theirs)
            except OSError:  # it died: replace it
                conn.close()
                _pool.drop()
                continue
            finally:
                theirs.close()
            _pool.conns.add(conn)
        buf = bytearray()
        try:
            conn.sendall(frame(job))
            conn.settimeout(START_TIMEOUT_S)
            hello = recv_frame(conn, buf)
            conn.settimeout(None)
        except OSError:
            hello = None
        if hello is not None and isinstance(hello.get("pid"), int):
            return WarmProcess(conn, hello["pid"], argv, buf)
        _pool.conns.discard(conn)  # no launcher: the zygote is stuck or gone
        conn.close()
        with _pool.mutex:
            if _pool.zygote is z:
                _pool.drop(kill=True)
    return None


def _at_exit() -> None:
    """This process ends: close the zygote's socket (it exits when it sees it) and reap
    it, briefly (so that the CPU time of its compiles counts as this process's children's,
    as a subprocess's does)."""
    z = _pool.zygote
    if z is not None:
        with contextlib.suppress(OSError):
            z.ctrl.close()
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            z.proc.wait(timeout=2.0)


def shutdown() -> None:
    """Let this process's zygote go (it exits once its control socket is closed)."""
    with _pool.mutex:
        _pool.drop()
