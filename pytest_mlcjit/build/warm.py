"""Pre-warmed compile workers: a compile that pays neither interpreter start-up nor
``import tvm``, and is still a process of its own.

A compile used to start a new interpreter (two, counting the launcher) and import TVM,
1.5 to 2 s, for a compile that can take 0.2 s. Here each test process keeps one
*zygote*: a process started on the first compile (``python -m pytest_mlcjit.workers``)
that imports TVM, nothing else, and then only forks. A compile whose command is
``python -m MODULE ARGS`` (both backends' are) is served by a fork of it::

    test process ──control socket──> zygote (TVM imported; never imports user code)
         │                             └─ fork: launcher (its own session; child subreaper)
         └──one socket per compile──────────┘ └─ fork: the compile (its own process group):
                                                  the request's environment, sys.path, cwd
                                                  and umask; stdout and stderr into the
                                                  launcher's pipe; runpy.run_module(MODULE)

What the fresh subprocess guaranteed (:mod:`._child`) holds:

* **Isolation.** Every compile is a new fork of a zygote that has imported TVM and
  nothing else: a module global it sets, a TVM function it monkeypatches, a crash,
  ``SystemExit``, ``os._exit`` or an out-of-memory kill touch only that compile's process.
* **Fresh factory.** The zygote never imports user modules, and the compile invalidates
  the import caches: the factory module is imported anew by every compile, so an edited
  factory is seen within the same run.
* **The test process's view.** The compile gets the request's environment (``os.environ``
  replaced), the ``sys.path`` that a fresh ``python -m`` with that environment would have
  (its ``PYTHONPATH`` carries the test process's ``sys.path``: :func:`.runner.child_env`),
  and the test process's working directory and umask. A request whose environment differs
  from the zygote's in a variable that can change how TVM imports (:data:`IMPORT_ENV`)
  gets a new zygote started with it.
* **Logged.** Everything the compile prints goes through the launcher into the log,
  bounded as :class:`._child.BoundedLog` bounds it.
* **Killed whole.** The launcher is a child subreaper: on a stop (the test process shuts
  its end of the compile's socket, on a timeout or an interrupt; or SIGTERM) it SIGKILLs
  every descendant, reaps them, reports and exits.
* **Dies with the test process.** When the test process dies, however, the kernel closes
  its sockets: each launcher sees its socket close and kills its tree; the zygote sees
  its control socket close (it also gets SIGKILL from ``PR_SET_PDEATHSIG``, set from a
  thread that lives as long as the process). The compile itself dies with its launcher
  (``PR_SET_PDEATHSIG``).
* **Replaced.** A zygote that dies (killed, out of memory) is replaced on the next
  compile; the compiles it served go on, since they do not depend on it.

The launcher and the compile rename themselves (``/proc/PID/cmdline``, what ``ps``
shows) to the command they run. Elsewhere than Linux, with ``--mlc-jit-compile-workers
=off``, or when the zygote cannot start or would fork with Python threads running, the
compile runs in a fresh subprocess as before (:func:`.runner.run_logged`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from pytest_mlcjit.build import _launcher as _child

#: Environment variables (name prefixes) that can change how Python or TVM import, or
#: what the zygote inherits from the moment it starts: a request whose value of any of
#: them differs from the zygote's gets a new zygote. ``PYTHONPATH`` is not among them:
#: every compile sets its own ``sys.path`` from it.
IMPORT_ENV = ("PYTHON", "TVM", "LD_", "DYLD_", "OMP_", "KMP_", "GOMP", "MKL_", "OPENBLAS",
              "GOTO", "CUDA", "NVIDIA", "HIP_", "ROCM", "VULKAN", "MALLOC", "LLVM", "NUMPY",
              "MLC_")
#: What a zygote imports before it forks anything: what the TVM compile child imports
#: before it starts recording the factory's inputs (so recorded inputs do not depend on
#: whether a compile ran warm).
WARM_MODULES = ("tvm", "tvm.relax")
#: How long the first compile waits for a new zygote to import TVM.
READY_TIMEOUT_S = 300.0
#: How long a compile waits for its launcher to say it runs.
START_TIMEOUT_S = 60.0
#: After this many zygotes failed to start in a process, it stops trying.
MAX_START_FAILURES = 2
#: Bytes of command line a zygote reserves, so that its forks can show what they run.
TITLE_ROOM = 4096
#: How often an idle zygote reaps its exited launchers.
REAP_EVERY_S = 1.0
_FRAME = struct.Struct("!I")


# -- framing: a 4-byte length, then JSON ---------------------------------------------------------
def _frame(data: Mapping[str, Any]) -> bytes:
    body = json.dumps(data, separators=(",", ":")).encode()
    return _FRAME.pack(len(body)) + body


def _split(buf: bytearray) -> Iterator[dict[str, Any]]:
    """Take every whole frame off the front of ``buf``."""
    while len(buf) >= _FRAME.size:
        (size,) = _FRAME.unpack_from(buf)
        if len(buf) < _FRAME.size + size:
            return
        body = bytes(buf[_FRAME.size:_FRAME.size + size])
        del buf[:_FRAME.size + size]
        yield json.loads(body)


def _recv_frame(sock: socket.socket, buf: bytearray | None = None) -> dict[str, Any] | None:
    """One frame, blocking; None at EOF. ``buf`` keeps what was read beyond it."""
    buf = bytearray() if buf is None else buf
    while True:
        for frame in _split(buf):
            return frame
        data = sock.recv(1 << 16)
        if not data:
            return None
        buf += data


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
    return {k: v for k, v in env.items() if k.startswith(IMPORT_ENV) and k != "PYTHONPATH"}


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
        argv = [sys.executable, "-m", "pytest_mlcjit.build.warm", str(theirs.fileno()),
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
                from pytest_mlcjit.build.launch import CompileInterrupted

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
            for frame in _split(buf):
                self.hello = frame
                return frame
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
                z.close()
                self.zygote = z = None
            if z is None:
                if self.keeper is None:
                    self.keeper = _Keeper()
                    atexit.register(_at_exit)
                try:
                    z = self.zygote = Zygote(env, self.keeper)
                except OSError:  # no process or descriptor to spare: a fresh subprocess
                    self.failures += 1
                    if self.failures >= MAX_START_FAILURES:
                        self.broken = "the compile worker could not be started"
                    return None
                self.started += 1
            hello = z.wait_ready(READY_TIMEOUT_S, cancelled)
            if hello is not None and int(hello.get("threads", 1)) > 1:
                self.broken = (f"the compile worker runs {hello['threads']} Python threads "
                               "after importing TVM: forking it is unsafe")
            elif hello is not None:
                return z
            else:
                self.failures += 1
                if self.failures >= MAX_START_FAILURES:
                    self.broken = "the compile worker failed to start"
            z.close()
            with contextlib.suppress(OSError):
                z.proc.kill()
            self.zygote = None
        return None



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

    def poll(self) -> int | None:
        return self._read(0.0)

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

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

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
        for frame in _split(self._buf):
            if self.returncode is not None:
                return
            if "status" in frame:
                self._done(os.waitstatus_to_exitcode(int(frame["status"])))
            elif "stopped" in frame:
                self._done(128 + int(frame["stopped"]))
            elif "error" in frame:
                self._done(127)

    def _done(self, code: int) -> None:
        self.returncode = code
        _pool.conns.discard(self.conn)
        with contextlib.suppress(OSError):
            self.conn.close()


def start(argv: list[str], log_path: Path, *, env: Mapping[str, str], head: int, tail: int,
          cancelled: Callable[[], bool] = lambda: False) -> WarmProcess | None:
    """Start ``argv`` (``python -m MODULE ...``) in a fork of this process's zygote, its
    output appended to ``log_path`` (the first ``head`` and last ``tail`` bytes); None
    where warm workers cannot serve it (then run it as a fresh subprocess).
    :class:`.runner.CompileInterrupted` if ``cancelled()`` turns true while a new zygote
    starts."""
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
                z.close()
                _pool.zygote = None
                continue
            finally:
                theirs.close()
            _pool.conns.add(conn)
        buf = bytearray()
        try:
            conn.sendall(_frame(job))
            conn.settimeout(START_TIMEOUT_S)
            hello = _recv_frame(conn, buf)
            conn.settimeout(None)
        except OSError:
            hello = None
        if hello is not None and isinstance(hello.get("pid"), int):
            return WarmProcess(conn, hello["pid"], argv, buf)
        _pool.conns.discard(conn)  # no launcher: the zygote is stuck or gone
        conn.close()
        with _pool.mutex:
            if _pool.zygote is z:
                z.close()
                with contextlib.suppress(OSError):
                    z.proc.kill()
                _pool.zygote = None
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
        if _pool.zygote is not None:
            _pool.zygote.close()
            _pool.zygote = None


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
        import ctypes

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
    _child._prctl(_child.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return 1
    _set_title([sys.executable, "-m", "pytest_mlcjit.build.warm", f"(compile worker of {parent})"])
    ctrl = socket.socket(fileno=ctrl_fd)
    _BASE_PATH[:] = _base_path()
    error = None
    import importlib

    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # no TVM: compiles import what they need
            error = f"{type(exc).__name__}: {exc}"
            break
    threads = threading.active_count()
    ctrl.sendall(_frame({"pid": os.getpid(), "threads": threads, "warm": error is None,
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
            _reap_launchers(launchers, wait=_child.REAP_LIMIT_S)
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
    job = _recv_frame(conn)
    if job is None:
        return 0
    _set_title(list(job["argv"]))
    _child._prctl(_child.PR_SET_CHILD_SUBREAPER, 1)

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise _child._Stop(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    stopped: _child._Stop | None = None
    status = 0
    pid = 0
    sink: _child.BoundedLog | None = None
    read_end = -1
    try:
        conn.sendall(_frame({"pid": os.getpid()}))
        out = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        sink = _child.BoundedLog(out, int(job["head"]), int(job["tail"]))
        read_end, write_end = os.pipe()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            _compile(job, me, (read_end, write_end, conn_fd, out))
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        os.close(write_end)
        status = _pump(read_end, conn, sink, pid)
    except _child._Stop as exc:
        stopped = exc
    except OSError as exc:
        with contextlib.suppress(OSError):
            conn.sendall(_frame({"error": f"{type(exc).__name__}: {exc}"}))
        return 0
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # the clean-up below is bounded: let it end
    reaped = stopped is None
    _child.kill_tree(None if reaped or not pid else pid)
    if sink is not None:
        if read_end >= 0:
            _child._drain(read_end, sink)
        sink.close()
    reply = {"stopped": stopped.signum} if stopped is not None else {"status": status}
    with contextlib.suppress(OSError):
        conn.sendall(_frame(reply))
    return 0


def _pump(fd: int, conn: socket.socket, sink: _child.BoundedLog, pid: int) -> int:
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
                raise _child._Stop(signal.SIGTERM)
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
        _child._prctl(_child.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != launcher:
            os._exit(137)
        os.umask(int(job["umask"]))
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        sys.path[:] = fresh_sys_path(job["env"], job["cwd"], _BASE_PATH)
        import importlib

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
    import runpy

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
