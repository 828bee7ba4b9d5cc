"""The storage seam: what the engine asks of a cache, and the typed answers it gets.

Every tier implements :class:`Store`: the local cache (:class:`.local.LocalStore`), its
read-only view (:class:`.readonly.ReadOnlyStore`, for READONLY), and the tiered store
(:class:`.tiered.TieredStore`: local first, then a remote); the two that wrap another
store are :class:`ForwardingStore` subclasses. The engine holds a ``Store`` and never
knows how many tiers are behind it: a lookup answers a :data:`Lookup` (where the bytes
came from is :attr:`Hit.source`), a publish of a compiled library goes to every tier that
takes writes. A store learns about a request only through :class:`EntryQuery`,
which the engine makes from its build request, so this layer knows nothing of backends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal, Protocol

from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.manifest import Manifest
from pytest_mlcjit.errors import CompileError
from pytest_mlcjit.inputs.paths import RecordedInputs


class EntryQuery(Protocol):
    """A request as a store sees it: its key, where its entries live, and the backend's
    rules for an entry found there."""

    @property
    def digest(self) -> str:
        """The key's digest."""

    @property
    def describe(self) -> str:
        """The request in words, for messages."""

    def locate(self, root: Path, entry: str | None = None) -> EntryPaths:
        """Where the key's entry (or its input-state variant ``entry``) lives under ``root``."""

    def inputs_base(self) -> Path | None:
        """Where recorded inputs are relative to, or None for a backend that records none
        (then a key has one entry, not one per input state)."""

    def stale(self, manifest: Mapping[str, Any]) -> str | None:
        """Why an entry built from ``manifest`` no longer fits (a toolchain change), or None."""

    def adopt(self, paths: EntryPaths) -> Manifest | None:
        """A manifest for a library found without one (another tool put it there), or None;
        CorruptEntryError unless it proves loadable."""


# -- what a lookup finds ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Hit:
    """A usable entry: its files, its manifest (checked against the library), and which
    tier served it (``"local"``, or ``"remote"`` for a download)."""

    paths: EntryPaths
    manifest: Manifest
    source: Literal["local", "remote"] = "local"


@dataclasses.dataclass(frozen=True)
class Missing:
    """No entry of the key (for a backend that records inputs: none of its input states).
    ``refused``: a further tier had entries of the key and refused them, and why (unsigned,
    signed by an unknown key, a digest mismatch, a library that failed its load check)."""

    refused: str | None = None


@dataclasses.dataclass(frozen=True)
class Stale:
    """An entry that no longer fits: its recorded inputs or its toolchain changed."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Corrupt:
    """An entry whose manifest or library is damaged (``paths``: to quarantine it)."""

    reason: str
    paths: EntryPaths


@dataclasses.dataclass(frozen=True)
class Redo:
    """An entry that the policy REDO rebuilds: it was not built in this run."""


Lookup = Hit | Missing | Stale | Corrupt | Redo
MISSING = Missing()

#: Announces a step that can take long (``"download"``) to the run's live progress, for
#: the duration of a ``with`` block.
Job = Callable[[str], AbstractContextManager[Any]]


def no_job(kind: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


def why_not(found: Lookup) -> str:
    """A lookup that is not a hit, in words: ``missing``, ``stale: …``, ``corrupt: …``,
    ``redo`` (the form ``JIT.status`` and ``explain`` show)."""
    if isinstance(found, Stale):
        return f"stale: {found.reason}"
    if isinstance(found, Corrupt):
        return f"corrupt: {found.reason}"
    if isinstance(found, Redo):
        return "redo"
    return "hit" if isinstance(found, Hit) else "missing"


# -- remembered failures ----------------------------------------------------------------------
#: How many compiles in a row must fail the same way (same key, error and inputs) before
#: the failure outlives its run: once is no proof (a missing variable, a tool that failed
#: once); twice shows it deterministic.
KNOWN_AFTER = 2


@dataclasses.dataclass(frozen=True)
class KnownFailure:
    """A failure of a key that the factory or the compiler raised (``what``: its exception
    line), recorded with the inputs it was compiled from. ``seen``: how many compiles in a
    row failed this identical way; from :data:`KNOWN_AFTER` on it is *known*: reported
    without compiling while its recorded ``inputs`` hold and the files in ``missing`` are
    still absent. A success of the key forgets it."""

    error: CompileError
    time: float
    inputs: RecordedInputs
    missing: list[str]
    what: str = ""
    seen: int = KNOWN_AFTER

    @property
    def known(self) -> bool:
        """Whether it was shown to be deterministic (seen :data:`KNOWN_AFTER` times)."""
        return self.seen >= KNOWN_AFTER


# -- the interface ---------------------------------------------------------------------------
class Store(Protocol):
    """What the engine needs of a cache, whatever its tiers."""

    #: The local cache root (where locks, staging, records and published entries live).
    root: Path

    @property
    def writable(self) -> bool:
        """Whether the store takes writes (locks, staging, publishes, records)."""

    def lookup(self, query: EntryQuery, *, redo_run: str | None = None) -> Lookup:
        """The local entry of ``query``: no lock, no network, a ``stat`` per recorded input
        when nothing changed. ``redo_run``: under REDO, the run's id (an entry built by
        another run is :class:`Redo`)."""

    def fetch(self, query: EntryQuery, *, job: Job = no_job) -> Lookup:
        """After a local miss: the entry from a further tier, downloaded, checked and made
        local (published when the store is writable, else kept privately), as a
        :class:`Hit` with its ``source``; else :data:`MISSING`. A writable store is asked
        with the key's lock held; ``job`` announces a download to the live progress."""

    def publish(self, query: EntryQuery, library: Path, log: Path | None,
                manifest: Manifest, *, replace: bool = False) -> Hit:
        """Publish a library compiled in a staging directory (with the key's lock held):
        atomically into the local cache, as the entry of its input state; then to the
        tiers that take uploads (``replace``: a forced rebuild replaces theirs)."""

    def lock(self, digest: str, timeout: float, what: str = "", *,
             cancelled: threading.Event | None = None) -> AbstractContextManager[float]:
        """Hold the key's lock (every process on every host sharing the cache); yields the
        seconds waited."""

    def new_staging_dir(self, digest: str, parent: Path | None = None) -> Path: ...
    def remove_staging(self, path: Path) -> None: ...
    def clean_staging(self, *, where: Path | None = None) -> list[Path]: ...

    def quarantine(self, paths: EntryPaths, reason: str) -> Path | None:
        """Set a corrupt entry aside (it stays readable, still corrupt, until replaced)."""

    def is_verified(self, paths: EntryPaths) -> bool:
        """Whether the library was verified in this run and is unchanged since (one stat)."""

    def record_use(self, digest: str) -> None:
        """Note that the entry was used now (recency for the size cap)."""

    def record_failure(self, digest: str, run_id: str, error: CompileError, *,
                       verdict: Mapping[str, Any] | None = None) -> None:
        """Remember a failed compile for the rest of run ``run_id``, and with ``verdict``
        (the compile's own account of a failure that may be deterministic, with ``seen``)
        for later runs too: see :class:`KnownFailure`."""

    def read_failure(self, digest: str, run_id: str) -> CompileError | None:
        """The failure recorded for ``digest`` in run ``run_id``, if any."""

    def read_failure_verdict(self, digest: str) -> KnownFailure | None:
        """The key's recorded failure verdict, from any run (seen once, or known), if any."""

    def failure_log(self, digest: str) -> Path:
        """Where the log of the key's failed compile is kept."""

    def record_time(self, spec_digest: str, key_digest: str, seconds: float) -> None:
        """Remember how long a spec took to compile (for the compile order)."""

    def recorded_time(self, query: EntryQuery, spec_digest: str) -> float | None:
        """How long ``query``'s spec is expected to take to compile, from the records."""


class ForwardingStore:
    """A :class:`Store` that passes every call to ``inner``: the base of a store that wraps
    another and changes a few of its answers (:class:`.readonly.ReadOnlyStore` refuses the
    writes, :class:`.tiered.TieredStore` adds a remote to ``fetch`` and ``publish``)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.root = inner.root

    @property
    def writable(self) -> bool:
        return self.inner.writable

    def lookup(self, query: EntryQuery, *, redo_run: str | None = None) -> Lookup:
        return self.inner.lookup(query, redo_run=redo_run)

    def fetch(self, query: EntryQuery, *, job: Job = no_job) -> Lookup:
        return self.inner.fetch(query, job=job)

    def publish(self, query: EntryQuery, library: Path, log: Path | None,
                manifest: Manifest, *, replace: bool = False) -> Hit:
        return self.inner.publish(query, library, log, manifest, replace=replace)

    def lock(self, digest: str, timeout: float, what: str = "", *,
             cancelled: threading.Event | None = None) -> AbstractContextManager[float]:
        return self.inner.lock(digest, timeout, what, cancelled=cancelled)

    def new_staging_dir(self, digest: str, parent: Path | None = None) -> Path:
        return self.inner.new_staging_dir(digest, parent)

    def remove_staging(self, path: Path) -> None:
        self.inner.remove_staging(path)

    def clean_staging(self, *, where: Path | None = None) -> list[Path]:
        return self.inner.clean_staging(where=where)

    def quarantine(self, paths: EntryPaths, reason: str) -> Path | None:
        return self.inner.quarantine(paths, reason)

    def is_verified(self, paths: EntryPaths) -> bool:
        return self.inner.is_verified(paths)

    def record_use(self, digest: str) -> None:
        self.inner.record_use(digest)

    def record_failure(self, digest: str, run_id: str, error: CompileError, *,
                       verdict: Mapping[str, Any] | None = None) -> None:
        self.inner.record_failure(digest, run_id, error, verdict=verdict)

    def read_failure(self, digest: str, run_id: str) -> CompileError | None:
        return self.inner.read_failure(digest, run_id)

    def read_failure_verdict(self, digest: str) -> KnownFailure | None:
        return self.inner.read_failure_verdict(digest)

    def failure_log(self, digest: str) -> Path:
        return self.inner.failure_log(digest)

    def record_time(self, spec_digest: str, key_digest: str, seconds: float) -> None:
        self.inner.record_time(spec_digest, key_digest, seconds)

    def recorded_time(self, query: EntryQuery, spec_digest: str) -> float | None:
        return self.inner.recorded_time(query, spec_digest)
