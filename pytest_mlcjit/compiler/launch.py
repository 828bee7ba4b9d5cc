"""Running a build in an isolated process: under a launcher (:mod:`._launcher`, or a fork
of a warm worker, :mod:`.warm`) that stays its parent, kills its whole process tree on
timeout, on interrupt and when the test process dies, and writes its output to the
entry's compile log, bounded (the first :data:`LOG_HEAD_BYTES` and the last
:data:`LOG_TAIL_BYTES` bytes).

:class:`Builds` keeps the builds of one run in flight, so that an interrupt stops them all
at once, those of background threads (prefetch) included, and cancels the run's waits
(:attr:`Builds.cancelled`); a second run in the same process starts with none of it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from pytest_mlcjit.compiler.warm import client
from pytest_mlcjit.errors import CompileInterrupted

#: A compile log keeps the first and the last bytes of the compiler's output, with a line
#: between them saying how much was cut: at most about 1.25 MiB per log.
LOG_HEAD_BYTES = 256 * 1024
LOG_TAIL_BYTES = 1024 * 1024
#: How long the launcher gets to kill the tree and exit before its group is SIGKILLed.
KILL_GRACE_S = 5.0


class Build(Protocol):
    """A build in flight: a :class:`subprocess.Popen` of the launcher, or a
    :class:`.warm.client.WarmProcess`."""

    pid: int

    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...


def child_env() -> dict[str, str]:
    """The environment of a compile subprocess: ours, with our ``sys.path`` as PYTHONPATH,
    so the child imports factories (and ``mlc_llm``) exactly as the test process can."""
    paths = [p or os.getcwd() for p in sys.path]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def kill_group(proc: Build) -> None:
    """Kill the build ``proc`` launched, its whole tree, and reap it: SIGTERM to the
    launcher, which SIGKILLs every descendant and exits; if it has not exited within
    :data:`KILL_GRACE_S`, SIGKILL to its process group."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Builds:
    """The builds of one run in flight, and the run's interruption.

    ``warm``: run ``python -m MODULE`` commands in forks of the process's warm compile
    worker (:mod:`.warm`) where one can serve them.
    """

    def __init__(self, *, warm: bool = True) -> None:
        self.warm = warm
        #: Set once the run is being interrupted: builds stop, waits for locks give up.
        self.cancelled = threading.Event()
        self._live: dict[int, Build] = {}
        self._killed: set[int] = set()
        self._mutex = threading.Lock()

    def run_logged(self, argv: list[str], log_path: Path, *, timeout: float) -> int | None:
        """Run ``argv`` with its output appended to ``log_path`` (bounded); its exit code
        (negative: killed by that signal), or None if it timed out.

        Its whole process tree is killed on timeout, when this call is interrupted, by
        :meth:`kill_all` (then CompileInterrupted is raised), and when this process dies.
        """
        launcher = [sys.executable, "-m", "pytest_mlcjit.compiler._launcher", "--log",
                    str(log_path), "--head", str(LOG_HEAD_BYTES), "--tail", str(LOG_TAIL_BYTES),
                    str(os.getpid()), "--", *argv]
        env = child_env()
        with open(log_path, "ab") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            proc: Build | None = None
            if self.warm:
                proc = client.start(argv, log_path, env=env,
                                    head=LOG_HEAD_BYTES, tail=LOG_TAIL_BYTES,
                                    cancelled=self.cancelled.is_set)
            if proc is None:
                proc = subprocess.Popen(launcher, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        with self._mutex:
            self._live[proc.pid] = proc
        try:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                return None
            except BaseException:
                kill_group(proc)
                raise
        finally:
            with self._mutex:
                self._live.pop(proc.pid, None)
                interrupted = proc.pid in self._killed
                self._killed.discard(proc.pid)
        if interrupted:
            raise CompileInterrupted(
                f"the build {shlex.join(argv[:3])}… was stopped: interrupted")
        return code

    def kill_all(self, *, wait: bool = True) -> int:
        """Stop every build in flight in this run (an interrupt: they are not wanted any
        more), and make every wait for a key's lock give up; how many builds were stopped.
        The threads running them get CompileInterrupted. ``wait=False`` (from a signal
        handler) only tells each launcher to kill its tree; the waiting threads reap
        them."""
        self.cancelled.set()
        with self._mutex:
            procs = list(self._live.values())
            self._killed.update(p.pid for p in procs)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if wait:
            for proc in procs:
                kill_group(proc)
        return len(procs)

    @contextlib.contextmanager
    def killing_on_sigint(self) -> Iterator[None]:
        """Within this block (entered in the main thread), a SIGINT first tells every build
        in flight to stop (:meth:`kill_all` without waiting: builds of background threads
        included), then raises KeyboardInterrupt as usual: the builds die while the run
        unwinds, not after it."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):  # SIG_IGN or SIG_DFL: someone chose; leave it
            yield
            return

        def on_sigint(signum: int, frame: FrameType | None) -> Any:
            self.kill_all(wait=False)
            return previous(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            if signal.getsignal(signal.SIGINT) is on_sigint:
                signal.signal(signal.SIGINT, previous)
