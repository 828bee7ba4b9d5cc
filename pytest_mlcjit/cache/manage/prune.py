"""``pytest-mlcjit prune`` and ``clear``, and the size cap applied after a run.

An entry is only ever deleted while its key's lock is held, taken without waiting: an
entry whose lock a live process holds (it is being compiled) is never evicted. The size
that ``--max-size`` caps is everything the cache stores under the root
(:func:`.entries.disk_usage`): entries, the quarantine, remembered failures and their logs,
staging, locks, usage records, key memos and the run history. Lock files go once nobody
holds them and no entry needs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import WriteWarnings, read_json
from pytest_mlcjit.cache import layout
from pytest_mlcjit.cache.layout import BACKEND_DIRS, DIGEST_RE
from pytest_mlcjit.cache.locks import (
    MISSING,
    is_key_locked,
    release_and_remove,
    remove_if_free,
    try_existing_flock,
)
from pytest_mlcjit.cache.manage.entries import (
    Entry,
    delete_entry,
    disk_usage,
    entry_locked,
    entry_size_of,
    hold_entry,
    open_store,
    scan,
    tree_size,
)
from pytest_mlcjit.cache.store.interface import KNOWN_AFTER
from pytest_mlcjit.errors import MlcJitError


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
    #: Keys whose remembered failure (record and log) was removed.
    failures_removed: list[str] = dataclasses.field(default_factory=list)
    locks_removed: int = 0
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
            "failures_removed": self.failures_removed, "locks_removed": self.locks_removed,
        }


def quarantined(root: Path) -> list[tuple[float, Path, int]]:
    """``(time quarantined, dir, bytes)`` of each quarantined entry, oldest first."""
    found = []
    try:
        dirs = list(layout.quarantine_dir(root).iterdir())
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


def failure_records(root: Path) -> dict[str, list[Path]]:
    """The files of each remembered failure (``.mlcjit/failed/<key>.json`` and ``.log``,
    and temporary files), by key digest."""
    found: dict[str, list[Path]] = {}
    for path in list_dir(layout.control_subdir(root, "failed")):
        stem = path.name.lstrip(".").split(".", 1)[0]
        found.setdefault(stem if DIGEST_RE.fullmatch(stem) else path.name, []).append(path)
    return found


def _seen(data: dict[str, Any]) -> int:
    if not isinstance(data.get("inputs"), dict):
        return 0  # no verdict: remembered for its run only
    seen = data.get("seen")
    return seen if isinstance(seen, int) and not isinstance(seen, bool) and seen > 0 else 1


def read_failures(root: Path) -> list[dict[str, Any]]:
    """The remembered failures under ``root``, newest first: ``{"digest", "known" (a
    known failure, reported without compiling by later runs while nothing changed; else
    remembered for its run only), "seen" (how many compiles in a row failed this same way:
    one is seen once, compiled again by the next run; 0 for a failure no later run
    considers), "time", "run_id", "model", "error", "log"}`` (a record that cannot be read
    is listed with ``"error": "unreadable record"``)."""
    found = []
    for key, files in failure_records(root).items():
        record = next((p for p in files if p.name == f"{key}.json"), None)
        if record is None or not DIGEST_RE.fullmatch(key):
            continue
        data = read_json(record)
        if not isinstance(data, dict):
            data = {"error": "unreadable record"}
        message = str(data.get("message") or "")
        when = data.get("time")
        log = record.with_suffix(".log")
        found.append({
            "digest": key, "seen": _seen(data),
            "known": data.get("known") is True and _seen(data) >= KNOWN_AFTER,
            "time": float(when) if isinstance(when, int | float) else None,
            "run_id": data.get("run_id"),
            "model": str(data.get("spec") or data.get("describe") or data.get("model") or ""),
            "error": str(data.get("error") or message.partition("\n")[0]),
            "log": str(log) if log.exists() else None})
    return sorted(found, key=lambda f: -(f["time"] or 0.0))


def prune(root: Path, *, max_size: int | None = None, older_than: float | None = None,
          keep_last_used: int | None = None, protect: Iterable[str] = (),
          protect_used_since: float | None = None, dry_run: bool = False,
          now: float | None = None, failed: bool = False,
          warnings: WriteWarnings | None = None) -> PruneResult:
    """Evict least recently used entries (by the cache's own usage records).

    An entry goes if it is older than ``older_than`` seconds, or beyond the
    ``keep_last_used`` most recent; then, while what the cache stores is larger than
    ``max_size``, quarantined entries go (oldest first), then remembered failures, then
    the least recently used remaining entries. Never evicted: an entry whose lock a live
    process holds, one in ``protect``, or one used at or after ``protect_used_since``.
    Abandoned staging dirs are always removed, and so are the lock files nobody holds of
    keys without entries. Remembered failures (known failures included) go when recorded
    longer ago than ``older_than``, or all of them with ``failed`` (never one whose key
    is being compiled now). ``total_after`` is measured on disk afterwards.
    """
    result = PruneResult(root, max_size=max_size, dry_run=dry_run)
    if not layout.control_dir(root).is_dir() and not any(
            layout.backend_dir(root, d).is_dir() for d, _ in BACKEND_DIRS):
        return result
    pruner = _Pruner(result, now=time.time() if now is None else now, older_than=older_than,
                     protected=set(protect), protect_used_since=protect_used_since,
                     warnings=warnings or WriteWarnings())
    pruner.failed = failed
    entries = scan(root)  # most recent first
    doomed: list[Entry] = []
    for rank, entry in enumerate(entries):
        too_old = older_than is not None and pruner.now - entry.recency > older_than
        beyond = keep_last_used is not None and rank >= keep_last_used
        if too_old or beyond:
            doomed.append(entry)
    pruner.remove_garbage()
    for entry in doomed:
        pruner.evict(entry)
    if max_size is not None:
        doomed_ids = {id(e) for e in doomed}
        for entry in reversed([e for e in entries if id(e) not in doomed_ids]):  # LRU first
            if pruner.total <= max_size:
                break
            pruner.evict(entry)
    if dry_run:
        result.total_after = pruner.total
        return result
    result.staging_removed = [str(p) for p in open_store(root).clean_staging()]
    evicted = {id(e) for e in result.evicted}
    needed = {e.lock_digest for e in entries if id(e) not in evicted}
    needed |= {k for k in failure_records(root) if DIGEST_RE.fullmatch(k)}
    result.locks_removed = remove_free_locks(root, keep=needed)
    result.total_after = disk_usage(root).total
    return result


class _Pruner:
    """The steps of :func:`prune`, keeping count of what the cache still stores."""

    def __init__(self, result: PruneResult, *, now: float, older_than: float | None,
                 protected: set[str], protect_used_since: float | None,
                 warnings: WriteWarnings) -> None:
        self.warnings = warnings
        self.result, self.now, self.older_than = result, now, older_than
        self.protected, self.protect_used_since = protected, protect_used_since
        self.root = result.root
        self.total = result.total_before = disk_usage(self.root).total
        #: Remove every remembered failure (``prune --failed``).
        self.failed = False

    def over(self) -> bool:
        return self.result.max_size is not None and self.total > self.result.max_size

    def remove_garbage(self) -> None:
        """Quarantined entries (expired, or oldest first while over the cap), then
        remembered failures (expired, all with ``failed``, or while over the cap): before
        any entry."""
        for stamp, path, size in quarantined(self.root):
            expired = self.older_than is not None and self.now - stamp > self.older_than
            if not expired and not self.over():
                continue
            if not self.result.dry_run:
                shutil.rmtree(path, ignore_errors=True)
            self.result.quarantine_removed.append(str(path))
            self.total -= size
        recorded = ({f["digest"]: f["time"] for f in read_failures(self.root)}
                    if self.older_than is not None else {})
        for key, files in failure_records(self.root).items():
            when = recorded.get(key)
            expired = (self.older_than is not None and when is not None
                       and self.now - when > self.older_than)
            if not (self.failed or expired or self.over()):
                continue
            if DIGEST_RE.fullmatch(key) and is_key_locked(self.root, key):
                continue  # being compiled again now
            if not self.result.dry_run:
                for path in files:
                    with self.warnings.best_effort(path, "remove the failure record"):
                        path.unlink(missing_ok=True)
            self.result.failures_removed.append(key)
            self.total -= sum(tree_size(p) for p in files)

    def evict(self, entry: Entry) -> bool:
        result = self.result
        if entry.digest in self.protected or (
                self.protect_used_since is not None
                and (entry.last_used or 0) >= self.protect_used_since):
            result.kept_in_use.append(entry)
            return False
        if result.dry_run:
            if entry_locked(entry):
                result.kept_locked.append(entry)
                return False
        else:
            with hold_entry(entry) as held:
                if not held:
                    result.kept_locked.append(entry)
                    return False
                entry.load()  # what it was, for the report, before its manifest goes
                delete_entry(entry)
        result.evicted.append(entry)
        self.total -= entry.disk_size
        return True


def remove_free_locks(root: Path, *, keep: Iterable[str] = ()) -> int:
    """Remove the key lock files under ``root`` that nobody holds (and their stale owner
    records), except those of ``keep``; how many went. Each is removed while held, and
    every taker checks that the file it locked is still the one named (see
    :mod:`..locks`), so no lock is ever split in two."""
    kept = set(keep)
    locks = layout.control_subdir(root, "locks")
    removed = 0
    files = list_dir(locks)
    owners: dict[str, list[Path]] = {}  # a key's owner records, a temporary one too
    for path in files:
        name = path.name.lstrip(".")
        if ".owner" in name:
            owners.setdefault(name.split(".", 1)[0], []).append(path)
    for path in files:
        stem = path.name.split(".", 1)[0]
        if not path.name.endswith(".lock") or not DIGEST_RE.fullmatch(stem) or stem in kept:
            continue
        try:
            fd = try_existing_flock(path)
        except (OSError, MlcJitError):
            continue  # another user's: left for its owner (clear and prune say nothing)
        if fd is None or fd == MISSING:
            continue  # held: a compile of this key is running
        for leftover in owners.get(stem, ()):
            with contextlib.suppress(OSError):
                leftover.unlink()
        release_and_remove(fd, path)
        removed += 1
    return removed


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


def _remove_variants(root: Path, result: ClearResult, warnings: WriteWarnings) -> None:
    """The input-state records of every key, unless a key is being compiled now."""
    if result.kept_locked:
        return
    for subdir, _ in BACKEND_DIRS:
        warnings.remove_tree(layout.variants_dir(root, subdir))


def clear(root: Path, *, dry_run: bool = False,
          warnings: WriteWarnings | None = None) -> ClearResult:
    """Remove every entry (except one being compiled now), the quarantine, the failure
    records, usage records, key memos, compile-time memos, abandoned staging dirs, the
    run history and the lock files nobody holds. Only files the cache made are touched
    (an MLC home's weights and configs stay)."""
    result = ClearResult(root, dry_run=dry_run)
    warnings = warnings or WriteWarnings()
    if not root.is_dir():
        return result
    control = layout.control_dir(root)
    for entry in scan(root):
        if dry_run:
            busy = entry_locked(entry)
        else:
            with hold_entry(entry) as held:
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
    locked = {e.lock_digest for e in result.kept_locked} | {e.digest for e in result.kept_locked}
    for sub in ("failed", "usage", "timings"):
        for path in list_dir(layout.control_subdir(root, sub)):
            if path.name.lstrip(".").split(".", 1)[0] not in locked:
                result.freed += tree_size(path)
                with warnings.best_effort(path, "remove"):
                    path.unlink(missing_ok=True)
    warnings.remove_tree(layout.mlc_key_memos(root))
    _remove_variants(root, result, warnings)
    with contextlib.suppress(FileNotFoundError):
        layout.runs_file(root).unlink()
    with contextlib.suppress(OSError, MlcJitError):
        remove_if_free(layout.runs_lock(root))
    open_store(root).clean_staging()
    remove_free_locks(root, keep=locked)
    return result


def list_dir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []

