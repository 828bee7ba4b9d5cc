"""The on-disk cache: layout, manifests, checksums, locks, staging and atomic publish.

Layout under a root (nothing in it holds an absolute path or depends on mtimes, so a
cache can be tarred and restored anywhere)::

    <root>/tvm/<digest>.so                  a library (MLC entries: <root>/model_lib/<md5>.<suffix>)
    <root>/tvm/<digest>.manifest.json       written last: full key, sha256, size, toolchain…
    <root>/tvm/<digest>.log                 the compile log
    <root>/.mlcjit/locks/<digest>.lock      flock()-based, released by the kernel on death
    <root>/.mlcjit/locks/<digest>.owner     who holds it (pid, host, since), for error messages
    <root>/.mlcjit/staging/…                per-compile scratch dirs on the cache's filesystem
    <root>/.mlcjit/failed/<digest>.json     a failure, remembered for the rest of its run
    <root>/.mlcjit/usage/<digest>           last-used time, kept by the cache (not atime)
    <root>/.mlcjit/quarantine/…             corrupt entries moved aside

This module knows nothing of TVM or pytest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import secrets
import shutil
import re
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import (
    ConfigError,
    CorruptEntryError,
    LockTimeoutError,
    MlcJitError,
    UntrustedCacheError,
)
from .key import file_sha256

CONTROL_DIR = ".mlcjit"
MANIFEST_SUFFIX = ".manifest.json"
#: A staging directory older than this whose owner cannot be checked is an orphan.
STAGING_MAX_AGE_S = 24 * 3600.0
#: Directories and files the cache creates: never writable by group or others, whatever the
#: umask (a root it made itself must pass its own trust check).
DIR_MODE = 0o755
FILE_MODE = 0o644
#: Entry digests: hex SHA-256 (TVM) or MD5 (MLC-compatible). Every name the cache derives
#: from a key is built from one, so no spec, override or config value reaches a path.
_DIGEST_RE = re.compile(r"[0-9a-f]{32}|[0-9a-f]{64}")
_SIMPLE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

#: Test-only fault injection (docs/reliability.md), off unless these are set in the
#: environment. ``MLCJIT_TEST_PAUSE=SECONDS``: at each named point of a compile, announce
#: ``mlcjit-test-point <name> <pid>`` on stderr and sleep, so a test can SIGKILL the process
#: inside that window. ``MLCJIT_TEST_ENOSPC=<name>``: raise ENOSPC at that point.
TEST_PAUSE_ENV = "MLCJIT_TEST_PAUSE"
TEST_ENOSPC_ENV = "MLCJIT_TEST_ENOSPC"


def fault_point(name: str) -> None:
    """A named point of a compile where tests may pause or inject ENOSPC (off by default)."""
    pause = os.environ.get(TEST_PAUSE_ENV)
    if pause:
        sys.stderr.write(f"mlcjit-test-point {name} {os.getpid()}\n")
        sys.stderr.flush()
        time.sleep(float(pause))
    if os.environ.get(TEST_ENOSPC_ENV) == name:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {name})")


def check_digest(digest: str) -> str:
    """``digest`` if it is a hex SHA-256 or MD5, else ConfigError (it names files)."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ConfigError(f"invalid cache key digest {digest!r}: expected 32 or 64 lowercase "
                          "hex digits")
    return digest


@dataclasses.dataclass(frozen=True)
class EntryPaths:
    """Where one entry's files live."""

    digest: str
    library: Path

    @property
    def stem(self) -> Path:
        return self.library.with_suffix("")

    @property
    def manifest(self) -> Path:
        return self.library.parent / (self.library.name.rsplit(".", 1)[0] + MANIFEST_SUFFIX)

    @property
    def log(self) -> Path:
        return self.library.parent / (self.library.name.rsplit(".", 1)[0] + ".log")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_tmp(path: Path, data: Any) -> Path:
    """Write JSON to a new temp file beside ``path`` and fsync it; returns the temp file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` all at once: a temp file in the same dir, fsync, rename."""
    tmp = _write_json_tmp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Cache:
    """One cache root. ``writable=False`` (READONLY) never creates, locks or writes anything."""

    def __init__(self, root: str | os.PathLike[str], *, writable: bool,
                 allow_untrusted: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        self.writable = writable
        self.control = self.root / CONTROL_DIR
        self._verified: dict[Path, tuple[int, int, int, str]] = {}
        self._used: set[str] = set()
        if writable:
            self._make_root()
        if self.root.exists() and not allow_untrusted:
            self.check_trusted()

    # -- set-up and trust --------------------------------------------------------------
    def _make_root(self) -> None:
        try:
            for sub in ("locks", "staging", "failed", "usage", "quarantine"):
                (self.control / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MlcJitError(
                f"cache directory {self.root} is not writable ({exc.strerror}); "
                "choose another with --mlc-jit-cache-dir, or use --mlc-jit-policy=READONLY"
            ) from None
        if not os.access(self.control, os.W_OK | os.X_OK):
            raise MlcJitError(
                f"cache directory {self.root} is not writable; choose another with "
                "--mlc-jit-cache-dir, or use --mlc-jit-policy=READONLY"
            )

    def check_trusted(self) -> None:
        """Refuse a root that other users can write to (loading a library runs its code)."""
        st = self.root.stat()
        if hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0):
            raise UntrustedCacheError(
                f"cache directory {self.root} is owned by uid {st.st_uid}, not by you "
                f"(uid {os.getuid()}); loading its libraries would run their code. "
                "Pass --mlc-jit-allow-untrusted-cache if you trust it."
            )
        others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if others_write and not st.st_mode & stat.S_ISVTX:
            raise UntrustedCacheError(
                f"cache directory {self.root} is writable by other users "
                f"(mode {stat.filemode(st.st_mode)}); loading its libraries would run their "
                "code. Fix its permissions (chmod go-w) or pass --mlc-jit-allow-untrusted-cache."
            )

    # -- reading -----------------------------------------------------------------------
    def read_manifest(self, paths: EntryPaths) -> dict[str, Any] | None:
        """The entry's manifest, None if absent; CorruptEntryError if it is not valid JSON."""
        try:
            text = paths.manifest.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise CorruptEntryError(f"manifest {paths.manifest} is not valid JSON") from None
        if not isinstance(data, dict) or not {"sha256", "size", "digest"} <= data.keys():
            raise CorruptEntryError(f"manifest {paths.manifest} lacks sha256/size/digest")
        if data["digest"] != paths.digest:
            raise CorruptEntryError(
                f"manifest {paths.manifest} is for key {data['digest']}, not {paths.digest}"
            )
        return data

    def verify(self, paths: EntryPaths, manifest: dict[str, Any]) -> None:
        """Check the library's size and SHA-256 against its manifest.

        The checksum is computed on the first read in this process and again only if the
        file's identity (inode, size, mtime) changes; a mismatch raises CorruptEntryError.
        """
        try:
            st = paths.library.stat()
        except FileNotFoundError:
            raise CorruptEntryError(
                f"library {paths.library} is missing although its manifest exists"
            ) from None
        ident = (st.st_ino, st.st_size, st.st_mtime_ns)
        seen = self._verified.get(paths.library)
        if seen is not None and seen[:3] == ident and seen[3] == manifest["sha256"]:
            return
        if st.st_size != manifest["size"]:
            raise CorruptEntryError(
                f"library {paths.library} is corrupt: {st.st_size} bytes, manifest says "
                f"{manifest['size']}"
            )
        actual = file_sha256(paths.library)
        if actual != manifest["sha256"]:
            raise CorruptEntryError(
                f"library {paths.library} is corrupt: sha256 {actual[:16]}…, manifest says "
                f"{str(manifest['sha256'])[:16]}…"
            )
        self._verified[paths.library] = (*ident, actual)

    def is_verified(self, paths: EntryPaths) -> bool:
        """Whether the library was verified in this process and is unchanged since (one stat)."""
        seen = self._verified.get(paths.library)
        if seen is None:
            return False
        try:
            st = paths.library.stat()
        except FileNotFoundError:
            return False
        return seen[:3] == (st.st_ino, st.st_size, st.st_mtime_ns)

    # -- locking -------------------------------------------------------------------------
    def lock_path(self, digest: str) -> Path:
        return self.control / "locks" / f"{digest}.lock"

    @contextlib.contextmanager
    def lock(self, digest: str, timeout: float, what: str = "") -> Iterator[float]:
        """Hold the key's lock; yields the seconds spent waiting for it.

        The lock is an ``flock`` (via :class:`filelock.FileLock`): the kernel releases it
        when its holder dies, so a killed compiler never blocks the next one.
        """
        from filelock import FileLock, Timeout

        assert self.writable, "READONLY caches take no locks"
        lock = FileLock(self.lock_path(digest), timeout=timeout, thread_local=False)
        owner = self.control / "locks" / f"{digest}.owner"
        start = time.monotonic()
        try:
            lock.acquire()
        except Timeout:
            raise LockTimeoutError(self._lock_timeout_message(digest, timeout, what)) from None
        waited = time.monotonic() - start
        try:
            with contextlib.suppress(OSError):
                write_json_atomic(owner, {"pid": os.getpid(), "host": socket.gethostname(),
                                          "since": time.time()})
            yield waited
        finally:
            with contextlib.suppress(OSError):
                owner.unlink()
            lock.release()

    def _lock_timeout_message(self, digest: str, timeout: float, what: str) -> str:
        owner = self.control / "locks" / f"{digest}.owner"
        try:
            info = json.loads(owner.read_text(encoding="utf-8"))
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
            held = (f"held by pid {info['pid']} on {info['host']} since {since} "
                    f"({time.time() - info['since']:.0f}s ago)")
        except (OSError, ValueError, KeyError, TypeError):
            held = "holder unknown"
        return (f"timed out after {timeout:g}s waiting for the lock of key {digest}"
                f"{' (' + what + ')' if what else ''}: {held}; raise --mlc-jit-lock-timeout "
                "or check that process")

    # -- writing -------------------------------------------------------------------------
    def new_staging_dir(self, digest: str, parent: Path | None = None) -> Path:
        """A fresh scratch directory on the cache's filesystem, named after its owner.

        ``parent`` (default ``.mlcjit/staging``) must be on the cache's filesystem, so that
        publishing is an atomic rename.
        """
        name = f"{digest[:32]}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        path = (parent or self.control / "staging") / name
        path.mkdir(parents=True)
        return path

    def publish(self, staging_library: Path, staging_log: Path | None, paths: EntryPaths,
                manifest: dict[str, Any]) -> dict[str, Any]:
        """Move a compiled library into place atomically, the manifest last.

        Call with the key's lock held. Any old manifest is removed first, so a concurrent
        reader sees either the old complete entry, no entry, or the new complete entry.
        Returns the manifest as written (with ``sha256`` and ``size`` filled in).
        """
        st = staging_library.stat()
        manifest = {**manifest, "digest": paths.digest, "library": paths.library.name,
                    "sha256": file_sha256(staging_library), "size": st.st_size,
                    "log": paths.log.name}
        with open(staging_library, "rb+") as f:
            os.fsync(f.fileno())
        paths.library.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            paths.manifest.unlink()
        os.replace(staging_library, paths.library)
        if staging_log is not None and staging_log.exists():
            os.replace(staging_log, paths.log)
        write_json_atomic(paths.manifest, manifest)
        _fsync_dir(paths.library.parent)
        return manifest

    def quarantine(self, paths: EntryPaths, reason: str) -> Path | None:
        """Move a corrupt entry's files aside (under the lock); returns where, if anything moved."""
        stamp = f"{int(time.time())}.{secrets.token_hex(2)}"
        dest = self.control / "quarantine" / f"{paths.digest}.{stamp}"
        moved = False
        for src in (paths.library, paths.manifest, paths.log):
            if src.exists():
                dest.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest / src.name)
                moved = True
        if moved:
            (dest / "REASON").write_text(reason + "\n", encoding="utf-8")
        self._verified.pop(paths.library, None)
        return dest if moved else None

    def record_use(self, digest: str) -> None:
        """Note that ``digest`` was used now (once per process; never under READONLY)."""
        if not self.writable or digest in self._used:
            return
        self._used.add(digest)
        with contextlib.suppress(OSError):
            (self.control / "usage" / digest).write_text(f"{time.time():.3f}\n", encoding="ascii")

    def last_used(self, digest: str) -> float | None:
        try:
            return float((self.control / "usage" / digest).read_text(encoding="ascii"))
        except (OSError, ValueError):
            return None

    # -- failures remembered within a run ------------------------------------------------
    def failure_paths(self, digest: str) -> tuple[Path, Path]:
        base = self.control / "failed" / digest
        return base.with_suffix(".json"), base.with_suffix(".log")

    def record_failure(self, digest: str, run_id: str, message: str) -> None:
        record, _ = self.failure_paths(digest)
        write_json_atomic(record, {"run_id": run_id, "message": message, "time": time.time()})

    def read_failure(self, digest: str, run_id: str) -> str | None:
        """The failure message recorded for ``digest`` in this run, if any."""
        record, _ = self.failure_paths(digest)
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return str(data["message"]) if data.get("run_id") == run_id else None

    # -- housekeeping --------------------------------------------------------------------
    def clean_staging(self, *, max_age: float = STAGING_MAX_AGE_S) -> list[Path]:
        """Remove orphaned staging dirs: a dead owner on this host, or older than ``max_age``."""
        removed: list[Path] = []
        staging = self.control / "staging"
        if not self.writable or not staging.is_dir():
            return removed
        host = socket.gethostname()
        now = time.time()
        for path in staging.iterdir():
            parts = path.name.split(".")
            try:
                pid = int(parts[-2])
                owner_host = ".".join(parts[1:-2])
                age = now - path.stat().st_mtime
            except (ValueError, IndexError, OSError):
                continue
            dead = owner_host == host and not _pid_alive(pid)
            if dead or age > max_age:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a full-disk (or quota) error."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
