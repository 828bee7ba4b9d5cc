"""Cache management over :mod:`pytest_mlcjit.cache`: enumerate, verify, prune, clear, the
run history, and the pieces of ``pytest-mlcjit key`` / ``explain`` that need no pytest.

Every entry of every backend under a root is found by its file names alone
(``tvm/<sha256>.so``, ``model_lib/<md5>.<suffix>``, each with ``.manifest.json`` and
``.log`` beside it), so a cache restored to another path works as before. Recency is the
cache's own usage record (``.mlcjit/usage/<digest>``), else the manifest's ``created``;
file times are never read, because CI cache actions restore files with new mtimes.

An entry is only ever deleted while its key's lock is held, taken without waiting: an
entry whose lock a live process holds (it is being compiled) is never evicted.

Importing this module is cheap: no TVM, no numpy, no pytest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._defaults import default_roots
from .cache import (
    CONTROL_DIR,
    FILE_MODE,
    MANIFEST_SUFFIX,
    Cache,
    EntryPaths,
    lock_file,
    parse_manifest,
    try_flock,
    usage_file,
)
from .errors import ConfigError, CorruptEntryError
from .history import RUNS_FILE, read_runs, record_run

#: ``(directory under the root, backend name)`` of every backend's entries.
BACKEND_DIRS = (("tvm", "tvm"), ("model_lib", "mlc"))
_DIGEST_RE = re.compile(r"^[0-9a-f]{32}([0-9a-f]{32})?$")


# -- sizes and ages ---------------------------------------------------------------------------
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30,
    "ti": 2**40, "tib": 2**40,
}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NUMBER_UNIT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str, *, what: str = "size") -> int:
    """``10G``, ``500M``, ``1.5GiB``, ``4096`` (bytes) → bytes; ConfigError naming the value.

    K, M, G, T (and kB, MB…) are powers of 1000; Ki, Mi, Gi, Ti (KiB…) powers of 1024.
    """
    match = _NUMBER_UNIT_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(
            f"invalid {what} {text!r}: expected a number of bytes with an optional unit "
            "K, M, G, T (powers of 1000) or Ki, Mi, Gi, Ti (powers of 1024), for example 10G"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_age(text: str, *, what: str = "age") -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (a bare number is seconds) → seconds."""
    match = _NUMBER_UNIT_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in ("", *_AGE_UNITS):
        raise ConfigError(
            f"invalid {what} {text!r}: expected a number with a unit s, m, h, d or w "
            "(seconds, minutes, hours, days, weeks), for example 30d"
        )
    return float(match.group(1)) * _AGE_UNITS.get(unit, 1)


def plural(n: int, word: str, plural: str | None = None) -> str:
    """``1 entry``, ``2 entries``: ``n`` and the word, in the plural (``word + "s"`` unless
    given) when ``n`` is not 1."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def format_size(n: float) -> str:
    """``1234567`` → ``1.2 MB`` (powers of 1000, like :func:`parse_size`'s ``M``)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


# -- roots ------------------------------------------------------------------------------------
# -- entries ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Entry:
    """One cache entry as found on disk, nothing verified yet. Its manifest is read and
    parsed on first use, so that scanning a large cache (``prune``) parses only the
    manifests it needs."""

    root: Path
    backend: str
    digest: str
    #: The backend's directory that holds the entry's files, and their names.
    directory: Path
    names: tuple[str, ...]
    #: The library's file name, None if only a manifest or log is left.
    library_name: str | None
    last_used: float | None
    #: The library's size in bytes (0 if it is missing), as found by :func:`scan`.
    size: int = 0
    #: Bytes of every file of the entry (library, manifest, log), as found by :func:`scan`.
    disk_size: int = 0
    _loaded: tuple[dict[str, Any] | None, str | None] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False)

    def load(self) -> tuple[dict[str, Any] | None, str | None]:
        """``(manifest, error)``: the parsed manifest, or why it is unusable (read once)."""
        if self._loaded is None:
            self._loaded = _read_manifest(self.manifest_path, self.digest)
        return self._loaded

    @property
    def manifest(self) -> dict[str, Any] | None:
        return self.load()[0]

    @property
    def manifest_path(self) -> Path:
        return self.directory / f"{self.digest}{MANIFEST_SUFFIX}"

    @property
    def library(self) -> Path | None:
        return None if self.library_name is None else self.directory / self.library_name

    @property
    def files(self) -> list[Path]:
        return [self.directory / name for name in self.names]

    @property
    def manifest_error(self) -> str | None:
        return self.load()[1]

    @property
    def paths(self) -> EntryPaths:
        library = self.library
        if library is None:
            name = (self.manifest or {}).get("library") or f"{self.digest}.so"
            library = self.manifest_path.parent / str(name)
        return EntryPaths(self.digest, library)

    def _number(self, field: str) -> float | None:
        """A numeric manifest field, None if absent or not a number."""
        value = (self.manifest or {}).get(field)
        return float(value) if isinstance(value, int | float) else None

    @property
    def created(self) -> float | None:
        return self._number("created")

    @property
    def recency(self) -> float:
        """When it was last used, by the cache's own records: usage, else creation, else 0."""
        return self.last_used or self.created or 0.0

    @property
    def state(self) -> str:
        """``ok`` (manifest and library; not yet verified), ``unmanaged`` (a library without
        manifest, as MLC's own JIT leaves them), ``incomplete`` or ``bad-manifest``."""
        if self.manifest_error is not None:
            return "bad-manifest"
        if self.manifest is not None and self.library is not None:
            return "ok"
        if self.library is not None:
            return "unmanaged"
        return "incomplete"

    @property
    def key(self) -> dict[str, Any]:
        key = (self.manifest or {}).get("key")
        return key if isinstance(key, dict) else {}

    @property
    def model(self) -> str:
        key, manifest = self.key, self.manifest or {}
        if self.backend == "tvm" and "factory" in key:
            return f"{key['factory']} {json.dumps(key.get('config', {}), sort_keys=True)}"
        if self.backend == "mlc" and key:
            name = Path(str(manifest.get("model_dir") or "")).name or str(key.get("model_type"))
            parts = [name, str(key.get("quantization", ""))]
            if key.get("overrides"):
                parts.append(str(key["overrides"]))
            return " ".join(p for p in parts if p)
        return "?"

    @property
    def target(self) -> str:
        key, manifest = self.key, self.manifest or {}
        target = key.get("target", manifest.get("target", key.get("device")))
        if target is None:
            return "?"
        return target if isinstance(target, str) else json.dumps(target, sort_keys=True)

    @property
    def compile_seconds(self) -> float | None:
        return self._number("compile_seconds")

    @property
    def toolchain(self) -> Any:
        manifest = self.manifest or {}
        return manifest.get("toolchain") or self.key.get("toolchain")

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root), "backend": self.backend, "digest": self.digest,
            "state": self.state, "model": self.model, "target": self.target,
            "library": str(self.library) if self.library else None,
            "size": self.size, "disk_size": self.disk_size, "created": self.created,
            "last_used": self.last_used, "recency": self.recency,
            "compile_seconds": self.compile_seconds, "toolchain": self.toolchain,
            "adopted": bool((self.manifest or {}).get("adopted")),
        }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_manifest(path: Path, digest: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, None)``, ``(None, why it is unusable)``, or ``(None, None)`` if absent;
    the same checks as :meth:`Cache.read_manifest` (:func:`parse_manifest`)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror}"
    try:
        return parse_manifest(raw, path, digest), None
    except CorruptEntryError as exc:
        return None, str(exc)


def _read_usage(path: str) -> float | None:
    """A usage record's stamp: when the cache last used that entry (never a file time)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return float(os.read(fd, 64))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def scan(root: str | os.PathLike[str]) -> list[Entry]:
    """Every entry under ``root``, of every backend, most recently used first.

    One ``scandir`` per backend directory (sizes from its entries), one small read per
    usage record; a manifest is parsed here only where recency or the library's name
    needs it (no usage record, or more than one candidate library).
    """
    base = Path(root).expanduser().absolute()
    entries: list[Entry] = []
    for subdir, backend in BACKEND_DIRS:
        directory = base / subdir
        try:
            with os.scandir(directory) as it:
                found = {d.name: d for d in it}
        except OSError:
            continue
        groups: dict[str, list[str]] = {}
        for name in sorted(found):
            stem = name.split(".", 1)[0]
            if not name.startswith(".") and _DIGEST_RE.match(stem) and "." in name:
                groups.setdefault(stem, []).append(name)
        for digest, group in groups.items():
            manifest_name = f"{digest}{MANIFEST_SUFFIX}"
            entry = Entry(root=base, backend=backend, digest=digest, directory=directory,
                          names=tuple(group), library_name=None,
                          last_used=_read_usage(usage_file(base, digest)),
                          disk_size=sum(_entry_size(found[n]) for n in group))
            candidates = [n for n in group if n not in (manifest_name, f"{digest}.log")]
            if len(candidates) > 1:  # the manifest names it
                named = (entry.manifest or {}).get("library")
                candidates = [named] if named in candidates else candidates
            if candidates:
                entry.library_name = candidates[0]
                entry.size = _entry_size(found[candidates[0]])
            entries.append(entry)
    entries.sort(key=lambda e: (-e.recency, e.backend, e.digest))
    return entries


def _entry_size(d: os.DirEntry[str]) -> int:
    try:
        return d.stat().st_size
    except OSError:
        return 0


# -- locks ------------------------------------------------------------------------------------
@contextlib.contextmanager
def try_lock(root: Path, digest: str) -> Iterator[bool]:
    """Hold ``digest``'s lock if no one holds it (a non-blocking ``flock``); yields whether
    it is held. A lock held by a live process means the entry is being compiled now.

    :func:`~pytest_mlcjit.cache.try_flock` (pruning thousands of entries takes one lock
    per entry); where the filesystem has no ``flock``, filelock and its fallback, as the
    cache itself.
    """
    path = lock_file(root, digest)
    try:
        fd = try_flock(path)
    except OSError:  # no flock here (ENOSYS, EOPNOTSUPP…), or no file: let filelock decide
        with _filelock_try(path) as held:
            yield held
        return
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _filelock_try(path: str) -> Iterator[bool]:
    from filelock import FileLock, Timeout

    lock = FileLock(path, timeout=0, mode=FILE_MODE, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def is_locked(root: Path, digest: str) -> bool:
    """Whether a live process holds ``digest``'s lock (read-only: no lock file is created)."""
    if not os.path.exists(lock_file(root, digest)):
        return False
    with try_lock(root, digest) as held:
        return not held


def _delete_entry(entry: Entry) -> None:
    """Remove an entry's files, the manifest first (so a reader sees a miss, not a
    corrupt entry), then its usage record. Call with the key's lock held."""
    manifest = f"{entry.digest}{MANIFEST_SUFFIX}"
    for name in sorted(entry.names, key=lambda n: (n != manifest, n)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(entry.directory, name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(usage_file(entry.root, entry.digest))


def _open(root: Path) -> Cache:
    """A writable Cache over an existing root; management never loads a library, so the
    ownership check that guards loading does not apply."""
    return Cache(root, writable=True, allow_untrusted=True)


# -- verify -----------------------------------------------------------------------------------
@dataclasses.dataclass
class VerifyResult:
    root: Path
    ok: list[Entry] = dataclasses.field(default_factory=list)
    corrupt: list[tuple[Entry, str]] = dataclasses.field(default_factory=list)
    unmanaged: list[Entry] = dataclasses.field(default_factory=list)
    quarantined: dict[str, str] = dataclasses.field(default_factory=dict)
    locked: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": [e.digest for e in self.ok],
            "corrupt": [{**e.to_json(), "reason": why} for e, why in self.corrupt],
            "unmanaged": [e.digest for e in self.unmanaged],
            "quarantined": self.quarantined, "locked": self.locked,
        }


def verify(root: Path, *, fix: bool = False) -> VerifyResult:
    """Check every entry's size and SHA-256 against its manifest. ``fix`` moves corrupt
    entries to ``.mlcjit/quarantine`` (under their lock; a locked one is left alone)."""
    result = VerifyResult(root)
    checker = Cache(root, writable=False, allow_untrusted=True)
    for entry in scan(root):
        state = entry.state
        if state == "unmanaged":
            result.unmanaged.append(entry)
            continue
        if state == "bad-manifest":
            result.corrupt.append((entry, str(entry.manifest_error)))
            continue
        if entry.manifest is None:  # only a log is left: nothing to verify
            continue
        try:
            checker.verify(entry.paths, entry.manifest)
        except CorruptEntryError as exc:
            result.corrupt.append((entry, str(exc)))
        else:
            result.ok.append(entry)
    if fix and result.corrupt:
        cache = _open(root)
        for entry, why in result.corrupt:
            with try_lock(root, entry.digest) as held:
                if not held:
                    result.locked.append(entry.digest)
                    continue
                moved = cache.quarantine(entry.paths, f"pytest-mlcjit verify --fix: {why}")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(usage_file(root, entry.digest))
                result.quarantined[entry.digest] = str(moved) if moved else ""
    return result


# -- prune ------------------------------------------------------------------------------------
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


def _quarantined(root: Path) -> list[tuple[float, Path, int]]:
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
        size = sum(_size(p) for p in path.rglob("*") if p.is_file())
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
    quarantine = _quarantined(root)
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

    cache = None if dry_run else _open(root)
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
            if is_locked(root, entry.digest):
                result.kept_locked.append(entry)
                return False
        else:
            with try_lock(root, entry.digest) as held:
                if not held:
                    result.kept_locked.append(entry)
                    return False
                entry.load()  # what it was, for the report, before its manifest goes
                _delete_entry(entry)
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
            busy = is_locked(root, entry.digest)
        else:
            with try_lock(root, entry.digest) as held:
                busy = not held
                if held:
                    _delete_entry(entry)
        (result.kept_locked if busy else result.removed).append(entry)
        if not busy:
            result.freed += entry.disk_size
    for _stamp, path, size in _quarantined(root):
        result.freed += size
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
    if dry_run or not control.is_dir():
        return result
    locked = {e.digest for e in result.kept_locked}
    for sub in ("failed", "usage"):
        for path in _listdir(control / sub):
            if path.name.split(".", 1)[0] not in locked:
                with contextlib.suppress(OSError):
                    path.unlink()
    shutil.rmtree(control / "mlckeys", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (control / RUNS_FILE).unlink()
    _open(root).clean_staging()
    return result


def _listdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


# -- run history ------------------------------------------------------------------------------
# -- info -------------------------------------------------------------------------------------
def info(root: Path, *, runs: int = 5) -> dict[str, Any]:
    """What a root holds: entries per backend, sizes, the toolchains seen, recent runs."""
    from .key import canonical_json, tvm_fingerprint

    entries = scan(root)
    installed_tvm = tvm_fingerprint()
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
    quarantine = _quarantined(root)
    control = root / CONTROL_DIR
    return {
        "root": str(root),
        "exists": root.is_dir(),
        "entries": len(entries),
        "backends": backends,
        "size": sum(e.disk_size for e in entries),
        "library_size": sum(e.size for e in entries),
        "unmanaged": sum(e.state == "unmanaged" for e in entries),
        "quarantined": len(quarantine),
        "quarantine_size": sum(size for _, _, size in quarantine),
        "staging": len(_listdir(control / "staging")),
        "toolchains": sorted(toolchains.values(), key=lambda t: -int(t["entries"])),
        "installed_tvm": installed_tvm,
        "runs": read_runs(root, runs),
    }


# -- key and explain --------------------------------------------------------------------------
def cache_key(requests: Sequence[Mapping[str, Any]]) -> str:
    """The CI cache key of a test suite: the SHA-256 of the toolchain and of every distinct
    library it requests (each request's digest and toolchain; the digests of TVM entries
    already cover the toolchain, MLC's MD5 does not)."""
    from .key import CACHE_FORMAT, sha256_digest, tvm_fingerprint

    libraries = sorted({json.dumps([r["digest"], r.get("toolchain")], sort_keys=True)
                        for r in requests})
    return sha256_digest({"format": CACHE_FORMAT, "tvm": tvm_fingerprint(),
                          "libraries": libraries})


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay whole)."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


#: Stands for a key field one side does not have, in :func:`key_diff`.
ABSENT = "(absent)"


def key_diff(wanted: Mapping[str, Any], cached: Mapping[str, Any]
             ) -> list[tuple[str, Any, Any]]:
    """``(field, wanted, cached)`` for every leaf field that differs (:data:`ABSENT` for a
    field one side lacks), fields as dotted paths such as ``config.hidden``."""
    a, b = flatten(wanted), flatten(cached)
    return [(name, a.get(name, ABSENT), b.get(name, ABSENT))
            for name in sorted(a.keys() | b.keys())
            if a.get(name, ABSENT) != b.get(name, ABSENT)]


def nearest(entries: Iterable[Entry], key: Mapping[str, Any], backend: str
            ) -> tuple[Entry | None, list[tuple[str, Any, Any]]]:
    """The entry of ``backend`` whose key differs from ``key`` in the fewest fields."""
    best: tuple[Entry | None, list[tuple[str, Any, Any]]] = (None, [])
    best_score = math.inf
    for entry in entries:
        if entry.backend != backend or not entry.key:
            continue
        diffs = key_diff(key, entry.key)
        if len(diffs) < best_score:
            best, best_score = (entry, diffs), len(diffs)
    return best


def entry_status(entries: Iterable[Entry], digest: str, stale: Any = None) -> str:
    """``hit``, ``missing``, ``unmanaged…``, ``corrupt: …`` or ``stale: …`` for ``digest``
    among ``entries`` (of one root), as a READONLY run would find it."""
    for entry in entries:
        if entry.digest != digest:
            continue
        if entry.state == "unmanaged":
            return "unmanaged (a library without manifest: adopted on first use if it loads)"
        if entry.manifest is None:
            return f"corrupt: {entry.manifest_error or 'the library is missing'}"
        try:
            Cache(entry.root, writable=False, allow_untrusted=True).verify(
                entry.paths, entry.manifest)
        except CorruptEntryError as exc:
            return f"corrupt: {exc}"
        why = stale(entry.manifest) if stale is not None else None
        return f"stale: {why}" if why else "hit"
    return "missing"


__all__ = [
    "ClearResult", "Entry", "PruneResult", "VerifyResult",
    "cache_key", "clear", "default_roots", "entry_status", "format_size", "info", "key_diff",
    "nearest", "parse_age", "parse_size", "plural", "prune", "read_runs", "record_run",
    "scan", "verify",
]
