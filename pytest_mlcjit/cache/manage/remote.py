"""``pytest-mlcjit remote ls|verify|prune|rm``: the remote tier's entries, their digests
and signatures checked, the old or least recently used ones removed, one removed by name;
and the size budget a prepare run applies (``--mlc-jit-remote-max-size``)."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from pytest_mlcjit.cache.store.remote import maintenance
from pytest_mlcjit.cache.store.remote.base import Remote, RemoteEntry
from pytest_mlcjit.cache.store.remote.maintenance import PruneReport, prune_remote
from pytest_mlcjit.cache.store.remote.signing import ENV_SIGNING_KEY
from pytest_mlcjit.errors import ConfigError
from pytest_mlcjit.units import format_size, plural

#: ``remote rm``'s argument: ``KEY/ENTRY`` or ``KEY``, digests or prefixes of them.
_TARGET_RE = re.compile(r"([0-9a-f]{4,64})(?:/([0-9a-f]{4,64}))?")
TARGET_FORMS = ("KEY/ENTRY (a key digest and an entry digest, or unique prefixes of at "
                "least 4 hex digits each, as 'pytest-mlcjit remote ls' prints them: "
                "0123456789ab/cdef01234567) or KEY (a key digest or its unique prefix: "
                "every entry of the key)")


def describe_entry(entry: RemoteEntry) -> dict[str, Any]:
    manifest: Mapping[str, Any] = entry.manifest or {}
    key = manifest.get("key") if isinstance(manifest.get("key"), Mapping) else {}
    assert isinstance(key, Mapping)
    model = key.get("factory") or key.get("model_type") or "?"
    return {
        "key_digest": entry.key_digest, "entry_digest": entry.entry_digest,
        "location": entry.location, "model": str(model),
        "config": key.get("config", key.get("overrides")),
        "target": key.get("target") or manifest.get("target"),
        "size": manifest.get("size"), "created": entry.created,
        "signed": "signature" in manifest, "problem": entry.problem,
    }


def list_entries(remote: Remote) -> list[dict[str, Any]]:
    """Every entry, newest first."""
    entries = [describe_entry(e) for e in remote.iter_entries()]
    return sorted(entries, key=lambda e: -(e["created"] or 0.0))


def verify(remote: Remote) -> dict[str, Any]:
    """Download every blob and check its digest, and every signature when a signing key
    is set; the entries with a problem, each with the command that removes it, and the
    entries moved aside (``quarantine/``) by the runs that refused them."""
    entries = list(remote.iter_entries())
    # A superseded generation is never used; `remote rm K/E` would remove the entry's
    # newest generation with it: prune removes it by age instead.
    bad = [{**describe_entry(e), "remove": None if e.problem and " is superseded by "
            in e.problem else rm_command(e.key_digest, e.entry_digest, entries)}
           for e in remote.verify(entries)]
    quarantined = []
    for location, record in remote.iter_quarantined():
        match = re.search(r"quarantine/([0-9a-f]+)/([0-9a-f]+)\.json$", location)
        why = (record or {}).get("why")
        when = (record or {}).get("time")
        quarantined.append({
            "location": location,
            "key_digest": match.group(1) if match else None,
            "entry_digest": match.group(2) if match else None,
            "why": why if isinstance(why, str) else "(an unreadable quarantine record)",
            "time": when if isinstance(when, int | float) and not isinstance(when, bool)
            else None,
            "remove": rm_command(match.group(1), match.group(2), entries) if match else None,
        })
    return {"checked": len(entries), "bad": bad, "quarantined": quarantined,
            "signatures_checked": remote.verifies, "signing_key_env": ENV_SIGNING_KEY}


def rm_command(key_digest: str, entry_digest: str, entries: list[RemoteEntry]) -> str:
    """``pytest-mlcjit remote rm K/E``: with the 12-digit prefixes ``remote ls`` prints
    where they name one entry, else the full digests."""
    short = (key_digest[:12], entry_digest[:12])
    unique = sum((e.key_digest[:12], e.entry_digest[:12]) == short for e in entries) <= 1
    target = "/".join(short) if unique else f"{key_digest}/{entry_digest}"
    return f"pytest-mlcjit remote rm {target}"


# -- prune --------------------------------------------------------------------------------------
def prune(remote: Remote, *, older_than: float | None, max_size: int | None = None,
          dry_run: bool = False, blob_grace: float = maintenance.DEFAULT_BLOB_GRACE_S,
          protect_used_since: float | None = None) -> PruneReport:
    """:func:`.maintenance.prune_remote` (with the store's own leftovers: a directory's
    temp files), its details; a store that evicts by itself refuses, a dry run too."""
    report = PruneReport()
    prune_remote(remote, older_than, blob_grace_seconds=blob_grace, max_size=max_size,
                 dry_run=dry_run, protect_used_since=protect_used_since, report=report)
    return report


def prune_json(report: PruneReport) -> dict[str, Any]:
    return {
        "removed": report.removed, "dry_run": report.dry_run,
        "older_than": report.older_than, "max_size": report.max_size,
        "blob_grace": report.blob_grace, "time": time.time(),
        "entries": [{**describe_entry(p.entry), "last_used": p.last_used, "why": p.why}
                    for p in report.entries],
        "blobs": report.blobs, "blobs_in_grace": report.blobs_in_grace,
        "blobs_rescued": [{"location": loc, "why": why} for loc, why in report.blobs_rescued],
        "access_records": report.access_records,
        "quarantine_records": report.quarantine_records,
        "total_before": report.total_before, "total_after": report.total_after,
        "freed": report.freed, "kept_in_use": report.kept_in_use,
        "over_budget": report.over_budget,
    }


def keep_to_budget(remote: Remote, max_size: int, used_since: float) -> str:
    """Prune ``remote`` to ``max_size`` as ``remote prune --max-size`` does, never removing
    an entry used (or created) since ``used_since``; the summary's line."""
    r = prune(remote, older_than=None, max_size=max_size, protect_used_since=used_since)
    line = (f"--mlc-jit-remote-max-size={format_size(max_size)}: {remote.url} holds "
            f"{format_size(r.total_after)}")
    if r.entries or r.blobs:
        entries = plural(len(r.entries), "least recently used entry",
                         "least recently used entries")
        line += (f" after removing {entries} and {plural(len(r.blobs), 'blob')} "
                 f"({format_size(r.freed)})")
    if r.over_budget:
        line += (f"; still over the budget: kept {plural(r.kept_in_use, 'entry', 'entries')} "
                 "this run used")
    return line


# -- rm -----------------------------------------------------------------------------------------
def parse_target(text: str) -> tuple[str, str | None]:
    """``remote rm``'s argument: (key digest or prefix, entry digest or prefix or None);
    ConfigError naming the value and the forms."""
    match = _TARGET_RE.fullmatch(text.strip().lower())
    if match is None:
        raise ConfigError(f"invalid ENTRY|KEY {text!r}: expected {TARGET_FORMS}")
    return match.group(1), match.group(2)


def find(remote: Remote, key_prefix: str, entry_prefix: str | None
         ) -> dict[tuple[str, str], list[str]]:
    """The entries (and quarantine records) ``remote rm`` would remove: see
    :func:`.maintenance.find_entries`."""
    return maintenance.find_entries(remote, key_prefix, entry_prefix)


def remove(remote: Remote, found: Mapping[tuple[str, str], list[str]]) -> list[str]:
    """Remove the manifests (and quarantine records) ``found`` names; their URLs. The blobs
    stay: the next ``remote prune`` removes those no manifest names, past the grace
    period (see :func:`.maintenance.prune_remote` for why only prune removes blobs)."""
    return maintenance.remove_objects(remote, [n for names in found.values() for n in names])
