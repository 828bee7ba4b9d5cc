"""The engine: policy, cache and backend together → :class:`CompiledModel`.

Usable from plain Python::

    from pytest_mlcjit import TVMModel, jit
    model = jit(TVMModel("examples.models.mlp:build", config={"hidden": 64}), "cpu")

The flow for one request: build the key (memoized), look the entry up without any lock
(manifest present, library verified on first read), and only on a miss take the key's lock,
look again (another process may have compiled it meanwhile), ask the store's further
tiers, and compile in a subprocess into a staging directory that is published atomically.
The engine knows one :class:`~pytest_mlcjit.cache.store.interface.Store`, whatever tiers
are behind it, and carries each request's state in a :class:`RequestState` made where the
request starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from pytest_mlcjit._util.fs import WriteWarnings, fault_point, is_no_space
from pytest_mlcjit.cache.layout import EntryPaths, backend_root
from pytest_mlcjit.cache.store import Stores
from pytest_mlcjit.cache.store.interface import (
    Corrupt,
    Hit,
    Job,
    Lookup,
    Store,
    why_not,
)
from pytest_mlcjit.compiler.backends import BuildContext, BuildRequest, backend_for
from pytest_mlcjit.compiler.launch import Builds
from pytest_mlcjit.compiler.loadcheck import LoadChecker
from pytest_mlcjit.device import Device, Presence, probe
from pytest_mlcjit.engine import failures
from pytest_mlcjit.engine.activity import Board, describe_spec, describe_target
from pytest_mlcjit.engine.failures import log_tail, no_space, ran_out_of_space, readonly_miss
from pytest_mlcjit.engine.model import CompiledModel, served_again
from pytest_mlcjit.engine.remote import remote_mode, remote_options, upload_job
from pytest_mlcjit.engine.request import Query, RequestState
from pytest_mlcjit.engine.schedule import spec_digest
from pytest_mlcjit.engine.settings import Settings, from_environment
from pytest_mlcjit.engine.stats import LibraryStats, Outcome, Stats, by_download
from pytest_mlcjit.engine.unpublished import Unpublished, disk_full_said
from pytest_mlcjit.errors import (
    CacheMissError,
    CompileError,
    JitDisabledError,
    KeyBusy,
    LockTimeoutError,
)
from pytest_mlcjit.inputs.check import InputChecker, changes_since
from pytest_mlcjit.policy import Policy


class JIT:
    """Compile-or-fetch libraries under one set of :class:`Settings`; thread-safe.

    One per run: it owns the run's state (stores, statistics, input checker, the board
    its jobs are announced on, its builds in flight), so a second run starts afresh.
    """

    def __init__(self, settings: Settings | None = None, *, board: Board | None = None,
                 warnings: WriteWarnings | None = None) -> None:
        self.settings = settings = settings or Settings()
        self.stats = Stats()
        self.warnings = warnings or WriteWarnings()
        self.unpublished = Unpublished(self.warnings)  # this run's untrusted compiles
        self.checker = InputChecker()
        self.board = board or Board(run_id=settings.run_id)
        self.builds = Builds(warm=settings.compile_workers != "off")
        self.stores = Stores(
            allow_untrusted=settings.allow_untrusted, warnings=self.warnings,
            checker=self.checker, remote=settings.remote, remote_mode=remote_mode(settings),
            remote_required=settings.remote_required, remote_stats=self.stats.remote,
            remote_options=remote_options(settings), load_check=LoadChecker(self.builds),
            worker=self.board.worker, announce=upload_job(self.board))
        self._presence: dict[str, Presence] = dict(settings.presence)
        self._requests: dict[tuple[Any, str | None, bool], BuildRequest] = {}
        self._done: dict[tuple[str, Path], CompiledModel] = {}
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}
        #: Compiles of each key this run finished (ended how they may).
        self._compiles_of: dict[str, int] = {}

    def close(self, *, keep_record: bool = False) -> None:
        """The run is over: its private downloads go, and its record leaves the board
        (unless ``keep_record``: another process's display still reads it)."""
        self.unpublished.release()  # the unpublished libraries' staging dirs
        self.stores.close()
        if not keep_record:
            self.board.close()

    # -- building blocks -------------------------------------------------------------------
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
                           writes=writes, presence=self.presence, checker=self.checker,
                           warnings=self.warnings)
        req = backend_for(spec).request(spec, dev, ctx)
        with self._lock:
            self._requests[memo_key] = req
        return req

    def root_for(self, req: BuildRequest) -> Path:
        """The cache root of ``req``'s entry (the cache-root rule of :mod:`..cache.layout`)."""
        return backend_root(req.backend, self.settings.cache_dir)

    def paths(self, req: BuildRequest) -> EntryPaths:
        """Where ``req``'s entry lives (whether or not it is there)."""
        return backend_for(req.spec).locate(req, self.root_for(req))

    def store_for(self, req: BuildRequest, policy: Policy) -> Store:
        """The store of ``req`` for a request with ``policy`` (its tiers are the store's
        business)."""
        return self.stores.get(self.root_for(req), writes=policy.writes)

    def query(self, req: BuildRequest) -> Query:
        return Query(req, backend_for(req.spec))

    def _policy(self, policy: Policy | str | None) -> Policy:
        return Policy.parse(policy) if policy is not None else self.settings.policy

    # -- interruption ------------------------------------------------------------------------
    def interrupt(self) -> int:
        """Stop every compile of this run now, and give up its waits (an interrupt); how
        many compiles were stopped."""
        return self.builds.kill_all()

    def interrupting_on_sigint(self) -> contextlib.AbstractContextManager[None]:
        """Within the block, a SIGINT first stops every compile of this run (a background
        thread's too), then interrupts the main thread as usual."""
        return self.builds.killing_on_sigint()

    # -- the one public operation -----------------------------------------------------------
    def compile(self, spec: Any, device: Device | str | None = "cpu", *,
                policy: Policy | str | None = None, background: bool = False) -> CompiledModel:
        """Return the compiled library for ``spec`` on ``device``, compiling it if needed.

        ``policy`` overrides the run's for this request: every read and write decision of
        the request follows it. ``background=True`` is for prefetching: the call is not
        counted as a request (nor its outcome as a hit); a compile it does is counted as
        ``prefetched`` too. Each request is counted once in ``stats.outcomes``
        (see :data:`.stats.OUTCOMES`).
        """
        return self._run(RequestState(background=background), spec, device, policy)

    def prefetch(self, spec: Any, device: Device | str | None = "cpu") -> bool:
        """Compile ``spec`` ahead of time, as ``compile(..., background=True)`` does,
        unless another thread or process holds its key now (it is compiling it): then
        return False at once, without waiting, so that the caller moves on to the next
        library. True once it is compiled or found; a failure raises as ``compile`` does."""
        try:
            self._run(RequestState(background=True, blocking=False), spec, device, None)
        except KeyBusy:
            return False
        return True

    def status(self, spec: Any, device: Device | str | None = "cpu") -> str:
        """How a READONLY lookup would find ``spec`` now: ``hit``, ``missing``, or
        ``stale: …`` / ``corrupt: …`` with why; writes nothing."""
        req = self.request(spec, device, Policy.READONLY)
        return why_not(self.store_for(req, Policy.READONLY).lookup(self.query(req)))

    def _run(self, state: RequestState, spec: Any, device: Device | str | None,
             policy: Policy | str | None) -> CompiledModel:
        try:
            model = self._compile(state, spec, device, policy)
        except BaseException as exc:
            missed = isinstance(exc, CacheMissError | JitDisabledError)
            if not state.background and (state.req is not None or missed):  # a bad spec: none
                self._count(state, "missed" if missed else "failed")
            raise
        if not state.background:
            self._count(state, state.outcome(model), model)
        return model

    def _compile(self, state: RequestState, spec: Any, device: Device | str | None,
                 policy: Policy | str | None) -> CompiledModel:
        pol = self._policy(policy)
        if pol is Policy.OFF:
            raise JitDisabledError(
                "JIT compilation is disabled (policy OFF): nothing is read from or written to "
                "the cache; use --mlc-jit-policy=ON (or MLC_JIT_POLICY=ON) to compile"
            )
        req = state.req = self.request(spec, device, pol)
        query = self.query(req)
        store = self.store_for(req, pol)
        with self._lock:
            done = self._done.get((req.digest, store.root))
        if done is not None and self._still_valid(done, query, store):
            return served_again(done, req.device)
        with self._holding_key(state, store):
            return self._compile_or_fetch(state, query, store, pol)

    def _compile_or_fetch(self, state: RequestState, query: Query, store: Store,
                          policy: Policy) -> CompiledModel:
        req = query.req
        redo = self.settings.run_id if policy is Policy.REDO else None
        found: Lookup = store.lookup(query, redo_run=redo)
        if isinstance(found, Hit):
            return self._finish(req, store, found, hit=True)
        job = self._download_job(state, store)
        if policy is Policy.READONLY or not store.writable:  # or ON on a read-only cache
            if isinstance(fetched := store.fetch(query, job=job), Hit):
                state.source = fetched.source
                return self._finish(req, store, fetched, hit=True)
            if policy is Policy.READONLY:
                with self._lock:
                    self.stats.corrupt += isinstance(found, Corrupt)
                raise CacheMissError(readonly_miss(req.describe, req.digest, store.root, found,
                                                   fetched))
        self._check_failure(query, store, policy, known=False)
        with self._locked(state, store):  # a read-only cache refuses: this would compile
            found = store.lookup(query, redo_run=redo)
            if isinstance(found, Hit):
                state.waited_for_other = True  # it appeared while we waited
                return self._finish(req, store, found, hit=True)
            self._check_failure(query, store, policy, known=False)
            if isinstance(found, Corrupt):
                with self._lock:
                    self.stats.corrupt += 1
                store.quarantine(found.paths, why_not(found))
            if policy is Policy.ON and isinstance(fetched := store.fetch(query, job=job), Hit):
                state.source = fetched.source
                return self._finish(req, store, fetched, hit=True)
            self._check_failure(query, store, policy, known=True)
            built = self._build(state, query, store, replace=policy is Policy.REDO)
        return self._finish(req, store, built, hit=False)

    def _check_failure(self, query: Query, store: Store, policy: Policy, *,
                       known: bool) -> None:
        """Raise a failure of ``query`` remembered from this run; with ``known`` (once no
        store has an entry that fits), a known failure (:func:`.failures.known_failure`)."""
        if (failed := store.read_failure(query.digest, self.settings.run_id)) is not None:
            raise failed
        if known and policy is not Policy.REDO and not self.settings.retry_failed and (
                error := failures.known_failure(store, query, self.checker)) is not None:
            raise error

    def _finish(self, req: BuildRequest, store: Store, found: Hit, *,
                hit: bool) -> CompiledModel:
        store.record_use(found.paths.digest)
        loadable = req.runnable and (req.device.kind == "cpu"
                                     or self.presence(req.device).present)
        manifest = found.manifest
        model = CompiledModel(
            spec=req.spec, device=req.device, path=found.paths.library, key=req.key,
            digest=found.paths.digest, hit=hit,
            compile_seconds=float(manifest.get("compile_seconds", 0)), manifest=manifest,
            loadable=loadable,
        )
        with self._lock:
            self._done[(req.digest, store.root)] = model
        return model

    def _still_valid(self, done: CompiledModel, query: Query, store: Store) -> bool:
        """Whether a library this run returned before is still the right one: the file is
        unchanged (one stat) and so are the inputs it was built from (stats)."""
        if not store.is_verified(EntryPaths(done.digest, done.path)):
            return False
        recorded = done.manifest.get("inputs")
        base = query.inputs_base()
        return base is None or not isinstance(recorded, dict) or changes_since(
            recorded, base, self.checker) == []

    # -- compiling -------------------------------------------------------------------------
    def _build(self, state: RequestState, query: Query, store: Store, *,
               replace: bool) -> Hit:
        """Compile ``query``'s request in a subprocess and publish it (with the key's lock
        held): the entry of its input state, as a hit; unpublished if an input changed
        while it compiled (:class:`.unpublished.Unpublished`)."""
        req, backend = query.req, query.backend
        store.clean_staging()
        parent, note = backend.staging_parent(req, store.root)
        if parent is not None:
            store.clean_staging(where=parent)
        with disk_full_said(req.describe, store.root):
            staging = store.new_staging_dir(req.digest, parent=parent)
        log, timeout = staging / "compile.log", self.settings.compile_timeout
        kept: Hit | None = None
        try:
            fault_point("staging")
            if note:
                log.write_text(f"[pytest-mlcjit] {note}\n", encoding="utf-8")
            argv, output = backend.command(req, staging, store.root)
            fault_point("compile")
            with self._job(state, "compile", store) as job:
                rc = job["rc"] = self.builds.run_logged(argv, log, timeout=timeout)
                job["rc"] = rc if rc != 0 or output.is_file() else -1  # no library: failed
            seconds = state.job_seconds
            fault_point("compiled")
            if rc != 0 and (why := ran_out_of_space(store.root, log)) is not None:
                # Not remembered as this config's failure: freeing space fixes it.
                raise no_space(req.describe, store.root, why, log)
            if rc is None:
                self._fail(state, store, log, f"timed out after {timeout:g}s "
                           "(--mlc-jit-timeout)", seconds=seconds)
            if rc != 0:
                known = backend.failed_compile(req, staging) if rc > 0 else None
                self._fail(state, store, log, f"the compiler exited with code {rc}",
                           known=known, seconds=seconds)
            if not output.is_file():
                self._fail(state, store, log, f"the compiler exited 0 but wrote no library "
                                              f"at {output.name}")
            manifest = query.manifest(staging, seconds=seconds, run_id=self.settings.run_id)
            kept = self.unpublished.check(req.describe, req.digest, staging=staging,
                                          library=output, manifest=manifest)
            hit = kept or store.publish(query, output, staging / "compile.log", manifest,
                                        replace=replace)
        except OSError as exc:
            if is_no_space(exc):
                raise no_space(req.describe, store.root, "") from None
            raise
        finally:  # a kept one goes when the run's engine closes
            self.unpublished.settle(store, staging, kept)
        store.record_time(spec_digest(req), req.digest, seconds)
        self._compile_done(state, seconds, ok=True, size=int(hit.manifest["size"]))
        return hit

    def _fail(self, state: RequestState, store: Store, log: Path, why: str, *,
              known: dict[str, Any] | None = None, seconds: float | None = None) -> NoReturn:
        """Remember the failure (for this run; with ``known``, the compile's own account of
        a failure that may be deterministic, for later runs too: seen once, or known once
        seen twice, see :func:`.failures.failure_verdict`) and raise its CompileError."""
        req = state.req
        assert req is not None
        kept_log = store.failure_log(req.digest)
        with self.warnings.best_effort(kept_log, "keep the failed compile's log at"):
            shutil.copyfile(log, kept_log)
        error = CompileError(model=req.describe, cause=why, log_path=str(kept_log),
                             log_tail=log_tail(log))
        verdict = failures.failure_verdict(known, log, store.read_failure_verdict(req.digest),
                                           self.query(req).inputs_base(), self.checker)
        if verdict is not None:
            verdict.update(describe=req.describe, seconds=seconds,
                           spec=describe_spec(req.spec, req.describe))
        store.record_failure(req.digest, self.settings.run_id, error, verdict=verdict)
        if seconds is not None:
            store.record_time(spec_digest(req), req.digest, seconds)
        self._compile_done(state, state.job_seconds, ok=False)
        raise error

    # -- accounting and progress (what a request became; what this run is doing) -----------
    def _library(self, req: BuildRequest) -> LibraryStats:
        """``req``'s record in the stats; call with ``self._lock`` held."""
        return self.stats.library(req.digest, spec=describe_spec(req.spec, req.describe),
                                  target=req.target, worker=self.board.worker)

    def _count(self, state: RequestState, outcome: Outcome,
               model: CompiledModel | None = None) -> None:
        """Count a request (its outcome, and how long it waited)."""
        outcome = by_download(outcome, model, self.settings.run_id)
        size = model.manifest.get("size") if model is not None else None
        with self._lock:
            lib = self._library(state.req) if state.req is not None else None
            self.stats.count(outcome, wait_seconds=state.waited, lib=lib,
                             size=size if isinstance(size, int) else None,
                             saved=model.compile_seconds if model is not None else 0.0)

    @contextlib.contextmanager
    def _job(self, state: RequestState, kind: str, store: Store) -> Iterator[dict[str, Any]]:
        """Announce a job that can take long (``compile``, ``download``, ``wait``) on the
        run's board (the live progress shows it); a compile's time is counted, ended how
        it may."""
        req = state.req
        assert req is not None
        t0 = time.monotonic()
        with self.board.doing(kind, model=describe_spec(req.spec, req.describe),
                              target=describe_target(req.target), digest=req.digest,
                              root=str(store.root), background=state.background) as job:
            try:
                yield job
            except BaseException:
                if kind == "compile":  # killed, interrupted: counted as a failed compile
                    self._compile_done(state, time.monotonic() - t0, ok=False)
                raise
            finally:
                state.job_seconds = time.monotonic() - t0

    def _download_job(self, state: RequestState, store: Store) -> Job:
        """Announces the store's downloads for this request (its long-running steps)."""

        def job(kind: str) -> contextlib.AbstractContextManager[Any]:
            return self._job(state, kind, store)

        return job

    def _compile_done(self, state: RequestState, seconds: float, *, ok: bool,
                      size: int | None = None) -> None:
        req = state.req
        assert req is not None
        with self._lock:
            self._compiles_of[req.digest] = self._compiles_of.get(req.digest, 0) + 1
            self.stats.compiled(self._library(req), seconds=seconds, ok=ok, size=size,
                                background=state.background, worker=self.board.worker)

    # -- locks -------------------------------------------------------------------------------
    def _key_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(digest, threading.Lock())

    @contextlib.contextmanager
    def _holding_key(self, state: RequestState, store: Store) -> Iterator[None]:
        """Hold this run's lock of the key: a thread that finds another (the prefetch)
        holding it waits, and that wait is counted and shown."""
        req = state.req
        assert req is not None
        lock = self._key_lock(req.digest)
        if not lock.acquire(blocking=False):
            if not state.blocking:
                raise KeyBusy(req.digest)
            t0 = time.monotonic()
            with self._lock:
                compiles_before = self._compiles_of.get(req.digest, 0)
            with self._job(state, "wait", store):
                lock.acquire()
            state.waited += time.monotonic() - t0
            with self._lock:  # "waited" if the other thread compiled it, not just looked up
                if self._compiles_of.get(req.digest, 0) > compiles_before:
                    state.waited_for_other = True
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _locked(self, state: RequestState, store: Store) -> Iterator[None]:
        """Hold the key's lock in the store (:meth:`Store.lock`), the wait for it shown as a
        job; the seconds waited are counted as this request's wait."""
        req = state.req
        assert req is not None
        cancelled = self.builds.cancelled
        with contextlib.ExitStack() as stack:
            if not state.blocking:  # prefetch: another holds it
                try:
                    waited = stack.enter_context(
                        store.lock(req.digest, 0.0, req.describe, cancelled=cancelled))
                except LockTimeoutError:
                    raise KeyBusy(req.digest) from None
            else:
                with self._job(state, "wait", store):
                    waited = stack.enter_context(store.lock(
                        req.digest, self.settings.effective_lock_timeout, req.describe,
                        cancelled=cancelled))
            state.waited += waited
            yield


_default_jit: JIT | None = None


def jit(spec: Any, device: Device | str | None = "cpu", *,
        policy: Policy | str | None = None, cache_dir: str | os.PathLike[str] | None = None
        ) -> CompiledModel:
    """Compile-or-fetch ``spec`` for ``device`` outside pytest, with the same cache.

    Settings come from the environment (``MLC_JIT_POLICY``, ``MLC_JIT_CACHE_DIR``…: the
    variables the options read) and defaults; ``policy`` and ``cache_dir`` override them.
    """
    global _default_jit  # noqa: PLW0603 - one engine per process, like the plugin's
    if _default_jit is None:
        _default_jit = JIT(from_environment())
    if cache_dir is not None:
        engine = JIT(dataclasses.replace(_default_jit.settings, cache_dir=Path(cache_dir)))
        return engine.compile(spec, device, policy=policy)
    return _default_jit.compile(spec, device, policy=policy)
