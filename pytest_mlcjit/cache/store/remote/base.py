"""The remote interface: :class:`Remote`, implemented once over a few storage primitives
that each adapter provides (``s3.py``, ``file.py``; see the package's docstring for the
layout and the guarantees)."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import os
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit._util import remote_limits
from pytest_mlcjit._util.fs import FILE_MODE, fault_point
from pytest_mlcjit._util.jsonsafe import loads_bounded
from pytest_mlcjit._util.remote_limits import Deadline
from pytest_mlcjit.cache.store.remote.entries import (
    CHUNK,
    ENTRY_NAME_RE,
    MAX_GENERATION,
    MAX_LIBRARY_BYTES,
    MAX_MANIFEST_BYTES,
    QUARANTINE_PREFIX,
    Chunks,
    RemoteEntry,
    StoredObject,
    check_digest,
    entry_name,
    manifest_data,
    manifest_problem,
    mark_superseded,
    name_generation,
    quarantine_record,
    read_limited,
    same_manifest,
    superseding,
)
from pytest_mlcjit.cache.store.remote.maintenance import prune_remote, verify_remote
from pytest_mlcjit.cache.store.remote.signing import ManifestKeys
from pytest_mlcjit.cache.store.remote.url import RemoteURL
from pytest_mlcjit.errors import (
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)
from pytest_mlcjit.key import file_sha256


@dataclasses.dataclass(frozen=True)
class RemoteOptions:
    """How to reach a remote: the HMAC signing key (sign uploads, accept only validly
    signed manifests), timeouts per connection attempt and per read, the retries of a
    failed request, and an endpoint that replaces the adapter's default; and, for a run of
    many processes, the run's id and a directory private to the user that they share
    (where the first to find the remote down tells the others); the total deadline of each
    operation (:meth:`Remote.within`); and the Ed25519 keys (:mod:`.signing`): the private
    key that signs uploads (its public key is trusted too), and the public keys whose
    signatures downloads accept."""

    signing_key: bytes | None = None
    connect_timeout: float = remote_limits.CONNECT_TIMEOUT_S
    read_timeout: float = remote_limits.READ_TIMEOUT_S
    retries: int = 2
    endpoint_url: str | None = None
    run_id: str | None = None
    run_dir: Path | None = None
    #: A remote operation's total deadline: ``deadline + bytes / min_throughput`` seconds.
    deadline: float = remote_limits.DEADLINE_S
    min_throughput: float = remote_limits.MIN_THROUGHPUT
    #: A raw 32-byte Ed25519 private key: uploads are signed with it (``ed25519:<key id>:``).
    ed25519_key: bytes | None = None
    #: Raw 32-byte Ed25519 public keys: with any, downloads require a signature by one.
    trusted_keys: tuple[bytes, ...] = ()


# -- the remote interface -------------------------------------------------------------------
class Remote(abc.ABC):
    """A remote store (see the module docstring for layout and guarantees).

    The public methods are implemented here once, over a few storage primitives that each
    backend provides; backends map their failures to the :class:`RemoteError` classes.
    """

    #: Why nothing is removed on request, for a store that evicts entries by itself
    #: (GitHub's cache): prune and rm are refused, runs write no access records.
    eviction: str | None = None

    def __init__(self, url: RemoteURL, options: RemoteOptions) -> None:
        self.remote_url = url
        self.options = options
        #: What uploads are signed with and downloads verified with (``signer_id``: the
        #: Ed25519 key id uploads are signed with; ``trusted``: key id -> public key).
        self.keys = self._keys = ManifestKeys(options.signing_key, options.ed25519_key,
                                              options.trusted_keys)
        self._local = threading.local()
        self._notes: list[str] = []
        self._notes_lock = threading.Lock()

    @classmethod
    @abc.abstractmethod
    def parse_url(cls, parts: urllib.parse.SplitResult) -> RemoteURL:
        """This adapter's URL, parsed (scheme, query and fragment already checked);
        :class:`.url.BadURL` saying why not, for a URL not of its form."""

    @property
    def url(self) -> str:
        """The remote's URL, safe to show (no credentials)."""
        return self.remote_url.redacted

    @property
    def signed(self) -> bool:
        """Whether uploads are signed (an HMAC key or an Ed25519 private key is set)."""
        return self._keys.signs

    @property
    def verifies(self) -> bool:
        """Whether downloads require a valid signature (an HMAC key, or trusted Ed25519
        keys, the signer's own included, are set)."""
        return self._keys.verifies

    def take_notes(self) -> list[str]:
        """What this remote did that the run should say (a squatter's manifest it
        replaced), since the last call."""
        with self._notes_lock:
            notes, self._notes = self._notes, []
        return notes

    def _note(self, message: str) -> None:
        with self._notes_lock:
            self._notes.append(message)

    def describe(self) -> str:
        """A one-line description for messages."""
        return f"remote cache {self.url}"

    # -- reading -------------------------------------------------------------------------
    def list_manifests(self, key_digest: str) -> list[RemoteEntry]:
        """Every manifest stored for ``key_digest``, ordered by entry digest.

        Usable entries have ``problem`` None; the others are returned too, with the reason,
        so that the caller can report them (a manifest that is malformed, is for another
        key or, when signatures are verified, lacks a valid signature). A usable manifest
        that a newer usable generation of its entry supersedes (:meth:`upload` with
        ``replace``) is left out. Raises the :class:`RemoteError` subclasses for failures
        of the remote itself.
        """
        check_digest(key_digest, "cache key digest")
        found = self._entries_of(key_digest)
        return sorted((e for e, newer in zip(found, superseding(found), strict=True)
                       if newer is None), key=lambda e: (e.entry_digest, e.generation))

    def iter_entries(self) -> Iterator[RemoteEntry]:
        """Every manifest on the remote, usable or not (see :meth:`list_manifests`); a
        superseded generation has a problem saying so."""
        batch: list[RemoteEntry] = []
        for obj in self._list("entries/"):
            entry = self._entry(obj)
            if entry is None:
                continue
            if batch and entry.key_digest != batch[0].key_digest:
                yield from mark_superseded(batch)
                batch = []
            batch.append(entry)
        yield from mark_superseded(batch)

    def _entries_of(self, key_digest: str) -> list[RemoteEntry]:
        found = (self._entry(obj) for obj in self._list(f"entries/{key_digest}/"))
        return [e for e in found if e is not None]

    def download(self, manifest: Mapping[str, Any], dest: Path) -> Path:
        """Fetch the library that ``manifest`` names into ``dest`` (a new file) and return it.

        The bytes are streamed to disk and checked against the manifest's ``size`` and
        ``sha256`` before this returns; with a signing key the manifest's signature is
        checked first. On any failure ``dest`` is removed and RemoteIntegrityError (or the
        transport's RemoteError) is raised. ``dest`` must not exist.
        """
        sha, size = self._usable_blob(manifest)
        name = f"blobs/{sha}"
        where = self._location(name)
        with self.within(f"downloading {where}", size) as deadline:
            stream = self._open_stream(name)
            if stream is None:
                raise RemoteIntegrityError(
                    f"{where} is missing although a manifest names it; prune or re-publish the "
                    "entry (upload with replace=True)"
                )
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            with contextlib.closing(stream):
                fd = os.open(dest, flags, FILE_MODE)
                try:
                    h, n = hashlib.sha256(), 0
                    with open(fd, "wb") as f:
                        fault_point("download")  # tests: MLCJIT_TEST_ENOSPC=download
                        for chunk in stream:
                            n += len(chunk)
                            if n > size or deadline.passed():
                                break
                            h.update(chunk)
                            f.write(chunk)
                    if deadline.expired:
                        raise self.late(f"downloading {where}", deadline)
                    if n != size or h.hexdigest() != sha:
                        got = (f"more than {size} bytes" if n > size
                               else f"{n} bytes, sha256 {h.hexdigest()}")
                        raise RemoteIntegrityError(
                            f"{where} is corrupt: got {got}; the manifest says {size} bytes, "
                            f"sha256 {sha}. The download was deleted; prune or re-publish the entry"
                        )
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(dest)
                    raise
            return dest

    def _usable_blob(self, manifest: Mapping[str, Any]) -> tuple[str, int]:
        problem = manifest_problem(dict(manifest), None) or self._keys.problem(manifest)
        if problem is not None:
            raise RemoteIntegrityError(f"refusing to download from {self.url}: the manifest "
                                       f"{problem}")
        return manifest["sha256"], manifest["size"]

    # -- writing -------------------------------------------------------------------------
    def upload(self, key_digest: str, entry_digest: str, library: Path,
               manifest: Mapping[str, Any], *, replace: bool = False) -> bool:
        """Publish ``library`` with ``manifest`` as entry ``entry_digest`` of ``key_digest``.

        The manifest's ``digest`` must be ``key_digest`` and the library must match its
        ``size`` and ``sha256`` (else RemoteIntegrityError, nothing uploaded). The blob goes
        first (skipped if the remote holds it with a verified digest, which is then
        touched so that prune's grace period keeps it; unless ``replace``), the manifest
        last, signed if a key is set; after the manifest, the blob is checked present
        again (uploaded again if a concurrent prune removed it).

        The manifest is created only if absent: returns False, changing nothing, when the
        entry already exists (another job published it). A writer that signs never loses
        to an object it would refuse to read: a manifest there that is junk, unsigned or
        wrongly signed is replaced (said by :meth:`take_notes`). ``replace=True`` (REDO)
        overwrites the blob and publishes the manifest; a signing writer publishes it as
        a new generation (``entries/<key>/<entry>.<N>.json``, with the signed field
        ``generation``, one more than the newest valid one) and removes the older ones,
        so that an old manifest put back is never preferred (:meth:`list_manifests`).
        Returns True. An upload that could not be made raises a :class:`RemoteError`.
        """
        check_digest(key_digest, "cache key digest")
        check_digest(entry_digest, "entry digest")
        problem = manifest_problem(dict(manifest), key_digest, entry_digest)
        if problem is not None:
            raise RemoteIntegrityError(f"refusing to upload {library}: its manifest {problem}")
        sha, size = manifest["sha256"], manifest["size"]
        actual_size, actual_sha = os.stat(library).st_size, file_sha256(library)
        if (actual_size, actual_sha) != (size, sha):
            raise RemoteIntegrityError(
                f"refusing to upload {library}: it has {actual_size} bytes, sha256 "
                f"{actual_sha}; its manifest says {size} bytes, sha256 {sha}"
            )
        generation = self._next_generation(key_digest, entry_digest) if replace else 0
        data = manifest_data(manifest, generation, self._keys, library)
        blob = f"blobs/{sha}"
        with self.within(f"uploading {self._location(blob)}", size):
            if replace or not self._blob_present(blob, sha, size):
                self._put_blob(blob, library, sha, size)
            else:  # reused: made young, so that a prune's grace period keeps it
                self._touch(blob)
        name = entry_name(key_digest, entry_digest, generation)
        with self.within(f"publishing {self._location(name)}", len(data)):
            published = self._publish(name, data, replace=replace)
        if not published:
            return False
        if replace and generation and self.signed:
            self._drop_older(key_digest, entry_digest, generation)
        with self.within(f"checking {self._location(blob)}"):
            gone = self._stat(blob) is None
        if gone:  # a prune removed it since it was found present: the entry needs it
            with self.within(f"uploading {self._location(blob)}", size):
                self._put_blob(blob, library, sha, size)
        return True

    def _publish(self, name: str, data: bytes, *, replace: bool) -> bool:
        """Write manifest ``name``: in place with ``replace``, else create-only, replacing
        what is there only when this writer signs and would refuse to read it."""
        if replace:
            return self._put_manifest(name, data, create_only=False)
        if self._put_manifest(name, data, create_only=True):
            return True
        if not self.signed:
            return False  # cannot tell a squatter from another publisher: theirs stands
        there = self._entry(StoredObject(name, MAX_MANIFEST_BYTES, 0.0))
        if there is not None and there.usable:
            return False  # another trusted writer published it first
        why = "it was removed meanwhile" if there is None else there.problem
        if not self._put_manifest(name, data, create_only=False):
            raise RemoteError(f"publishing {self._location(name)} failed: the object there "
                              "could not be replaced")
        self._note(f"replaced {self._location(name)}, an object this writer would refuse "
                   f"to read ({why})")
        return True

    def _next_generation(self, key_digest: str, entry_digest: str) -> int:
        """The generation a REDO of the entry publishes: one more than the newest one this
        writer accepts (0 if none), except for a writer that neither signs nor verifies:
        the newest one's, overwritten in place (as before generations; a writer that only
        verifies never overwrites a signed manifest it cannot sign again)."""
        valid = [e.generation for e in self._entries_of(key_digest)
                 if e.entry_digest == entry_digest and e.usable]
        if not valid:
            return 0
        if not self.signed and not self.verifies:
            return max(valid)
        if max(valid) >= MAX_GENERATION:
            raise RemoteError(f"cannot publish a new generation of entry {entry_digest} of "
                              f"key {key_digest}: it has reached {MAX_GENERATION}")
        return max(valid) + 1

    def _drop_older(self, key_digest: str, entry_digest: str, generation: int) -> None:
        """Remove the manifests of the entry older than ``generation`` (best effort: a
        manifest left is superseded, never preferred)."""
        try:
            for obj in self._list(f"entries/{key_digest}/"):
                match = ENTRY_NAME_RE.fullmatch(obj.name)
                if (match and match.group(2) == entry_digest
                        and name_generation(obj.name) < generation):
                    self._delete(obj.name)
        except RemoteError:
            pass

    # -- quarantine ----------------------------------------------------------------------
    def quarantine(self, entry: RemoteEntry, why: str) -> str:
        """Move ``entry``'s manifest aside, to ``quarantine/<key>/<entry>.json`` (a JSON
        record: the manifest's bytes as text, ``why``, ``time``), then delete it from
        ``entries/``; returns the quarantine record's URL. Raises RemoteError as any
        write does (the entry is left in place if the record could not be written), and
        RemoteIntegrityError, moving nothing, if the object is no longer the manifest
        refused (a trusted writer replaced it, or someone swapped in other bytes)."""
        check_digest(entry.key_digest, "cache key digest")
        check_digest(entry.entry_digest, "entry digest")
        raw = self._read(entry.name)
        if raw is not None and not same_manifest(raw, entry.manifest):
            raise RemoteIntegrityError(f"{entry.location} changed since it was refused: "
                                       "left in place")
        data = quarantine_record(entry, raw if entry.manifest is not None else None, why)
        name = f"{QUARANTINE_PREFIX}{entry.key_digest}/{entry.entry_digest}.json"
        with self.within(f"quarantining {self._location(name)}", len(data)):
            self._put_manifest(name, data, create_only=False)
        with self.within(f"removing {entry.location}"):
            self._delete(entry.name)
        return self._location(name)

    def iter_quarantined(self) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """Every quarantine record: its URL and the record (None if it is not a JSON
        object: someone else's object)."""
        for obj in self._list(QUARANTINE_PREFIX):
            try:
                raw = self._read(obj.name, obj.size)
                record = None if raw is None else loads_bounded(raw,
                                                                max_bytes=MAX_MANIFEST_BYTES)
            except (RemoteIntegrityError, ValueError):
                record = None
            yield self._location(obj.name), record if isinstance(record, dict) else None

    # -- maintenance (:mod:`.maintenance`) ----------------------------------------------
    def verify(self, entries: Iterable[RemoteEntry] | None = None) -> list[RemoteEntry]:
        """Check every entry (or those of ``entries``) and its blob's bytes; the entries
        with a problem (:func:`.maintenance.verify_remote`)."""
        return verify_remote(self, entries)

    def prune(self, older_than_seconds: float, *,
              blob_grace_seconds: float = 3600.0) -> list[str]:
        """Remove old entries and the blobs no entry names (:func:`.maintenance.prune_remote`)."""
        return prune_remote(self, older_than_seconds, blob_grace_seconds=blob_grace_seconds)

    def _prune_leftovers(self, cutoff: float) -> list[str]:
        """Remove what the store keeps outside its layout, older than ``cutoff``; URLs."""
        return []  # most stores keep nothing (a directory: the temp files of dead writers)

    # -- helpers -------------------------------------------------------------------------
    def _entry(self, obj: StoredObject) -> RemoteEntry | None:
        match = ENTRY_NAME_RE.fullmatch(obj.name)
        if match is None:
            return None  # not a manifest name: ignored
        key_digest, entry_digest = match.groups()
        generation = name_generation(obj.name)
        where = self._location(obj.name)
        manifest: Any = None
        try:
            raw = self._read(obj.name, obj.size)
            if raw is None:
                return None  # removed since it was listed
            manifest = loads_bounded(raw, max_bytes=MAX_MANIFEST_BYTES)
        except RemoteIntegrityError:
            problem: str | None = f"is larger than {MAX_MANIFEST_BYTES} bytes"
        except ValueError as exc:  # junk: too large, too deep, not UTF-8 JSON
            problem = f"is not UTF-8 JSON ({exc})"
        else:
            problem = (manifest_problem(manifest, key_digest, entry_digest, generation)
                       or self._keys.problem(manifest))
        return RemoteEntry(key_digest, entry_digest, where,
                           manifest if isinstance(manifest, dict) else None,
                           None if problem is None else f"manifest {where} {problem}",
                           obj.modified, generation)

    def _read(self, name: str, size: int = MAX_MANIFEST_BYTES) -> bytes | None:
        """A small object's bytes (at most MAX_MANIFEST_BYTES, else RemoteIntegrityError),
        None if absent; ``size``: its size as listed (for the deadline)."""
        where = self._location(name)
        with self.within(f"reading {where}", min(size, MAX_MANIFEST_BYTES)) as deadline:
            stream = self._open_stream(name)
            if stream is None:
                return None
            with contextlib.closing(stream):
                return read_limited(stream, where, deadline)

    # -- deadlines -------------------------------------------------------------------------
    @contextlib.contextmanager
    def within(self, what: str, size: int = 0) -> Iterator[Deadline]:
        """Bound the operation in the block (``what``, moving ``size`` bytes) by its total
        deadline, ``options.deadline + size / options.min_throughput`` seconds: when it
        expires, what the operation waits on is closed (the adapter registers that with
        :meth:`current_deadline`), and the operation fails with RemoteUnavailableError."""
        seconds = (self.options.deadline
                   + min(size, MAX_LIBRARY_BYTES) / self.options.min_throughput)
        deadline = Deadline(seconds)
        outer = getattr(self._local, "deadline", None)
        self._local.deadline = deadline
        try:
            with deadline:
                yield deadline
        except Exception:
            if deadline.expired:
                raise self.late(what, deadline) from None
            raise
        finally:
            self._local.deadline = outer

    def current_deadline(self) -> Deadline | None:
        """The deadline of the operation this thread is in (:meth:`within`), if any."""
        deadline: Deadline | None = getattr(self._local, "deadline", None)
        return deadline

    def late(self, what: str, deadline: Deadline) -> RemoteUnavailableError:
        opts = self.options
        return RemoteUnavailableError(
            f"{what} did not finish within its deadline of {deadline.seconds:.1f}s "
            f"({opts.deadline:g}s + its size at {opts.min_throughput:g} bytes/s: "
            "MLC_JIT_REMOTE_DEADLINE, MLC_JIT_REMOTE_MIN_THROUGHPUT); the remote is stalled "
            "or too slow")

    # -- storage primitives: names are "/"-separated, relative to the remote's root -------
    @abc.abstractmethod
    def _location(self, name: str) -> str:
        """The URL of object ``name``, safe to show."""

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterator[StoredObject]:
        """The objects whose names start with ``prefix`` (a directory-like "x/y/")."""

    @abc.abstractmethod
    def _open_stream(self, name: str) -> Chunks | None:
        """The object's bytes in chunks (a generator to close when done), None if absent."""

    @abc.abstractmethod
    def _blob_present(self, name: str, sha256: str, size: int) -> bool:
        """Whether the store holds blob ``name`` with this size and a *verified* SHA-256:
        a checksum the store itself verified when the object was written, or the bytes
        read and hashed. An object of the right size without such a checksum is not
        present (the upload overwrites it: its name is predictable, so anyone may have
        planted it)."""

    def _stat(self, name: str) -> StoredObject | None:
        """Object ``name``'s size and last-modified time, None if absent. Adapters
        override this with one request (HEAD, stat); this fallback lists its prefix."""
        prefix = name.rpartition("/")[0] + "/" if "/" in name else ""
        return next((o for o in self._list(prefix) if o.name == name), None)

    def _touch(self, name: str) -> None:  # noqa: B027 - a no-op for a store that cannot
        """Make object ``name``'s last-modified time "now" (an upload that reuses a blob
        touches it, so that a prune's grace period keeps it). Adapters override this; a
        store that cannot touch an object leaves it as it is (this fallback)."""

    @abc.abstractmethod
    def _put_blob(self, name: str, library: Path, sha256: str, size: int) -> None:
        """Store ``library`` as ``name``, atomically; RemoteIntegrityError if the bytes sent
        do not hash to ``sha256``."""

    @abc.abstractmethod
    def _put_manifest(self, name: str, data: bytes, *, create_only: bool) -> bool:
        """Write a manifest atomically; with ``create_only``, False if it already exists."""

    @abc.abstractmethod
    def _delete(self, name: str) -> None:
        """Remove an object; absent is fine."""


__all__ = ["CHUNK", "MAX_LIBRARY_BYTES", "MAX_MANIFEST_BYTES", "Chunks", "Remote",
           "RemoteEntry", "RemoteOptions", "StoredObject", "read_limited"]
