"""Checking recorded inputs in the test process: what changed since an entry was built.

An :class:`InputChecker` stats each recorded file and hashes it only when its stat is not
already known to match, so checking an unchanged entry costs one ``stat`` per file.
:func:`inputs_digest` names a recorded state: the same input state always gives the same
digest. Only the standard library is imported here.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pytest_mlcjit.inputs.observe import env_state, listing_state, path_state
from pytest_mlcjit.inputs.paths import (
    RACY_WINDOW_NS,
    FileRecord,
    PathLike,
    abspath,
    resolve,
    signature,
)
from pytest_mlcjit.key import file_sha256, sha256_digest

ChangeKind = Literal["module", "file", "dist", "listing", "probe", "env"]


@dataclass(frozen=True)
class Change:
    """One recorded input that no longer matches.

    ``kind`` is ``module``, ``file``, ``dist``, ``listing`` (a directory's names),
    ``probe`` (a path's state: ``old``/``new`` are ``absent``, ``file``, ``dir`` or
    ``other``) or ``env`` (``old``/``new`` are value digests, None: unset); ``name`` the
    recorded path (modules, files, listings, probes), distribution or variable name.
    ``old`` is the recorded SHA-256 or version; ``new`` the
    current one, or None for a file that no longer exists (or whose size changed, then
    ``old_size``/``new_size`` say how: it was not hashed), ``"unreadable"`` for a file that
    cannot be read, ``"missing"`` for a distribution no longer installed.
    """

    kind: ChangeKind
    name: str
    old: str | None
    new: str | None
    old_size: int | None = None
    new_size: int | None = None

    def __str__(self) -> str:  # noqa: PLR0911 - one sentence per kind of change
        if self.kind == "listing":
            counts = "" if self.old_size == self.new_size or self.new_size is None else \
                f" ({self.old_size} → {self.new_size} names)"
            return (f"directory {self.name} no longer exists" if self.new is None
                    else f"directory {self.name}: its names changed{counts}")
        if self.kind == "probe":
            return f"{self.name}: {self.old} → {self.new}"
        if self.kind == "env":
            was = "unset" if self.old is None else "set"
            now = "unset" if self.new is None else ("set" if self.old is None else "another value")
            return f"environment variable {self.name}: {was} → {now}"
        if self.kind == "dist":
            if self.new == "missing":
                return f"distribution {self.name} {self.old} is no longer installed"
            return f"distribution {self.name} {self.old} → {self.new}"
        if self.new is None and self.new_size is None:
            return f"{self.kind} {self.name} no longer exists"
        if self.new == "unreadable":
            return f"{self.kind} {self.name} cannot be read"
        if self.new is None:
            return f"{self.name}: size {self.old_size} → {self.new_size} bytes"
        return f"{self.name}: sha256 {(self.old or '')[:8]}… → {self.new[:8]}…"


def _normalize_dist(name: str) -> str:

    return re.sub(r"[-_.]+", "-", name).lower()


def _validated(recorded: Mapping[str, Any]) -> tuple[list[FileRecord], list[FileRecord],
                                                      dict[str, str]]:
    """(modules, files, dists) of a recorded dict; ValueError naming what is malformed."""
    if not isinstance(recorded, Mapping):
        raise ValueError(f"recorded inputs must be a dict, not {type(recorded).__name__}")
    lists: list[list[FileRecord]] = []
    for key in ("modules", "files"):
        entries = recorded.get(key)
        if not isinstance(entries, list):
            raise ValueError(f"recorded inputs: {key!r} must be a list, got {entries!r:.80}")
        for e in entries:
            if not (isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"]
                    and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64
                    and isinstance(e.get("size"), int) and not isinstance(e["size"], bool)):
                raise ValueError(
                    f"recorded inputs: bad {key} entry {e!r:.120}; expected "
                    '{"path": str, "sha256": 64 hex digits, "size": int}'
                )
        lists.append(entries)
    dists = recorded.get("dists")
    if not (isinstance(dists, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in dists.items())):
        raise ValueError(f"recorded inputs: 'dists' must map names to versions, got {dists!r:.80}")
    _validated_observed(recorded)
    return lists[0], lists[1], dists


def _validated_observed(recorded: Mapping[str, Any]) -> None:
    """The optional fields (listings, probes, env, incomplete): absent, or well formed."""
    shapes: dict[str, dict[str, type]] = {"listings": {"path": str, "sha256": str, "count": int},
              "probes": {"path": str, "state": str}}
    for key, shape in shapes.items():
        entries = recorded.get(key, [])
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and all(isinstance(e.get(f), t) for f, t in shape.items())
                for e in entries):
            raise ValueError(f"recorded inputs: bad {key!r}: {entries!r:.120}")
    env: Any = recorded.get("env", {})
    if not (isinstance(env, dict) and all(isinstance(k, str) and (v is None or isinstance(
            v, str)) for k, v in env.items())):
        raise ValueError(f"recorded inputs: 'env' must map names to digests, got {env!r:.80}")
    notes = recorded.get("incomplete", [])
    if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        raise ValueError(f"recorded inputs: 'incomplete' must be a list, got {notes!r:.80}")


class InputChecker:
    """Checks recorded inputs against the files and distributions present now.

    Keep one per run (the engine's): it remembers, per absolute path, the
    SHA-256 of the content it last hashed under a stat signature (inode, size, mtime,
    ctime), and each distribution's version. Checking a file costs one ``stat``; it is
    hashed only on first sight or when its stat changed (a ``touch`` costs a hash but is no
    change: contents are compared), and not at all when its size differs from the
    recorded one, or when the entry's stat hints still match. A file too recent to trust
    its stat (:data:`RACY_WINDOW_NS`) is not remembered.

    Distribution versions are read once per process: installing a package while a test
    session runs is not noticed until :meth:`forget`.
    """

    def __init__(self, *, racy_window_ns: int = RACY_WINDOW_NS) -> None:
        self.racy_window_ns = racy_window_ns
        self._memo: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self._versions: dict[str, str | None] = {}
        #: How many files this checker has hashed (for diagnostics and tests).
        self.files_hashed = 0

    def forget(self) -> None:
        """Drop everything remembered (file digests and distribution versions)."""
        self._memo.clear()
        self._versions.clear()

    def digest(self, path: PathLike, st: os.stat_result | None = None) -> tuple[str, int]:
        """(SHA-256, size) of a file's current content, through the stat memo. OSError if
        it is not a readable regular file."""
        return self._digest(abspath(path), st)

    def _digest(self, key: str, st: os.stat_result | None) -> tuple[str, int]:
        if st is None:
            st = os.stat(key)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(f"not a regular file: {key}")
        sig = signature(st)
        remembered = self._memo.get(key)
        if remembered is not None and remembered[0] == sig:
            return remembered[1], st.st_size
        digest = file_sha256(key)
        self.files_hashed += 1
        after = os.stat(key)
        if (signature(after) == sig and time.time_ns()
                - max(after.st_mtime_ns, after.st_ctime_ns) > self.racy_window_ns):
            self._memo[key] = (sig, digest)
        else:
            self._memo.pop(key, None)
        return digest, after.st_size

    def dist_version(self, name: str) -> str | None:
        """The installed version of distribution ``name``, or None; memoized."""
        key = _normalize_dist(name)
        if key not in self._versions:

            try:
                self._versions[key] = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                self._versions[key] = None
        return self._versions[key]

    def _check_file(self, kind: ChangeKind, entry: Mapping[str, Any], base: str
                    ) -> Change | None:
        name, old, size = entry["path"], entry["sha256"], entry["size"]
        path = resolve(name, base)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(path)
            if st.st_size != size:
                return Change(kind, name, old, None, old_size=size, new_size=st.st_size)
            hint = entry.get("mtime_ns")
            if (isinstance(hint, int) and hint == st.st_mtime_ns
                    and entry.get("ctime_ns") == st.st_ctime_ns):
                return None  # unchanged since it was hashed, and it was not racy then
            digest, _ = self._digest(path, st)
        except (FileNotFoundError, NotADirectoryError):
            return Change(kind, name, old, None)
        except OSError:
            return Change(kind, name, old, "unreadable")
        return None if digest == old else Change(kind, name, old, digest)

    def changes(self, recorded: Mapping[str, Any], base: PathLike) -> list[Change]:
        """What differs now from ``recorded`` (a :meth:`InputRecorder.result`), relative
        paths resolved against ``base``: modules, then files, then distributions; empty if
        nothing changed. ValueError if ``recorded`` is malformed."""
        modules, files, dists = _validated(recorded)
        base_path = abspath(base)
        out: list[Change] = []
        groups: tuple[tuple[ChangeKind, list[FileRecord]], ...] = (
            ("module", modules), ("file", files))
        for kind, entries in groups:
            for entry in entries:
                change = self._check_file(kind, entry, base_path)
                if change is not None:
                    out.append(change)
        for name, version in sorted(dists.items()):
            current = self.dist_version(name)
            if current != version:
                out.append(Change("dist", name, version, current or "missing"))
        return out + observed_changes(recorded, base_path)


def changes_since(recorded: object, base: PathLike, checker: InputChecker) -> list[Change] | None:
    """What differs now from an entry's recorded inputs (empty: the entry still fits),
    checked by ``checker`` (one per run: its memo makes a check one ``stat`` per file);
    None when ``recorded`` is not a well-formed record, so the entry cannot be judged and
    fits nothing. The one rule for local variants, entries returned before, known failures
    and remote entries alike."""
    if not isinstance(recorded, Mapping):
        return None
    try:
        return checker.changes(recorded, base)
    except ValueError:
        return None


def inputs_digest(recorded: Mapping[str, Any]) -> str:
    """SHA-256 naming a recorded input state: over the canonical JSON of each module's and
    file's path and SHA-256 and of the distributions' versions, independent of order, of
    sizes and stat hints, and of ``roots``. ValueError if ``recorded`` is malformed."""
    modules, files, dists = _validated(recorded)
    payload: dict[str, Any] = {
        "modules": sorted([e["path"], e["sha256"]] for e in modules),
        "files": sorted([e["path"], e["sha256"]] for e in files),
        "dists": dict(dists),
    }
    # Only when present: a record without them names the same state as before.
    if recorded.get("listings"):
        payload["listings"] = sorted([e["path"], e["sha256"]] for e in recorded["listings"])
    if recorded.get("probes"):
        payload["probes"] = sorted([e["path"], e["state"]] for e in recorded["probes"])
    if recorded.get("env"):
        payload["env"] = dict(recorded["env"])
    return sha256_digest(payload)


def observed_changes(recorded: Mapping[str, Any], base: str) -> list[Change]:
    """What differs now in what the factory learnt without reading a file: the names in a
    listed directory, the state of a probed path, an environment variable's value."""
    out: list[Change] = []
    for entry in recorded.get("listings", ()):
        now = listing_state(resolve(entry["path"], base))
        if now is None or now[0] != entry["sha256"]:
            out.append(Change("listing", entry["path"], entry["sha256"],
                              None if now is None else now[0], old_size=entry["count"],
                              new_size=None if now is None else now[1]))
    for entry in recorded.get("probes", ()):
        state = path_state(resolve(entry["path"], base))
        if state != entry["state"]:
            out.append(Change("probe", entry["path"], entry["state"], state))
    for name, digest in sorted(recorded.get("env", {}).items()):
        current = env_state(name)
        if current != digest:
            out.append(Change("env", name, digest, current))
    return out
