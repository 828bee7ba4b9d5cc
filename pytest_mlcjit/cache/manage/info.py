"""``pytest-mlcjit info``: what a cache root holds, and its recent runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_mlcjit.cache.history import read_runs
from pytest_mlcjit.cache.layout import STAGING_LOCK_SUFFIX, staging_dir
from pytest_mlcjit.cache.manage.entries import disk_usage, scan, variants_size
from pytest_mlcjit.cache.manage.prune import failure_records, list_dir, quarantined
from pytest_mlcjit.key import canonical_json


def info(root: Path, *, runs: int = 5, installed_tvm: Any = None) -> dict[str, Any]:
    """What a root holds: entries per backend, sizes, the toolchains seen (whether each is
    ``installed_tvm``, the TVM fingerprint installed here), recent runs."""
    entries = scan(root)
    toolchains: dict[str, dict[str, Any]] = {}
    for entry in entries:
        chain = entry.toolchain
        if chain is None:
            continue
        text = canonical_json(chain)
        seen = toolchains.setdefault(text, {"toolchain": chain, "entries": 0})
        seen["entries"] += 1
        tvm = chain.get("tvm") if isinstance(chain, dict) else None
        seen["installed_tvm"] = tvm == installed_tvm
    backends: dict[str, int] = {}
    for entry in entries:
        backends[entry.backend] = backends.get(entry.backend, 0) + 1
    quarantine = quarantined(root)
    usage = disk_usage(root)
    return {
        "root": str(root),
        "exists": root.is_dir(),
        "entries": len(entries),
        "backends": backends,
        "size": sum(e.disk_size for e in entries) + variants_size(root),
        "library_size": sum(e.size for e in entries),
        "unmanaged": sum(e.state == "unmanaged" for e in entries),
        "quarantined": len(quarantine),
        "quarantine_size": sum(size for _, _, size in quarantine),
        "staging": len([p for p in list_dir(staging_dir(root))
                        if not p.name.endswith(STAGING_LOCK_SUFFIX)]),
        "staging_size": usage.staging,
        "failed": len(failure_records(root)),
        "failed_size": usage.failed,
        "other_size": usage.other,
        #: Everything the cache stores under the root: what ``prune --max-size`` caps.
        "total_size": usage.total,
        "toolchains": sorted(toolchains.values(), key=lambda t: -int(t["entries"])),
        "installed_tvm": installed_tvm,
        "runs": read_runs(root, runs),
    }

