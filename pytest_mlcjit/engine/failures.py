"""What a failed compile says: the last lines of its log, and whether it ran out of disk
space (then it is not remembered as the config's failure: freeing space fixes it)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from pytest_mlcjit.cache.store.interface import Corrupt, Lookup, Missing, Stale, why_not
from pytest_mlcjit.errors import CompileError

#: Lines of the compile log a failure's message keeps.
LOG_TAIL_LINES = 20


def read_end(path: str | os.PathLike[str], limit: int) -> str | None:
    """The last ``limit`` bytes of a file as text, or None when it cannot be read: what is
    shown of a log stays small, however much the compiler printed."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, limit: int = 8192) -> str:
    """The last ``lines`` lines of a log, at most its last ``limit`` bytes (a failure
    record and its message stay small)."""
    text = read_end(path, limit)
    if text is None:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def ran_out_of_space(root: Path, log: Path) -> str | None:
    """Why a failed compile looks like a full disk (its log says so, or the cache's
    filesystem has no space left), else None."""
    text = read_end(log, 1 << 16) or ""
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in text:
            return f"its log says {os.strerror(code)!r}"
    try:
        st = os.statvfs(root)
        full = st.f_bavail == 0 and st.f_blocks > 0  # some FUSE mounts report 0 of 0
    except OSError:
        full = False
    return "the cache's filesystem has no space left" if full else None


def no_space(model: str, root: Path, why: str, log: Path | None = None) -> CompileError:
    """The error of a compile that ran out of disk space: where the space is missing."""
    try:
        st = os.statvfs(root)
        free = st.f_bavail * st.f_frsize
    except OSError:
        where = f"the cache's filesystem ({root}) or the temporary directory (TMPDIR)"
    else:
        where = (f"the cache's filesystem ({root}) is full ({free // 1024} KiB free)"
                 if free < 2**20 * 64 else
                 f"the cache's filesystem ({root}) has {free / 2**30:.1f} GiB free, so "
                 "the compiler's temporary directory (TMPDIR) may be what is full")
    detail = f" ({why})" if why else ""
    return CompileError(
        model=model, cause=f"ran out of disk space{detail}; nothing was published: {where}. "
        "Free space or prune the cache (pytest-mlcjit prune).",
        log_tail=log_tail(log) if log is not None else None)


def readonly_miss(describe: str, digest: str, root: Path, found: Lookup) -> str:
    """Why READONLY found no usable library for a key, and what to do."""
    if isinstance(found, Missing):
        head, detail = "no cached library", ""
    elif isinstance(found, Stale | Corrupt):
        kind = "stale" if isinstance(found, Stale) else "corrupt"
        head, detail = f"the cached library is {kind}", f" ({found.reason})"
    else:
        head, detail = f"the cached library is not usable ({why_not(found)})", ""
    return (
        f"{head} for key {digest} ({describe}) in {root}{detail}, and the policy is "
        "READONLY, which never compiles or repairs; warm the cache first (pytest "
        "--mlc-jit-prepare, or a run with --mlc-jit-policy=ON)"
    )
