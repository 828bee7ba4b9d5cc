"""The remote interface: :class:`Remote`, implemented once over a few storage primitives
that each adapter provides (``s3.py``, ``file.py``; see the package's docstring for the
layout and the guarantees)."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Generator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pytest_mlcjit._util import remote_limits
from pytest_mlcjit._util.fs import FILE_MODE, fault_point
from pytest_mlcjit._util.jsonsafe import MAX_JSON_BYTES, loads_bounded
from pytest_mlcjit._util.remote_limits import Deadline
from pytest_mlcjit.cache.layout import DIGEST_RE
from pytest_mlcjit.cache.store.remote.signing import (
    SIGNATURE_FIELD,
    manifest_signature,
    signature_problem,
)
from pytest_mlcjit.cache.store.remote.url import RemoteURL
from pytest_mlcjit.errors import (
    RemoteConfigError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)
from pytest_mlcjit.key import file_sha256

#: A manifest is a few hundred bytes; anything far larger is not one.
MAX_MANIFEST_BYTES = MAX_JSON_BYTES
#: The largest library a remote manifest may name (1 PiB: anything larger is junk, and a
#: size is used in arithmetic, as the download's deadline).
MAX_LIBRARY_BYTES = 1 << 50

CHUNK = 1 << 20


#: An object's bytes, in chunks: a generator, closed when the reader stops early.
Chunks = Generator[bytes, None, None]


_SHA256_RE = re.compile(r"[0-9a-f]{64}")


_ENTRY_NAME_RE = re.compile(r"entries/([0-9a-f]{32}|[0-9a-f]{64})/"
                            r"([0-9a-f]{32}|[0-9a-f]{64})\.json")


_BLOB_NAME_RE = re.compile(r"blobs/([0-9a-f]{64})")


def _manifest_problem(manifest: Any, key_digest: str | None,
                      entry_digest: str | None = None) -> str | None:
    """Why ``manifest`` is not a usable manifest (of ``key_digest`` and ``entry_digest``,
    if given), or None.

    The manifest must name its key (``key_digest``, else ``digest``) and, with a
    ``key_digest``, its entry (``digest``): that binds a signature to both, so a signed
    manifest copied under another key or entry is refused."""
    if not isinstance(manifest, dict):
        return "is not a JSON object"
    sha, size = manifest.get("sha256"), manifest.get("size")
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        return f"has an invalid sha256 {sha!r} (expected 64 lowercase hex digits)"
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_LIBRARY_BYTES:
        return (f"has an invalid size {str(size)[:40]} (expected an integer from 0 to "
                f"{MAX_LIBRARY_BYTES})")
    digest = manifest.get("digest")
    named_key = manifest.get("key_digest", digest)
    if key_digest is not None and named_key != key_digest:
        return f"is for key {named_key!r}, not {key_digest}"
    if entry_digest is not None and "key_digest" in manifest and digest != entry_digest:
        return f"is for entry {digest!r}, not {entry_digest}"
    return None


def _check_digest(digest: str, what: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise RemoteConfigError(f"invalid {what} {digest!r}: expected 32 or 64 lowercase hex "
                                "digits")
    return digest


@dataclasses.dataclass(frozen=True)
class RemoteOptions:
    """How to reach a remote: the signing key (sign uploads, accept only validly signed
    manifests), timeouts per connection attempt and per read, the retries of a failed
    request, and an endpoint that replaces the adapter's default; and, for a run of many
    processes, the run's id and a directory private to the user that they share (where
    the first to find the remote down tells the others); and the total deadline of each
    operation (:meth:`Remote.within`)."""

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


class RemoteEntry(NamedTuple):
    """One manifest found on a remote, usable or not.

    ``problem`` is None for a usable entry; otherwise it says why the entry must not be
    used (unreadable JSON, bad fields, missing or invalid signature, or, from
    :meth:`Remote.verify`, a bad blob), and ``manifest`` holds what could be parsed.
    """

    key_digest: str
    entry_digest: str
    location: str  #: the manifest object's URL (redacted)
    manifest: dict[str, Any] | None
    problem: str | None
    modified: float | None  #: when the store last wrote the manifest object (epoch seconds)

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def created(self) -> float | None:
        """The manifest's ``created`` time if it has a number there, else ``modified``."""
        created = (self.manifest or {}).get("created")
        if isinstance(created, (int, float)) and not isinstance(created, bool):
            return float(created)
        return self.modified


class StoredObject(NamedTuple):
    """An object as a store lists it: its name under the remote's root, size, mtime."""

    name: str
    size: int
    modified: float


# -- the remote interface -------------------------------------------------------------------
class Remote(abc.ABC):
    """A remote store (see the module docstring for layout and guarantees).

    The public methods are implemented here once, over a few storage primitives that each
    backend provides; backends map their failures to the :class:`RemoteError` classes.
    """

    def __init__(self, url: RemoteURL, options: RemoteOptions) -> None:
        self.remote_url = url
        self.options = options
        self._signing_key = options.signing_key
        self._local = threading.local()

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
        """Whether uploads are signed and downloads require a valid signature."""
        return self._signing_key is not None

    def describe(self) -> str:
        """A one-line description for messages."""
        return f"remote cache {self.url}"

    # -- reading -------------------------------------------------------------------------
    def list_manifests(self, key_digest: str) -> list[RemoteEntry]:
        """Every manifest stored for ``key_digest``, ordered by entry digest.

        Usable entries have ``problem`` None; the others are returned too, with the reason,
        so that the caller can report them (a manifest that is malformed, is for another
        key or, when a signing key is set, lacks a valid signature). Raises the
        :class:`RemoteError` subclasses for failures of the remote itself.
        """
        _check_digest(key_digest, "cache key digest")
        found = (self._entry(obj) for obj in self._list(f"entries/{key_digest}/"))
        return sorted((e for e in found if e is not None), key=lambda e: e.entry_digest)

    def iter_entries(self) -> Iterator[RemoteEntry]:
        """Every manifest on the remote, usable or not (see :meth:`list_manifests`)."""
        for obj in self._list("entries/"):
            entry = self._entry(obj)
            if entry is not None:
                yield entry

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
        problem = _manifest_problem(dict(manifest), None)
        if problem is None and self._signing_key is not None:
            problem = signature_problem(manifest, self._signing_key)
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
        first (skipped if the remote already holds it, unless ``replace``), the manifest
        last, signed if a signing key is set. The manifest is created only if absent:
        returns False, changing nothing, when the entry already exists (another job
        published it). ``replace=True`` overwrites the blob and the manifest (a forced
        rebuild) and returns True.
        """
        _check_digest(key_digest, "cache key digest")
        _check_digest(entry_digest, "entry digest")
        problem = _manifest_problem(dict(manifest), key_digest, entry_digest)
        if problem is not None:
            raise RemoteIntegrityError(f"refusing to upload {library}: its manifest {problem}")
        sha, size = manifest["sha256"], manifest["size"]
        actual_size, actual_sha = os.stat(library).st_size, file_sha256(library)
        if (actual_size, actual_sha) != (size, sha):
            raise RemoteIntegrityError(
                f"refusing to upload {library}: it has {actual_size} bytes, sha256 "
                f"{actual_sha}; its manifest says {size} bytes, sha256 {sha}"
            )
        body = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
        try:
            if self._signing_key is not None:
                body[SIGNATURE_FIELD] = manifest_signature(body, self._signing_key)
            data = (json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False,
                               allow_nan=False) + "\n").encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise RemoteError(f"refusing to upload {library}: its manifest is not JSON "
                              f"({exc})") from None
        if len(data) > MAX_MANIFEST_BYTES:
            raise RemoteError(f"refusing to upload {library}: its manifest has {len(data)} "
                              f"bytes, more than {MAX_MANIFEST_BYTES}")
        blob = f"blobs/{sha}"
        with self.within(f"uploading {self._location(blob)}", size):
            if replace or not self._blob_present(blob, sha, size):
                self._put_blob(blob, library, sha, size)
        name = f"entries/{key_digest}/{entry_digest}.json"
        with self.within(f"publishing {self._location(name)}", len(data)):
            return self._put_manifest(name, data, create_only=not replace)

    # -- maintenance ---------------------------------------------------------------------
    def verify(self, entries: Iterable[RemoteEntry] | None = None) -> list[RemoteEntry]:
        """Check every entry (or those of ``entries``, from :meth:`iter_entries`): its
        manifest (and signature, if a key is set) and its blob's bytes (read in full and
        hashed). Returns the entries with a problem (each blob is read once however many
        entries name it)."""
        bad: list[RemoteEntry] = []
        blobs: dict[tuple[str, int], str | None] = {}
        for entry in self.iter_entries() if entries is None else entries:
            if entry.problem is not None or entry.manifest is None:
                bad.append(entry)
                continue
            sha, size = entry.manifest["sha256"], entry.manifest["size"]
            if (sha, size) not in blobs:
                blobs[sha, size] = self._blob_problem(sha, size)
            if blobs[sha, size] is not None:
                bad.append(entry._replace(problem=f"manifest {entry.location} "
                                                  f"{blobs[sha, size]}"))
        return bad

    def _blob_problem(self, sha: str, size: int) -> str | None:
        """Why blob ``sha`` does not hold ``size`` bytes hashing to ``sha``, or None."""
        h, n = hashlib.sha256(), 0
        name = f"blobs/{sha}"
        with self.within(f"verifying {self._location(name)}", size) as deadline:
            stream = self._open_stream(name)
            if stream is None:
                return f"names {self._location(name)}, which is missing"
            with contextlib.closing(stream):
                for chunk in stream:
                    if deadline.passed():
                        raise self.late(f"verifying {self._location(name)}", deadline)
                    n += len(chunk)
                    if n > size:
                        return (f"names {self._location(name)}, which has more than {size} "
                                "bytes")
                    h.update(chunk)
        if n != size or h.hexdigest() != sha:
            return (f"names {self._location(name)}, which is corrupt: {n} bytes, sha256 "
                    f"{h.hexdigest()} (the manifest says {size} bytes, sha256 {sha})")
        return None

    def prune(self, older_than_seconds: float, *,
              blob_grace_seconds: float = 3600.0) -> list[str]:
        """Remove the manifests created more than ``older_than_seconds`` ago (their
        ``created`` field, else the object's time), then the blobs no remaining manifest
        names that are older than ``blob_grace_seconds`` (a blob younger than that may
        belong to an upload whose manifest is not written yet). Returns the removed
        objects' URLs.

        Blobs are listed before manifests, so a blob uploaded while this runs is never
        removed. Run it from one maintenance job: an upload that reuses an old orphaned
        blob in the instant between listing and removal leaves an entry whose blob is
        missing, which :meth:`download` and :meth:`verify` report and ``replace=True``
        repairs.
        """
        now = time.time()
        blobs = list(self._list("blobs/"))
        referenced: set[str] = set()
        removed: list[str] = []
        for entry in self.iter_entries():
            created = entry.created
            if created is not None and created < now - older_than_seconds:
                self._delete(f"entries/{entry.key_digest}/{entry.entry_digest}.json")
                removed.append(entry.location)
            elif isinstance(entry.manifest, dict):
                referenced.add(str(entry.manifest.get("sha256")))
        for blob in blobs:
            match = _BLOB_NAME_RE.fullmatch(blob.name)
            if (match and match.group(1) not in referenced
                    and blob.modified < now - blob_grace_seconds):
                self._delete(blob.name)
                removed.append(self._location(blob.name))
        return removed

    # -- helpers -------------------------------------------------------------------------
    def _entry(self, obj: StoredObject) -> RemoteEntry | None:
        match = _ENTRY_NAME_RE.fullmatch(obj.name)
        if match is None:
            return None  # not a manifest name: ignored
        key_digest, entry_digest = match.groups()
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
            problem = _manifest_problem(manifest, key_digest, entry_digest)
            if problem is None and self._signing_key is not None:
                problem = signature_problem(manifest, self._signing_key)
        return RemoteEntry(key_digest, entry_digest, where,
                           manifest if isinstance(manifest, dict) else None,
                           None if problem is None else f"manifest {where} {problem}",
                           obj.modified)

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
        """Whether the store holds blob ``name`` with this size (and SHA-256, where the
        store can tell cheaply)."""

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


def read_limited(chunks: Iterator[bytes], where: str, deadline: Deadline | None = None
                 ) -> bytes:
    data = bytearray()
    for chunk in chunks:
        if deadline is not None and deadline.passed():
            raise RemoteUnavailableError(f"{where}: deadline")  # worded by Remote.within
        data += chunk
        if len(data) > MAX_MANIFEST_BYTES:
            raise RemoteIntegrityError(f"{where} is larger than {MAX_MANIFEST_BYTES} bytes: "
                                       "not a manifest")
    return bytes(data)
