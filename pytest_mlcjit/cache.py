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
import fcntl
import json
import os
import re
import secrets
import shutil
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
_STAGING_NAME_RE = re.compile(r"[0-9a-f]{32}\.[^/]+\.[0-9]+\.[0-9a-f]{8}")
_SIMPLE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

#: Test-only fault injection (docs/reliability.md), off unless these are set in the
#: environment. ``MLCJIT_TEST_PAUSE=SECONDS``: at each named point of a compile, announce
#: ``mlcjit-test-point <name> <pid>`` on stderr and sleep, so a test can SIGKILL the process
#: inside that window. ``MLCJIT_TEST_ENOSPC=<name>``: raise ENOSPC at that point.
TEST_PAUSE_ENV = "MLCJIT_TEST_PAUSE"
TEST_ENOSPC_ENV = "MLCJIT_TEST_ENOSPC"


def lock_file(root: str | os.PathLike[str], digest: str) -> str:
    """``<root>/.mlcjit/locks/<digest>.lock``: the file whose ``flock`` guards a key."""
    return os.path.join(root, CONTROL_DIR, "locks", f"{digest}.lock")


def usage_file(root: str | os.PathLike[str], digest: str) -> str:
    """``<root>/.mlcjit/usage/<digest>``: when the cache last used the entry (a stamp)."""
    return os.path.join(root, CONTROL_DIR, "usage", digest)


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


def parse_manifest(raw: bytes, path: Path, digest: str) -> dict[str, Any]:
    """A manifest's bytes as a dict; CorruptEntryError unless they are UTF-8 JSON with a
    string ``sha256``, a non-negative integer ``size`` and ``digest`` equal to ``digest``."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise CorruptEntryError(f"manifest {path} is not valid JSON") from None
    if not isinstance(data, dict) or not {"sha256", "size", "digest"} <= data.keys():
        raise CorruptEntryError(f"manifest {path} lacks sha256/size/digest")
    size, sha = data["size"], data["sha256"]
    if not isinstance(sha, str) or isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CorruptEntryError(f"manifest {path} has an invalid sha256 {sha!r} or size {size!r}")
    if data["digest"] != digest:
        raise CorruptEntryError(f"manifest {path} is for key {data['digest']}, not {digest}")
    return data


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


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` all at once: a temp file in the same dir, fsync, rename."""
    tmp = _write_json_tmp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
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


class Cache:
    """One cache root. ``writable=False`` (READONLY) never creates, locks or writes anything."""

    def __init__(self, root: str | os.PathLike[str], *, writable: bool,
                 allow_untrusted: bool = False) -> None:
        if "\0" in os.fspath(root):
            raise ConfigError(f"invalid cache directory {os.fspath(root)!r}: it contains a NUL "
                              "character")
        self.root = Path(root).expanduser().absolute()
        self.writable = writable
        self.allow_untrusted = allow_untrusted
        self.control = self.root / CONTROL_DIR
        self._verified: dict[Path, tuple[int, int, int, str]] = {}
        self._used: set[str] = set()
        self._trusted_dirs: set[Path] = set()
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"cache directory {self.root} is not a directory; choose another "
                              "with --mlc-jit-cache-dir")
        if writable:
            self._make_root()
        elif self.root.exists():
            self.check_trusted()

    # -- set-up and trust --------------------------------------------------------------
    def _make_root(self) -> None:
        try:
            self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            self.check_trusted()  # before writing anything into it
            self.control.mkdir(mode=DIR_MODE, exist_ok=True)
            for sub in ("locks", "staging", "failed", "usage", "quarantine"):
                (self.control / sub).mkdir(mode=DIR_MODE, exist_ok=True)
        except UntrustedCacheError:
            raise
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
        self.check_trusted()

    def check_trusted(self) -> None:
        """Refuse a root that other users can write to (loading a library runs its code).

        Checks the root, the control directory and its sub-directories; entry directories
        and files are checked when an entry is read. Nothing is checked when the cache was
        opened with ``allow_untrusted``.
        """
        if self.allow_untrusted:
            return
        self._check_dir(self.root)
        if self.control.is_dir():
            self._check_dir(self.control)
            for sub in self.control.iterdir():
                if sub.is_dir():
                    self._check_dir(sub)

    def _check_dir(self, path: Path) -> None:
        if self.allow_untrusted or path in self._trusted_dirs:
            return
        st = path.stat()
        what = "cache directory" if path == self.root else "directory"
        if hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0):
            raise UntrustedCacheError(
                f"{what} {path} is owned by uid {st.st_uid}, not by you "
                f"(uid {os.getuid()}); loading its libraries would run their code. "
                "Pass --mlc-jit-allow-untrusted-cache if you trust it."
            )
        others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if others_write and not st.st_mode & stat.S_ISVTX:
            raise UntrustedCacheError(
                f"{what} {path} is writable by other users "
                f"(mode {stat.filemode(st.st_mode)}); loading its libraries would run their "
                "code. Fix its permissions (chmod go-w) or pass --mlc-jit-allow-untrusted-cache."
            )
        self._trusted_dirs.add(path)

    def _check_owner(self, path: Path, st: os.stat_result) -> None:
        """Refuse an entry file another user created (possible in a sticky directory)."""
        if self.allow_untrusted or not hasattr(os, "getuid"):
            return
        if st.st_uid not in (os.getuid(), 0):
            raise UntrustedCacheError(
                f"{path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); "
                "loading it would run its code. Pass --mlc-jit-allow-untrusted-cache if you "
                "trust it."
            )

    def check_entry(self, paths: EntryPaths) -> None:
        """ConfigError unless ``paths`` is ``<root>/<dir>/<digest>.<suffix>``: no key, name
        or setting can make the cache read, write or load anything outside its root."""
        check_digest(paths.digest)
        lib = paths.library
        suffix = lib.name[len(paths.digest) + 1:]
        if (lib.parent.parent != self.root or not _SIMPLE_NAME_RE.fullmatch(lib.parent.name)
                or not lib.name.startswith(paths.digest + ".")
                or not _SIMPLE_NAME_RE.fullmatch(suffix) or ".." in suffix):
            raise ConfigError(
                f"invalid cache entry path {os.fspath(lib)!r}: expected "
                f"{self.root}/<dir>/{paths.digest}.<suffix> with a plain suffix (check "
                "MLC_DSO_SUFFIX and the backend's layout)"
            )

    # -- reading -----------------------------------------------------------------------
    def read_manifest(self, paths: EntryPaths) -> dict[str, Any] | None:
        """The entry's manifest, None if absent; CorruptEntryError if it cannot be read or is
        not a manifest (not UTF-8 JSON, fields missing or of the wrong type)."""
        self.check_entry(paths)
        try:
            with open(paths.manifest, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorruptEntryError(
                f"manifest {paths.manifest} cannot be read ({exc.strerror})") from None
        self._check_dir(paths.library.parent)
        self._check_owner(paths.manifest, st)
        return parse_manifest(raw, paths.manifest, paths.digest)

    def verify(self, paths: EntryPaths, manifest: dict[str, Any]) -> None:
        """Check the library's size and SHA-256 against its manifest.

        The checksum is computed on the first read in this process and again only if the
        file's identity (inode, size, mtime) changes; a mismatch raises CorruptEntryError.
        """
        self.check_entry(paths)
        try:
            st = paths.library.stat()
        except FileNotFoundError:
            raise CorruptEntryError(
                f"library {paths.library} is missing although its manifest exists"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptEntryError(f"library {paths.library} is not a regular file")
        self._check_owner(paths.library, st)
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
        return Path(lock_file(self.root, check_digest(digest)))

    @contextlib.contextmanager
    def lock(self, digest: str, timeout: float, what: str = "") -> Iterator[float]:
        """Hold the key's lock; yields the seconds spent waiting for it.

        The lock is an ``flock`` (via :class:`filelock.FileLock`): the kernel releases it
        when its holder dies, so a killed compiler never blocks the next one.
        """
        from filelock import FileLock, Timeout

        assert self.writable, "READONLY caches take no locks"
        lock = FileLock(self.lock_path(digest), timeout=timeout, mode=FILE_MODE,
                        thread_local=False)
        owner = self.control / "locks" / f"{digest}.owner"
        start = time.monotonic()
        fault_point("lock-wait")
        try:
            lock.acquire()
        except Timeout:
            raise LockTimeoutError(self._lock_timeout_message(digest, timeout, what)) from None
        waited = time.monotonic() - start
        try:
            with contextlib.suppress(OSError):
                write_json_atomic(owner, {"pid": os.getpid(), "host": socket.gethostname(),
                                          "since": time.time()})
            fault_point("locked")
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
            if info["host"] == socket.gethostname() and not _pid_alive(int(info["pid"])):
                held += " (that process has exited: the record is stale, the holder unknown)"
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
        check_digest(digest)
        name = f"{digest[:32]}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        path = (parent or self.control / "staging") / name
        path.mkdir(mode=0o700, parents=True)  # private: nobody may swap what we publish
        return path

    def publish(self, staging_library: Path, staging_log: Path | None, paths: EntryPaths,
                manifest: dict[str, Any]) -> dict[str, Any]:
        """Move a compiled library into place atomically, the manifest last.

        Call with the key's lock held. Everything that needs disk space (the fsync, the
        manifest's temp file) happens before anything is moved, so a full disk leaves any
        old entry untouched. Then the old manifest is removed, the library and log are
        renamed into place, and the manifest is renamed last: a concurrent reader sees the
        old complete entry, no entry, or the new complete entry. A crash between the renames
        leaves a library that no manifest names, which no reader loads and the next compile
        replaces; an error there takes the library back out. Returns the manifest as written
        (with ``sha256`` and ``size`` filled in).
        """
        self.check_entry(paths)
        with open(staging_library, "rb+") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):  # a umask of 0 made it writable
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
            os.fsync(f.fileno())
        manifest = {**manifest, "digest": paths.digest, "library": paths.library.name,
                    "sha256": file_sha256(staging_library), "size": st.st_size,
                    "log": paths.log.name}
        paths.library.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        self._check_dir(paths.library.parent)
        tmp_manifest = _write_json_tmp(paths.manifest, manifest)
        placed = False
        try:
            fault_point("publish:staged")
            with contextlib.suppress(FileNotFoundError):
                paths.manifest.unlink()
            os.replace(staging_library, paths.library)
            placed = True
            if staging_log is not None and staging_log.exists():
                with contextlib.suppress(OSError):
                    staging_log.chmod(FILE_MODE)
                os.replace(staging_log, paths.log)
            fault_point("publish:library")
            os.replace(tmp_manifest, paths.manifest)
            placed = False
        except BaseException:
            if placed:  # no manifest names it: take it back out rather than leave litter
                with contextlib.suppress(OSError):
                    paths.library.unlink()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_manifest.unlink()
        _fsync_dir(paths.library.parent)
        fault_point("published")
        return manifest

    def quarantine(self, paths: EntryPaths, reason: str) -> Path | None:
        """Move a corrupt entry's files aside (under the lock); returns where, if anything moved."""
        self.check_entry(paths)
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
        check_digest(digest)
        self._used.add(digest)
        # Overwritten in place, not truncated: ext4 starts writeback when a truncated file
        # is closed, which made this 0.6 to 4 ms on a busy disk instead of ~10 us.
        stamp = f"{time.time():.3f}\n".encode("ascii")
        with contextlib.suppress(OSError):
            fd = os.open(usage_file(self.root, digest), os.O_WRONLY | os.O_CREAT, FILE_MODE)
            try:
                os.pwrite(fd, stamp, 0)
                os.ftruncate(fd, len(stamp))  # no tail of a longer record left behind
            finally:
                os.close(fd)

    # -- failures remembered within a run ------------------------------------------------
    def failure_paths(self, digest: str) -> tuple[Path, Path]:
        base = self.control / "failed" / check_digest(digest)
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
        if not isinstance(data, dict) or data.get("run_id") != run_id or "message" not in data:
            return None
        return str(data["message"])

    # -- housekeeping --------------------------------------------------------------------
    def clean_staging(self, *, max_age: float = STAGING_MAX_AGE_S,
                      where: Path | None = None) -> list[Path]:
        """Remove orphaned staging dirs: a dead owner on this host, or older than ``max_age``
        (whatever their name: also strays whose owner cannot be read from it).

        ``where``: a shared directory used for staging (``MLC_TEMP_DIR``): there, only
        entries named like this cache's staging dirs are considered.
        """
        removed: list[Path] = []
        staging = where or self.control / "staging"
        if not self.writable or not staging.is_dir():
            return removed
        host = socket.gethostname()
        now = time.time()
        for path in staging.iterdir():
            if where is not None and not _STAGING_NAME_RE.fullmatch(path.name):
                continue
            try:
                age = now - path.lstat().st_mtime
            except OSError:
                continue
            parts = path.name.split(".")
            try:
                pid, owner_host = int(parts[-2]), ".".join(parts[1:-2])
            except (ValueError, IndexError):
                pid, owner_host = 0, ""
            dead = pid > 0 and owner_host == host and not _pid_alive(pid)
            if dead or age > max_age:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed.append(path)
        return removed


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a full-disk (or quota) error."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
