"""What a failed compile says: the last lines of its log, whether it ran out of disk
space or memory (then it is not remembered as the config's failure: freeing space or
memory fixes it), and when a failure outlives its run (:func:`failure_verdict`,
:func:`known_failure`)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache.store.interface import (
    Corrupt,
    EntryQuery,
    KnownFailure,
    Lookup,
    Missing,
    Stale,
    Store,
    why_not,
)
from pytest_mlcjit.errors import CompileError
from pytest_mlcjit.inputs.check import InputChecker, changes_since

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


def readonly_miss(describe: str, digest: str, root: Path, found: Lookup,
                  fetched: Lookup | None = None) -> str:
    """Why READONLY found no usable library for a key, and what to do: first a remote
    entry that was refused (``fetched``: what the further tiers answered), with the
    refusal and its fix, rather than "no cached library"."""
    if isinstance(fetched, Missing) and fetched.refused:
        return (f"the remote's library for key {digest} ({describe}) was refused: "
                f"{fetched.refused}. {refusal_fix(fetched.refused)} The policy is READONLY, "
                "which never compiles or repairs")
    if (missing := missing_cache(root)) is not None:
        return f"no cached library for key {digest} ({describe}): {missing}"
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


#: A refusal's kind, by what the remote tier said (its words: :mod:`..cache.store.tiered`,
#: :mod:`..cache.store.remote.signing`): the first that matches gives the fix.
_BAD_BYTES_FIX = ("a job that writes sets the entry aside (quarantine/ on the remote); "
                  "rebuild it there (a run with --mlc-jit-policy=ON compiles and uploads a "
                  "good one; pytest-mlcjit remote verify lists the bad entries).")
_REFUSAL_FIXES = (
    (("supersed",), "A newer entry replaced it: publish the current library again from a "
     "trusted writer (a run with --mlc-jit-policy=ON there)."),
    (("load check",), "Its library does not load, or lacks a function its manifest "
     "records: " + _BAD_BYTES_FIX),
    (("is corrupt", "is missing", "sha256"), "The library on the remote is not the one its "
     "manifest names: " + _BAD_BYTES_FIX),
    (("unsigned", "signature", "signed"), "Only entries signed by a trusted key are "
     "loaded: publish it again from a job that signs with a trusted key (a run with "
     "--mlc-jit-policy=REDO there replaces it), or, if you trust its signer, add that "
     "signer's public key to MLC_JIT_REMOTE_TRUSTED_KEYS (with HMAC, use the writer's "
     "MLC_JIT_REMOTE_SIGNING_KEY)."),
    ((), "The entry is not usable here: publish it again from a trusted writer (a run with "
     "--mlc-jit-policy=ON there); pytest-mlcjit remote verify lists the bad entries."),
)


def refusal_fix(refused: str) -> str:
    """What to do about a refused remote entry (``refused``: why it was refused)."""
    text = refused.lower()
    return next(fix for words, fix in _REFUSAL_FIXES
                if not words or any(word in text for word in words))


def missing_cache(root: Path) -> str | None:
    """Why READONLY cannot read ``root`` at all: it does not exist (a typo in a path, a
    cache that was not restored), else None."""
    if os.path.lexists(root):
        return None
    return (f"cache directory {root} does not exist (and a remote, if one is set, has no "
            "entry that fits), and the policy is READONLY, which reads an existing cache "
            "and never makes one: check the path (--mlc-jit-cache-dir, "
            "MLC_JIT_CACHE_DIR), or warm a cache there first (pytest --mlc-jit-prepare, or a "
            "run with --mlc-jit-policy=ON)")


# -- which failures outlive their run -------------------------------------------------------------
#: What TVM, CUDA, ROCm, Vulkan, the C++ allocator, the C library and Python say when memory
#: runs out: a failure that says so is never remembered past its run (another moment, or
#: another process's memory freed, fixes it).
OUT_OF_MEMORY = re.compile(
    r"out[ _-]?of[ _-]?(?:device[ _-]?|host[ _-]?|gpu[ _-]?)?memory"  # CUDA_ERROR_OUT_OF_MEMORY
    r"|MemoryAllocation"  # cudaErrorMemoryAllocation
    r"|\bMemoryError\b|bad_alloc|failed to allocate|cannot allocate memory|(?-i:\bOOM\b)",
    re.IGNORECASE)


def out_of_memory(*texts: str | None) -> bool:
    """Whether any of ``texts`` (an error, a log's tail) says that memory ran out."""
    return any(text and OUT_OF_MEMORY.search(text) for text in texts)


def still_holds(failure: KnownFailure, base: Path, checker: InputChecker) -> bool:
    """Whether nothing a recorded failure depends on changed: its recorded inputs (modules,
    files, and what else the compile recorded) are unchanged, and the files it tried to read
    and did not find are still absent."""
    if changes_since(failure.inputs, base, checker) != []:  # changed, or malformed
        return False
    return not any(os.path.lexists(os.path.join(base, path)) for path in failure.missing)


def known_failure(store: Store, query: EntryQuery, checker: InputChecker) -> CompileError | None:
    """The error of the key's *known failure*, if it has one that still holds: the factory
    or the compiler raised the same error in :data:`.interface.KNOWN_AFTER` compiles in a
    row of this key and input state (deterministic), it is no out-of-memory, and nothing it
    depends on changed since (:func:`still_holds`)."""
    found = store.read_failure_verdict(query.digest)
    base = query.inputs_base()
    if found is None or not found.known or base is None or out_of_memory(found.what):
        return None
    return found.error if still_holds(found, base, checker) else None


def failure_verdict(account: Mapping[str, Any] | None, log: Path, prior: KnownFailure | None,
                    base: Path | None, checker: InputChecker) -> dict[str, Any] | None:
    """What to record of a failed compile for later runs: None when it cannot outlive its
    run (the compile gave no account of it, its inputs are not recorded or incomplete, or
    it ran out of memory); else the compile's ``account`` (``{"error", "inputs",
    "missing"}``) with ``seen``: one more than the ``prior`` verdict's when that one is the
    same error and still holds (the same key and inputs), else 1 (seen once)."""
    if account is None or base is None:
        return None
    inputs = account.get("inputs")
    if not isinstance(inputs, Mapping) or inputs.get("incomplete"):
        return None  # what it ran (a tool, a worker) is no input: fixing it is not seen
    what = str(account.get("error", ""))
    if out_of_memory(what, log_tail(log)):
        return None
    same = prior is not None and prior.what == what and still_holds(prior, base, checker)
    return {**account, "seen": prior.seen + 1 if same and prior is not None else 1}
