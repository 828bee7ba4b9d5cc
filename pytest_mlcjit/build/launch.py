"""Running a build in an isolated process: under a launcher (:mod:`._child`) that stays its
parent, kills its whole process tree on timeout, on interrupt and when the test process
dies, and writes its output to the entry's compile log, bounded (the first
:data:`LOG_HEAD_BYTES` and the last :data:`LOG_TAIL_BYTES` bytes).

Every build in flight is registered here, so that an interrupt can stop them all at once,
those of background threads (prefetch) included: :func:`kill_all`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from pytest_mlcjit.cache.locks import WAITS_CANCELLED

#: A compile log keeps the first and the last bytes of the compiler's output, with a line
#: between them saying how much was cut: at most about 1.25 MiB per log.
LOG_HEAD_BYTES = 256 * 1024
LOG_TAIL_BYTES = 1024 * 1024
#: How long the launcher gets to kill the tree and exit before its group is SIGKILLed.
KILL_GRACE_S = 5.0

class Build(Protocol):
    """A build in flight: a :class:`subprocess.Popen` of the launcher, or a
    :class:`.workers.WarmProcess`."""

    pid: int

    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...


_live: dict[int, Build] = {}
_killed: set[int] = set()
_mutex = threading.Lock()


class CompileInterrupted(KeyboardInterrupt):
    """A build was stopped by :func:`kill_all` (the run is being interrupted)."""


def child_env() -> dict[str, str]:
    """The environment of a compile subprocess: ours, with our ``sys.path`` as PYTHONPATH,
    so the child imports factories (and ``mlc_llm``) exactly as the test process can."""
    paths = [p or os.getcwd() for p in sys.path]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_logged(argv: list[str], log_path: Path, *, timeout: float,
               env: Mapping[str, str] | None = None, warm: bool = False) -> int | None:
    """Run ``argv`` with its output appended to ``log_path`` (bounded); its exit code
    (negative: killed by that signal), or None if it timed out.

    Its whole process tree is killed on timeout, when this call is interrupted, by
    :func:`kill_all` (then CompileInterrupted is raised), and when this process dies.
    ``warm``: a ``python -m MODULE`` command runs in a fork of this process's pre-warmed
    compile worker (:mod:`.workers`), with the same guarantees, where one can serve it.
    """
    launcher = [sys.executable, "-m", "pytest_mlcjit.build._launcher", "--log", str(log_path),
                "--head", str(LOG_HEAD_BYTES), "--tail", str(LOG_TAIL_BYTES),
                str(os.getpid()), "--", *argv]
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        proc: Build | None = None
        if warm:
            from pytest_mlcjit.build import warm as workers

            proc = workers.start(argv, log_path, env=dict(env or child_env()),
                                 head=LOG_HEAD_BYTES, tail=LOG_TAIL_BYTES,
                                 cancelled=WAITS_CANCELLED.is_set)
        if proc is None:
            proc = subprocess.Popen(launcher, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=dict(env or child_env()),
                                    start_new_session=True)
    with _mutex:
        _live[proc.pid] = proc
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
        with _mutex:
            _live.pop(proc.pid, None)
            interrupted = proc.pid in _killed
            _killed.discard(proc.pid)
    if interrupted:
        raise CompileInterrupted(f"the build {shlex.join(argv[:3])}… was stopped: interrupted")
    return code


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


def kill_all(*, wait: bool = True) -> int:
    """Stop every build in flight in this process (an interrupt: they are not wanted any
    more), and make every wait for a key's lock give up; how many builds were stopped.
    The threads running them get CompileInterrupted. ``wait=False`` (from a signal
    handler) only tells each launcher to kill its tree; the waiting threads reap them."""
    WAITS_CANCELLED.set()
    with _mutex:
        procs = list(_live.values())
        _killed.update(p.pid for p in procs)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    if wait:
        for proc in procs:
            kill_group(proc)
    return len(procs)


@contextlib.contextmanager
def killing_on_sigint() -> Iterator[None]:
    """Within this block (entered in the main thread), a SIGINT first tells every build in
    flight to stop (:func:`kill_all` without waiting: builds of background threads
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
        kill_all(wait=False)
        return previous(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, previous)


def in_flight() -> int:
    """How many builds this process is running now."""
    with _mutex:
        return len(_live)
