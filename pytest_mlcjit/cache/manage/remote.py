"""``pytest-mlcjit remote ls|verify|prune``: the remote tier's entries, their digests and
signatures checked, the old ones removed."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pytest_mlcjit.cache.store.remote.base import Remote, RemoteEntry
from pytest_mlcjit.cache.store.remote.signing import ENV_SIGNING_KEY


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
    is set; the entries with a problem."""
    entries = list(remote.iter_entries())
    bad = [describe_entry(e) for e in remote.verify(entries)]
    return {"checked": len(entries), "bad": bad, "signatures_checked": remote.signed,
            "signing_key_env": ENV_SIGNING_KEY}


def prune(remote: Remote, older_than: float) -> dict[str, Any]:
    removed = remote.prune(older_than)
    return {"removed": removed, "older_than": older_than, "time": time.time()}
