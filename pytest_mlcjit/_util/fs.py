"""File-system primitives the cache is built on: atomic JSON writes, directory fsync,
best-effort writes that warn instead of failing silently (:class:`WriteWarnings`, one per
run), and test fault injection. Only the standard library is imported here."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.jsonsafe import MAX_JSON_BYTES, loads_bounded

#: Directories and files the cache creates: never writable by group or others, whatever the
#: umask (a root it made itself must pass its own trust check).
DIR_MODE = 0o755
FILE_MODE = 0o644

#: Test-only fault injection (docs/explanation/reliability.md), off unless these are set in the
#: environment. ``MLCJIT_TEST_PAUSE=SECONDS``: at each named point of a compile, announce
#: ``mlcjit-test-point <name> <pid>`` on stderr and sleep, so a test can SIGKILL the process
#: inside that window. ``MLCJIT_TEST_STOP=<name>``: announce each point the same way, and
#: stop (SIGSTOP) at that one, so the kill lands exactly there. ``MLCJIT_TEST_ENOSPC=<name>``:
#: raise ENOSPC at that point.
TEST_PAUSE_ENV = "MLCJIT_TEST_PAUSE"
TEST_STOP_ENV = "MLCJIT_TEST_STOP"
TEST_ENOSPC_ENV = "MLCJIT_TEST_ENOSPC"

log = logging.getLogger("pytest_mlcjit")


def fault_point(name: str) -> None:
    """A named point of a compile where tests may pause, stop or inject ENOSPC (off by
    default)."""
    pause, stop = os.environ.get(TEST_PAUSE_ENV), os.environ.get(TEST_STOP_ENV)
    if pause or stop:
        sys.stderr.write(f"mlcjit-test-point {name} {os.getpid()}\n")
        sys.stderr.flush()
        if stop == name:
            os.kill(os.getpid(), signal.SIGSTOP)
        elif pause:
            time.sleep(float(pause))
    if os.environ.get(TEST_ENOSPC_ENV) == name:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {name})")


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a full-disk (or quota) error."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_temp(path: Path, chunks: Iterable[bytes]) -> tuple[Path, str]:
    """Write ``chunks`` to a new temp file beside ``path`` (a name no other writer can
    take) and fsync it; ``(the temp file, the SHA-256 of what was written)``. Nothing is
    left behind if writing fails or is interrupted."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    h = hashlib.sha256()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with open(fd, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp, h.hexdigest()


def read_json(path: str | os.PathLike[str], limit: int = MAX_JSON_BYTES) -> Any:
    """A small JSON file's content, or None when it is absent, unreadable, larger than
    ``limit`` bytes, or junk (:func:`.jsonsafe.loads_bounded`: not UTF-8 JSON, or nested
    too deep): a record the cache keeps beside its entries is then treated as absent,
    never as a crash."""
    try:
        with open(path, "rb") as f:
            return loads_bounded(f.read(limit + 1), max_bytes=limit)
    except (OSError, ValueError):
        return None


def write_json_tmp(path: Path, data: Any) -> Path:
    """Write JSON to a new temp file beside ``path`` and fsync it; returns the temp file."""
    text = json.dumps(data, indent=1, sort_keys=True)
    return write_temp(path, [text.encode("utf-8")])[0]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` all at once: a temp file in the same dir, fsync, rename."""
    tmp = write_json_tmp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# -- best-effort writes -----------------------------------------------------------------------
Emit = Callable[[str], None]


def _log_warning(message: str) -> None:
    log.warning(message)


class WriteWarnings:
    """Says, once per path, that a write the cache can do without (a usage stamp, the run
    history, a cleanup) failed, and carries on.

    One belongs to each run (the engine's), so that a second run in the same process
    warns again. ``emit`` shows a message: the plugin's gives a ``PytestWarning`` (as
    pytest's cacheprovider does), the default logs it. Thread-safe; never raises.
    """

    def __init__(self, emit: Emit | None = None) -> None:
        self.emit: Emit = emit or _log_warning
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def failed(self, path: str | os.PathLike[str], what: str, exc: OSError) -> None:
        """Report that writing ``path`` (to ``what``) failed with ``exc``, once per path."""
        name = os.fspath(path)
        with self._lock:
            if name in self._warned:
                return
            self._warned.add(name)
        message = (f"pytest-mlcjit could not {what} {name}: "
                   f"{exc.strerror or exc} (errno {exc.errno}); carrying on without it")
        try:
            self.emit(message)
        except Warning:
            # A filter of "error" (the strictest test configs) must not turn a convenience
            # into a failed test: then the warning is logged instead.
            log.warning(message)

    @contextlib.contextmanager
    def best_effort(self, path: str | os.PathLike[str], what: str) -> Iterator[None]:
        """Run a write the cache can do without; an OSError is reported, not raised."""
        try:
            yield
        except OSError as exc:
            self.failed(path, what, exc)

    def remove_tree(self, path: Path) -> None:
        """Remove a directory tree the cache no longer needs; a part that cannot be removed
        is reported (once per path), the rest goes."""

        def report(_func: Any, failed: str, exc: BaseException) -> None:
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                self.failed(failed, "remove", exc)

        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=report)
        else:
            shutil.rmtree(path, onerror=lambda f, p, info: report(f, p, info[1]))
