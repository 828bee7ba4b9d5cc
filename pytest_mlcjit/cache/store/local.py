"""The local tier: one cache root on this machine's filesystem.

Lookups (the input state's entry, its manifest, the library checked against it), atomic
publishes and quarantine; paths come from :mod:`..layout`, locks from :mod:`..locks`,
trust from :mod:`..trust`, staging from :mod:`.staging`, records from :mod:`.records`.
Opening a store writes nothing: :meth:`LocalStore.open_for_writing` makes the root (the
store of a policy that writes), :class:`.readonly.ReadOnlyStore` is the view of one that
does not. This module knows nothing of TVM, backends or pytest.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import (
    DIR_MODE,
    FILE_MODE,
    WriteWarnings,
    fault_point,
    fsync_dir,
    write_json_atomic,
    write_json_tmp,
)
from pytest_mlcjit.cache import layout
from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.locks import key_lock
from pytest_mlcjit.cache.manifest import Manifest, parse_manifest
from pytest_mlcjit.cache.store.interface import (
    MISSING,
    Corrupt,
    EntryQuery,
    Hit,
    Job,
    KnownFailure,
    Lookup,
    Redo,
    Stale,
    no_job,
)
from pytest_mlcjit.cache.store.records import Records
from pytest_mlcjit.cache.store.staging import Staging
from pytest_mlcjit.cache.store.unwritable import not_writable, prepare_root
from pytest_mlcjit.cache.trust import Trust
from pytest_mlcjit.errors import (
    CompileError,
    ConfigError,
    CorruptEntryError,
    MlcJitError,
)
from pytest_mlcjit.inputs.check import Change, InputChecker, changes_since, inputs_digest
from pytest_mlcjit.key import file_sha256, sha256_digest

#: How many times a reader that finds a library not matching its manifest reads the
#: manifests again (a publish may be replacing the entry: see :meth:`LocalStore.verify`).
VERIFY_RETRIES = 3


class LocalStore:
    """One cache root. Opening it writes nothing; :meth:`open_for_writing` makes it."""

    def __init__(self, root: str | os.PathLike[str], *, allow_untrusted: bool = False,
                 warnings: WriteWarnings | None = None,
                 checker: InputChecker | None = None) -> None:
        if "\0" in os.fspath(root):
            raise ConfigError(f"invalid cache directory {os.fspath(root)!r}: it contains a NUL "
                              "character")
        self.root = Path(root).expanduser().absolute()
        layout.check_path_room(self.root, layout.PATH_ROOM_READ, "cache directory")
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"cache directory {self.root} is not a directory; choose another "
                              "with --mlc-jit-cache-dir")
        self.allow_untrusted = allow_untrusted
        self.warnings = warnings or WriteWarnings()
        self.checker = checker or InputChecker()
        self.control = layout.control_dir(self.root)
        self.trust = Trust(self.root, allow_untrusted=allow_untrusted)
        self.records = Records(self.root, self.warnings)
        self.staging = Staging(self.root, self.warnings)
        self._writable = False
        self._verified: dict[Path, tuple[int, int, int, str]] = {}
        self._verified_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def writable(self) -> bool:
        return self._writable

    # -- set-up and trust --------------------------------------------------------------
    def open_for_writing(self) -> LocalStore:
        """Make the root and its control directories (checking that they can be trusted
        and written); returns the store, now writable. MlcJitError if it cannot be written
        (:meth:`make_writable` says why instead)."""
        if (reason := self.make_writable()) is not None:
            raise MlcJitError(not_writable(self.root, reason))
        return self

    def make_writable(self) -> str | None:
        """As :meth:`open_for_writing`: None once the store is writable, else why the
        directory cannot be written (:func:`.unwritable.prepare_root`)."""
        layout.check_path_room(self.root, layout.PATH_ROOM_WRITE, "cache directory")
        reason = prepare_root(self.root, self.control, self.check_trusted)
        self._writable = reason is None
        return reason

    def check_trusted(self) -> None:
        """Refuse a root that other users can write to (loading a library runs its code).

        Checks the root, the control directory and its sub-directories; entry directories
        and files are checked when an entry is read. Nothing is checked when the store was
        opened with ``allow_untrusted``.
        """
        self.trust.check_tree(self.control)

    def check_entry(self, paths: EntryPaths) -> None:
        layout.check_entry(self.root, paths)

    # -- lookups -----------------------------------------------------------------------
    def lookup(self, query: EntryQuery, *, redo_run: str | None = None) -> Lookup:
        """The entry of ``query`` here (see :meth:`.interface.Store.lookup`): for a backend
        that records inputs, the newest variant whose recorded inputs are unchanged (one
        ``stat`` per input when nothing changed); for the others, the key's one entry."""
        base = query.inputs_base()
        paths = query.locate(self.root)
        if base is not None:
            first: list[Change] | None = None
            for variant in self.records.variants(paths.library.parent, query.digest):
                changes = changes_since(variant["inputs"], base, self.checker)
                if changes is None:  # a malformed record: not this variant
                    continue
                if not changes:
                    return self._read_entry(query, query.locate(self.root, variant["entry"]),
                                            redo_run)
                first = changes if first is None else first
            if first is None:
                return MISSING
            return Stale("inputs changed since it was built: " + "; ".join(map(str, first)))
        return self._read_entry(query, paths, redo_run)

    def _read_entry(self, query: EntryQuery, paths: EntryPaths, redo_run: str | None
                    ) -> Lookup:
        try:
            manifest = self.read_manifest(paths)
            if manifest is None:
                if not paths.library.is_file():
                    return MISSING
                adopted = query.adopt(paths)
                if adopted is None:
                    return MISSING
                if self._writable:
                    with self.warnings.best_effort(paths.manifest, "write the manifest"):
                        write_json_atomic(paths.manifest, adopted)
                manifest = adopted
            manifest = self.verify(paths, manifest)
        except CorruptEntryError as exc:
            return Corrupt(str(exc), paths)
        if (why := query.stale(manifest)) is not None:
            return Stale(why)
        if redo_run is not None and manifest.get("run_id") != redo_run:
            return Redo()
        return Hit(paths, manifest)

    def fetch(self, query: EntryQuery, *, job: Job = no_job) -> Lookup:
        """No tier beyond this one."""
        return MISSING

    def read_manifest(self, paths: EntryPaths) -> Manifest | None:
        """The entry's manifest, None if absent; CorruptEntryError if it cannot be read or is
        not a manifest (not UTF-8 JSON, a field missing, of the wrong type or out of range)."""
        self.check_entry(paths)
        return self._read_manifest_at(paths.manifest, paths)

    def _read_manifest_at(self, where: Path, paths: EntryPaths) -> Manifest | None:
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

    def verify(self, paths: EntryPaths, manifest: Manifest) -> Manifest:
        """Check the library's size and SHA-256 against its manifest; returns the manifest
        that the library matches.

        The checksum is computed on the first read in this run and again only if the
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

    def _verify(self, paths: EntryPaths, manifest: Manifest) -> None:
        try:
            st = paths.library.stat()
        except FileNotFoundError:
            raise CorruptEntryError(
                f"library {paths.library} is missing although its manifest exists"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptEntryError(f"library {paths.library} is not a regular file")
        self.trust.check_owner(paths.library, st)
        with self._verified_lock:
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
        self._remember_verified(paths.library, st, actual)

    def _remember_verified(self, library: Path, st: os.stat_result, sha256: str) -> None:
        with self._verified_lock:
            self._verified[library] = (st.st_ino, st.st_size, st.st_mtime_ns, sha256)

    def is_verified(self, paths: EntryPaths) -> bool:
        """Whether the library was verified in this run and is unchanged since (one stat)."""
        with self._verified_lock:
            seen = self._verified.get(paths.library)
        if seen is None:
            return False
        try:
            st = paths.library.stat()
        except FileNotFoundError:
            return False
        return seen[:3] == (st.st_ino, st.st_size, st.st_mtime_ns)

    # -- locking and staging -----------------------------------------------------------
    def lock_path(self, digest: str) -> Path:
        """The lock file of a key (ConfigError unless ``digest`` is a digest)."""
        return Path(layout.lock_file(self.root, layout.check_digest(digest)))

    @contextlib.contextmanager
    def lock(self, digest: str, timeout: float, what: str = "", *,
             cancelled: threading.Event | None = None) -> Iterator[float]:
        """Hold the key's lock (:func:`..locks.key_lock`); yields the seconds waited."""
        with key_lock(self.root, digest, timeout, what, cancelled=cancelled,
                      warnings=self.warnings) as waited:
            yield waited

    def new_staging_dir(self, digest: str, parent: Path | None = None) -> Path:
        return self.staging.new(digest, parent)

    def remove_staging(self, path: Path) -> None:
        self.staging.remove(path)

    def clean_staging(self, *, where: Path | None = None) -> list[Path]:
        return self.staging.clean(where=where)

    # -- publishing --------------------------------------------------------------------
    def entry_for(self, query: EntryQuery, manifest: Mapping[str, Any]) -> EntryPaths:
        """Where an entry with ``manifest`` goes: for a backend that records inputs, the
        entry of its input state (named by the key's and the inputs' digests)."""
        recorded = manifest.get("inputs")
        if query.inputs_base() is not None and isinstance(recorded, dict):
            entry = sha256_digest({"key": query.digest, "inputs": inputs_digest(recorded)})
            return query.locate(self.root, entry)
        return query.locate(self.root)

    def publish(self, query: EntryQuery, library: Path, log: Path | None,
                manifest: Manifest, *, replace: bool = False) -> Hit:
        """Publish ``library`` (in a staging directory) as ``query``'s entry of its input
        state, listed first among the key's variants (listed before it is published: a
        crash in between leaves a variant whose entry is missing, compiled again, never a
        published entry no lookup finds). See :meth:`publish_entry`."""
        paths = self.entry_for(query, manifest)
        if paths.digest != query.digest:
            self.records.add_variant(paths.library.parent, query.digest, {
                "entry": paths.digest, "inputs": manifest.get("inputs"),
                "created": manifest.get("created") or time.time()})
        return Hit(paths, self.publish_entry(library, log, paths, manifest))

    def publish_entry(self, staging_library: Path, staging_log: Path | None,
                      paths: EntryPaths, manifest: Manifest) -> Manifest:
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
        written: Manifest = {**manifest, "digest": paths.digest,
                             "library": paths.library.name,
                             "sha256": file_sha256(staging_library), "size": st.st_size,
                             "log": paths.log.name}
        paths.library.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        self.trust.check_dir(paths.library.parent)
        tmp_manifest = write_json_tmp(paths.manifest, written)
        replacing = os.path.lexists(paths.manifest)
        pending = placed = logged = False
        try:
            fault_point("publish:staged")
            os.replace(tmp_manifest, paths.pending)
            pending = True
            os.replace(staging_library, paths.library)
            placed = True
            if staging_log is not None and staging_log.exists():
                with self.warnings.best_effort(staging_log, "make the compile log readable"):
                    staging_log.chmod(FILE_MODE)
                os.replace(staging_log, paths.log)
                logged = True
            fault_point("publish:library")
            os.replace(paths.pending, paths.manifest)
            pending = placed = logged = False
        except BaseException:
            # Replacing: the new library and the pending manifest that names it stay (a
            # whole entry to readers). Otherwise nothing may stay that no manifest names.
            if pending and (not placed or not replacing):
                with contextlib.suppress(OSError):
                    paths.pending.unlink()
            if placed and not replacing:
                with contextlib.suppress(OSError):
                    paths.library.unlink()
            if logged and not replacing:
                with contextlib.suppress(OSError):
                    paths.log.unlink()
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_manifest.unlink()
        fsync_dir(paths.library.parent)
        with contextlib.suppress(OSError):  # hashed above: the next lookup need not again
            self._remember_verified(paths.library, paths.library.stat(), written["sha256"])
        fault_point("published")
        key_digest = written.get("key_digest")
        for digest in {paths.digest, key_digest if isinstance(key_digest, str) else ""}:
            if layout.is_digest(digest):
                self.records.forget_failure(digest)  # failures are remembered per key
        return written

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
        with self._verified_lock:
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

    # -- records -------------------------------------------------------------------------
    def record_use(self, digest: str) -> None:
        self.records.record_use(digest)

    def record_failure(self, digest: str, run_id: str, error: CompileError, *,
                       verdict: Mapping[str, Any] | None = None) -> None:
        self.records.record_failure(digest, run_id, error, verdict=verdict)

    def read_failure(self, digest: str, run_id: str) -> CompileError | None:
        return self.records.read_failure(digest, run_id)

    def read_failure_verdict(self, digest: str) -> KnownFailure | None:
        return self.records.read_failure_verdict(digest)

    def failure_log(self, digest: str) -> Path:
        return self.records.failure_paths(digest)[1]

    def record_time(self, spec_digest: str, key_digest: str, seconds: float) -> None:
        self.records.record_time(spec_digest, key_digest, seconds)

    def recorded_time(self, query: EntryQuery, spec_digest: str) -> float | None:
        paths = query.locate(self.root)
        manifests = [query.locate(self.root, v["entry"]).manifest
                     for v in self.records.variants(paths.library.parent, query.digest)]
        return self.records.recorded_time(spec_digest, manifests, query.digest)
