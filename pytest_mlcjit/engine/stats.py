"""The accounting of a run: every request counted once, by what became of it; every
compile, wait and download; one record per library. Counted in each process, merged on
the xdist controller, shown in the summary and the JSON report, kept in the run history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pytest_mlcjit.cache.store.remote_stats import RemoteStats
from pytest_mlcjit.cache.store.tiered import DOWNLOADED_RUN_FIELD
from pytest_mlcjit.units import plural

if TYPE_CHECKING:
    from pytest_mlcjit.engine.model import CompiledModel

Outcome = Literal["hit", "remote_hit", "compiled", "waited", "failed", "missed"]
#: What became of a request; each request is counted as exactly one of these.
#: ``hit``: found in the local cache; ``remote_hit``: served by a library this run
#: downloaded from the remote tier (by this request, or before it: a fetch ahead of time,
#: an earlier request, another process of the run; :func:`by_download`), so that a fresh
#: machine's requests are all remote hits, however the downloads fell; ``compiled``:
#: compiled by this request; ``waited``: found after waiting for another's compile
#: (another process's, or this process's prefetch); ``failed``: an error; ``missed``: not
#: cached, and the policy (READONLY, OFF) does not compile. Downloads are counted apart,
#: one per library (:attr:`.RemoteStats.downloads`).
OUTCOMES: tuple[Outcome, ...] = ("hit", "remote_hit", "compiled", "waited", "failed", "missed")
#: How the summary, ``pytest-mlcjit info`` and every other text name each outcome:
#: (singular, plural). The JSON report and the run history use the keys of :data:`OUTCOMES`.
OUTCOME_WORDS = {
    "hit": ("hit", "hits"), "remote_hit": ("remote hit", "remote hits"),
    "compiled": ("compiled", "compiled"), "waited": ("waited", "waited"),
    "failed": ("failed", "failed"), "missed": ("missed", "missed"),
}


def by_download(outcome: Outcome, model: CompiledModel | None, run_id: str) -> Outcome:
    """``outcome``, or ``remote_hit`` for a hit (or a wait) served by a library that run
    ``run_id`` downloaded: its manifest records the run that downloaded it
    (:data:`.tiered.DOWNLOADED_RUN_FIELD`), whichever of the run's processes or threads
    did."""
    if outcome in ("hit", "waited") and model is not None \
            and model.manifest.get(DOWNLOADED_RUN_FIELD) == run_id:
        return "remote_hit"
    return outcome


def _add_counts(mine: dict[str, int], theirs: Mapping[str, int]) -> None:
    """Add the counts ``theirs`` into ``mine``."""
    for kind, n in theirs.items():
        mine[kind] = mine.get(kind, 0) + n


@dataclasses.dataclass
class LibraryStats:
    """What happened to one library (one key) in a run."""

    digest: str
    spec: str = ""
    target: Any = None
    requests: int = 0
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    compiles: int = 0
    compile_failed: bool = False
    prefetched: bool = False
    compile_seconds: float = 0.0
    wait_seconds: float = 0.0
    size: int | None = None
    #: The process that compiled it (or tried to), else the one that asked first.
    worker: str = ""
    #: Its recorded compile time (its manifest's), when a request found it in the cache.
    saved_seconds: float = 0.0

    @property
    def outcome(self) -> str:
        """What became of the library in the run, from its requests and compiles."""
        if self.compile_failed or self.outcomes.get("failed"):
            return "failed"
        if self.compiles:
            return "compiled"
        for kind in ("missed", "remote_hit", "waited", "hit"):
            if self.outcomes.get(kind):
                return kind
        return "hit"

    def merge(self, theirs: LibraryStats) -> None:
        for name in ("requests", "compiles", "compile_seconds", "wait_seconds"):
            setattr(self, name, getattr(self, name) + getattr(theirs, name))
        _add_counts(self.outcomes, theirs.outcomes)
        self.compile_failed = self.compile_failed or theirs.compile_failed
        self.saved_seconds = max(self.saved_seconds, theirs.saved_seconds)
        self.prefetched = self.prefetched or theirs.prefetched
        if theirs.compiles or (theirs.compile_failed and not self.compiles):
            self.worker = theirs.worker or self.worker
        if self.size is None:
            self.size = theirs.size
        self.spec = self.spec or theirs.spec

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "outcomes": dict(self.outcomes)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LibraryStats:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        known["outcomes"] = dict(known.get("outcomes") or {})
        return cls(**known)


@dataclasses.dataclass
class Stats:
    """The accounting of one process, merged across xdist workers on the controller.

    Every request (a test's, or a :meth:`JIT.compile` call; not a prefetch) is counted
    once, in ``outcomes``, so they sum to ``requests``. Compiles are counted apart
    (``compiles``, of which ``prefetched`` ahead of time), since a prefetch compile is no
    request. ``wait_seconds`` is the time requests spent waiting for another's compile (a
    key's lock, or this process's prefetch). ``libraries``: one record per key digest.
    """

    requests: int = 0
    outcomes: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    #: Libraries compiled (successfully) by this process: for requests and ahead of time.
    compiles: int = 0
    #: Of ``compiles``, those done ahead of time by background prefetch.
    prefetched: int = 0
    #: Time spent compiling, failed compiles included.
    compile_seconds: float = 0.0
    wait_seconds: float = 0.0
    bytes_compiled: int = 0
    corrupt: int = 0
    #: Time tests spent waiting for the GPU lock, and holding it (``--mlc-jit-gpu-lock``).
    gpu_wait_seconds: float = 0.0
    gpu_hold_seconds: float = 0.0
    libraries: dict[str, LibraryStats] = dataclasses.field(default_factory=dict)
    #: What the remote tier did (downloads, bytes, seconds, uploads, errors, warnings).
    remote: RemoteStats = dataclasses.field(default_factory=RemoteStats)

    # -- counting ---------------------------------------------------------------------------
    def library(self, digest: str, *, spec: str = "", target: Any = None,
                worker: str = "") -> LibraryStats:
        """The record of one library (made on first use)."""
        lib = self.libraries.get(digest)
        if lib is None:
            lib = self.libraries[digest] = LibraryStats(digest, spec=spec, target=target,
                                                        worker=worker)
        return lib

    def count(self, outcome: Outcome, *, wait_seconds: float = 0.0,
              lib: LibraryStats | None = None, size: int | None = None,
              saved: float = 0.0) -> None:
        """Count one request's outcome (and its wait) in the totals and its library;
        ``saved``: the recorded compile time of the library a hit found."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.requests += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.wait_seconds += wait_seconds
        if lib is not None:
            lib.requests += 1
            lib.outcomes[outcome] = lib.outcomes.get(outcome, 0) + 1
            lib.wait_seconds += wait_seconds
            if outcome in ("hit", "remote_hit"):
                lib.saved_seconds = max(lib.saved_seconds, saved)
            if size is not None:
                lib.size = size

    def compiled(self, lib: LibraryStats, *, seconds: float, ok: bool, background: bool,
                 worker: str, size: int | None = None) -> None:
        """Count one compile (``ok``: published; else failed or interrupted)."""
        self.compile_seconds += seconds
        lib.compile_seconds += seconds
        lib.worker = worker
        if ok:
            self.compiles += 1
            self.prefetched += background
            self.bytes_compiled += size or 0
            lib.compiles += 1
            lib.prefetched = lib.prefetched or background
            lib.size = size
        else:
            lib.compile_failed = True

    # -- merging and reporting ----------------------------------------------------------
    def merge(self, other: Mapping[str, Any]) -> None:
        """Add another process's :meth:`to_json`."""
        for field in dataclasses.fields(self):  # the numeric totals
            value, current = other.get(field.name), getattr(self, field.name)
            if (isinstance(value, int | float) and not isinstance(value, bool)
                    and isinstance(current, int | float)):
                setattr(self, field.name, current + value)
        _add_counts(self.outcomes, other.get("outcomes") or {})
        self.remote.merge(other.get("remote") or {})
        for data in other.get("libraries") or ():
            theirs = LibraryStats.from_json(data)
            mine = self.libraries.get(theirs.digest)
            if mine is None:
                self.libraries[theirs.digest] = theirs
            else:
                mine.merge(theirs)

    def library_records(self) -> list[LibraryStats]:
        """One record per library, slowest compile first."""
        return sorted(self.libraries.values(),
                      key=lambda r: (-r.compile_seconds, r.spec, r.digest))

    @property
    def saved_seconds(self) -> float:
        """The compile time the cache saved this run: the recorded compile time of each
        library its requests found in the cache (local or remote) and that it did not
        compile, once per library (a run without the cache would have compiled it once)."""
        return sum(lib.saved_seconds for lib in self.libraries.values()
                   if not lib.compiles and not lib.compile_failed)

    def to_json(self) -> dict[str, Any]:
        """Plain data: what a worker sends its controller, and what the run history keeps
        (each request counted in ``outcomes``, by the names of :data:`OUTCOMES`;
        ``saved_seconds``, derived from the libraries, is not merged)."""
        return {
            "requests": self.requests, "outcomes": dict(self.outcomes),
            "compiles": self.compiles, "prefetched": self.prefetched,
            "compile_seconds": self.compile_seconds, "wait_seconds": self.wait_seconds,
            "saved_seconds": self.saved_seconds,
            "bytes_compiled": self.bytes_compiled, "corrupt": self.corrupt,
            "gpu_wait_seconds": self.gpu_wait_seconds,
            "gpu_hold_seconds": self.gpu_hold_seconds,
            "libraries": [lib.to_json() for lib in self.libraries.values()],
            "remote": self.remote.to_json(),
        }

    def accounting_line(self) -> str:
        """``7 requests: 3 hits, 4 waited; 4 libraries compiled ahead of time, 50.32s
        compiling, 52.10s waiting``: every non-zero outcome (they add up to the requests),
        then what the compiles and waits cost. The summary's line, and each run's in
        ``pytest-mlcjit info``."""
        kinds = []
        for kind in OUTCOMES:
            n = self.outcomes.get(kind, 0)
            if n:
                one, many = OUTCOME_WORDS[kind]
                kinds.append(f"{n} {one if n == 1 else many}")
        if not self.requests:
            line = "no requests"
        else:
            line = (f"{plural(self.requests, 'request')}: "
                    f"{', '.join(kinds) or 'outcomes not recorded'}")
        extra = []
        if self.prefetched:
            extra.append(f"{plural(self.prefetched, 'library', 'libraries')} compiled ahead "
                         "of time")
        if self.compile_seconds >= 0.005:
            extra.append(f"{self.compile_seconds:.2f}s compiling")
        if self.wait_seconds >= 0.005:
            extra.append(f"{self.wait_seconds:.2f}s waiting for other compiles")
        if self.corrupt:
            extra.append(f"{self.corrupt} corrupt")
        return line + ("; " + ", ".join(extra) if extra else "")
