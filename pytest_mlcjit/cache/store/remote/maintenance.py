"""Keeping a remote: verifying every entry's bytes, pruning old entries and the blobs no
entry names. Functions over :class:`.base.Remote`'s storage primitives."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pytest_mlcjit.cache.store.remote.entries import BLOB_NAME_RE, RemoteEntry

if TYPE_CHECKING:
    from pytest_mlcjit.cache.store.remote.base import Remote


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

def prune_remote(remote: Remote, older_than_seconds: float, *,
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
    blobs = list(remote._list("blobs/"))
    referenced: set[str] = set()
    removed: list[str] = []
    for entry in remote.iter_entries():
        created = entry.created
        if created is not None and created < now - older_than_seconds:
            remote._delete(f"entries/{entry.key_digest}/{entry.entry_digest}.json")
            removed.append(entry.location)
        elif isinstance(entry.manifest, dict):
            referenced.add(str(entry.manifest.get("sha256")))
    for blob in blobs:
        match = BLOB_NAME_RE.fullmatch(blob.name)
        if (match and match.group(1) not in referenced
                and blob.modified < now - blob_grace_seconds):
            remote._delete(blob.name)
            removed.append(remote._location(blob.name))
    return removed

