"""The read-only view of a store (policy READONLY): lookups as the store answers them,
and nothing ever written: no directory made, no lock taken, no usage stamp, no record.

A wrapper, as sccache's read-only storage is, so that "writes nothing" is one class's
whole job rather than a flag every write of the local store has to test. It works on a
read-only filesystem and on a cache path that does not exist.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.manifest import Manifest
from pytest_mlcjit.cache.store.interface import EntryQuery, ForwardingStore, Hit
from pytest_mlcjit.errors import CompileError


class ReadOnlyStore(ForwardingStore):
    """A :class:`Store` that answers lookups from ``inner`` and refuses every write."""

    def __repr__(self) -> str:
        return f"ReadOnlyStore({self.inner!r})"

    @property
    def writable(self) -> bool:
        return False

    # -- writes: none -------------------------------------------------------------------------
    def _refuse(self, what: str) -> Exception:
        return AssertionError(f"a read-only store does not {what} (the policy is READONLY)")

    def publish(self, query: EntryQuery, library: Path, log: Path | None,
                manifest: Manifest, *, replace: bool = False) -> Hit:
        raise self._refuse("publish")

    @contextlib.contextmanager
    def lock(self, digest: str, timeout: float, what: str = "", *,
             cancelled: threading.Event | None = None) -> Iterator[float]:
        raise self._refuse("take locks")
        yield 0.0  # pragma: no cover - never reached

    def new_staging_dir(self, digest: str, parent: Path | None = None) -> Path:
        raise self._refuse("stage")

    def remove_staging(self, path: Path) -> None:
        raise self._refuse("stage")

    def clean_staging(self, *, where: Path | None = None) -> list[Path]:
        return []

    def quarantine(self, paths: EntryPaths, reason: str) -> Path | None:
        return None  # a corrupt entry stays where it is, and is reported

    def record_use(self, digest: str) -> None:
        pass

    def record_failure(self, digest: str, run_id: str, error: CompileError, *,
                       verdict: Mapping[str, Any] | None = None) -> None:
        pass

    def record_time(self, spec_digest: str, key_digest: str, seconds: float) -> None:
        pass
