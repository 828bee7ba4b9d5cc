"""The engine: policy, cache and backend together → :class:`CompiledModel`.

Usable from plain Python::

    from pytest_mlcjit import TVMModel, jit
    model = jit(TVMModel("examples.models.mlp:build", config={"hidden": 64}), "cpu")

The flow for one request: build the key (memoized), look the entry up without any lock
(manifest present, library verified on first read), and only on a miss take the key's lock,
look again (another process may have compiled it meanwhile), and compile in a subprocess
into a staging directory that is published atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pytest_mlcjit import __version__
from pytest_mlcjit.engine import activity
from pytest_mlcjit.build.backends import Backend, BuildContext, BuildRequest, backend_for
from pytest_mlcjit.device import Device, Presence, probe
from pytest_mlcjit.errors import (
    CacheMissError,
    CompileError,
    CorruptEntryError,
    JitDisabledError,
    LockTimeoutError,
)
from pytest_mlcjit._util.fs import best_effort, fault_point, is_no_space
from pytest_mlcjit.inputs import Change, changes_since, inputs_digest
from pytest_mlcjit.key import sha256_digest
from pytest_mlcjit.cache.layout import EntryPaths, backend_root
from pytest_mlcjit.engine.model import CompiledModel
from pytest_mlcjit.policy import Policy
from pytest_mlcjit.build.launch import run_logged
from pytest_mlcjit.engine.schedule import record_time
from pytest_mlcjit.engine.settings import Settings
from pytest_mlcjit.cache.store import LocalStore, Store

if TYPE_CHECKING:
    from pytest_mlcjit.cache.store.tiered import RemoteTier

LOG_TAIL_LINES = 20
#: Between a failed compile's message and the last lines of its log.
_TAIL_MARK = "\n--- last lines of the log ---"


class _KeyBusy(Exception):
    """A prefetch found its key held by another thread or process (:meth:`JIT.prefetch`)."""


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(0.0, seconds):.0f} s"


def _known_failure_message(known: Mapping[str, Any]) -> str:
    """A known failure's message: the original one (its cause, its log's last lines),
    with when it was recorded and why it was not compiled again."""
    head, mark, tail = str(known["message"]).partition(_TAIL_MARK)
    when = float(known["time"])
    note = (f"(a known failure, recorded {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}"
            f", {_ago(time.time() - when)} ago: not compiled again, since its key and its "
            "recorded inputs are unchanged; --mlc-jit-retry-failed or --mlc-jit-policy=REDO "
            "compiles it again)")
    return f"{head}\n{note}{mark}{tail}"


#: What became of a request; each request is counted as exactly one of these.
#: ``hit``: found in the local cache; ``remote_hit``: fetched from a remote tier;
#: ``compiled``: compiled by this request; ``waited``: found after waiting for another's
#: compile (another process's, or this process's prefetch); ``failed``: an error;
#: ``missed``: not cached, and the policy (READONLY, OFF) does not compile.
OUTCOMES = ("hit", "remote_hit", "compiled", "waited", "failed", "missed")


def _library_outcome(lib: Mapping[str, Any]) -> str:
    """What became of one library in a run, from its requests and compiles."""
    outcomes = lib.get("outcomes", {})
    if lib.get("compile_failed") or outcomes.get("failed"):
        return "failed"
    if lib.get("compiles"):
        return "compiled"
    for kind in ("missed", "remote_hit", "waited", "hit"):
        if outcomes.get(kind):
            return kind
    return "hit"


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
    libraries: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    #: The remote tier's counts (downloads, bytes, seconds, uploads, errors, warnings).
    remote: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- the older names (run history, benchmarks) --------------------------------------
    @property
    def hits(self) -> int:
        """Requests served from a cache without compiling (hit, remote_hit, waited)."""
        return sum(self.outcomes.get(k, 0) for k in ("hit", "remote_hit", "waited"))

    @property
    def failures(self) -> int:
        return self.outcomes.get("failed", 0)

    @property
    def lock_wait_seconds(self) -> float:
        return self.wait_seconds

    # -- counting ---------------------------------------------------------------------------
    def library(self, digest: str, *, spec: str = "", target: Any = None,
                worker: str = "") -> dict[str, Any]:
        """The record of one library (made on first use)."""
        lib = self.libraries.get(digest)
        if lib is None:
            lib = self.libraries[digest] = {
                "spec": spec, "digest": digest, "target": target, "requests": 0,
                "outcomes": {}, "compiles": 0, "compile_failed": False, "prefetched": False,
                "compile_seconds": 0.0, "wait_seconds": 0.0, "size": None, "worker": worker}
        return lib

    def count(self, outcome: str, *, wait_seconds: float = 0.0,
              lib: dict[str, Any] | None = None, size: int | None = None) -> None:
        """Count one request's outcome (and its wait) in the totals and its library."""
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.requests += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.wait_seconds += wait_seconds
        if lib is not None:
            lib["requests"] += 1
            lib["outcomes"][outcome] = lib["outcomes"].get(outcome, 0) + 1
            lib["wait_seconds"] += wait_seconds
            if size is not None:
                lib["size"] = size

    def compiled(self, lib: dict[str, Any], *, seconds: float, ok: bool, background: bool,
                 worker: str, size: int | None = None) -> None:
        """Count one compile (``ok``: published; else failed or interrupted)."""
        self.compile_seconds += seconds
        lib["compile_seconds"] += seconds
        lib["worker"] = worker
        if ok:
            self.compiles += 1
            self.prefetched += background
            self.bytes_compiled += size or 0
            lib["compiles"] += 1
            lib["prefetched"] = lib["prefetched"] or background
            lib["size"] = size
        else:
            lib["compile_failed"] = True

    # -- merging and reporting ----------------------------------------------------------
    def merge(self, other: Mapping[str, Any]) -> None:
        """Add another process's :meth:`to_json`."""
        for name in ("requests", "compiles", "prefetched", "compile_seconds", "wait_seconds",
                     "bytes_compiled", "corrupt"):
            setattr(self, name, getattr(self, name) + other.get(name, 0))
        for kind, n in (other.get("outcomes") or {}).items():
            self.outcomes[kind] = self.outcomes.get(kind, 0) + n
        if other.get("remote"):
            from pytest_mlcjit.cache.store.tiered import merge_remote_stats

            merge_remote_stats(self.remote, other["remote"])
        for theirs in other.get("libraries") or ():
            mine = self.libraries.get(theirs["digest"])
            if mine is None:
                self.libraries[theirs["digest"]] = {
                    **theirs, "outcomes": dict(theirs.get("outcomes") or {})}
                continue
            for name in ("requests", "compiles", "compile_seconds", "wait_seconds"):
                mine[name] += theirs.get(name, 0)
            for kind, n in (theirs.get("outcomes") or {}).items():
                mine["outcomes"][kind] = mine["outcomes"].get(kind, 0) + n
            for flag in ("compile_failed", "prefetched"):
                mine[flag] = bool(mine.get(flag) or theirs.get(flag))
            if theirs.get("compiles") or (theirs.get("compile_failed") and not mine["compiles"]):
                mine["worker"] = theirs.get("worker", mine["worker"])
            if mine.get("size") is None:
                mine["size"] = theirs.get("size")
            mine["spec"] = mine["spec"] or theirs.get("spec", "")

    def library_records(self) -> list[dict[str, Any]]:
        """One record per library, with its ``outcome`` in this run, slowest compile first."""
        records = [{**lib, "outcome": _library_outcome(lib),
                    "compile_seconds": round(lib["compile_seconds"], 3),
                    "wait_seconds": round(lib["wait_seconds"], 3)}
                   for lib in self.libraries.values()]
        return sorted(records, key=lambda r: (-r["compile_seconds"], r["spec"], r["digest"]))

    def to_json(self) -> dict[str, Any]:
        """Plain data: what a worker sends its controller, and what the run history keeps
        (with the older names ``hits``, ``failures`` and ``lock_wait_seconds``)."""
        data = dataclasses.asdict(self)
        data["libraries"] = [dict(lib) for lib in self.libraries.values()]
        data.update(hits=self.hits, failures=self.failures,
                    lock_wait_seconds=self.lock_wait_seconds)
        return data


def _ran_out_of_space(root: Path, log: Path) -> str | None:
    """Why a failed compile looks like a full disk (its log says so, or the cache's
    filesystem has no space left), else None."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 16)))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        text = ""
    for code in (errno.ENOSPC, errno.EDQUOT):
        if os.strerror(code) in text:
            return f"its log says {os.strerror(code)!r}"
    try:
        st = os.statvfs(root)
        full = st.f_bavail == 0 and st.f_blocks > 0  # some FUSE mounts report 0 of 0
    except OSError:
        full = False
    return "the cache's filesystem has no space left" if full else None


def _no_space_message(req: BuildRequest, cache: Store, why: str,
                      log: Path | None = None) -> str:
    try:
        st = os.statvfs(cache.root)
        free = st.f_bavail * st.f_frsize
    except OSError:
        where = f"the cache's filesystem ({cache.root}) or the temporary directory (TMPDIR)"
    else:
        where = (f"the cache's filesystem ({cache.root}) is full ({free // 1024} KiB free)"
                 if free < 2**20 * 64 else
                 f"the cache's filesystem ({cache.root}) has {free / 2**30:.1f} GiB free, so "
                 "the compiler's temporary directory (TMPDIR) may be what is full")
    detail = f" ({why})" if why else ""
    tail = f"\n--- last lines of the log ---\n{_tail(log)}" if log is not None else ""
    return (f"compiling {req.describe} ran out of disk space{detail}; nothing was published: "
            f"{where}. Free space or prune the cache (pytest-mlcjit prune).{tail}")


def _tail(path: Path, lines: int = LOG_TAIL_LINES, limit: int = 8192) -> str:
    """The last ``lines`` lines of a log, at most its last ``limit`` bytes (a failure
    record and its message stay small, however much the compiler printed)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


class JIT:
    """Compile-or-fetch libraries under one set of :class:`Settings`; thread-safe."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.stats = Stats()
        self._presence: dict[str, Presence] = dict(self.settings.presence)
        self._stores: dict[tuple[Path, bool], Store] = {}
        self._requests: dict[tuple[Any, str | None, bool], BuildRequest] = {}
        self._done: dict[tuple[str, Path], CompiledModel] = {}
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}
        #: Compiles of each key this process finished (ended how they may).
        self._compiles_of: dict[str, int] = {}
        self._remote: RemoteTier | None = None
        #: ``background``: whether this thread's current ``compile`` call is a prefetch
        #: (set at the top of every ``compile``, read where it counts outcomes).
        self._local = threading.local()

    # -- building blocks -------------------------------------------------------------------
    @property
    def remote(self) -> RemoteTier | None:
        """The remote tier (``Settings.remote``), opened on first use; None without one."""
        if self.settings.remote is None:
            return None
        with self._lock:
            if self._remote is None:
                from pytest_mlcjit.cache.store.tiered import RemoteTier, signing_key_from_env

                self._remote = RemoteTier(
                    self.settings.remote, mode=self.settings.remote_mode,
                    required=self.settings.remote_required, signing_key=signing_key_from_env())
                self.stats.remote = self._remote.stats
            return self._remote

    def presence(self, device: Device) -> Presence:
        """Whether ``device`` is present (probed once, in a subprocess, on first ask)."""
        name = str(device)
        if name not in self._presence:
            self._presence.update(probe([device]))
        return self._presence[name]

    def request(self, spec: Any, device: Device | str | None = "cpu",
                policy: Policy | str | None = None) -> BuildRequest:
        """The validated, keyed request for ``spec`` on ``device`` (memoized). ``policy``
        (default: the run's) decides whether the backend may keep memos in the cache."""
        dev = Device.parse(device) if isinstance(device, str) else device
        writes = self._policy(policy).writes
        memo_key = (spec, None if dev is None else str(dev), writes)
        with self._lock:
            found = self._requests.get(memo_key)
        if found is not None:
            return found
        ctx = BuildContext(run_id=self.settings.run_id, cache_dir=self.settings.cache_dir,
                           writes=writes, presence=self.presence)
        req = backend_for(spec).request(spec, dev, ctx)
        with self._lock:
            self._requests[memo_key] = req
        return req

    def root_for(self, req: BuildRequest) -> Path:
        """The cache root of ``req``'s entry (the cache-root rule of :mod:`.layout`)."""
        return backend_root(req.backend, self.settings.cache_dir)

    def paths(self, req: BuildRequest) -> EntryPaths:
        """Where ``req``'s entry lives (whether or not it is there)."""
        return backend_for(req.spec).locate(req, self.root_for(req))

    def store_for(self, req: BuildRequest, policy: Policy) -> Store:
        root = self.root_for(req)
        writable = policy.writes
        with self._lock:
            store = self._stores.get((root, writable))
            if store is None:
                store = LocalStore(root, writable=writable,
                                   allow_untrusted=self.settings.allow_untrusted)
                self._stores[(root, writable)] = store
        return store

    def _policy(self, policy: Policy | str | None) -> Policy:
        return Policy.parse(policy) if policy is not None else self.settings.policy

    # -- the one public operation -----------------------------------------------------------
    def compile(self, spec: Any, device: Device | str | None = "cpu", *,
                policy: Policy | str | None = None, background: bool = False) -> CompiledModel:
        """Return the compiled library for ``spec`` on ``device``, compiling it if needed.

        ``policy`` overrides the run's for this request: every read and write decision of
        the request follows it. ``background=True`` is for prefetching: the call is not
        counted as a request (nor its outcome as a hit); a compile it does is counted as
        ``prefetched`` too.

        Each request is counted once in ``stats.outcomes`` (see :data:`OUTCOMES`): a
        library from the cache is a ``hit``, unless the request waited for another's
        compile first (``waited``) or a remote tier's lookup sets ``self._local.outcome =
        "remote_hit"``.
        """
        return self._run(spec, device, policy, background=background, wait=True)

    def prefetch(self, spec: Any, device: Device | str | None = "cpu") -> bool:
        """Compile ``spec`` ahead of time, as ``compile(..., background=True)`` does,
        unless another thread or process holds its key now (it is compiling it): then
        return False at once, without waiting, so that the caller moves on to the next
        library. True once it is compiled or found; a failure raises as ``compile`` does."""
        try:
            self._run(spec, device, None, background=True, wait=False)
        except _KeyBusy:
            return False
        return True

    def _run(self, spec: Any, device: Device | str | None, policy: Policy | str | None, *,
             background: bool, wait: bool) -> CompiledModel:
        local = self._local
        local.background, local.req, local.store = background, None, None
        local.waited, local.waited_for_other, local.outcome = 0.0, False, None
        local.wait = wait
        try:
            model = self._compile(spec, device, policy)
        except BaseException as exc:
            if not background:
                missed = isinstance(exc, CacheMissError | JitDisabledError)
                self._count("missed" if missed else "failed")
            raise
        if not background:
            self._count("compiled" if not model.hit else local.outcome
                        or ("waited" if local.waited_for_other else "hit"), model)
        return model

    def _compile(self, spec: Any, device: Device | str | None,
                 policy: Policy | str | None) -> CompiledModel:
        pol = self._policy(policy)
        if pol is Policy.OFF:
            raise JitDisabledError(
                "JIT compilation is disabled (policy OFF): nothing is read from or written to "
                "the cache; use --mlc-jit-policy=ON (or MLC_JIT_POLICY=ON) to compile"
            )
        req = self.request(spec, device, pol)
        backend = backend_for(req.spec)
        store = self.store_for(req, pol)
        self._local.req, self._local.store = req, store
        with self._lock:
            done = self._done.get((req.digest, store.root))
        if done is not None and self._still_valid(done, backend, req, store):
            return dataclasses.replace(done, hit=True)
        with self._holding_key(req, store):
            return self._compile_or_fetch(req, backend, store, pol)

    # -- accounting and progress (what a request became; what this process is doing) -------
    def _library(self, req: BuildRequest) -> dict[str, Any]:
        """``req``'s record in the stats; call with ``self._lock`` held."""
        return self.stats.library(req.digest, spec=activity.describe_spec(req.spec, req.describe),
                                  target=req.target, worker=activity.worker_name())

    def _count(self, outcome: str, model: CompiledModel | None = None) -> None:
        """Count this thread's request (its outcome, and how long it waited)."""
        req = self._local.req
        size = model.manifest.get("size") if model is not None else None
        with self._lock:
            lib = self._library(req) if req is not None else None
            self.stats.count(outcome, wait_seconds=self._local.waited, lib=lib,
                             size=size if isinstance(size, int) else None)

    @contextlib.contextmanager
    def _job(self, kind: str, req: BuildRequest, store: Store) -> Iterator[dict[str, Any]]:
        """Announce a job that can take long (``compile``, ``download``, ``wait``) to the
        progress display (:mod:`.activity`); a compile's time is counted, ended how it may."""
        t0 = time.monotonic()
        with activity.doing(kind, model=activity.describe_spec(req.spec, req.describe),
                            target=activity.describe_target(req.target), digest=req.digest,
                            root=str(store.root), background=self._local.background) as job:
            try:
                yield job
            except BaseException:
                if kind == "compile":  # killed, interrupted: counted as a failed compile
                    self._compile_done(req, time.monotonic() - t0, ok=False)
                raise
            finally:
                self._local.job_seconds = time.monotonic() - t0

    def _compile_done(self, req: BuildRequest, seconds: float, *, ok: bool,
                      size: int | None = None) -> None:
        with self._lock:
            self._compiles_of[req.digest] = self._compiles_of.get(req.digest, 0) + 1
            self.stats.compiled(self._library(req), seconds=seconds, ok=ok, size=size,
                                background=self._local.background,
                                worker=activity.worker_name())

    @contextlib.contextmanager
    def _holding_key(self, req: BuildRequest, store: Store) -> Iterator[None]:
        """Hold this process's lock of the key: a thread that finds another (the prefetch)
        holding it waits, and that wait is counted and shown."""
        lock = self._key_lock(req.digest)
        if not lock.acquire(blocking=False):
            if not getattr(self._local, "wait", True):
                raise _KeyBusy(req.digest)
            t0 = time.monotonic()
            with self._lock:
                compiles_before = self._compiles_of.get(req.digest, 0)
            with self._job("wait", req, store):
                lock.acquire()
            self._local.waited += time.monotonic() - t0
            with self._lock:  # "waited" if the other thread compiled it, not just looked up
                if self._compiles_of.get(req.digest, 0) > compiles_before:
                    self._local.waited_for_other = True
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _locked(self, req: BuildRequest, store: Store) -> Iterator[float]:
        """Hold the key's lock in the store (:meth:`Store.lock`), the wait for it shown as a
        job; yields the seconds waited (also counted as this request's wait)."""
        with contextlib.ExitStack() as stack:
            if not getattr(self._local, "wait", True):  # prefetch: another holds it
                try:
                    waited = stack.enter_context(store.lock(req.digest, 0.0, req.describe))
                except LockTimeoutError:
                    raise _KeyBusy(req.digest) from None
            else:
                with self._job("wait", req, store):
                    waited = stack.enter_context(store.lock(
                        req.digest, self.settings.effective_lock_timeout, req.describe))
            self._local.waited += waited
            yield waited

    def _still_valid(self, done: CompiledModel, backend: Backend, req: BuildRequest,
                     store: Store) -> bool:
        """Whether a library this process returned before is still the right one: the file
        is unchanged (one stat) and so are the inputs it was built from (stats)."""
        if not store.is_verified(EntryPaths(done.digest, done.path)):
            return False
        recorded = done.manifest.get("inputs")
        base = backend.inputs_base(req)
        return base is None or not isinstance(recorded, dict) or changes_since(
            recorded, base) == []

    def _key_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(digest, threading.Lock())

    def _finish(self, req: BuildRequest, store: Store, paths: EntryPaths,
                manifest: dict[str, Any], *, hit: bool) -> CompiledModel:
        store.record_use(paths.digest)
        loadable = req.runnable and (req.device.kind == "cpu"
                                     or self.presence(req.device).present)
        model = CompiledModel(
            spec=req.spec, device=req.device, path=paths.library, key=req.key,
            digest=paths.digest, hit=hit, compile_seconds=float(manifest.get("compile_seconds", 0)),
            manifest=manifest, loadable=loadable,
        )
        with self._lock:
            self._done[(req.digest, store.root)] = model
        return model

    def _select(self, req: BuildRequest, backend: Backend, store: Store
                ) -> tuple[EntryPaths | None, str]:
        """The entry this request selects: for a backend that records inputs, the newest
        variant whose recorded inputs are unchanged (one stat per input when nothing
        changed), else ``(None, why)``; for the others, the key's one entry."""
        base = backend.inputs_base(req)
        paths = backend.locate(req, store.root)
        if base is None:
            return paths, ""
        variants = store.read_variants(paths.library.parent, req.digest)
        first: list[Change] | None = None
        for variant in variants:
            changes = changes_since(variant["inputs"], base)
            if changes is None:  # a malformed record: not this variant
                continue
            if not changes:
                return backend.locate(req, store.root, variant["entry"]), ""
            first = changes if first is None else first
        if first is None:
            return None, "missing"
        return None, "stale: inputs changed since it was built: " + "; ".join(map(str, first))

    def _lookup(self, req: BuildRequest, backend: Backend, store: Store, policy: Policy
                ) -> tuple[EntryPaths | None, dict[str, Any] | None, str]:
        """``(paths, manifest, "")`` for a usable entry, else ``(paths or None, None, why it
        is not usable)``."""
        paths, why = self._select(req, backend, store)
        if paths is None:
            return None, None, why
        manifest, why = self._read_entry(req, backend, store, paths, policy)
        return paths, manifest, why

    def _read_entry(self, req: BuildRequest, backend: Backend, store: Store, paths: EntryPaths,
                    policy: Policy) -> tuple[dict[str, Any] | None, str]:
        try:
            manifest = store.read_manifest(paths)
            if manifest is None:
                if not paths.library.is_file():
                    return None, "missing"
                adopted = backend.adopt(req, paths)
                if adopted is None:
                    return None, "missing"
                store.write_manifest(paths, adopted)
                manifest = adopted
            manifest = store.verify(paths, manifest)
        except CorruptEntryError as exc:
            return None, f"corrupt: {exc}"
        if (why := backend.stale(req, manifest)) is not None:
            return None, f"stale: {why}"
        if policy is Policy.REDO and manifest.get("run_id") != self.settings.run_id:
            return None, "redo"
        return manifest, ""

    def status(self, spec: Any, device: Device | str | None = "cpu") -> str:
        """How a READONLY lookup would find ``spec`` now: ``hit``, ``missing``, or
        ``stale: …`` / ``corrupt: …`` / ``redo`` with why; writes nothing."""
        req = self.request(spec, device, Policy.READONLY)
        _, manifest, why = self._lookup(req, backend_for(req.spec),
                                        self.store_for(req, Policy.READONLY), Policy.READONLY)
        return "hit" if manifest is not None else why

    def _compile_or_fetch(self, req: BuildRequest, backend: Backend, store: Store,
                          policy: Policy) -> CompiledModel:
        paths, manifest, why = self._lookup(req, backend, store, policy)
        if paths is not None and manifest is not None:
            return self._finish(req, store, paths, manifest, hit=True)
        if policy is Policy.READONLY:
            if self.remote is not None and (pulled := self.remote.pull_private(
                    req, backend, lambda: self._job("download", req, store))) is not None:
                self._local.outcome = "remote_hit"
                return self._finish(req, store, *pulled, hit=True)
            with self._lock:
                self.stats.corrupt += why.startswith("corrupt")
            raise CacheMissError(self._readonly_message(req, store, why))
        self._check_failure(req, backend, store, policy)
        with self._locked(req, store):
            paths, manifest, why = self._lookup(req, backend, store, policy)
            if paths is not None and manifest is not None:
                self._local.waited_for_other = True  # it appeared while we waited
                return self._finish(req, store, paths, manifest, hit=True)
            self._check_failure(req, backend, store, policy)
            if paths is not None and why.startswith("corrupt"):
                with self._lock:
                    self.stats.corrupt += 1
                store.quarantine(paths, why)
            tier = self.remote
            if tier is not None and policy is Policy.ON and (pulled := tier.pull(
                    req, backend, store, lambda: self._job("download", req, store))) is not None:
                self._local.outcome = "remote_hit"
                return self._finish(req, store, *pulled, hit=True)
            paths, manifest = self._build(req, backend, store)
            if tier is not None:
                tier.upload(req, paths.digest, paths.library, manifest,
                            replace=policy is Policy.REDO)
        return self._finish(req, store, paths, manifest, hit=False)

    def _check_failure(self, req: BuildRequest, backend: Backend, store: Store,
                       policy: Policy) -> None:
        """Raise CompileError for a failure of ``req`` remembered from this run, or for a
        known failure: one an earlier run recorded when the factory or the compiler raised,
        for this key, whose recorded inputs are unchanged (and whose files that were
        missing still are). Known failures are compiled again under REDO, with
        ``--mlc-jit-retry-failed``, or once anything they depend on changed."""
        if (failed := store.read_failure(req.digest, self.settings.run_id)) is not None:
            raise CompileError(f"{failed}\n(remembered from an earlier attempt in this run)")
        if policy is Policy.REDO or self.settings.retry_failed:
            return
        known = store.read_known_failure(req.digest)
        base = backend.inputs_base(req)
        if known is None or base is None:
            return
        if changes_since(known.get("inputs"), base) != []:  # changed, or a malformed record
            return
        missing = known.get("missing")
        for path in missing if isinstance(missing, list) else []:
            if os.path.lexists(os.path.join(base, str(path))):
                return
        _, kept_log = store.failure_paths(req.digest)
        raise CompileError(_known_failure_message(known), log_path=str(kept_log))

    def _readonly_message(self, req: BuildRequest, store: Store, why: str) -> str:
        head = {
            "missing": "no cached library",
        }.get(why, f"the cached library is {why.split(':', 1)[0]}")
        detail = "" if why == "missing" else f" ({why.split(': ', 1)[-1]})"
        return (
            f"{head} for key {req.digest} ({req.describe}) in {store.root}{detail}, and the "
            "policy is READONLY, which never compiles or repairs; warm the cache first "
            "(pytest --mlc-jit-prepare, or a run with --mlc-jit-policy=ON)"
        )

    def _build(self, req: BuildRequest, backend: Backend, store: Store
               ) -> tuple[EntryPaths, dict[str, Any]]:
        """Compile ``req`` in a subprocess and publish it; call with the key's lock held.
        Returns where it was published (for a backend that records inputs, the entry of
        this input state) and its manifest."""
        store.clean_staging()
        parent, note = backend.staging_parent(req, store.root)
        if parent is not None:
            store.clean_staging(where=parent)
        try:
            staging = store.new_staging_dir(req.digest, parent=parent)
        except OSError as exc:
            if is_no_space(exc):
                raise CompileError(_no_space_message(req, store, "")) from None
            raise
        log = staging / "compile.log"
        timeout = self.settings.compile_timeout
        try:
            fault_point("staging")
            if note:
                log.write_text(f"[pytest-mlcjit] {note}\n", encoding="utf-8")
            argv, output = backend.command(req, staging, store.root)
            t0 = time.perf_counter()
            fault_point("compile")
            with self._job("compile", req, store):
                rc = run_logged(argv, log, timeout=timeout,
                                warm=self.settings.compile_workers != "off")
            seconds = time.perf_counter() - t0
            fault_point("compiled")
            if rc != 0 and (why := _ran_out_of_space(store.root, log)) is not None:
                # Not remembered as this config's failure: freeing space fixes it.
                raise CompileError(_no_space_message(req, store, why, log))
            if rc is None:
                self._fail(req, store, log, f"timed out after {timeout:g}s (--mlc-jit-timeout)",
                           seconds=seconds)
            if rc != 0:
                known = backend.failed_compile(req, staging) if rc > 0 else None
                self._fail(req, store, log, f"the compiler exited with code {rc}", known=known,
                           seconds=seconds)
            if not output.is_file():
                self._fail(req, store, log, f"the compiler exited 0 but wrote no library "
                                            f"at {output.name}")
            paths, published = self._publish(req, backend, store, staging=staging,
                                            output=output, seconds=seconds)
        except OSError as exc:
            if is_no_space(exc):
                raise CompileError(_no_space_message(req, store, "")) from None
            raise
        finally:
            store.remove_staging(staging)
        record_time(store.root, req, seconds)
        self._compile_done(req, seconds, ok=True, size=int(published["size"]))
        return paths, published

    def _publish(self, req: BuildRequest, backend: Backend, store: Store, *, staging: Path,
                 output: Path, seconds: float) -> tuple[EntryPaths, dict[str, Any]]:
        """Publish a compiled library with its manifest. A backend that records inputs
        gets one entry per input state, named by the key and the inputs' digests, listed
        first among the key's variants."""
        manifest = {
            "format": req.key.get("format"), "backend": req.backend, "key": req.key,
            "key_digest": req.digest,
            "toolchain": dict(req.toolchain), "compile_seconds": round(seconds, 3),
            "created": time.time(), "run_id": self.settings.run_id,
            "host": socket.gethostname(), "plugin_version": __version__,
            **backend.collect(req, staging),
        }
        paths = backend.locate(req, store.root)
        recorded = manifest.get("inputs")
        if backend.inputs_base(req) is not None and isinstance(recorded, dict):
            entry = sha256_digest({"key": req.digest, "inputs": inputs_digest(recorded)})
            paths = backend.locate(req, store.root, entry)
        if paths.digest != req.digest:
            # Listed before it is published: a crash in between leaves a variant whose
            # entry is missing (compiled again), never a published entry no lookup finds.
            store.add_variant(paths.library.parent, req.digest, {
                "entry": paths.digest, "inputs": recorded, "created": manifest["created"]})
        published = store.publish(output, staging / "compile.log", paths, manifest)
        return paths, published

    def _fail(self, req: BuildRequest, store: Store, log: Path, why: str, *,
              known: dict[str, Any] | None = None, seconds: float | None = None) -> NoReturn:
        """Remember the failure (for this run; ``known``, the compile's own account of a
        deterministic failure: for later runs too, see :meth:`_check_failure`) and raise
        CompileError."""
        _, kept_log = store.failure_paths(req.digest)
        with best_effort(kept_log, "keep the failed compile's log at"):
            shutil.copyfile(log, kept_log)
        message = (f"compiling {req.describe} failed: {why}\n"
                   f"compile log: {kept_log}{_TAIL_MARK}\n{_tail(log)}")
        if known is not None:
            known = {**known, "describe": req.describe, "seconds": seconds,
                     "spec": activity.describe_spec(req.spec, req.describe)}
        store.record_failure(req.digest, self.settings.run_id, message, known=known)
        if seconds is not None:
            record_time(store.root, req, seconds)
        self._compile_done(req, getattr(self._local, "job_seconds", 0.0), ok=False)
        raise CompileError(message, log_path=str(kept_log))


_default_jit: JIT | None = None


def jit(spec: Any, device: Device | str | None = "cpu", *,
        policy: Policy | str | None = None, cache_dir: str | os.PathLike[str] | None = None
        ) -> CompiledModel:
    """Compile-or-fetch ``spec`` for ``device`` outside pytest, with the same cache.

    ``policy`` defaults to ``$MLC_JIT_POLICY`` or ON; ``cache_dir`` to ``$MLC_JIT_CACHE_DIR``
    or :func:`default_cache_dir`.
    """
    global _default_jit  # noqa: PLW0603 - one engine per process, like the plugin's
    if _default_jit is None:
        env_dir = os.environ.get("MLC_JIT_CACHE_DIR")
        _default_jit = JIT(Settings(
            policy=Policy.parse(os.environ.get("MLC_JIT_POLICY") or "ON", source="MLC_JIT_POLICY"),
            cache_dir=Path(env_dir) if env_dir else None,
        ))
    if cache_dir is not None:
        engine = JIT(dataclasses.replace(_default_jit.settings, cache_dir=Path(cache_dir)))
        return engine.compile(spec, device, policy=policy)
    return _default_jit.compile(spec, device, policy=policy)

