"""The entries under a cache root, found by their file names alone
(``tvm/<sha256>.so``, ``model_lib/<md5>.<suffix>``, each with ``.manifest.json`` and
``.log`` beside it), so a cache restored to another path works as before. Recency is the
cache's own usage record (``.mlcjit/usage/<digest>``), else the manifest's ``created``;
file times are never read for recency, because CI cache actions restore files with new
mtimes (a writer's leftover temporary file is removed by its age: a restore only delays it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache import layout
from pytest_mlcjit.cache.layout import (
    BACKEND_DIRS,
    DIGEST_RE,
    MANIFEST_SUFFIX,
    EntryPaths,
    usage_file,
)
from pytest_mlcjit.cache.locks import is_key_locked, pid_alive, try_key_lock
from pytest_mlcjit.cache.manifest import MAX_TIME, Manifest, read_manifest_file
from pytest_mlcjit.cache.store.local import LocalStore

#: A temporary file older than this, of no live process of this host, was left by a writer
#: that died: ``prune`` and ``clear`` remove it (a writer renames its own within moments).
TEMP_LITTER_AGE_S = 3600.0


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
    _loaded: tuple[Manifest | None, str | None] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False)

    def load(self) -> tuple[Manifest | None, str | None]:
        """``(manifest, error)``: the parsed manifest, or why it is unusable (read once)."""
        if self._loaded is None:
            self._loaded = read_manifest_file(self.manifest_path, self.digest)
        return self._loaded

    @property
    def manifest(self) -> Manifest | None:
        return self.load()[0]

    @property
    def fields(self) -> Mapping[str, Any]:
        """The manifest's fields (none if it is missing or unusable), for display."""
        return self.manifest or {}

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
    def lock_digest(self) -> str:
        """The digest whose lock guards this entry: its key's (``key_digest``: one key may
        have several entries, one per input state), else its own."""
        key_digest = self.fields.get("key_digest")
        return key_digest if isinstance(key_digest, str) else self.digest

    @property
    def paths(self) -> EntryPaths:
        library = self.library
        if library is None:
            name = self.fields.get("library") or f"{self.digest}.so"
            library = self.manifest_path.parent / str(name)
        return EntryPaths(self.digest, library)

    def _number(self, field: str) -> float | None:
        """A numeric manifest field, None if absent or not a number."""
        value = self.fields.get(field)
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
        key = self.fields.get("key")
        return key if isinstance(key, dict) else {}

    @property
    def model(self) -> str:
        key, manifest = self.key, self.fields
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
        key, manifest = self.key, self.fields
        target = key.get("target", manifest.get("target", key.get("device")))
        if target is None:
            return "?"
        return target if isinstance(target, str) else json.dumps(target, sort_keys=True)

    @property
    def compile_seconds(self) -> float | None:
        return self._number("compile_seconds")

    @property
    def toolchain(self) -> Any:
        manifest = self.fields
        return manifest.get("toolchain") or self.key.get("toolchain")

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root), "backend": self.backend, "digest": self.digest,
            "key_digest": str(self.fields.get("key_digest") or self.digest),
            "state": self.state, "model": self.model, "target": self.target,
            "library": str(self.library) if self.library else None,
            "size": self.size, "disk_size": self.disk_size, "created": self.created,
            "last_used": self.last_used, "recency": self.recency,
            "compile_seconds": self.compile_seconds, "toolchain": self.toolchain,
            "adopted": bool(self.fields.get("adopted")),
        }


def variants_size(root: Path) -> int:
    """The bytes of the input-state records (``<dir>/variants/*.json``) under ``root``."""
    total = 0
    for subdir, _ in BACKEND_DIRS:
        with contextlib.suppress(OSError), os.scandir(layout.variants_dir(root, subdir)) as it:
            total += sum(_entry_size(d) for d in it)
    return total


def entry_size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_usage(path: str) -> float | None:
    """A usage record's stamp: when the cache last used that entry (never a file time);
    None unless it is a time from 1970 to the year 9999."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        stamp = float(os.read(fd, 64))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return stamp if math.isfinite(stamp) and 0 <= stamp <= MAX_TIME else None


def scan(root: str | os.PathLike[str]) -> list[Entry]:
    """Every entry under ``root``, of every backend, most recently used first.

    One ``scandir`` per backend directory (sizes from its entries), one small read per
    usage record; a manifest is parsed here only where recency or the library's name
    needs it (no usage record, or more than one candidate library).
    """
    base = Path(root).expanduser().absolute()
    entries: list[Entry] = []
    for subdir, backend in BACKEND_DIRS:
        directory = layout.backend_dir(base, subdir)
        try:
            with os.scandir(directory) as it:
                found = {d.name: d for d in it}
        except OSError:
            continue
        groups: dict[str, list[str]] = {}
        hidden: dict[str, list[str]] = {}
        for name in sorted(found):
            stem = name.lstrip(".").split(".", 1)[0]
            if not DIGEST_RE.fullmatch(stem) or "." not in name.lstrip("."):
                continue
            if name.startswith("."):  # a pending or temporary manifest: part of the entry
                hidden.setdefault(stem, []).append(name)
            else:
                groups.setdefault(stem, []).append(name)
        for digest, names in hidden.items():
            if digest not in groups and all(_abandoned_temp(found[n]) for n in names):
                groups[digest] = []  # only a dead writer's temp files: litter to remove
        for digest, group in groups.items():
            manifest_name = f"{digest}{MANIFEST_SUFFIX}"
            extra = hidden.get(digest, [])
            entry = Entry(root=base, backend=backend, digest=digest, directory=directory,
                          names=(*group, *extra), library_name=None,
                          last_used=_read_usage(usage_file(base, digest)),
                          disk_size=sum(_entry_size(found[n]) for n in (*group, *extra)))
            candidates = [n for n in group if n not in (manifest_name, f"{digest}.log")]
            if len(candidates) > 1:  # the manifest names it
                named = entry.fields.get("library")
                candidates = [named] if named in candidates else candidates
            if candidates:
                entry.library_name = candidates[0]
                entry.size = _entry_size(found[candidates[0]])
            entries.append(entry)
    entries.sort(key=lambda e: (-e.recency, e.backend, e.digest))
    return entries


def _abandoned_temp(d: os.DirEntry[str]) -> bool:
    """Whether ``d`` is a temporary file (``.<name>.<pid>.<hex>.tmp``, as
    :func:`pytest_mlcjit._util.fs.write_temp` names them) that its writer left: older than
    :data:`TEMP_LITTER_AGE_S` (a writer renames it within moments) and not of a live
    process of this host. The age decides: a pid says nothing about a writer in another
    PID namespace or on another host sharing the cache."""
    parts = d.name.split(".")
    if len(parts) < 4 or parts[-1] != "tmp" or not parts[-3].isdigit():
        return False
    try:
        age = time.time() - d.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    return age > TEMP_LITTER_AGE_S and not pid_alive(int(parts[-3]))


def _entry_size(d: os.DirEntry[str]) -> int:
    try:
        return d.stat().st_size
    except OSError:
        return 0


def delete_entry(entry: Entry) -> None:
    """Remove an entry's files, the manifest first (so a reader sees a miss, not a
    corrupt entry), then its usage record. Call with the key's lock held."""
    manifest = f"{entry.digest}{MANIFEST_SUFFIX}"
    for name in sorted(entry.names, key=lambda n: (n != manifest, n)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(entry.directory, name))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(usage_file(entry.root, entry.digest))


@dataclasses.dataclass
class DiskUsage:
    """Bytes of every file the cache keeps under a root, by kind (file sizes; directories
    and other programs' files beside an MLC home's ``model_lib`` are not counted)."""

    #: Entries (libraries, manifests, logs, pending and temporary manifests, variants).
    entries: int = 0
    quarantine: int = 0
    #: Remembered failures, with their compile logs.
    failed: int = 0
    staging: int = 0
    #: Locks, usage records, key memos, the run history.
    other: int = 0

    @property
    def total(self) -> int:
        return self.entries + self.quarantine + self.failed + self.staging + self.other

    def to_json(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (or of ``path`` itself), links not
    followed; what cannot be read counts 0."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    for top, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, name))
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def disk_usage(root: Path) -> DiskUsage:
    """What the cache stores under ``root``, by kind (see :class:`DiskUsage`)."""
    usage = DiskUsage()
    for subdir, _ in BACKEND_DIRS:
        usage.entries += tree_size(layout.backend_dir(root, subdir))
    control = layout.control_dir(root)
    for name in _names(control):
        size = tree_size(control / name)
        if name in ("quarantine", "failed", "staging"):
            setattr(usage, name, getattr(usage, name) + size)
        else:
            usage.other += size
    return usage


def _names(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


@contextlib.contextmanager
def hold_entry(entry: Entry) -> Iterator[bool]:
    """Hold, without waiting, the locks that guard ``entry``: its key's (the compile of
    any of the key's entries holds it) and, if that is another digest, its own; yields
    whether both are held (if not, the entry is being compiled now)."""
    with contextlib.ExitStack() as stack:
        for digest in dict.fromkeys((entry.lock_digest, entry.digest)):
            if not stack.enter_context(try_key_lock(entry.root, digest)):
                yield False
                return
        yield True


def entry_locked(entry: Entry) -> bool:
    """Whether a live process holds a lock that guards ``entry`` (nothing is created)."""
    return any(is_key_locked(entry.root, d) for d in {entry.lock_digest, entry.digest})


def open_store(root: Path) -> LocalStore:
    """A writable store over an existing root; management never loads a library, so the
    ownership check that guards loading does not apply."""
    return LocalStore(root, allow_untrusted=True).open_for_writing()

