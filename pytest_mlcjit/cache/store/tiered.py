"""Two tiers as one store: the local cache first, then a remote shared by many machines.

:class:`TieredStore` is a :class:`.interface.Store`: a lookup is the local one; after a
local miss, :meth:`~TieredStore.fetch` asks the remote (under the key's lock when the local
store takes writes, so one process per machine downloads an entry), checks what it
downloads, and publishes it locally with the same atomic publish as a compile (or, over a
read-only local store, keeps it in a private directory of the run); a publish goes to the
local cache, then is uploaded. The engine does not know the remote is there.

:class:`RemoteTier` is the run's remote: the adapter (:mod:`.remote`), the statistics and
the failure policy, as sccache and ccache users asked for it:

* authentication and permission errors on a read always fail the request (they are never
  a miss); an upload refused for permission while reads work (read-only credentials) is
  warned once and the rest of the run only reads (it fails with ``--mlc-jit-remote-required``);
* any other error (connection, timeout, an operation past its deadline, throttling, server
  error) fails the request with ``--mlc-jit-remote-required``; otherwise it is reported
  once, the remote is marked down for the rest of the run, and the library is compiled
  locally. The first process of the run to find it down tells the others (a file in the
  run's board directory: :attr:`.RemoteOptions.run_dir`), so the run waits out one timeout;
* a remote object whose digest or signature is wrong is reported and never loaded; one that
  is not a usable manifest is skipped and counted (:class:`RemoteStats`: one line however
  many); a full disk during a download is reported and the library compiled instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import is_no_space, read_json, write_json_atomic
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
from pytest_mlcjit.cache.store.remote_stats import RemoteStats
from pytest_mlcjit.errors import (
    RemoteAuthError,
    RemoteConfigError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)
from pytest_mlcjit.inputs.check import InputChecker, changes_since
from pytest_mlcjit.key import sha256_digest

REMOTE_MODES = ("read", "readwrite")
#: Manifest fields a download does not carry over: the local publish writes its own.
_LOCAL_FIELDS = ("digest", "library", "sha256", "size", "log", SIGNATURE_FIELD)


#: How long a run's "remote down" file is kept (a later run that finds it down removes it).
MARKER_KEPT_S = 86400.0
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
        #: Whether a read was refused (bad credentials: an upload refused too fails).
        self._read_refused = False
        self.stats = stats if stats is not None else RemoteStats()
        self._lock = threading.Lock()
        self._private: dict[str, Hit] = {}
        self._private_dir: Path | None = None
        opts = options or self.remote.options
        #: Where the processes of this run tell one another that the remote is down (the
        #: run's directory, a file per run and remote), so that it costs one timeout.
        self._marker = None if not (opts.run_dir and opts.run_id) else Path(
            opts.run_dir, f".remote-down-{opts.run_id}-{sha256_digest(self.url)[:16]}.json")

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
            self.stats.note(message)

    @contextlib.contextmanager
    def guard(self, what: str, *, upload: bool = False) -> Iterator[None]:
        """Apply the failure policy to a remote operation (see the module's docstring)."""
        try:
            yield
        except RemoteIntegrityError as exc:
            with self._lock:
                self.stats.errors += 1
            self.warn(f"{what}: {exc} (not loaded)")
            if self.required:
                raise
        except RemoteAuthError as exc:
            with self._lock:
                self.stats.errors += 1
                if not upload:
                    self._read_refused = True
            if not upload or self._read_refused or self.required:
                raise
            # Credentials that read but may not write (the default mode is readwrite):
            # the library is fine; the rest of this run only reads.
            self.mode = "read"
            with self._lock:
                self.stats.refused_upload(
                    f"remote {self.url} refused an upload ({what}): {exc}; this run only "
                    "reads from it from now on (set --mlc-jit-remote-mode=read for "
                    "read-only credentials, or --mlc-jit-remote-required to fail instead)")
        except RemoteError as exc:
            self._went_down(exc, f"remote {self.url} failed while {what}: {exc}; it is not "
                            "used for the rest of this run (pass --mlc-jit-remote-required "
                            "to fail instead)")
            if self.required:
                raise

    def _went_down(self, exc: RemoteError, message: str, *, told: bool = False) -> None:
        """The remote is down for the rest of this run: say so once (the run's first
        process to find it down also tells the others, unless ``told`` by one)."""
        with self._lock:
            self.stats.errors += not told
            first = self.down is None
            self.down = self.down or str(exc)
            self._down_error = self._down_error or exc
            if not self.required:
                self.stats.went_down(message)
        if first and not told and self._marker is not None:
            with contextlib.suppress(OSError):
                write_json_atomic(self._marker, {"error": str(exc), "class": type(exc).__name__,
                                                 "message": message})
                for old in self._marker.parent.glob(".remote-down-*.json"):  # earlier runs'
                    if old.stat().st_mtime < time.time() - MARKER_KEPT_S:
                        old.unlink()

    def _told_down(self) -> None:
        """Take the remote as down when another process of this run found it so."""
        if self._marker is None or not self._marker.exists():
            return
        data = read_json(self._marker)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str)
                                                 for k in ("error", "class", "message")):
            return
        cls = {c.__name__: c for c in (RemoteUnavailableError, RemoteConfigError)}.get(
            data["class"], RemoteError)
        self._went_down(cls(data["error"]), data["message"], told=True)

    def usable(self) -> bool:
        """Whether to use the remote now: not when it is down (found so here or by another
        process of the run), and then, when it is required, the error that put it down is
        raised again (every request that would have used it fails, not only the first)."""
        if self.down is None:
            self._told_down()
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
                with self._lock:
                    self.stats.skip(f"refused a remote entry of {query.describe}: "
                                    f"{entry.problem}")
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
        try:
            with self.guard(f"downloading {entry.location}"):
                self.remote.download(entry.manifest, dest)
                ok = True
        except OSError as exc:  # the local disk, not the remote: not a remote error
            if not is_no_space(exc):
                raise
            self.warn(_no_space(entry.location, dest, exc))
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
        with self.guard(f"uploading {query.describe}", upload=True):
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
        directory, checked, and published locally. The listing and the download are one
        job on the run's board (the live progress shows a slow remote)."""
        if not self.tier.usable():
            return MISSING
        staging = None
        try:
            with job("download") as view:
                entry = self.tier.select(query, self.tier.fits(query, self.checker))
                if entry is None:
                    _nothing_there(view)
                    return MISSING
                staging = self.inner.new_staging_dir(query.digest)
                manifest = self.tier.download(entry, staging / "library")
            if manifest is None:
                return MISSING
            hit = self.inner.publish(query, staging / "library", None, manifest)
        finally:
            if staging is not None:
                self.inner.remove_staging(staging)
        return Hit(hit.paths, hit.manifest, "remote")

    def _pull_private(self, query: EntryQuery, job: Job) -> Lookup:
        """Over a read-only local store (READONLY): the remote entry that fits, downloaded
        into the run's private directory (so a read-only cache directory still works)."""
        found = self.tier.private_hit(query.digest)
        fits = self.tier.fits(query, self.checker)
        if found is not None and found.paths.library.is_file() and fits(found.manifest):
            return found
        if not self.tier.usable():
            return MISSING
        with job("download") as view:
            entry = self.tier.select(query, fits)
            if entry is None or entry.manifest is None:
                _nothing_there(view)
                return MISSING
            variant = entry.entry_digest != query.digest
            paths = query.locate(self.tier.private_root(),
                                 entry.entry_digest if variant else None)
            paths.library.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                paths.library.unlink()
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


def _no_space(location: str, dest: Path, exc: OSError) -> str:
    """A download that ran out of disk space, worded as a compile's (``engine.failures``):
    where the space is missing; the library is compiled instead."""
    try:
        st = os.statvfs(dest.parent)
    except OSError:
        where = f"the filesystem of {dest.parent}"
    else:
        free = st.f_bavail * st.f_frsize
        where = f"the filesystem of {dest.parent} ({free // 1024} KiB free)"
    return (f"downloading {location} ran out of disk space ({exc.strerror or exc}); nothing "
            f"was published: {where}. Free space or prune the cache (pytest-mlcjit prune). "
            "The library is compiled instead")


def _nothing_there(view: object) -> None:
    """Mark a download job whose listing found no entry that fits (the live progress then
    says so instead of "downloaded")."""
    if isinstance(view, dict):
        view["found"] = False
