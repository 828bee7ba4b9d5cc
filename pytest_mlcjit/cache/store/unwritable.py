"""A cache directory that cannot be written (a read-only mount, a restored cache without
write permission) under a policy that writes (ON, REDO).

Hits need no write, so they are served as READONLY serves them: no lock, no usage stamp, no
record, a remote's download kept in the run's private directory. Only a request that would
have to compile fails, saying that the directory is not writable and what to do. The run's
end writes no history into it and says once that the cache was read-only
(:mod:`pytest_mlcjit.plugin.after_run`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from pytest_mlcjit._util.fs import DIR_MODE
from pytest_mlcjit.cache import layout
from pytest_mlcjit.cache.store.interface import Store
from pytest_mlcjit.cache.store.readonly import ReadOnlyStore
from pytest_mlcjit.errors import MlcJitError, UntrustedCacheError


def not_writable(root: Path, reason: str | None, what: str = "") -> str:
    """The message of a cache directory that cannot be written (``what``: the request that
    would have had to compile into it)."""
    because = f" ({reason})" if reason else ""
    needs = (f": {what} has no usable entry there (or the policy is REDO), and compiling it "
             "would write there") if what else ""
    return (f"cache directory {root} is not writable{because}{needs}; choose another with "
            "--mlc-jit-cache-dir, or use --mlc-jit-policy=READONLY")


def writable_reason(path: Path) -> str | None:
    """Why ``path`` (a directory) cannot be written by this process, or None when it can."""
    if os.access(path, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return os.strerror(errno.EROFS if read_only else errno.EACCES)


def prepare_root(root: Path, control: Path, check_trusted: Callable[[], None]) -> str | None:
    """Make a cache root and its control directories, checking that they can be trusted
    (``check_trusted``, before anything is written; UntrustedCacheError) and written: None
    when they can, else why not (:func:`not_writable`'s reason)."""
    try:
        root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        check_trusted()  # before writing anything into it
        control.mkdir(mode=DIR_MODE, exist_ok=True)
        for sub in layout.CONTROL_SUBDIRS:
            (control / sub).mkdir(mode=DIR_MODE, exist_ok=True)
    except UntrustedCacheError:
        raise
    except OSError as exc:
        return exc.strerror or str(exc)
    if (reason := writable_reason(control)) is not None:
        return reason
    check_trusted()
    return None


class UnwritableStore(ReadOnlyStore):
    """The store of a cache directory that cannot be written, for a policy that writes:
    lookups and downloads as :class:`ReadOnlyStore` answers them; what only a compile
    needs (a lock, a staging directory, a publish) fails with :func:`not_writable`."""

    def __init__(self, inner: Store, reason: str | None) -> None:
        super().__init__(inner)
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnwritableStore({self.inner!r})"

    def _refuse(self, what: str) -> Exception:
        return MlcJitError(not_writable(self.root, self.reason))

    @contextlib.contextmanager
    def lock(self, digest: str, timeout: float, what: str = "", *,
             cancelled: threading.Event | None = None) -> Iterator[float]:
        raise MlcJitError(not_writable(self.root, self.reason, what))
        yield 0.0  # pragma: no cover - never reached
