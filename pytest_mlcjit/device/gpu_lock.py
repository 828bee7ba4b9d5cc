"""The GPU lock: one machine-wide ``flock`` per GPU, the same file and the same lock as
TVM's ``tvm.testing.run_with_gpu_lock`` (apache-tvm 0.27, ``tvm/testing/locking.py``), so
that TVM-style tests and this plugin's tests serialize on one GPU, in either direction.

Where the lock lives (:func:`lock_dir`):

* ``$TVM_TEST_LOCK_DIR`` (``~`` expanded) when set: made if missing; a directory that
  cannot be made or written is an :class:`~pytest_mlcjit.errors.MlcJitError` naming the
  variable, the path and why.
* else ``<tempdir>/tvm-testing-locks``, TVM's default, shared by every user of the machine:
  made mode ``01777`` (like ``/tmp``: anyone may add a lock, no one may remove another's);
  made by another user first and not writable to us, it is replaced by a per-user
  directory, ``<tempdir>/tvm-testing-locks-<uid>`` (no PermissionError; the lock then
  serializes only this user's tests).

Which file (:func:`lock_path`): ``gpu.lock`` for GPU 0 and for a device without an index
(TVM's own file); ``gpu-<i>.lock`` for GPU ``i > 0``.

How it is taken: the file opened ``O_WRONLY | O_CREAT`` (read-only when it exists and
another user's mode forbids writing: ``flock`` needs no write access), then
``fcntl.flock(LOCK_EX | LOCK_NB)`` polled every :data:`POLL_S` seconds, as tvm-ffi's
``FileLock`` does. The kernel releases a ``flock`` when its holder dies, so a dead holder
never makes anyone wait. Within one process the lock is re-entrant (a nested
:func:`gpu_lock` of the same GPU takes nothing more) and threads take it in turn. While it
is held, a small JSON file beside it, ``<lock>.owner``, says who holds it (pid, host,
worker, test), for the message of whoever waits; TVM's holders write none.

Standard library only: the plugin imports this when a test needs the lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.device import Device
from pytest_mlcjit.errors import MlcJitError

#: The variable TVM's test suite names its lock directory with.
ENV_LOCK_DIR = "TVM_TEST_LOCK_DIR"
#: The shared default directory's name under the temporary directory (TVM's).
LOCK_DIR_NAME = "tvm-testing-locks"
#: How often a waiter tries the lock again, in seconds (tvm-ffi's FileLock: 0.1).
POLL_S = 0.1
#: The most bytes of an owner record read.
OWNER_BYTES = 4096


def _usable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _shared_dir(path: Path) -> bool:
    """Make the shared directory (mode 01777, umask or not); whether it is usable."""
    try:
        path.mkdir()
    except FileExistsError:
        pass
    except OSError:
        return False
    else:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o1777)  # noqa: S103 - shared like /tmp (sticky), on purpose
    return _usable(path)


def lock_dir() -> Path:
    """The directory of the GPU locks (made if missing); see the module's doc."""
    override = os.environ.get(ENV_LOCK_DIR)
    if override:
        path = Path(override).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable")
        except OSError as exc:
            raise MlcJitError(
                f"{ENV_LOCK_DIR}={override}: cannot use {path} as the GPU lock directory: "
                f"{exc.strerror or exc}; point {ENV_LOCK_DIR} at a directory you can "
                "write to (the same one for every test process that shares the GPUs)"
            ) from None
        return path
    temp = Path(tempfile.gettempdir())
    shared = temp / LOCK_DIR_NAME
    if _shared_dir(shared):
        return shared
    own = temp / f"{LOCK_DIR_NAME}-{os.getuid()}"
    with contextlib.suppress(OSError):
        own.mkdir(mode=0o700, exist_ok=True)
    if _usable(own):
        return own
    raise MlcJitError(
        f"cannot use {shared} (shared GPU lock directory) nor {own} (this user's) as the "
        f"GPU lock directory: neither can be made or written; set {ENV_LOCK_DIR} to a "
        "directory you can write to (the same one for every test process that shares the "
        "GPUs)")


def lock_name(device: Device | None) -> str:
    """``gpu.lock`` for GPU 0 or a device without an index (TVM's), ``gpu-<i>.lock``
    for GPU ``i > 0``."""
    index = device.index if device is not None else 0
    return "gpu.lock" if index == 0 else f"gpu-{index}.lock"


def lock_path(device: Device | None = None) -> Path:
    """The lock file of ``device``'s GPU (None: GPU 0, TVM's ``gpu.lock``), in
    :func:`lock_dir` (made if missing)."""
    return lock_dir() / lock_name(device)


def owner_path(lock: Path) -> Path:
    return lock.with_name(lock.name + ".owner")


# -- who holds it -------------------------------------------------------------------------
def _flock_holders(lock: Path) -> list[int] | None:
    """The pids holding a ``flock`` on ``lock``, from ``/proc/locks`` (None: not known,
    no ``/proc/locks`` or no lock file)."""
    try:
        st = os.stat(lock)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5] == where and fields[4].isdigit():
            pids.append(int(fields[4]))
    return pids


def holder(lock: Path) -> dict[str, Any] | None:
    """Who holds ``lock`` now, as well as can be told: its owner record (pid, host,
    worker, run_id, test) when its holder wrote one, else ``{"pid": …}`` from
    ``/proc/locks`` (a TVM-style holder), else None (not held, or not known)."""
    pids = _flock_holders(lock)
    record: Any = None
    with contextlib.suppress(OSError, ValueError), open(owner_path(lock), "rb") as f:
        record = json.loads(f.read(OWNER_BYTES))
    # A record left by a holder that died (the kernel released its lock) is ignored.
    if isinstance(record, dict) and isinstance(record.get("pid"), int) and (
            pids is None or record.get("host") != socket.gethostname()
            or record["pid"] in pids):
        return record
    return {"pid": pids[0]} if pids else None


def describe_holder(record: Mapping[str, Any] | None, run_id: str | None = None) -> str:
    """``held by gw3``; ``held by gw3 of another pytest run (pid 42)``; ``held by pid 42``
    (a TVM-style holder); ``holder unknown``."""
    if record is None:
        return "holder unknown"
    worker = record.get("worker")
    if not worker:
        return f"held by pid {record.get('pid')}"
    if run_id is not None and record.get("run_id") not in (None, run_id):
        return f"held by {worker} of another pytest run (pid {record.get('pid')})"
    return f"held by {worker}"


# -- taking it ------------------------------------------------------------------------------
@dataclasses.dataclass
class _Held:
    """This process's hold of one lock file."""

    turn: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    depth: int = 0
    fd: int | None = None


_held: dict[str, _Held] = {}
_held_lock = threading.Lock()


def _forget_in_child() -> None:
    """A forked child holds none of its parent's locks (its copy of the descriptor would
    keep the parent's lock held after the parent released or died)."""
    for held in _held.values():
        if held.fd is not None:
            with contextlib.suppress(OSError):
                os.close(held.fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _open(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except PermissionError:  # another user's file: a read-only descriptor locks as well
        try:
            return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except PermissionError as exc:
            raise MlcJitError(
                f"cannot open the GPU lock {path} ({exc.strerror}; it is another user's): "
                f"set {ENV_LOCK_DIR} to a directory of your own, or ask its owner to make "
                "it readable") from None
    with contextlib.suppress(OSError):  # ours: every user may take it (umask or not)
        if os.fstat(fd).st_uid == os.getuid() and stat.S_IMODE(os.fstat(fd).st_mode) != 0o666:
            os.fchmod(fd, 0o666)
    return fd


class GpuLock:
    """The lock of one GPU's file: :meth:`try_acquire`, :meth:`acquire`, :meth:`release`
    (re-entrant in a process; see the module's doc). ``owner``: what the owner record
    says besides pid, host and since (``worker``, ``run_id``, ``test``)."""

    def __init__(self, path: Path, owner: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.owner = dict(owner or {})
        with _held_lock:
            self._held = _held.setdefault(str(self.path), _Held())

    def try_acquire(self) -> bool:
        """Take the lock if it is free now (or this process holds it already)."""
        if not self._held.turn.acquire(blocking=False):
            return False
        try:
            taken = bool(self._held.depth) or self._flock(blocking=False)
        except BaseException:
            self._held.turn.release()
            raise
        if taken:
            self._held.depth += 1
            return True
        self._held.turn.release()
        return False

    def acquire(self, poll_s: float = POLL_S) -> None:
        """Take the lock, waiting for it as long as it takes."""
        self._held.turn.acquire()
        try:
            if not self._held.depth:
                self._flock(blocking=True, poll_s=poll_s)
        except BaseException:
            self._held.turn.release()
            raise
        self._held.depth += 1

    def _flock(self, *, blocking: bool, poll_s: float = POLL_S) -> bool:
        fd = _open(self.path)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not blocking:
                        os.close(fd)
                        return False
                    time.sleep(poll_s)
        except BaseException:
            os.close(fd)
            raise
        self._held.fd = fd
        self._write_owner()
        return True

    def _write_owner(self) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  **self.owner}
        target = owner_path(self.path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):  # best effort: it only words messages
            tmp.write_text(json.dumps(record), encoding="utf-8")
            try:
                os.replace(tmp, target)
            except OSError:  # another user's record in a sticky directory
                tmp.unlink()

    def release(self) -> None:
        held = self._held
        held.depth -= 1
        if not held.depth and held.fd is not None:
            with contextlib.suppress(OSError):
                owner_path(self.path).unlink()
            with contextlib.suppress(OSError):
                fcntl.flock(held.fd, fcntl.LOCK_UN)
            os.close(held.fd)
            held.fd = None
        held.turn.release()

    @property
    def depth(self) -> int:
        """How many times this process holds it now (nested holds)."""
        return self._held.depth

    @property
    def held(self) -> bool:
        """Whether this process holds it (in any thread)."""
        return self._held.fd is not None


@contextlib.contextmanager
def gpu_lock(device: Device | str | None = None, *, owner: Mapping[str, Any] | None = None,
             waiting: Callable[[GpuLock], contextlib.AbstractContextManager[Any]] | None = None
             ) -> Iterator[GpuLock]:
    """Hold the lock of ``device``'s GPU (``cuda:1``, a :class:`Device`; None: GPU 0,
    TVM's ``gpu.lock``) for the block: the same ``flock`` on the same file as
    ``tvm.testing.run_with_gpu_lock``. ``waiting``, if given, is entered around the wait
    when the lock is not free at once (the plugin shows the wait with it)."""
    if isinstance(device, str):
        device = Device.parse(device)
    lock = GpuLock(lock_path(device), owner)
    if not lock.try_acquire():
        with waiting(lock) if waiting is not None else contextlib.nullcontext():
            lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
