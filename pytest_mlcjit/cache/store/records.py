"""The small records a cache root keeps beside its entries: the input states of a key
(*variants*), remembered failures, usage stamps, and compile-time memos.

Each is a small file under the root (paths from :mod:`..layout`), written atomically; a
record that cannot be read is treated as absent (a miss, never a crash), and a record the
cache can do without that cannot be written is reported once (:class:`WriteWarnings`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import (
    DIR_MODE,
    FILE_MODE,
    WriteWarnings,
    read_json,
    write_json_atomic,
)
from pytest_mlcjit.cache import layout
from pytest_mlcjit.cache.manifest import MAX_TIME
from pytest_mlcjit.cache.store.interface import KNOWN_AFTER, KnownFailure
from pytest_mlcjit.errors import CompileError


def _seen(data: Mapping[str, Any]) -> int:
    """A verdict's count of identical failures in a row (1 when absent or malformed)."""
    seen = data.get("seen")
    return seen if isinstance(seen, int) and not isinstance(seen, bool) and seen >= 1 else 1


def _seconds(data: Any) -> float | None:
    value = data.get("seconds", data.get("compile_seconds")) if isinstance(data, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


class Records:
    """The records of one cache root."""

    def __init__(self, root: Path, warnings: WriteWarnings) -> None:
        self.root = root
        self.warnings = warnings
        self._used: set[str] = set()

    # -- variants: one entry per input state of a key ---------------------------------------
    def variants(self, entry_dir: Path, key_digest: str) -> list[dict[str, Any]]:
        """The input states recorded for a key, newest first (``[]`` if none, or if the
        record is unreadable: a miss, never a crash)."""
        data = read_json(layout.variants_file(entry_dir, key_digest))
        variants = data.get("variants") if isinstance(data, dict) else None
        if not isinstance(variants, list):
            return []
        return [v for v in variants if isinstance(v, dict) and isinstance(v.get("entry"), str)
                and layout.is_digest(v["entry"]) and isinstance(v.get("inputs"), dict)]

    def add_variant(self, entry_dir: Path, key_digest: str, variant: dict[str, Any]) -> None:
        """Put ``variant`` (``{"entry", "inputs", "created"}``) first in the key's record,
        replacing one for the same entry; keeps the newest :data:`layout.MAX_VARIANTS`.
        Call with the key's lock held (the record is rewritten whole, atomically)."""
        path = layout.variants_file(entry_dir, key_digest)
        known = self.variants(entry_dir, key_digest)
        if known and known[0]["entry"] == variant["entry"]:
            return  # already the newest: nothing to rewrite (a REDO of the same inputs)
        kept = [v for v in known if v["entry"] != variant["entry"]]
        entry_dir.mkdir(mode=DIR_MODE, exist_ok=True)  # as publish makes it: not by umask
        path.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        write_json_atomic(path, {"key": key_digest,
                                 "variants": [variant, *kept][:layout.MAX_VARIANTS]})

    # -- failures: remembered within a run; known failures across runs ----------------------
    def failure_paths(self, digest: str) -> tuple[Path, Path]:
        return layout.failure_files(self.root, digest)

    def record_failure(self, digest: str, run_id: str, error: CompileError, *,
                       verdict: Mapping[str, Any] | None = None) -> None:
        """Remember that ``digest`` failed to compile: for the rest of run ``run_id``; and,
        with ``verdict`` (``{"error", "inputs", "missing", "seen", ...}``: the compile's own
        account of a failure that may be deterministic), for later runs too: seen once, or
        known from :data:`KNOWN_AFTER` identical failures in a row on (:class:`KnownFailure`).
        A record without a verdict replaces one with: the row of identical failures ends."""
        record, _ = self.failure_paths(digest)
        data: dict[str, Any] = {"run_id": run_id, "message": str(error), "time": time.time(),
                                **error.fields()}
        if verdict is not None:
            seen = _seen(verdict)
            data.update(verdict, seen=seen, known=seen >= KNOWN_AFTER)
        write_json_atomic(record, data)

    def read_failure(self, digest: str, run_id: str) -> CompileError | None:
        """The failure recorded for ``digest`` in run ``run_id``, if any."""
        record, _ = self.failure_paths(digest)
        data = read_json(record)
        if not isinstance(data, dict) or data.get("run_id") != run_id:
            return None
        if isinstance(data.get("cause"), str):
            return CompileError.from_fields(data, remembered=True)
        return None  # a record of this run is always written with its fields

    def read_failure_verdict(self, digest: str) -> KnownFailure | None:
        """The key's failure record if it has a verdict (from any run, with the fields this
        version writes): seen once, or known. A record of a version that knew a failure
        after one compile counts as seen once."""
        record, log = self.failure_paths(digest)
        data = read_json(record)
        if (not isinstance(data, dict) or not isinstance(data.get("cause"), str)
                or not isinstance(data.get("inputs"), dict)
                or isinstance(data.get("time"), bool)
                or not isinstance(data.get("time"), int | float)
                or not 0 <= data["time"] <= MAX_TIME):  # NaN fails too; printed as a date
            return None
        missing = data.get("missing")
        error = CompileError.from_fields({**data, "log_path": str(log)},
                                         known_since=float(data["time"]))
        return KnownFailure(error=error, time=float(data["time"]), inputs=data["inputs"],
                            missing=[str(p) for p in missing] if isinstance(missing, list)
                            else [], what=str(data.get("error", "")), seen=_seen(data))

    def forget_failure(self, digest: str) -> None:
        """Remove the key's failure record and its log (once the key has compiled)."""
        for path in self.failure_paths(digest):
            with self.warnings.best_effort(path, "remove the failure record"):
                path.unlink(missing_ok=True)

    # -- usage and timings ---------------------------------------------------------------------
    def record_use(self, digest: str) -> None:
        """Note that ``digest`` was used now (once per run)."""
        if digest in self._used:
            return
        layout.check_digest(digest)
        self._used.add(digest)
        # Overwritten in place, not truncated: ext4 starts writeback when a truncated file
        # is closed, which made this 0.6 to 4 ms on a busy disk instead of ~10 us.
        stamp = f"{time.time():.3f}\n".encode("ascii")
        path = layout.usage_file(self.root, digest)
        with self.warnings.best_effort(path, "record the use of"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
            try:
                os.pwrite(fd, stamp, 0)
                os.ftruncate(fd, len(stamp))  # no tail of a longer record left behind
            finally:
                os.close(fd)

    def record_time(self, spec_digest: str, key_digest: str, seconds: float) -> None:
        """Remember how long a spec took to compile (best effort; no fsync: a lost memo only
        costs a worse order)."""
        path = layout.timing_file(self.root, spec_digest)
        with self.warnings.best_effort(path, "record the compile time in"):
            path.parent.mkdir(mode=DIR_MODE, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            # Made 0644 whatever the umask: nothing the cache makes is writable by others.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            with open(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps({"seconds": round(float(seconds), 3), "key": key_digest}))
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)

    def recorded_time(self, spec_digest: str, manifests: list[Path], key_digest: str
                      ) -> float | None:
        """The spec's compile-time memo; else the ``compile_seconds`` of the first of
        ``manifests`` that has one (the key's other input states); else its failure's."""
        memo = _seconds(read_json(layout.timing_file(self.root, spec_digest)))
        if memo is not None:
            return memo
        for manifest in manifests:
            found = _seconds(read_json(manifest))
            if found is not None:
                return found
        record, _ = self.failure_paths(key_digest)
        return _seconds(read_json(record))
