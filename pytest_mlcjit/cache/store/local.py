"""The local tier: one cache root on this machine's filesystem.

Manifests, checksums, staging and atomic publish; paths come from :mod:`..layout`, locks
from :mod:`..locks`, trust from :mod:`..trust`. This module knows nothing of TVM or pytest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache import layout
from pytest_mlcjit.errors import ConfigError, CorruptEntryError, MlcJitError, UntrustedCacheError
from pytest_mlcjit._util.fs import (
    DIR_MODE,
    FILE_MODE,
    best_effort,
    fault_point,
    fsync_dir,
    remove_tree,
    write_json_atomic,
    write_json_tmp,
)
from pytest_mlcjit.key import file_sha256
from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.locks import (
    MISSING,
    create_held,
    key_lock,
    release_and_remove,
    remove_if_free,
    try_existing_flock,
)
from pytest_mlcjit.cache.manifest import MAX_TIME, parse_manifest
from pytest_mlcjit.cache.trust import Trust

#: How many times a reader that finds a library not matching its manifest reads the
#: manifests again (a publish may be replacing the entry: see :meth:`LocalStore.verify`).
VERIFY_RETRIES = 3


class LocalStore:
    """One cache root. ``writable=False`` (READONLY) never creates, locks or writes anything."""

    def __init__(self, root: str | os.PathLike[str], *, writable: bool,
                 allow_untrusted: bool = False) -> None:
        if "\0" in os.fspath(root):
            raise ConfigError(f"invalid cache directory {os.fspath(root)!r}: it contains a NUL "
                              "character")
        self.root = Path(root).expanduser().absolute()
        layout.check_path_room(self.root, layout.PATH_ROOM_WRITE if writable
                               else layout.PATH_ROOM_READ, "cache directory")
        self.writable = writable
        self.allow_untrusted = allow_untrusted
        self.control = layout.control_dir(self.root)
        self.trust = Trust(self.root, allow_untrusted=allow_untrusted)
        self._verified: dict[Path, tuple[int, int, int, str]] = {}
        self._used: set[str] = set()
        #: This process's staging directories → the descriptor holding each one's lock.
        self._staging: dict[Path, int] = {}
        self._staging_mutex = threading.Lock()
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
        not a manifest (not UTF-8 JSON, a field missing, of the wrong type or out of range)."""
        self.check_entry(paths)
        return self._read_manifest_at(paths.manifest, paths)

    def _read_manifest_at(self, where: Path, paths: EntryPaths) -> dict[str, Any] | None:
        try:
            with open(where, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorruptEntryError(
                f"manifest {where} cannot be read ({exc.strerror})") from None
        self.trust.check_dir(paths.library.parent)
        self.trust.check_owner(where, st)
        return parse_manifest(raw, where, paths.digest)

    def verify(self, paths: EntryPaths, manifest: dict[str, Any]) -> dict[str, Any]:
        """Check the library's size and SHA-256 against its manifest; returns the manifest
        that the library matches.

        The checksum is computed on the first read in this process and again only if the
        file's identity (inode, size, mtime) changes. A publish that replaces an entry
        renames the new library into place a moment before the new manifest (which waits
        meanwhile as ``paths.pending``): a library that does not match ``manifest`` is
        checked against the pending manifest and the manifest read again, up to
        :data:`VERIFY_RETRIES` times, and the one it matches is returned. Only a library
        that matches none is corrupt (CorruptEntryError).
        """
        self.check_entry(paths)
        try:
            self._verify(paths, manifest)
            return manifest
        except CorruptEntryError as exc:
            error = exc
        tried = [manifest]
        for _ in range(VERIFY_RETRIES):
            fresh = False
            for where in (paths.pending, paths.manifest):
                try:
                    candidate = self._read_manifest_at(where, paths)
                except CorruptEntryError:
                    continue
                if candidate is None or candidate in tried:
                    continue
                tried.append(candidate)
                fresh = True
                try:
                    self._verify(paths, candidate)
                except CorruptEntryError:
                    continue
                return candidate
            if not fresh:
                break
        raise error

    def _verify(self, paths: EntryPaths, manifest: dict[str, Any]) -> None:
        try:
            st = paths.library.stat()
        except FileNotFoundError:
            raise CorruptEntryError(
                f"library {paths.library} is missing although its manifest exists"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptEntryError(f"library {paths.library} is not a regular file")
        self.trust.check_owner(paths.library, st)
        seen = self._verified.get(paths.library)
        if (seen is not None and seen[:3] == (st.st_ino, st.st_size, st.st_mtime_ns)
                and seen[3] == manifest["sha256"]):
            return
        try:
            f = open(paths.library, "rb")  # noqa: SIM115 - one file throughout, if replaced
        except OSError as exc:
            raise CorruptEntryError(
                f"library {paths.library} cannot be read ({exc.strerror})") from None
        with f:
            st = os.fstat(f.fileno())
            if st.st_size != manifest["size"]:
                raise CorruptEntryError(
                    f"library {paths.library} is corrupt: {st.st_size} bytes, manifest says "
                    f"{manifest['size']}"
                )
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        actual = digest.hexdigest()
        if actual != manifest["sha256"]:
            raise CorruptEntryError(
                f"library {paths.library} is corrupt: sha256 {actual[:16]}…, manifest says "
                f"{str(manifest['sha256'])[:16]}…"
            )
        self._verified[paths.library] = (st.st_ino, st.st_size, st.st_mtime_ns, actual)

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
        """A fresh scratch directory on the cache's filesystem, ``<digest[:32]>.<hex16>``.

        Its lock file (``<name>.lock`` beside it) is made and locked first, and held until
        :meth:`remove_staging`: whoever finds the directory finds its lock held while this
        process lives (in any PID namespace, container or host sharing the filesystem), and
        free once it has died, so :meth:`clean_staging` removes only abandoned ones.
        ``parent`` (default ``.mlcjit/staging``) must be on the cache's filesystem, so that
        publishing is an atomic rename.
        """
        layout.check_digest(digest)
        base = parent or layout.staging_dir(self.root)
        if parent is not None:
            layout.check_path_room(parent, layout.PATH_ROOM_WRITE, "staging directory")
        base.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        for _ in range(16):
            path = base / f"{digest[:32]}.{secrets.token_hex(8)}"
            lock = layout.staging_lock(path)
            try:
                fd = create_held(lock)
            except FileExistsError:
                continue
            try:
                path.mkdir(mode=0o700)  # private: nobody may swap what we publish
            except BaseException:
                release_and_remove(fd, lock)
                raise
            with self._staging_mutex:
                self._staging[path] = fd
            return path
        raise FileExistsError(f"could not make a staging directory in {base}")

    def remove_staging(self, path: Path) -> None:
        """Remove a staging directory of this process, then its lock file, and release it."""
        shutil.rmtree(path, ignore_errors=True)
        with self._staging_mutex:
            fd = self._staging.pop(path, None)
        if fd is not None:
            release_and_remove(fd, layout.staging_lock(path))

    def publish(self, staging_library: Path, staging_log: Path | None, paths: EntryPaths,
                manifest: dict[str, Any]) -> dict[str, Any]:
        """Move a compiled library into place atomically, the manifest last.

        Call with the key's lock held. Everything that needs disk space (the fsync, the
        manifest's temp file) happens before anything is moved, so a full disk leaves any
        old entry untouched. Then, each step an atomic rename over what was there (nothing
        is ever removed first): the new manifest becomes the pending manifest
        (``paths.pending``), the library and log go into place, and the pending manifest
        becomes the manifest (the commit point). A reader that finds the old manifest and
        the new library checks the library against the pending manifest
        (:meth:`verify`), so it sees the old complete entry or the new complete entry,
        never a missing or mismatched one. A crash before the commit point leaves the
        pending manifest, which names the library in place (or is replaced by the next
        publish); an error in a first publish takes the library back out. Afterwards the
        key's remembered failure, if any, is removed. Returns the manifest as written
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
        replacing = os.path.lexists(paths.manifest)
        pending = placed = False
        try:
            fault_point("publish:staged")
            os.replace(tmp_manifest, paths.pending)
            pending = True
            os.replace(staging_library, paths.library)
            placed = True
            if staging_log is not None and staging_log.exists():
                with best_effort(staging_log, "make the compile log readable"):
                    staging_log.chmod(FILE_MODE)
                os.replace(staging_log, paths.log)
            fault_point("publish:library")
            os.replace(paths.pending, paths.manifest)
            pending = placed = False
        except BaseException:
            # Replacing: the new library and the pending manifest that names it stay (a
            # whole entry to readers). Otherwise nothing may stay that no manifest names.
            if pending and (not placed or not replacing):
                with contextlib.suppress(OSError):
                    paths.pending.unlink()
            if placed and not replacing:
                with contextlib.suppress(OSError):
                    paths.library.unlink()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_manifest.unlink()
        fsync_dir(paths.library.parent)
        fault_point("published")
        key_digest = manifest.get("key_digest")
        for digest in {paths.digest, key_digest if isinstance(key_digest, str) else ""}:
            if layout.is_digest(digest):
                self.forget_failure(digest)  # failures are remembered per key
        return manifest

    def write_manifest(self, paths: EntryPaths, manifest: dict[str, Any]) -> None:
        """Write a manifest for a library already in place (adopting another tool's)."""
        if self.writable:
            with best_effort(paths.manifest, "write the manifest"):
                write_json_atomic(paths.manifest, manifest)

    def quarantine(self, paths: EntryPaths, reason: str, *, remove: bool = False
                   ) -> Path | None:
        """Set a corrupt entry's files aside in ``.mlcjit/quarantine`` (under the lock);
        returns where, if anything was there.

        Regular files are hard-linked there and stay in place, so that readers keep
        finding the entry (corrupt, as before) until the rebuild's publish replaces it:
        never missing meanwhile. Other files (a directory where a file belongs), files
        that cannot be linked, and everything when ``remove`` (``verify --fix``: no
        rebuild follows) are moved. An entry already quarantined with the very same
        files is not quarantined twice.
        """
        self.check_entry(paths)
        self._verified.pop(paths.library, None)
        found = []
        for src in (paths.library, paths.manifest, paths.log):
            with contextlib.suppress(FileNotFoundError):
                found.append((src, os.lstat(src)))
        if remove:
            with contextlib.suppress(FileNotFoundError):
                paths.pending.unlink()
        if not found:
            return None
        if not remove and (earlier := self._quarantined_as(paths, found)) is not None:
            return earlier
        stamp = f"{int(time.time())}.{secrets.token_hex(2)}"
        dest = layout.quarantine_dir(self.root) / f"{paths.digest}.{stamp}"
        dest.mkdir(parents=True, exist_ok=True)
        for src, st in found:
            if remove or not stat.S_ISREG(st.st_mode):
                os.replace(src, dest / src.name)
                continue
            try:
                os.link(src, dest / src.name, follow_symlinks=False)
            except OSError:  # another user's file (protected_hardlinks), no hard links here
                os.replace(src, dest / src.name)
        (dest / "REASON").write_text(reason + "\n", encoding="utf-8")
        return dest

    def _quarantined_as(self, paths: EntryPaths, found: list[tuple[Path, os.stat_result]]
                        ) -> Path | None:
        """An earlier quarantine of this entry that holds the same files (a rebuild that
        failed left them in place), or None."""
        wanted = {(st.st_dev, st.st_ino) for _, st in found}
        with contextlib.suppress(OSError):
            for earlier in layout.quarantine_dir(self.root).glob(f"{paths.digest}.*"):
                held = set()
                for src, _ in found:
                    with contextlib.suppress(OSError):
                        st = os.lstat(earlier / src.name)
                        held.add((st.st_dev, st.st_ino))
                if held == wanted:
                    return earlier
        return None

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

    # -- variants: one entry per input state of a key -----------------------------------
    def read_variants(self, entry_dir: Path, key_digest: str) -> list[dict[str, Any]]:
        """The input states recorded for a key, newest first (``[]`` if none, or if the
        record is unreadable: a miss, never a crash)."""
        path = layout.variants_file(entry_dir, key_digest)
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, ValueError):
            return []
        variants = data.get("variants") if isinstance(data, dict) else None
        if not isinstance(variants, list):
            return []
        return [v for v in variants if isinstance(v, dict) and isinstance(v.get("entry"), str)
                and layout.is_digest(v["entry"]) and isinstance(v.get("inputs"), dict)]

    def add_variant(self, entry_dir: Path, key_digest: str, variant: dict[str, Any]) -> None:
        """Put ``variant`` (``{"entry", "inputs", "created"}``) first in the key's record,
        replacing one for the same entry; keeps the newest :data:`layout.MAX_VARIANTS`.
        Call with the key's lock held (the record is rewritten whole, atomically)."""
        path = layout.variants_file(entry_dir, key_digest)
        known = self.read_variants(entry_dir, key_digest)
        if known and known[0]["entry"] == variant["entry"]:
            return  # already the newest: nothing to rewrite (a REDO of the same inputs)
        kept = [v for v in known if v["entry"] != variant["entry"]]
        entry_dir.mkdir(mode=DIR_MODE, exist_ok=True)  # as publish makes it: not by umask
        path.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        write_json_atomic(path, {"key": key_digest,
                                 "variants": [variant, *kept][:layout.MAX_VARIANTS]})

    # -- failures: remembered within a run; known failures across runs ------------------
    def failure_paths(self, digest: str) -> tuple[Path, Path]:
        return layout.failure_files(self.root, digest)

    def record_failure(self, digest: str, run_id: str, message: str, *,
                       known: dict[str, Any] | None = None) -> None:
        """Remember that ``digest`` failed to compile: for the rest of run ``run_id``; and,
        with ``known`` (the compile failed deterministically: ``{"error", "inputs",
        "missing", ...}``), for later runs too, as long as the key's recorded inputs are
        unchanged (:meth:`read_known_failure`)."""
        record, _ = self.failure_paths(digest)
        data: dict[str, Any] = {"run_id": run_id, "message": message, "time": time.time()}
        if known is not None:
            data.update(known, known=True)
        write_json_atomic(record, data)

    def read_known_failure(self, digest: str) -> dict[str, Any] | None:
        """The key's failure record if it is a known failure (a deterministic one, from
        any run): ``{"message", "time", "run_id", "error", "inputs", "missing", ...}``."""
        record, _ = self.failure_paths(digest)
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (not isinstance(data, dict) or data.get("known") is not True
                or not isinstance(data.get("message"), str)
                or not isinstance(data.get("inputs"), dict)
                or isinstance(data.get("time"), bool)
                or not isinstance(data.get("time"), int | float)
                or not 0 <= data["time"] <= MAX_TIME):  # NaN fails too; printed as a date
            return None
        return data

    def forget_failure(self, digest: str) -> None:
        """Remove the key's failure record and its log (once the key has compiled)."""
        for path in self.failure_paths(digest):
            with best_effort(path, "remove the failure record"):
                path.unlink(missing_ok=True)

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
    def clean_staging(self, *, where: Path | None = None) -> list[Path]:
        """Remove abandoned staging directories: those whose lock file (beside them) this
        process can lock, and those without one (no owner holds a lock on them: left by an
        earlier version of the plugin, or by a crash before the lock existed); then lock
        files left without their directory. A directory whose lock is held is being
        compiled in, whatever its age, host or PID namespace, and is never touched.

        ``where``: a shared directory used for staging (``MLC_TEMP_DIR``): there, only
        entries named like this cache's staging dirs (and their locks) are considered.
        """
        removed: list[Path] = []
        staging = where or layout.staging_dir(self.root)
        if not self.writable:
            return removed
        try:
            names = set(os.listdir(staging))
        except OSError:
            return removed
        suffix = layout.STAGING_LOCK_SUFFIX
        with self._staging_mutex:
            mine = set(self._staging)
        for path in mine:  # ours, removed without remove_staging: let its lock go too
            if path.parent == staging and not os.path.lexists(path):
                self.remove_staging(path)
        for name in sorted(names):
            path = staging / name
            if name.endswith(suffix) or path in mine:
                continue
            if where is not None and not layout.is_staging_name(name):
                continue
            if _remove_if_abandoned(path):
                removed.append(path)
        for name in sorted(names):
            stem = name[:-len(suffix)]
            if (name.endswith(suffix) and stem not in names
                    and (where is None or layout.is_staging_name(stem))):
                with contextlib.suppress(OSError, MlcJitError):
                    remove_if_free(staging / name)
        return removed


def _remove_if_abandoned(path: Path) -> bool:
    """Remove the staging directory (or stray file) ``path`` unless its owner holds its
    lock; whether it was removed. The lock file goes last, while held."""
    lock = layout.staging_lock(path)
    try:
        fd = try_existing_flock(lock)
    except (OSError, MlcJitError):  # another user's lock file: not ours to judge
        return False
    if fd is None:
        return False  # its owner is alive
    try:
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        else:
            with best_effort(path, "remove the stray staging file"):
                path.unlink(missing_ok=True)
    finally:
        if fd != MISSING:
            release_and_remove(fd, lock)
    return True
