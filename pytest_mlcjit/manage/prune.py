"""``pytest-mlcjit prune`` and ``clear``, and the size cap applied after a run.

An entry is only ever deleted while its key's lock is held, taken without waiting: an
entry whose lock a live process holds (it is being compiled) is never evicted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..fsutil import best_effort, remove_tree
from ..layout import BACKEND_DIRS, CONTROL_DIR, RUNS_FILE
from ..locks import is_key_locked, try_key_lock
from .entries import Entry, delete_entry, entry_size_of, open_store, scan


@dataclasses.dataclass
class PruneResult:
    root: Path
    total_before: int = 0
    total_after: int = 0
    evicted: list[Entry] = dataclasses.field(default_factory=list)
    kept_locked: list[Entry] = dataclasses.field(default_factory=list)
    kept_in_use: list[Entry] = dataclasses.field(default_factory=list)
    quarantine_removed: list[str] = dataclasses.field(default_factory=list)
    staging_removed: list[str] = dataclasses.field(default_factory=list)
    max_size: int | None = None
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return self.total_before - self.total_after

    @property
    def over_cap(self) -> bool:
        return self.max_size is not None and self.total_after > self.max_size

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root), "dry_run": self.dry_run, "max_size": self.max_size,
            "total_before": self.total_before, "total_after": self.total_after,
            "freed": self.freed, "over_cap": self.over_cap,
            "evicted": [e.to_json() for e in self.evicted],
            "kept_locked": [e.digest for e in self.kept_locked],
            "kept_in_use": [e.digest for e in self.kept_in_use],
            "quarantine_removed": self.quarantine_removed,
            "staging_removed": self.staging_removed,
        }


def quarantined(root: Path) -> list[tuple[float, Path, int]]:
    """``(time quarantined, dir, bytes)`` of each quarantined entry, oldest first."""
    found = []
    try:
        dirs = list((root / CONTROL_DIR / "quarantine").iterdir())
    except OSError:
        return []
    for path in dirs:
        parts = path.name.split(".")
        try:
            stamp = float(parts[1])
        except (IndexError, ValueError):
            stamp = 0.0
        size = sum(entry_size_of(p) for p in path.rglob("*") if p.is_file())
        found.append((stamp, path, size))
    return sorted(found)


def prune(root: Path, *, max_size: int | None = None, older_than: float | None = None,
          keep_last_used: int | None = None, protect: Iterable[str] = (),
          protect_used_since: float | None = None, dry_run: bool = False,
          now: float | None = None) -> PruneResult:
    """Evict least recently used entries (by the cache's own usage records).

    An entry goes if it is older than ``older_than`` seconds, or beyond the
    ``keep_last_used`` most recent; then, while the cache is larger than ``max_size``,
    the least recently used remaining entries go (quarantined entries first). Never
    evicted: an entry whose lock a live process holds, one in ``protect``, or one used
    at or after ``protect_used_since``. Orphaned staging dirs are always removed.
    """
    now = time.time() if now is None else now
    result = PruneResult(root, max_size=max_size, dry_run=dry_run)
    if not (root / CONTROL_DIR).is_dir() and not any((root / d).is_dir()
                                                    for d, _ in BACKEND_DIRS):
        return result
    protected = set(protect)
    entries = scan(root)  # most recent first
    quarantine = quarantined(root)
    total = sum(e.disk_size for e in entries) + sum(size for _, _, size in quarantine)
    result.total_before = total

    doomed: list[Entry] = []
    for rank, entry in enumerate(entries):
        too_old = older_than is not None and now - entry.recency > older_than
        beyond = keep_last_used is not None and rank >= keep_last_used
        if too_old or beyond:
            doomed.append(entry)
    doomed_ids = {id(e) for e in doomed}
    rest = [e for e in entries if id(e) not in doomed_ids]

    def in_use(entry: Entry) -> bool:
        return entry.digest in protected or (
            protect_used_since is not None and (entry.last_used or 0) >= protect_used_since)

    cache = None if dry_run else open_store(root)
    for stamp, path, size in quarantine:  # oldest first; garbage goes before any entry
        expired = older_than is not None and now - stamp > older_than
        if not expired and (max_size is None or total <= max_size):
            continue
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
        result.quarantine_removed.append(str(path))
        total -= size

    def evict(entry: Entry) -> bool:
        nonlocal total
        if in_use(entry):
            result.kept_in_use.append(entry)
            return False
        if dry_run:
            if is_key_locked(root, entry.digest):
                result.kept_locked.append(entry)
                return False
        else:
            with try_key_lock(root, entry.digest) as held:
                if not held:
                    result.kept_locked.append(entry)
                    return False
                entry.load()  # what it was, for the report, before its manifest goes
                delete_entry(entry)
        result.evicted.append(entry)
        total -= entry.disk_size
        return True

    for entry in doomed:
        evict(entry)
    if max_size is not None:
        for entry in reversed(rest):  # least recently used first
            if total <= max_size:
                break
            evict(entry)
    if cache is not None:
        result.staging_removed = [str(p) for p in cache.clean_staging()]
    result.total_after = total
    return result


# -- clear ------------------------------------------------------------------------------------
@dataclasses.dataclass
class ClearResult:
    root: Path
    removed: list[Entry] = dataclasses.field(default_factory=list)
    kept_locked: list[Entry] = dataclasses.field(default_factory=list)
    freed: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"root": str(self.root), "dry_run": self.dry_run, "freed": self.freed,
                "removed": [e.digest for e in self.removed],
                "kept_locked": [e.digest for e in self.kept_locked]}


def clear(root: Path, *, dry_run: bool = False) -> ClearResult:
    """Remove every entry (except one being compiled now), the quarantine, the failure
    records, usage records, key memos, orphaned staging dirs and the run history. Only
    files the cache made are touched (an MLC home's weights and configs stay)."""
    result = ClearResult(root, dry_run=dry_run)
    if not root.is_dir():
        return result
    control = root / CONTROL_DIR
    for entry in scan(root):
        if dry_run:
            busy = is_key_locked(root, entry.digest)
        else:
            with try_key_lock(root, entry.digest) as held:
                busy = not held
                if held:
                    delete_entry(entry)
        (result.kept_locked if busy else result.removed).append(entry)
        if not busy:
            result.freed += entry.disk_size
    for _stamp, path, size in quarantined(root):
        result.freed += size
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
    if dry_run or not control.is_dir():
        return result
    locked = {e.digest for e in result.kept_locked}
    for sub in ("failed", "usage"):
        for path in list_dir(control / sub):
            if path.name.split(".", 1)[0] not in locked:
                with best_effort(path, "remove"):
                    path.unlink(missing_ok=True)
    remove_tree(control / "mlckeys")
    with contextlib.suppress(FileNotFoundError):
        (control / RUNS_FILE).unlink()
    open_store(root).clean_staging()
    return result


def list_dir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []

