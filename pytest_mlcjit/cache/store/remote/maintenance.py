"""Keeping a remote: the access records runs leave (when each entry was last used),
verifying every entry's bytes, pruning (by age, by a size budget, least recently used
first) and removing entries. Functions over :class:`.base.Remote`'s storage primitives.

Access records: a run in ``readwrite`` mode that used remote entries writes ONE small
object at its end, ``access/<run_id>-<worker>.json`` = ``{"time": epoch, "used":
["<key_digest>/<entry_digest>", ...]}`` (:func:`write_access`); a read-only job writes
nothing. An entry's last use is the latest record naming it, or its ``created`` time
(:func:`last_use`). :func:`prune_remote` removes the records no kept entry needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from pytest_mlcjit._util.jsonsafe import loads_bounded
from pytest_mlcjit.cache.store.remote.entries import (
    BLOB_NAME_RE,
    ENTRY_NAME_RE,
    MAX_LIBRARY_BYTES,
    MAX_MANIFEST_BYTES,
    QUARANTINE_PREFIX,
    SHA256_RE,
    RemoteEntry,
    StoredObject,
)
from pytest_mlcjit.errors import RemoteConfigError, RemoteIntegrityError

if TYPE_CHECKING:
    from pytest_mlcjit.cache.store.remote.base import Remote

#: How long a blob no manifest names is kept after its last write (``--blob-grace``): an
#: upload writes its blob, then its manifest, and one that reuses a blob touches it first.
DEFAULT_BLOB_GRACE_S = 3600.0
ACCESS_PREFIX = "access/"
#: An entry as access records and ``remote rm`` name it: ``<key_digest>/<entry_digest>``.
ENTRY_REF_RE = re.compile(r"([0-9a-f]{32}|[0-9a-f]{64})/([0-9a-f]{32}|[0-9a-f]{64})")
_DIGEST_RE = re.compile(r"[0-9a-f]{32}|[0-9a-f]{64}")
_QUARANTINE_NAME_RE = re.compile(r"quarantine/([0-9a-f]{32}|[0-9a-f]{64})/"
                                 r"([0-9a-f]{32}|[0-9a-f]{64})\.json")
#: The most entries one access record names (about 13 MB: under MAX_MANIFEST_BYTES).
MAX_ACCESS_USED = 100_000


# -- access records ---------------------------------------------------------------------------
def write_access(remote: Remote, run_id: str, worker: str, used: Iterable[str]) -> None:
    """Record that run ``run_id``'s process ``worker`` used the entries ``used``
    (``"<key_digest>/<entry_digest>"``; others are ignored): one object,
    ``access/<run_id>-<worker>.json``, overwritten if the process writes again. Nothing is
    written when nothing valid was used. Raises the :class:`RemoteError` subclasses as any
    write does (the caller decides whether that matters: it never should for a run)."""
    refs = sorted({u for u in used if isinstance(u, str) and ENTRY_REF_RE.fullmatch(u)})
    if not refs:
        return
    name = f"{ACCESS_PREFIX}{_name_part(run_id)}-{_name_part(worker)}.json"
    data = json.dumps({"time": time.time(), "used": refs[:MAX_ACCESS_USED]},
                      separators=(",", ":")).encode()
    with remote.within(f"recording use in {remote._location(name)}", len(data)):
        remote._put_manifest(name, data, create_only=False)


def _name_part(text: str) -> str:
    """``text`` as part of an object name: letters, digits, ``_.-`` (never a leading dot:
    a directory remote does not list dot files), at most 100 characters."""
    part = re.sub(r"[^A-Za-z0-9_.-]", "_", str(text))[:100] or "_"
    return "_" + part[1:] if part.startswith(".") else part


class AccessRecord(NamedTuple):
    """One object under ``access/``: its name, its time (the record's ``time``, at most the
    object's own: a clock ahead or a forged future time cannot keep an entry forever; the
    object's time for junk), and the entries it names (none for junk)."""

    name: str
    time: float
    used: tuple[str, ...]


def access_records(remote: Remote) -> list[AccessRecord]:
    """Every object under ``access/``; junk (unreadable, too large, not a record) is
    returned with no entries, so that prune can remove it once old."""
    records = []
    for obj in remote._list(ACCESS_PREFIX):
        when = obj.modified
        used: tuple[str, ...] = ()
        try:
            raw = remote._read(obj.name, obj.size)
            if raw is None:
                continue  # removed since it was listed
            data = loads_bounded(raw, max_bytes=MAX_MANIFEST_BYTES)
        except (ValueError, RemoteIntegrityError):  # junk: too large, not JSON
            data = None
        stamp = _number(data.get("time")) if isinstance(data, dict) else math.nan
        names = data.get("used") if isinstance(data, dict) else None
        if math.isfinite(stamp) and isinstance(names, list):
            when = min(stamp, obj.modified)
            used = tuple(u for u in names[:MAX_ACCESS_USED]
                         if isinstance(u, str) and ENTRY_REF_RE.fullmatch(u))
        records.append(AccessRecord(obj.name, when, used))
    return records


def _number(value: object) -> float:
    """``value`` as a float; NaN for anything else (a bool, a string, 10**400)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    try:
        return float(value)
    except OverflowError:
        return math.nan


def last_use(remote: Remote, records: Iterable[AccessRecord] | None = None
             ) -> dict[str, float]:
    """``"<key_digest>/<entry_digest>"`` → the time of the latest access record naming it
    (entries no record names are absent: their last use is their ``created`` time)."""
    latest: dict[str, float] = {}
    for record in access_records(remote) if records is None else records:
        for ref in record.used:
            if record.time > latest.get(ref, -math.inf):
                latest[ref] = record.time
    return latest


def entry_ref(entry: RemoteEntry) -> str:
    return f"{entry.key_digest}/{entry.entry_digest}"


def verify_remote(remote: Remote, entries: Iterable[RemoteEntry] | None = None
                  ) -> list[RemoteEntry]:
    """Check every entry (or those of ``entries``, from :meth:`iter_entries`): its
    manifest (and signature, if a key is set) and its blob's bytes (read in full and
    hashed). Returns the entries with a problem (each blob is read once however many
    entries name it)."""
    bad: list[RemoteEntry] = []
    blobs: dict[tuple[str, int], str | None] = {}
    for entry in remote.iter_entries() if entries is None else entries:
        if entry.problem is not None or entry.manifest is None:
            bad.append(entry)
            continue
        sha, size = entry.manifest["sha256"], entry.manifest["size"]
        if (sha, size) not in blobs:
            blobs[sha, size] = blob_problem(remote, sha, size)
        if blobs[sha, size] is not None:
            bad.append(entry._replace(problem=f"manifest {entry.location} "
                                              f"{blobs[sha, size]}"))
    return bad

def blob_problem(remote: Remote, sha: str, size: int) -> str | None:
    """Why blob ``sha`` does not hold ``size`` bytes hashing to ``sha``, or None."""
    h, n = hashlib.sha256(), 0
    name = f"blobs/{sha}"
    with remote.within(f"verifying {remote._location(name)}", size) as deadline:
        stream = remote._open_stream(name)
        if stream is None:
            return f"names {remote._location(name)}, which is missing"
        with contextlib.closing(stream):
            for chunk in stream:
                if deadline.passed():
                    raise remote.late(f"verifying {remote._location(name)}", deadline)
                n += len(chunk)
                if n > size:
                    return (f"names {remote._location(name)}, which has more than {size} "
                            "bytes")
                h.update(chunk)
    if n != size or h.hexdigest() != sha:
        return (f"names {remote._location(name)}, which is corrupt: {n} bytes, sha256 "
                f"{h.hexdigest()} (the manifest says {size} bytes, sha256 {sha})")
    return None



# -- pruning ----------------------------------------------------------------------------------
class PrunedEntry(NamedTuple):
    entry: RemoteEntry
    last_used: float
    why: str  #: ``older-than`` or ``max-size``


@dataclasses.dataclass
class PruneReport:
    """What :func:`prune_remote` removed (or, with ``dry_run``, would remove), and why."""

    older_than: float | None = None
    max_size: int | None = None
    blob_grace: float = DEFAULT_BLOB_GRACE_S
    dry_run: bool = False
    #: Every object removed (or that would be), as URLs: entries, blobs, records.
    removed: list[str] = dataclasses.field(default_factory=list)
    entries: list[PrunedEntry] = dataclasses.field(default_factory=list)
    blobs: list[str] = dataclasses.field(default_factory=list)
    #: Blobs no kept entry names, written within the grace period: kept for now.
    blobs_in_grace: int = 0
    #: Blobs judged unused that were kept at the last moment: (URL, why).
    blobs_rescued: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    access_records: int = 0
    quarantine_records: int = 0
    #: Bytes of the blobs the entries name, before and after.
    total_before: int = 0
    total_after: int = 0
    #: Entries over the budget kept because they were used since ``protect_used_since``.
    kept_in_use: int = 0

    @property
    def over_budget(self) -> bool:
        return self.max_size is not None and self.total_after > self.max_size

    @property
    def freed(self) -> int:
        return self.total_before - self.total_after


def prune_remote(remote: Remote, older_than_seconds: float | None = None, *,
                 blob_grace_seconds: float = DEFAULT_BLOB_GRACE_S,
                 max_size: int | None = None, dry_run: bool = False,
                 protect_used_since: float | None = None,
                 report: PruneReport | None = None) -> list[str]:
    """Remove the entries last used longer than ``older_than_seconds`` ago, then, with
    ``max_size``, the least recently used entries until the blobs the remaining entries
    name total at most ``max_size`` bytes; then the blobs no remaining manifest names
    that were last written more than ``blob_grace_seconds`` ago, and the access records
    no remaining entry needs. Returns the removed objects' URLs (``report``, if given,
    is filled in with the details). ``dry_run``: remove nothing, say what would go.

    An entry's last use is the latest access record naming it or its ``created`` time
    (the manifest's field, else the object's time), whichever is later. Entries used at
    or after ``protect_used_since`` are never removed (a run's own). Any manifest, usable
    or not, keeps the blob it names. Access records older than the least recently used
    entry kept (and than ``older_than_seconds``) go, as do quarantine records older than
    ``older_than_seconds``.

    No blob a manifest names is removed, even while other machines upload:

    * blobs are listed before manifests, so a blob uploaded after that is no candidate;
    * a blob written within the grace period is no candidate (an upload puts its blob
      first and its manifest last: the grace period must outlast an upload);
    * right before the candidates are removed, the manifests are listed again, and those
      written since the first listing are read: a blob one of them names is kept;
    * right before each candidate is removed it is looked at again (``_stat``): an
      upload that reuses an existing blob touches it first (``_touch``), so a blob
      written within the grace period since the listing is kept;
    * and the upload itself, once its manifest is written, checks that its blob is still
      there and puts it again if not (:meth:`.base.Remote.upload`).

    The residual window: an upload that touches the blob, writes its manifest and checks
    the blob again, all between this function's last look at the blob and its removal
    (two consecutive requests); on a store that cannot touch, one whose manifest is
    written after the second listing and whose check comes before the removal. Its entry
    then names a missing blob: readers report it and compile instead (ON), ``remote
    verify`` reports it, and the next upload of the same library (any key) puts the blob
    back, since an upload checks for its blob first.
    """
    if remote.eviction is not None:  # a dry run too: it would list nothing
        raise RemoteConfigError(f"cannot prune {remote.url}: {remote.eviction}")
    r = report if report is not None else PruneReport()
    r.older_than, r.max_size, r.blob_grace, r.dry_run = (
        older_than_seconds, max_size, blob_grace_seconds, dry_run)
    plan = _Plan(remote, time.time(), protect_used_since)
    kept = plan.choose_entries(r)
    refs = Counter(sha for e in kept if (sha := blob_of(e)))
    evicted = 0  # kept is least recently used first
    while max_size is not None and r.total_after > max_size and evicted < len(kept):
        entry = kept[evicted]
        if plan.protected(entry):  # and so are the rest: they were used later
            r.kept_in_use = len(kept) - evicted
            break
        evicted += 1
        r.entries.append(PrunedEntry(entry, plan.last(entry), "max-size"))
        sha = blob_of(entry)
        if sha is not None:
            refs[sha] -= 1
            if not refs[sha]:
                del refs[sha]
                r.total_after -= plan.sizes[sha]
    kept = kept[evicted:]

    candidates = plan.unused_blobs(set(refs), r)
    stale = plan.stale_records(kept, r)
    for pruned in r.entries:
        if not dry_run:
            _delete(remote, pruned.entry.name)
        r.removed.append(pruned.entry.location)
    if dry_run:
        r.blobs = [remote._location(b.name) for b in candidates]
        r.removed += r.blobs
    elif candidates:
        _remove_blobs(remote, candidates, set(refs), plan.seen(), r)
    for name in stale:
        if not dry_run:
            _delete(remote, name)
        r.removed.append(remote._location(name))
    if not dry_run:  # what the store keeps outside its layout (a directory's temp files)
        r.removed += remote._prune_leftovers(plan.now - blob_grace_seconds)
    return r.removed


class _Plan:
    """What :func:`prune_remote` found: the blobs (listed first), the entries and the
    access records, and when each entry was last used."""

    def __init__(self, remote: Remote, now: float, protect_used_since: float | None
                 ) -> None:
        self.remote, self.now, self.protect_used_since = remote, now, protect_used_since
        self.blobs = {m.group(1): obj for obj in remote._list("blobs/")
                      if (m := BLOB_NAME_RE.fullmatch(obj.name))}
        self.entries = list(remote.iter_entries())
        self.records = access_records(remote)
        self.used = last_use(remote, self.records)
        self.entries.sort(key=lambda e: (self.last(e), e.key_digest, e.entry_digest))
        self.sizes = {sha: self._size(sha, e) for e in self.entries if (sha := blob_of(e))}

    def last(self, entry: RemoteEntry) -> float:
        """The latest access record naming the entry, or its creation: the manifest's
        ``created``, at most the object's time (a future or junk time cannot keep it)."""
        created = entry.created if entry.created is not None else 0.0
        if entry.modified is not None and not created <= entry.modified:  # NaN too
            created = entry.modified
        return max(self.used.get(entry_ref(entry), -math.inf), created)

    def protected(self, entry: RemoteEntry) -> bool:
        since = self.protect_used_since
        return since is not None and self.last(entry) >= since

    def _size(self, sha: str, entry: RemoteEntry) -> int:
        """The blob's size as listed; else (uploaded since) the size its manifest says."""
        if sha in self.blobs:
            return self.blobs[sha].size
        claimed = (entry.manifest or {}).get("size")
        if isinstance(claimed, int) and not isinstance(claimed, bool):
            return min(max(claimed, 0), MAX_LIBRARY_BYTES)
        return 0

    def choose_entries(self, r: PruneReport) -> list[RemoteEntry]:
        """Put the entries unused for ``r.older_than`` in ``r.entries``; the others, least
        recently used first. Sets the totals."""
        kept = []
        for entry in self.entries:
            if (r.older_than is not None and self.last(entry) < self.now - r.older_than
                    and not self.protected(entry)):
                r.entries.append(PrunedEntry(entry, self.last(entry), "older-than"))
            else:
                kept.append(entry)
        r.total_before = sum(self.sizes.values())
        r.total_after = sum(self.sizes[sha] for sha in {blob_of(e) for e in kept} - {None}
                            if sha is not None)
        return kept

    def unused_blobs(self, referenced: set[str], r: PruneReport) -> list[StoredObject]:
        """The blobs no kept manifest names, written before the grace period."""
        unused = [self.blobs[sha] for sha in sorted(set(self.blobs) - referenced)]
        candidates = [b for b in unused if b.modified < self.now - r.blob_grace]
        r.blobs_in_grace = len(unused) - len(candidates)
        return candidates

    def stale_records(self, kept: list[RemoteEntry], r: PruneReport) -> list[str]:
        """The access records older than every kept entry's last use (and than the age
        limit), and, with an age limit, the quarantine records older than it."""
        cutoff = min((self.last(e) for e in kept), default=self.now)
        if r.older_than is not None:
            cutoff = max(cutoff, self.now - r.older_than)
        stale = [rec.name for rec in self.records if rec.time < cutoff]
        quarantine = [] if r.older_than is None else [
            obj.name for obj in self.remote._list(QUARANTINE_PREFIX)
            if obj.modified < self.now - r.older_than]
        r.access_records, r.quarantine_records = len(stale), len(quarantine)
        return stale + quarantine

    def seen(self) -> dict[str, float | None]:
        """The manifests of the first listing: name → the object's time."""
        return {e.name: e.modified for e in self.entries}


def blob_of(entry: RemoteEntry) -> str | None:
    """The blob digest the entry's manifest names, if it names a valid one (usable or not:
    any manifest keeps its blob)."""
    sha = (entry.manifest or {}).get("sha256")
    return sha if isinstance(sha, str) and SHA256_RE.fullmatch(sha) else None


def _remove_blobs(remote: Remote, candidates: list[StoredObject], referenced: set[str],
                  seen: dict[str, float | None], r: PruneReport) -> None:
    """Remove the candidate blobs, but those a manifest written since the listing names,
    or written again within the grace period (see :func:`prune_remote`)."""
    for obj in remote._list("entries/"):
        if ENTRY_NAME_RE.fullmatch(obj.name) and seen.get(obj.name, -1.0) != obj.modified:
            entry = remote._entry(obj)  # written (or rewritten) since the first listing
            if entry is not None and (sha := blob_of(entry)) is not None:
                referenced.add(sha)
    for blob in candidates:
        where = remote._location(blob.name)
        if blob.name[len("blobs/"):] in referenced:
            r.blobs_rescued.append((where, "a manifest written during the prune names it"))
            continue
        with remote.within(f"checking {where}"):
            current = remote._stat(blob.name)
        if current is None:
            continue  # removed by someone else
        if current.modified >= time.time() - r.blob_grace:
            r.blobs_rescued.append((where, "written again within the grace period (an "
                                           "upload reuses it)"))
            continue
        _delete(remote, blob.name)
        r.blobs.append(where)
        r.removed.append(where)


def _delete(remote: Remote, name: str) -> None:
    with remote.within(f"removing {remote._location(name)}"):
        remote._delete(name)


# -- removing chosen entries (``remote rm``) ---------------------------------------------------
def find_entries(remote: Remote, key_prefix: str, entry_prefix: str | None
                 ) -> dict[tuple[str, str], list[str]]:
    """The entries (``(key_digest, entry_digest)``) whose key digest starts with
    ``key_prefix`` and, if given, whose entry digest starts with ``entry_prefix``: each
    with its objects, its manifest and its quarantine record where present. Names only
    are listed: nothing is read."""
    full = _DIGEST_RE.fullmatch(key_prefix) is not None
    found: dict[tuple[str, str], list[str]] = {}
    for prefix, pattern in (("entries/", ENTRY_NAME_RE),
                            (QUARANTINE_PREFIX, _QUARANTINE_NAME_RE)):
        for obj in remote._list(f"{prefix}{key_prefix}/" if full else prefix):
            match = pattern.fullmatch(obj.name)
            if match is None:
                continue
            key, entry = match.groups()
            if key.startswith(key_prefix) and entry.startswith(entry_prefix or ""):
                found.setdefault((key, entry), []).append(obj.name)
    return found


def remove_objects(remote: Remote, names: Iterable[str]) -> list[str]:
    """Remove the objects ``names`` (absent is fine); their URLs."""
    removed = []
    for name in names:
        _delete(remote, name)
        removed.append(remote._location(name))
    return removed
