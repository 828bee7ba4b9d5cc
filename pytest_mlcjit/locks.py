"""Every lock the cache takes, in one place.

All of them are ``flock`` locks on files under ``<root>/.mlcjit/locks`` (or beside the file
they guard): the kernel releases them when their holder dies, so a killed compiler never
blocks the next one, and nothing ever polls for a file to disappear.

* :func:`key_lock` waits for a key's lock (the compile protocol), and writes an owner
  record so that a timeout can say who held it.
* :func:`try_flock` / :func:`try_key_lock` take one without waiting (prune, clear: many
  locks quickly; a held lock means the entry is being compiled now).
* :func:`flocked` waits a bounded time for a small shared file (the run history).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import LockTimeoutError
from .fsutil import FILE_MODE, best_effort, fault_point, write_json_atomic
from .layout import check_digest, lock_file, owner_file


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and has not exited. A killed process
    stays a zombie until its parent reaps it (an xdist worker's parent may take a while);
    its locks are already released, so a zombie counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[:1]
    except OSError:
        return True  # no /proc (not Linux): trust kill()
    return state not in ([b"Z"], [b"X"])


def try_flock(path: str | os.PathLike[str]) -> int | None:
    """Open ``path`` (made if missing) and take its ``flock`` without waiting.

    Returns the descriptor, whose ``os.close`` releases the lock, or None if another open
    file holds it. The same lock :class:`filelock.FileLock` takes on the file, for the
    places that need many locks quickly (a FileLock object costs half a millisecond).
    Raises OSError if the file cannot be opened or the filesystem has no ``flock``.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def flocked(path: str | os.PathLike[str], *, timeout: float) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (made if missing), waiting at most ``timeout`` s;
    TimeoutError after that."""
    deadline = time.monotonic() + timeout
    while (fd := try_flock(path)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} stayed locked for {timeout:g}s")
        time.sleep(0.01)
    try:
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def try_key_lock(root: str | os.PathLike[str], digest: str) -> Iterator[bool]:
    """Hold ``digest``'s lock if no one holds it; yields whether it is held. A lock held
    by a live process means the entry is being compiled now.

    Where the filesystem has no ``flock``, filelock and its fallback, as :func:`key_lock`.
    """
    path = lock_file(root, digest)
    try:
        fd = try_flock(path)
    except OSError:  # no flock here (ENOSYS, EOPNOTSUPP…), or no file: let filelock decide
        with _filelock_try(path) as held:
            yield held
        return
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _filelock_try(path: str) -> Iterator[bool]:
    from filelock import FileLock, Timeout

    lock = FileLock(path, timeout=0, mode=FILE_MODE, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def is_key_locked(root: str | os.PathLike[str], digest: str) -> bool:
    """Whether a live process holds ``digest``'s lock (no lock file is created)."""
    if not os.path.exists(lock_file(root, digest)):
        return False
    with try_key_lock(root, digest) as held:
        return not held


@contextlib.contextmanager
def key_lock(root: Path, digest: str, timeout: float, what: str = "") -> Iterator[float]:
    """Hold the key's lock, waiting at most ``timeout`` seconds; yields the seconds spent
    waiting. LockTimeoutError names the holder when the wait runs out."""
    from filelock import FileLock, Timeout

    lock = FileLock(lock_file(root, check_digest(digest)), timeout=timeout, mode=FILE_MODE,
                    thread_local=False)
    owner = owner_file(root, digest)
    start = time.monotonic()
    fault_point("lock-wait")
    try:
        lock.acquire()
    except Timeout:
        raise LockTimeoutError(_timeout_message(owner, digest, timeout, what)) from None
    waited = time.monotonic() - start
    try:
        with best_effort(owner, "write the lock owner record"):
            write_json_atomic(owner, {"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.time()})
        fault_point("locked")
        yield waited
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()


def _timeout_message(owner: Path, digest: str, timeout: float, what: str) -> str:
    try:
        info = json.loads(owner.read_text(encoding="utf-8"))
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        held = (f"held by pid {info['pid']} on {info['host']} since {since} "
                f"({time.time() - info['since']:.0f}s ago)")
        if info["host"] == socket.gethostname() and not pid_alive(int(info["pid"])):
            held += " (that process has exited: the record is stale, the holder unknown)"
    except (OSError, ValueError, KeyError, TypeError):
        held = "holder unknown"
    return (f"timed out after {timeout:g}s waiting for the lock of key {digest}"
            f"{' (' + what + ')' if what else ''}: {held}; raise --mlc-jit-lock-timeout "
            "or check that process")
