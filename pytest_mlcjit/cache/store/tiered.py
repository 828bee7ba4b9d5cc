"""Two tiers as one store: the local cache first, then a remote shared by many machines.

:class:`TieredStore` is a :class:`.interface.Store`: a lookup is the local one; after a
local miss, :meth:`~TieredStore.fetch` asks the remote (under the key's lock when the local
store takes writes, so one process per machine downloads an entry), checks what it
downloads, and publishes it locally with the same atomic publish as a compile (or, over a
read-only local store, keeps it in a private directory of the run); a publish goes to the
local cache, then is uploaded. The engine does not know the remote is there.

:class:`RemoteTier` is the run's remote: the adapter (:mod:`.remote`), the statistics and
the failure policy (its base, :class:`.remote_policy.RemotePolicy`: what happens when the
remote fails, and to writes that could not be made). A lookup that finds no usable remote
entry says why when the remote had one and refused it (:attr:`.interface.Missing.refused`):
READONLY fails with that cause.

**Never sharing a broken library.** With a load check (:data:`.remote_policy.LoadCheck`,
which the engine injects: the cache starts no process), a library is loaded in a process
of its own and its recorded functions looked up before it is uploaded; one that fails is
not uploaded.
The manifest uploaded records what the check found (:data:`LOAD_CHECK_FIELD`), so a
download of it is not checked again; a download whose manifest lacks it (an older
version's, another tool's) is checked after its digest, before it is published locally.
A downloaded entry that fails its digest or its load check, or (for a tier that signs its
own uploads) its signature, is set aside on the remote (``quarantine/``) by a job that
writes (a remote in ``readwrite`` mode and a local store that takes writes; a read-only
job never writes), so the library compiled instead can be published in its place.

**Access records.** The tier notes the remote entries the run used (downloads, and local
hits of entries downloaded from this remote) and, in a job that writes, records them once
at its end (:func:`.remote.maintenance.write_access`: one small object per process), which
``remote prune --max-size`` reads as each entry's last use.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import is_no_space
from pytest_mlcjit.cache.manifest import Manifest
from pytest_mlcjit.cache.store.interface import (
    MISSING,
    EntryQuery,
    ForwardingStore,
    Hit,
    Job,
    Lookup,
    Missing,
    Store,
    no_job,
)
from pytest_mlcjit.cache.store.remote import Remote, RemoteOptions
from pytest_mlcjit.cache.store.remote.base import RemoteEntry
from pytest_mlcjit.cache.store.remote.maintenance import write_access
from pytest_mlcjit.cache.store.remote.signing import SIGNATURE_FIELD
from pytest_mlcjit.cache.store.remote_policy import (
    LoadCheck,
    LoadResult,
    RemotePolicy,
    badly_signed,
)
from pytest_mlcjit.cache.store.remote_stats import RemoteStats
from pytest_mlcjit.errors import RemoteError, RemoteIntegrityError
from pytest_mlcjit.inputs.check import InputChecker, changes_since

#: Manifest fields a download does not carry over: the local publish writes its own.
_LOCAL_FIELDS = ("digest", "library", "sha256", "size", "log", SIGNATURE_FIELD)
#: The field an uploaded manifest records its load check in (what was checked): a download
#: of it is not checked again.
LOAD_CHECK_FIELD = "load_check"
#: The field a downloaded entry's local manifest records the downloading run's id in: a
#: request of that run served by it is a remote hit (in any of the run's processes).
DOWNLOADED_RUN_FIELD = "downloaded_run"
#: Fields of a local manifest an upload leaves out.
_NOT_UPLOADED = ("log", "remote", DOWNLOADED_RUN_FIELD, LOAD_CHECK_FIELD)
#: The end of a remote manifest's URL: its key and entry (and a REDO's generation).
_ENTRY_REF_RE = re.compile(r"entries/([0-9a-f]{32}|[0-9a-f]{64})/([0-9a-f]{32}|[0-9a-f]{64})"
                           r"(?:\.[0-9]+)?\.json$")


#: Announces a job of the tier (``upload``) for a query, on a remote (its URL).
Announce = Callable[[str, EntryQuery, str], contextlib.AbstractContextManager[Any]]


def _unannounced(kind: str, query: EntryQuery, where: str
                 ) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


class RemoteTier(RemotePolicy):
    """One remote for one run: the adapter, the failure policy (:class:`RemotePolicy`) and
    the statistics; thread-safe. ``mode`` ``read`` never uploads. ``load_check``: checks a
    library before it is uploaded, and after the download of an entry whose uploader did
    not record one (none: not checked). ``worker``: this process's name in the run (its
    access record)."""

    def __init__(self, url: str, *, mode: str = "readwrite", required: bool = False,
                 options: RemoteOptions | None = None, remote: Remote | None = None,
                 stats: RemoteStats | None = None, load_check: LoadCheck | None = None,
                 worker: str = "main", announce: Announce | None = None) -> None:
        super().__init__(url, mode=mode, required=required, options=options, remote=remote,
                         stats=stats)
        self.load_check = load_check
        self.worker = worker
        #: Announces each upload (from the engine: the run's trace), if anything does.
        self.announce = announce
        #: Whether a store that takes writes uses this tier (a job that writes), and the
        #: remote entries this process used (``<key_digest>/<entry_digest>``).
        self.job_writes = False
        self._used: set[str] = set()
        #: The unusable remote objects counted (:meth:`select`): each once in a process.
        self._skipped: set[tuple[str, str]] = set()
        self._private: dict[str, Hit] = {}
        self._private_dir: Path | None = None

    def close(self) -> None:
        """Record the remote entries this process used (a job that writes, once), and
        remove the run's private downloads (those of a read-only local store)."""
        with self._lock:
            private, self._private_dir = self._private_dir, None
            self._private.clear()
            used, self._used = sorted(self._used), set()
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
        if used and self.down is None:
            self._told_down()  # another process of the run found it down: not used either
        if (used and self.writes and self.job_writes and self.down is None
                and self.remote.eviction is None):
            try:
                write_access(self.remote, self.run_id or "run", self.worker, used)
            except (RemoteError, OSError) as exc:  # a record of use: never an error
                self.warn(f"could not record the use of {len(used)} remote entries on "
                          f"{self.url} (remote prune --max-size takes them as unused "
                          f"since their last record): {exc}")

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

    def select(self, query: EntryQuery, fits: Callable[[Mapping[str, Any]], bool],
               refused: list[str] | None = None, *, writer: bool = False
               ) -> RemoteEntry | None:
        """The newest usable remote entry of ``query``'s key that ``fits``, or None.
        Entries with a problem (a bad or missing signature, a malformed manifest) are
        reported and skipped, and why is added to ``refused``; with ``writer`` (a job that
        writes), one whose only problem is a missing, malformed or mismatching signature
        is set aside when this tier signs its own uploads (it then publishes a signed one
        in its place; :func:`.remote_policy.badly_signed`)."""
        if not self.usable():
            return None
        found: list[RemoteEntry] = []
        with self.guard(f"listing the entries of key {query.digest}"):
            found = self.remote.list_manifests(query.digest)
        usable = []
        for entry in found:
            if entry.problem is not None:
                with self._lock:  # an object once, however often listed (ahead, then asked)
                    if (entry.location, entry.problem) not in self._skipped:
                        self._skipped.add((entry.location, entry.problem))
                        self.stats.skip(f"refused a remote entry of {query.describe}: "
                                        f"{entry.problem}")
                if refused is not None:
                    refused.append(entry.problem)
                if writer and self.remote.signed and badly_signed(entry):
                    self.set_aside(entry, entry.problem)
            elif entry.manifest is not None and fits(entry.manifest):
                usable.append(entry)
        usable.sort(key=lambda e: -(e.created or 0.0))
        return usable[0] if usable else None

    def download(self, entry: RemoteEntry, dest: Path, refused: list[str] | None = None,
                 *, writer: bool = False) -> Manifest | None:
        """Download ``entry``'s library to ``dest`` (checked against its size and SHA-256,
        then, when its manifest records no load check, loaded by :attr:`load_check`, before
        this returns); its manifest as the local cache keeps it, or None if the download
        failed or was refused (reported; why added to ``refused``; with ``writer``, a job
        that writes, a refused entry is set aside on the remote)."""
        assert entry.manifest is not None
        if (before := self.refused_before(entry)) is not None:  # refused by this run
            if refused is not None:
                refused.append(before)
            return None
        t0 = time.monotonic()
        ok = False
        try:
            with self.guard(f"downloading {entry.location}"):
                try:
                    self.remote.download(entry.manifest, dest)
                except RemoteIntegrityError as exc:
                    self.refuse(entry, str(exc), refused, writer=writer)
                    raise
                ok = True
        except OSError as exc:  # the local disk, not the remote: not a remote error
            if not is_no_space(exc):
                raise
            self.warn(_no_space(entry.location, dest, exc))
        if ok:
            ok = False
            with self.guard(f"loading {entry.location}"):
                ok = self._load_check(entry, dest, refused, writer=writer)
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            return None
        with self._lock:
            self.stats.downloads += 1
            self.stats.download_bytes += int(entry.manifest["size"])
            self.stats.download_seconds += time.monotonic() - t0
            self._used.add(f"{entry.key_digest}/{entry.entry_digest}")
        manifest: dict[str, Any] = {k: v for k, v in entry.manifest.items()
                                    if k not in _LOCAL_FIELDS}
        manifest["remote"] = entry.location
        if self.run_id:
            manifest[DOWNLOADED_RUN_FIELD] = self.run_id
        return manifest  # type: ignore[return-value] # the local publish fills the rest

    def _load_check(self, entry: RemoteEntry, library: Path, refused: list[str] | None, *,
                    writer: bool) -> bool:
        """Check a downloaded library whose uploader recorded no load check (an older
        version's, another tool's): True if it passed or needs none; RemoteIntegrityError
        if it fails (refused, set aside); False, warned, if the check could not run (not
        used, not set aside: the library may be fine)."""
        assert entry.manifest is not None
        if self.load_check is None or LOAD_CHECK_FIELD in entry.manifest:
            return True
        result = self._checked(library, entry.manifest)
        if result.ok:
            return True
        if result.at_fault:
            why = f"its library failed its load check ({result.detail})"
            self.refuse(entry, f"{entry.location}: {why}", refused, writer=writer)
            raise RemoteIntegrityError(why)
        if refused is not None:
            refused.append(f"{entry.location}: {result.detail}")
        self.warn(f"not using the library of {entry.location}: {result.detail}")
        return False

    def _checked(self, library: Path, manifest: Mapping[str, Any]) -> LoadResult:
        assert self.load_check is not None
        result = self.load_check(library, manifest)
        with self._lock:
            self.stats.load_checks += 1
            self.stats.load_check_seconds += result.seconds
        return result

    def local_hit(self, hit: Hit) -> Hit:
        """A local hit: an entry downloaded from this remote is noted as used (for the
        access record)."""
        location = hit.manifest.get("remote")
        if not isinstance(location, str):
            return hit
        match = _ENTRY_REF_RE.search(location)
        if match is not None and self.remote._location(match.group(0)) == location:
            with self._lock:
                self._used.add(f"{match.group(1)}/{match.group(2)}")
        return hit

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
        """Upload a freshly published local entry (``readwrite`` only), once its library
        passed the load check; ``replace`` for REDO. True if this run published it; every
        upload that could not be made is counted and said (:meth:`not_made`)."""
        if not self.writes:
            if self.demoted is not None:  # readwrite, until the remote refused an upload
                self.not_made("not uploaded: the remote refused an upload earlier in this "
                               "run, which only reads from it since")
            return False
        try:
            usable = self.usable()
        except RemoteError as exc:  # required, and down: this write is not made either
            self.not_made(f"{query.describe}: {exc}")
            raise
        if not usable:
            self.not_made("not uploaded: the remote was down for the rest of the run")
            return False
        body = {k: v for k, v in hit.manifest.items() if k not in _NOT_UPLOADED}
        if self.load_check is not None:
            try:
                result = self._checked(hit.paths.library, hit.manifest)
            except BaseException as exc:  # an interrupt: the upload is not made either
                self.not_made(_stopped(query, exc))
                raise
            if not result.ok:
                self.not_made(f"{query.describe}: not uploaded: " + (
                    f"its library failed its load check ({result.detail})"
                    if result.at_fault else result.detail))
                return False
            body[LOAD_CHECK_FIELD] = result.detail
        done = False
        try:
            with self.guard(f"uploading {query.describe}", upload=True), \
                    (self.announce or _unannounced)("upload", query, self.url):
                try:
                    done = self.remote.upload(query.digest, hit.paths.digest,
                                              hit.paths.library, body, replace=replace)
                except RemoteError as exc:
                    self.not_made(f"{query.describe}: {exc}")
                    raise
                except BaseException as exc:  # the local library (gone), an interrupt
                    self.not_made(_stopped(query, exc))
                    raise
        finally:
            for note in self.remote.take_notes():
                self.warn(note)
        if done:
            with self._lock:
                self.stats.uploads += 1
                self.stats.upload_bytes += int(hit.manifest["size"])
        return done


class TieredStore(ForwardingStore):
    """The local store (``inner``), then ``tier``: a :class:`.interface.Store` (see the
    module doc). Everything but :meth:`lookup` (a hit of a downloaded entry is noted as a
    use of the remote's), :meth:`fetch` and :meth:`publish` is the local store's."""

    def __init__(self, local: Store, tier: RemoteTier, *, checker: InputChecker) -> None:
        super().__init__(local)
        self.tier = tier
        self.checker = checker
        if local.writable:
            tier.job_writes = True

    def __repr__(self) -> str:
        return f"TieredStore({self.inner!r}, {self.tier.url!r})"

    def lookup(self, query: EntryQuery, *, redo_run: str | None = None) -> Lookup:
        found = self.inner.lookup(query, redo_run=redo_run)
        return self.tier.local_hit(found) if isinstance(found, Hit) else found

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
        refused: list[str] = []
        try:
            with job("download") as view:
                entry = self.tier.select(query, self.tier.fits(query, self.checker), refused,
                                         writer=True)
                if entry is None:
                    _nothing_there(view)
                    return _missing(refused)
                staging = self.inner.new_staging_dir(query.digest)
                library = staging / f"library{_suffix(entry)}"  # as TVM loads it (a check)
                manifest = self.tier.download(entry, library, refused, writer=True)
            if manifest is None:
                return _missing(refused)
            hit = self.inner.publish(query, library, None, manifest)
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
        refused: list[str] = []
        with job("download") as view:
            entry = self.tier.select(query, fits, refused)
            if entry is None or entry.manifest is None:
                _nothing_there(view)
                return _missing(refused)
            variant = entry.entry_digest != query.digest
            paths = query.locate(self.tier.private_root(),
                                 entry.entry_digest if variant else None)
            paths.library.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                paths.library.unlink()
            manifest = self.tier.download(entry, paths.library, refused)
        if manifest is None:
            return _missing(refused)
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


def _stopped(query: EntryQuery, exc: BaseException) -> str:
    """Why an upload stopped by something other than the remote was not made."""
    why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
    return f"{query.describe}: not uploaded: {why}"


def _suffix(entry: RemoteEntry) -> str:
    """The file suffix of the library ``entry`` names (``.so``, ``.tar``...), or none."""
    name = (entry.manifest or {}).get("library")
    suffix = Path(name).suffix if isinstance(name, str) else ""
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""


#: How many refusals a miss names (the key's entries may be many: junk planted beside it).
MAX_REFUSALS_SAID = 3


def _missing(refused: list[str]) -> Missing:
    """No usable remote entry: with why the key's entries were refused, if they were (the
    first few reasons, and how many more)."""
    if not refused:
        return MISSING
    reasons = list(dict.fromkeys(refused))
    said = "; ".join(reasons[:MAX_REFUSALS_SAID])
    if len(reasons) > MAX_REFUSALS_SAID:
        said += f"; and {len(reasons) - MAX_REFUSALS_SAID} more refused entries of this key"
    return Missing(refused=said)


def _nothing_there(view: object) -> None:
    """Mark a download job whose listing found no entry that fits (the live progress then
    says so instead of "downloaded")."""
    if isinstance(view, dict):
        view["found"] = False
