"""The local tier: one cache root on this machine's filesystem.

Manifests, checksums, staging and atomic publish; paths come from :mod:`..layout`, locks
from :mod:`..locks`, trust from :mod:`..trust`. This module knows nothing of TVM or pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import layout
from ..errors import ConfigError, CorruptEntryError, MlcJitError, UntrustedCacheError
from ..fsutil import (
    DIR_MODE,
    FILE_MODE,
    best_effort,
    fault_point,
    fsync_dir,
    remove_tree,
    write_json_atomic,
    write_json_tmp,
)
from ..key import file_sha256
from ..layout import EntryPaths
from ..locks import key_lock, pid_alive
from ..manifest import parse_manifest
from ..trust import Trust

#: A staging directory older than this whose owner cannot be checked is an orphan.
STAGING_MAX_AGE_S = 24 * 3600.0


class LocalStore:
    """One cache root. ``writable=False`` (READONLY) never creates, locks or writes anything."""

    def __init__(self, root: str | os.PathLike[str], *, writable: bool,
                 allow_untrusted: bool = False) -> None:
        if "\0" in os.fspath(root):
            raise ConfigError(f"invalid cache directory {os.fspath(root)!r}: it contains a NUL "
                              "character")
        self.root = Path(root).expanduser().absolute()
        self.writable = writable
        self.allow_untrusted = allow_untrusted
        self.control = layout.control_dir(self.root)
        self.trust = Trust(self.root, allow_untrusted=allow_untrusted)
        self._verified: dict[Path, tuple[int, int, int, str]] = {}
        self._used: set[str] = set()
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"cache directory {self.root} is not a directory; choose another "
                              "with --mlc-jit-cache-dir")
        if writable:
            self._make_root()
        elif self.root.exists():
            self.check_trusted()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r}, writable={self.writable})"

    # -- set-up and trust --------------------------------------------------------------
    def _make_root(self) -> None:
        try:
            self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            self.check_trusted()  # before writing anything into it
            self.control.mkdir(mode=DIR_MODE, exist_ok=True)
            for sub in layout.CONTROL_SUBDIRS:
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
        and files are checked when an entry is read. Nothing is checked when the store was
        opened with ``allow_untrusted``.
        """
        self.trust.check_tree(self.control)

    def check_entry(self, paths: EntryPaths) -> None:
        layout.check_entry(self.root, paths)

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
        self.trust.check_dir(paths.library.parent)
        self.trust.check_owner(paths.manifest, st)
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
        self.trust.check_owner(paths.library, st)
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
        """The lock file of a key (ConfigError unless ``digest`` is a digest)."""
        return Path(layout.lock_file(self.root, layout.check_digest(digest)))

    @contextlib.contextmanager
    def lock(self, digest: str, timeout: float, what: str = "") -> Iterator[float]:
        """Hold the key's lock (:func:`..locks.key_lock`); yields the seconds waited."""
        assert self.writable, "READONLY caches take no locks"
        with key_lock(self.root, digest, timeout, what) as waited:
            yield waited

    # -- writing -------------------------------------------------------------------------
    def new_staging_dir(self, digest: str, parent: Path | None = None) -> Path:
        """A fresh scratch directory on the cache's filesystem, named after its owner.

        ``parent`` (default ``.mlcjit/staging``) must be on the cache's filesystem, so that
        publishing is an atomic rename.
        """
        layout.check_digest(digest)
        name = f"{digest[:32]}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        path = (parent or layout.staging_dir(self.root)) / name
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
        self.trust.check_dir(paths.library.parent)
        tmp_manifest = write_json_tmp(paths.manifest, manifest)
        placed = False
        try:
            fault_point("publish:staged")
            with contextlib.suppress(FileNotFoundError):
                paths.manifest.unlink()
            os.replace(staging_library, paths.library)
            placed = True
            if staging_log is not None and staging_log.exists():
                with best_effort(staging_log, "make the compile log readable"):
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
        fsync_dir(paths.library.parent)
        fault_point("published")
        return manifest

    def write_manifest(self, paths: EntryPaths, manifest: dict[str, Any]) -> None:
        """Write a manifest for a library already in place (adopting another tool's)."""
        if self.writable:
            with best_effort(paths.manifest, "write the manifest"):
                write_json_atomic(paths.manifest, manifest)

    def quarantine(self, paths: EntryPaths, reason: str) -> Path | None:
        """Move a corrupt entry's files aside (under the lock); returns where, if anything moved."""
        self.check_entry(paths)
        stamp = f"{int(time.time())}.{secrets.token_hex(2)}"
        dest = layout.quarantine_dir(self.root) / f"{paths.digest}.{stamp}"
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
        layout.check_digest(digest)
        self._used.add(digest)
        # Overwritten in place, not truncated: ext4 starts writeback when a truncated file
        # is closed, which made this 0.6 to 4 ms on a busy disk instead of ~10 us.
        stamp = f"{time.time():.3f}\n".encode("ascii")
        path = layout.usage_file(self.root, digest)
        with best_effort(path, "record the use of"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
            try:
                os.pwrite(fd, stamp, 0)
                os.ftruncate(fd, len(stamp))  # no tail of a longer record left behind
            finally:
                os.close(fd)

    # -- failures remembered within a run ------------------------------------------------
    def failure_paths(self, digest: str) -> tuple[Path, Path]:
        return layout.failure_files(self.root, digest)

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
        staging = where or layout.staging_dir(self.root)
        if not self.writable or not staging.is_dir():
            return removed
        host = socket.gethostname()
        now = time.time()
        for path in staging.iterdir():
            if where is not None and not layout.STAGING_NAME_RE.fullmatch(path.name):
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
            dead = pid > 0 and owner_host == host and not pid_alive(pid)
            if dead or age > max_age:
                if path.is_dir() and not path.is_symlink():
                    remove_tree(path)
                else:
                    with best_effort(path, "remove the stray staging file"):
                        path.unlink(missing_ok=True)
                removed.append(path)
        return removed
