"""The process-tree primitives of a compile's launcher (:mod:`._launcher`, and the warm
workers' launchers, :mod:`.warm.zygote`): Linux ``prctl`` for a subreaper and a parent-death
signal, a bounded log, and killing a whole tree of descendants found in ``/proc``.

Imported by child-process entry points: only the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import time

PR_SET_PDEATHSIG = 1

PR_SET_CHILD_SUBREAPER = 36

#: How long the launcher keeps killing and reaping descendants before it gives up.
REAP_LIMIT_S = 10.0

def prctl(option: int, arg: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False

    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0)) == 0

class BoundedLog:
    """Writes the first ``head`` bytes to ``fd`` as they come, keeps the last ``tail``
    bytes in memory, and on :meth:`close` writes a line saying how much was cut (if
    anything) and then the tail."""

    def __init__(self, fd: int, head: int, tail: int) -> None:
        self.fd, self.head, self.tail = fd, head, tail
        self.written = 0
        self.total = 0
        self.kept = bytearray()

    def write(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head - self.written
        if room > 0:
            first = data[:room]
            write_all(self.fd, first)
            self.written += len(first)
            data = data[room:]
        if data:
            self.kept += data
            if len(self.kept) > self.tail:
                del self.kept[:len(self.kept) - self.tail]  # O(1) from the front

    def close(self) -> None:
        cut = self.total - self.written - len(self.kept)
        if cut > 0:
            write_all(self.fd, (
                f"\n[pytest-mlcjit] ... {cut} bytes of compiler output cut here ({self.total} "
                f"in all): the log keeps the first {self.written} and the last "
                f"{len(self.kept)} bytes ...\n").encode())
        write_all(self.fd, bytes(self.kept))
        self.kept.clear()

def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except OSError:
            return  # a full disk: the compile itself will say so

def descendants(root: int) -> list[int]:
    """Every live (not zombie) descendant of ``root``, from ``/proc``, parents first."""
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[0] not in (b"Z", b"X"):
            children.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found.append(pid)
            todo.append(pid)
    return found

def kill_tree(group: int | None) -> None:
    """SIGKILL every descendant of this process (and the command's process group), reaping
    them, until none is left (or :data:`REAP_LIMIT_S` has passed)."""
    deadline = time.monotonic() + REAP_LIMIT_S
    linux = os.path.isdir("/proc/self")
    while True:
        if group is not None:
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGKILL)
        for pid in descendants(os.getpid()) if linux else []:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return  # no children left, live or zombie
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)

def drain(fd: int, sink: BoundedLog) -> None:
    """What is left in the pipe once every writer is dead."""
    with contextlib.suppress(OSError):
        while True:
            ready, _, _ = select.select([fd], [], [], 0)
            if not ready:
                return
            data = os.read(fd, 1 << 16)
            if not data:
                return
            sink.write(data)
