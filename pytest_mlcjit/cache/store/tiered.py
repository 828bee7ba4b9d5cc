"""Two tiers as one store: the local cache first, then a remote shared by many machines.

:class:`TieredStore` is a :class:`.interface.Store`: a lookup is the local one; after a
local miss, :meth:`~TieredStore.fetch` asks the remote (under the key's lock when the local
store takes writes, so one process per machine downloads an entry), checks what it
downloads, and publishes it locally with the same atomic publish as a compile (or, over a
read-only local store, keeps it in a private directory of the run); a publish goes to the
local cache, then is uploaded. The engine does not know the remote is there.

:class:`RemoteTier` is the run's remote: the adapter (:mod:`.remote`), the statistics and
the failure policy, as sccache and ccache users asked for it:

* authentication and permission errors always fail the request (they are never a miss);
* any other error (connection, timeout, throttling, server error) fails the request with
  ``--mlc-jit-remote-required``; otherwise it is reported once, the remote is marked down
  for the rest of the run, and the library is compiled locally;
* a remote object whose digest or signature is wrong is reported and never loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache.manifest import Manifest
from pytest_mlcjit.cache.store.interface import (
    MISSING,
    EntryQuery,
    ForwardingStore,
    Hit,
    Job,
    Lookup,
    Store,
    no_job,
)
from pytest_mlcjit.cache.store.remote import Remote, RemoteOptions, open_remote
from pytest_mlcjit.cache.store.remote.base import RemoteEntry
from pytest_mlcjit.cache.store.remote.signing import SIGNATURE_FIELD
from pytest_mlcjit.errors import (
    RemoteAuthError,
    RemoteError,
    RemoteIntegrityError,
)
from pytest_mlcjit.inputs.check import InputChecker, changes_since

REMOTE_MODES = ("read", "readwrite")
#: Manifest fields a download does not carry over: the local publish writes its own.
_LOCAL_FIELDS = ("digest", "library", "sha256", "size", "log", SIGNATURE_FIELD)


@dataclasses.dataclass
class RemoteStats:
    """What the remote did in a run (merged across xdist workers on the controller)."""

    downloads: int = 0
    download_bytes: int = 0
    download_seconds: float = 0.0
    uploads: int = 0
    upload_bytes: int = 0
    errors: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)

    def merge(self, other: Mapping[str, Any]) -> None:
        """Add another process's :meth:`to_json`."""
        for field in dataclasses.fields(self):
            value = other.get(field.name)
            if field.name == "warnings":
                self.warnings += [w for w in value or () if w not in self.warnings]
            elif isinstance(value, int | float) and not isinstance(value, bool):
                setattr(self, field.name, getattr(self, field.name) + value)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RemoteTier:
    """One remote for one run: the adapter, the failure policy and the statistics;
    thread-safe. ``mode`` ``read`` never uploads."""

    def __init__(self, url: str, *, mode: str = "readwrite", required: bool = False,
                 options: RemoteOptions | None = None, remote: Remote | None = None,
                 stats: RemoteStats | None = None) -> None:
        self.mode = mode
        self.required = required
        self.remote = remote or open_remote(url, options)
        self.url = self.remote.url
        #: Why the remote is down for the rest of this run (None: usable), and the error
        #: that put it down (raised again for every later use when the remote is required).
        self.down: str | None = None
        self._down_error: RemoteError | None = None
        self.stats = stats if stats is not None else RemoteStats()
        self._lock = threading.Lock()
        self._private: dict[str, Hit] = {}
        self._private_dir: Path | None = None

    @property
    def writes(self) -> bool:
        return self.mode == "readwrite"

    def close(self) -> None:
        """Remove the run's private downloads (those of a read-only local store)."""
        with self._lock:
            private, self._private_dir = self._private_dir, None
            self._private.clear()
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)

    # -- failures ------------------------------------------------------------------------
    def warn(self, message: str) -> None:
        with self._lock:
            if message not in self.stats.warnings:
                self.stats.warnings.append(message)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Apply the failure policy to a remote operation (see the module's docstring)."""
        try:
            yield
        except RemoteIntegrityError as exc:
            with self._lock:
                self.stats.errors += 1
            self.warn(f"{what}: {exc} (not loaded)")
            if self.required:
                raise
        except RemoteAuthError:
            with self._lock:
                self.stats.errors += 1
            raise
        except RemoteError as exc:
            with self._lock:
                self.stats.errors += 1
                self.down = self.down or str(exc)
                self._down_error = self._down_error or exc
            if self.required:
                raise
            self.warn(f"remote {self.url} failed while {what}: {exc}; it is not used for the "
                      "rest of this run (pass --mlc-jit-remote-required to fail instead)")

    def usable(self) -> bool:
        """Whether to use the remote now: not when it is down, and then, when it is
        required, the error that put it down is raised again (every request that would
        have used it fails, not only the first)."""
        if self.down is None:
            return True
        if self.required and self._down_error is not None:
            raise type(self._down_error)(str(self._down_error))
        return False

    # -- reading -------------------------------------------------------------------------
    def fits(self, query: EntryQuery, checker: InputChecker
             ) -> Callable[[Mapping[str, Any]], bool]:
        """Whether a remote manifest fits ``query`` here: the recorded-inputs rule exactly
        as for local entries (its inputs are unchanged here), and a current toolchain."""
        base = query.inputs_base()

        def fits(manifest: Mapping[str, Any]) -> bool:
            if query.stale(manifest) is not None:
                return False
            if base is None:
                return manifest.get("digest") == query.digest
            return changes_since(manifest.get("inputs"), base, checker) == []

        return fits

    def select(self, query: EntryQuery, fits: Callable[[Mapping[str, Any]], bool]
               ) -> RemoteEntry | None:
        """The newest usable remote entry of ``query``'s key that ``fits``, or None.
        Entries with a problem (a bad or missing signature, a malformed manifest) are
        reported and skipped."""
        if not self.usable():
            return None
        found: list[RemoteEntry] = []
        with self.guard(f"listing the entries of key {query.digest}"):
            found = self.remote.list_manifests(query.digest)
        usable = []
        for entry in found:
            if entry.problem is not None:
                self.warn(f"refused a remote entry of {query.describe}: {entry.problem}")
            elif entry.manifest is not None and fits(entry.manifest):
                usable.append(entry)
        usable.sort(key=lambda e: -(e.created or 0.0))
        return usable[0] if usable else None

    def download(self, entry: RemoteEntry, dest: Path) -> Manifest | None:
        """Download ``entry``'s library to ``dest`` (checked against its size and SHA-256
        before this returns); its manifest as the local cache keeps it, or None if the
        download failed (reported)."""
        assert entry.manifest is not None
        t0 = time.monotonic()
        ok = False
        with self.guard(f"downloading {entry.location}"):
            self.remote.download(entry.manifest, dest)
            ok = True
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            return None
        with self._lock:
            self.stats.downloads += 1
            self.stats.download_bytes += int(entry.manifest["size"])
            self.stats.download_seconds += time.monotonic() - t0
        manifest: dict[str, Any] = {k: v for k, v in entry.manifest.items()
                                    if k not in _LOCAL_FIELDS}
        manifest["remote"] = entry.location
        return manifest  # type: ignore[return-value] # the local publish fills the rest

    def private_root(self) -> Path:
        with self._lock:
            if self._private_dir is None:
                self._private_dir = Path(tempfile.mkdtemp(prefix="mlcjit-remote-"))
            return self._private_dir

    def private_hit(self, digest: str) -> Hit | None:
        """The private download of key ``digest`` made earlier in this run, if any."""
        with self._lock:
            return self._private.get(digest)

    def keep_private(self, digest: str, hit: Hit) -> None:
        """Remember ``hit``, downloaded under :meth:`private_root`, as key ``digest``'s."""
        with self._lock:
            self._private[digest] = hit

    # -- writing -------------------------------------------------------------------------
    def upload(self, query: EntryQuery, hit: Hit, *, replace: bool) -> bool:
        """Upload a freshly published local entry (``readwrite`` only); ``replace`` for
        REDO. True if this run published it."""
        if not self.writes or not self.usable():
            return False
        body = {k: v for k, v in hit.manifest.items() if k not in ("log", "remote")}
        done = False
        with self.guard(f"uploading {query.describe}"):
            done = self.remote.upload(query.digest, hit.paths.digest, hit.paths.library, body,
                                      replace=replace)
        if done:
            with self._lock:
                self.stats.uploads += 1
                self.stats.upload_bytes += int(hit.manifest["size"])
        return done


class TieredStore(ForwardingStore):
    """The local store (``inner``), then ``tier``: a :class:`.interface.Store` (see the
    module doc). Everything but :meth:`fetch` and :meth:`publish` is the local store's."""

    def __init__(self, local: Store, tier: RemoteTier, *, checker: InputChecker) -> None:
        super().__init__(local)
        self.tier = tier
        self.checker = checker

    def __repr__(self) -> str:
        return f"TieredStore({self.inner!r}, {self.tier.url!r})"

    def fetch(self, query: EntryQuery, *, job: Job = no_job) -> Lookup:
        if self.inner.writable:
            return self._pull(query, job)
        return self._pull_private(query, job)

    def _pull(self, query: EntryQuery, job: Job) -> Lookup:
        """Under the key's lock: the remote entry that fits, downloaded into a staging
        directory, checked, and published locally."""
        entry = self.tier.select(query, self.tier.fits(query, self.checker))
        if entry is None:
            return MISSING
        staging = self.inner.new_staging_dir(query.digest)
        try:
            with job("download"):
                manifest = self.tier.download(entry, staging / "library")
            if manifest is None:
                return MISSING
            hit = self.inner.publish(query, staging / "library", None, manifest)
        finally:
            self.inner.remove_staging(staging)
        return Hit(hit.paths, hit.manifest, "remote")

    def _pull_private(self, query: EntryQuery, job: Job) -> Lookup:
        """Over a read-only local store (READONLY): the remote entry that fits, downloaded
        into the run's private directory (so a read-only cache directory still works)."""
        found = self.tier.private_hit(query.digest)
        fits = self.tier.fits(query, self.checker)
        if found is not None and found.paths.library.is_file() and fits(found.manifest):
            return found
        entry = self.tier.select(query, fits)
        if entry is None or entry.manifest is None:
            return MISSING
        variant = entry.entry_digest != query.digest
        paths = query.locate(self.tier.private_root(),
                             entry.entry_digest if variant else None)
        paths.library.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            paths.library.unlink()
        with job("download"):
            manifest = self.tier.download(entry, paths.library)
        if manifest is None:
            return MISSING
        complete: Manifest = {**manifest, "digest": entry.manifest["digest"],
                              "sha256": entry.manifest["sha256"],
                              "size": entry.manifest["size"]}
        hit = Hit(paths, complete, "remote")
        self.tier.keep_private(query.digest, hit)
        return hit

    def publish(self, query: EntryQuery, library: Path, log: Path | None,
                manifest: Manifest, *, replace: bool = False) -> Hit:
        hit = self.inner.publish(query, library, log, manifest, replace=replace)
        self.tier.upload(query, hit, replace=replace)
        return hit
