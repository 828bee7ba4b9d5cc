"""Every lock the cache takes, in one place.

All of them are ``flock`` locks on files under ``<root>/.mlcjit/locks`` (or beside the file
or directory they guard): the kernel releases them when their holder dies, so a killed
compiler never blocks the next one, and nothing ever polls for a file to disappear. An
``flock`` is held by an open file, not by a process id, so it tells a live holder from a
dead one across PID namespaces, containers and hosts that share the filesystem.

* :func:`key_lock` waits for a key's lock (the compile protocol), and writes an owner
  record so that a timeout can say who held it.
* :func:`try_flock` / :func:`try_key_lock` take one without waiting (prune, clear: many
  locks quickly; a held lock means the entry is being compiled now).
* :func:`flocked` waits a bounded time for a small shared file (the run history).
* :func:`create_held` makes a new lock file already held: a staging directory's, whose
  owner holds it for the directory's whole life (:mod:`.store.local`).
* :func:`remove_if_free` removes a lock file nobody holds (clear, prune).

Lock files may be removed while nobody holds them, so every taker checks, once it holds
the lock, that the path still names the file it locked (else it locked a removed file,
which guards nothing, and starts again). A lock file this user cannot write (a root-owned
one left by a ``sudo`` run) is locked through a read-only descriptor; one it cannot even
read is an error that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import (
    FILE_MODE,
    WriteWarnings,
    fault_point,
    read_json,
    write_json_atomic,
)
from pytest_mlcjit.cache.layout import check_digest, lock_file, owner_file
from pytest_mlcjit.errors import LockTimeoutError, LockWaitCancelled, MlcJitError

#: How often a waiter tries a held lock again.
POLL_S = 0.05
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
#: ``flock`` errors that mean the filesystem does not support it.
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists in this PID namespace and has not exited (a zombie
    counts as dead: its locks are already released). Used only to word messages: a pid
    says nothing about a process in another PID namespace or on another host, so no
    decision to remove anything rests on it."""
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


def _unusable(path: str | os.PathLike[str], exc: OSError) -> MlcJitError:
    """The error for a lock file this user cannot open or lock: what it is, and the fix."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
        whose = (f"; it is owned by uid {st.st_uid} with mode {st.st_mode & 0o7777:04o}, and "
                 f"you are uid {os.getuid()}")
    except OSError:
        whose = ""
    return MlcJitError(
        f"cannot use the lock file {name} ({exc.strerror or exc}{whose}): another user (a "
        f"run under sudo?) left it. Once no run uses this cache, remove it (rm {name}) or "
        "give it back to yourself (sudo chown $USER of it), or choose another cache with "
        "--mlc-jit-cache-dir"
    )


def open_lock_file(path: str | os.PathLike[str], *, create: bool = True) -> int | None:
    """Open a lock file for ``flock``: read-write, made if missing (unless ``create`` is
    false: None if it does not exist), or read-only where this user may not write it (an
    ``flock`` does not need write access). MlcJitError naming the file and the fix if it
    cannot be opened at all; other OSErrors (no such directory, a full disk) as they are."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0) | _NOFOLLOW
    try:
        return os.open(path, flags, FILE_MODE)
    except FileNotFoundError:
        if create:
            raise
        return None
    except PermissionError as exc:
        if not os.path.lexists(path):
            raise  # the directory is not writable: not a lock file problem
        try:
            return os.open(path, os.O_RDONLY | _NOFOLLOW)
        except FileNotFoundError:
            return None
        except PermissionError:
            raise _unusable(path, exc) from None


def _flock_nb(fd: int, path: str | os.PathLike[str]) -> bool:
    """Try an exclusive ``flock`` without waiting; whether it was taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno == errno.EBADF:  # NFS emulates flock with fcntl: needs write access
            raise _unusable(path, exc) from None
        if exc.errno in _NO_FLOCK:
            raise MlcJitError(
                f"the filesystem of {os.fspath(path)} does not support flock "
                f"({exc.strerror}), which the cache's locks need; put the cache on a "
                "local filesystem (--mlc-jit-cache-dir)") from None
        raise
    return True


def _still_named(fd: int, path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (it may have been removed, or
    removed and made again, since it was opened)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


#: What :func:`try_existing_flock` returns for a lock file that does not exist.
MISSING = -1


def _try_lock(path: str | os.PathLike[str], *, create: bool = True) -> int | None:
    """One non-blocking attempt: the descriptor holding the lock, None if another holds
    it, :data:`MISSING` if the file does not exist (only when ``create`` is false)."""
    while True:
        fd = open_lock_file(path, create=create)
        if fd is None:
            return MISSING
        try:
            if not _flock_nb(fd, path):
                os.close(fd)
                return None
            if _still_named(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # we locked a file that was removed meanwhile: try the path again


def try_existing_flock(path: str | os.PathLike[str]) -> int | None:
    """Take the ``flock`` of an existing lock file without waiting (nothing is created):
    the descriptor, None if another holds it, :data:`MISSING` if there is no such file."""
    return _try_lock(path, create=False)


def try_flock(path: str | os.PathLike[str]) -> int | None:
    """Open ``path`` (made if missing) and take its ``flock`` without waiting.

    Returns the descriptor, whose ``os.close`` releases the lock, or None if another open
    file holds it. Raises MlcJitError if the file cannot be used (another user's, no
    ``flock`` on this filesystem), OSError if it cannot be made.
    """
    return _try_lock(path)


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
    by a live process means the entry is being compiled now."""
    fd = try_flock(lock_file(root, check_digest(digest)))
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)  # releases the flock


def is_key_locked(root: str | os.PathLike[str], digest: str) -> bool:
    """Whether a live process holds ``digest``'s lock (no lock file is created)."""
    fd = _try_lock(lock_file(root, check_digest(digest)), create=False)
    if fd is None:
        return True
    if fd != MISSING:
        os.close(fd)
    return False


def remove_if_free(path: str | os.PathLike[str]) -> bool:
    """Remove the lock file ``path`` if nobody holds it (it is removed while held, so that
    no one can take it meanwhile); whether it is gone."""
    fd = _try_lock(path, create=False)
    if fd is None:
        return False
    if fd == MISSING:
        return True
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)
    return True


def create_held(path: str | os.PathLike[str]) -> int:
    """Make the new lock file ``path`` and hold its lock; returns the descriptor.

    FileExistsError if it exists. For locks whose file is made before what they guard (a
    staging directory), so that whoever sees the guarded thing finds its lock held.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, FILE_MODE)
    try:
        if not _flock_nb(fd, path) or not _still_named(fd, path):
            # Someone took or removed a lock file we had just made: only a cleaner that
            # found it "free" between our open and our flock can, and it removes it.
            raise FileExistsError(errno.EEXIST, "lock file taken while being made", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_and_remove(fd: int, path: str | os.PathLike[str]) -> None:
    """Remove a lock file we hold, then release it."""
    try:
        if _still_named(fd, path):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def key_lock(root: Path, digest: str, timeout: float, what: str = "", *,
             cancelled: threading.Event | None = None,
             warnings: WriteWarnings | None = None) -> Iterator[float]:
    """Hold the key's lock, waiting at most ``timeout`` seconds; yields the seconds spent
    waiting. LockTimeoutError names the holder when the wait runs out; LockWaitCancelled
    once ``cancelled`` is set (the run is being interrupted) while it waits."""
    path = lock_file(root, check_digest(digest))
    owner = owner_file(root, digest)
    start = time.monotonic()
    deadline = start + timeout
    fault_point("lock-wait")
    while (fd := try_flock(path)) is None:
        if cancelled is not None and cancelled.is_set():
            raise LockWaitCancelled(f"gave up waiting for the lock of key {digest}: "
                                    "interrupted")
        left = deadline - time.monotonic()
        if left <= 0:
            raise LockTimeoutError(_timeout_message(owner, digest, timeout, what))
        time.sleep(min(POLL_S, left))
    waited = time.monotonic() - start
    try:
        with (warnings or WriteWarnings()).best_effort(owner, "write the lock owner record"):
            write_json_atomic(owner, {"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.time()})
        fault_point("locked")
        yield waited
    finally:
        with contextlib.suppress(OSError):
            owner.unlink()
        os.close(fd)  # releases the flock


def owner_record(owner: Path) -> dict[str, Any] | None:
    """What a lock's owner record says (``pid``, ``host``, ``since``…), or None when it is
    absent or unreadable: it words messages only."""
    data = read_json(owner)
    return data if isinstance(data, dict) else None


def _timeout_message(owner: Path, digest: str, timeout: float, what: str) -> str:
    try:
        info: Any = owner_record(owner)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        held = (f"held by pid {info['pid']} on {info['host']} since {since} "
                f"({time.time() - info['since']:.0f}s ago)")
        if info["host"] == socket.gethostname() and not pid_alive(int(info["pid"])):
            held += " (that process has exited: the record is stale, the holder unknown)"
    except (ValueError, KeyError, TypeError, OverflowError):
        held = "holder unknown"
    return (f"timed out after {timeout:g}s waiting for the lock of key {digest}"
            f"{' (' + what + ')' if what else ''}: {held}; raise --mlc-jit-lock-timeout "
            "or check that process")
