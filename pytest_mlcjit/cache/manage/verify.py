"""``pytest-mlcjit verify``: check every entry's manifest and checksum."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache.layout import usage_file
from pytest_mlcjit.cache.manage.entries import Entry, hold_entry, open_store, scan
from pytest_mlcjit.cache.store.local import LocalStore
from pytest_mlcjit.errors import ConfigError, CorruptEntryError


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
    checker = LocalStore(root, allow_untrusted=True)
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
        except (CorruptEntryError, ConfigError) as exc:  # ConfigError: a path out of layout
            result.corrupt.append((entry, str(exc)))
        else:
            result.ok.append(entry)
    if fix and result.corrupt:
        cache = open_store(root)
        for entry, why in result.corrupt:
            with hold_entry(entry) as held:
                if not held:
                    result.locked.append(entry.digest)
                    continue
                moved = cache.quarantine(entry.paths, f"pytest-mlcjit verify --fix: {why}",
                                         remove=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(usage_file(root, entry.digest))
                result.quarantined[entry.digest] = str(moved) if moved else ""
    return result

