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

import dataclasses
import errno
import os
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from .backends import Backend, BuildContext, BuildRequest, backend_for
from .device import Device, Presence, probe
from .errors import (
    CacheMissError,
    CompileError,
    CorruptEntryError,
    JitDisabledError,
)
from .fsutil import best_effort, fault_point, is_no_space
from .layout import EntryPaths, backend_root
from .model import CompiledModel
from .policy import Policy
from .runner import run_logged
from .settings import Settings
from .store import LocalStore, Store

LOG_TAIL_LINES = 20


@dataclasses.dataclass
class Stats:
    """Counters of one process, merged across xdist workers on the controller."""

    requests: int = 0
    hits: int = 0
    compiles: int = 0
    failures: int = 0
    compile_seconds: float = 0.0
    lock_wait_seconds: float = 0.0
    bytes_compiled: int = 0
    corrupt: int = 0
    #: Compiles done ahead of time by background prefetch (included in ``compiles``).
    prefetched: int = 0

    def merge(self, other: Mapping[str, Any]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + other.get(field.name, 0))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
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
        #: ``background``: whether this thread's current ``compile`` call is a prefetch
        #: (set at the top of every ``compile``, read where it counts outcomes).
        self._local = threading.local()

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
        """
        self._local.background = background
        pol = self._policy(policy)
        if pol is Policy.OFF:
            raise JitDisabledError(
                "JIT compilation is disabled (policy OFF): nothing is read from or written to "
                "the cache; use --mlc-jit-policy=ON (or MLC_JIT_POLICY=ON) to compile"
            )
        req = self.request(spec, device, pol)
        backend = backend_for(req.spec)
        store = self.store_for(req, pol)
        paths = backend.locate(req, store.root)
        with self._lock:
            self.stats.requests += not background
            done = self._done.get((req.digest, store.root))
        if done is not None and store.is_verified(paths):
            with self._lock:
                self.stats.hits += not background
            return dataclasses.replace(done, hit=True)
        with self._key_lock(req.digest):
            return self._compile_or_fetch(req, backend, store, paths, pol)

    def _key_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(digest, threading.Lock())

    def _finish(self, req: BuildRequest, store: Store, paths: EntryPaths,
                manifest: dict[str, Any], *, hit: bool) -> CompiledModel:
        store.record_use(req.digest)
        loadable = req.runnable and (req.device.kind == "cpu"
                                     or self.presence(req.device).present)
        model = CompiledModel(
            spec=req.spec, device=req.device, path=paths.library, key=req.key,
            digest=req.digest, hit=hit, compile_seconds=float(manifest.get("compile_seconds", 0)),
            manifest=manifest, loadable=loadable,
        )
        with self._lock:
            self._done[(req.digest, store.root)] = model
            if hit and not self._local.background:
                self.stats.hits += 1
        return model

    def _lookup(self, req: BuildRequest, backend: Backend, store: Store, paths: EntryPaths,
                policy: Policy) -> tuple[dict[str, Any] | None, str]:
        """``(manifest, "")`` for a usable entry, else ``(None, why it is not usable)``."""
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
            store.verify(paths, manifest)
        except CorruptEntryError as exc:
            return None, f"corrupt: {exc}"
        if (why := backend.stale(req, manifest)) is not None:
            return None, f"stale: {why}"
        if policy is Policy.REDO and manifest.get("run_id") != self.settings.run_id:
            return None, "redo"
        return manifest, ""

    def _compile_or_fetch(self, req: BuildRequest, backend: Backend, store: Store,
                          paths: EntryPaths, policy: Policy) -> CompiledModel:
        manifest, why = self._lookup(req, backend, store, paths, policy)
        if manifest is not None:
            return self._finish(req, store, paths, manifest, hit=True)
        if policy is Policy.READONLY:
            with self._lock:
                self.stats.corrupt += why.startswith("corrupt")
            raise CacheMissError(self._readonly_message(req, store, why))
        if (failed := store.read_failure(req.digest, self.settings.run_id)) is not None:
            raise CompileError(f"{failed}\n(remembered from an earlier attempt in this run)")
        with store.lock(req.digest, self.settings.effective_lock_timeout,
                        req.describe) as waited:
            with self._lock:
                self.stats.lock_wait_seconds += waited
            manifest, why = self._lookup(req, backend, store, paths, policy)
            if manifest is not None:
                return self._finish(req, store, paths, manifest, hit=True)
            if (failed := store.read_failure(req.digest, self.settings.run_id)) is not None:
                raise CompileError(f"{failed}\n(remembered from an earlier attempt in this run)")
            if why.startswith("corrupt"):
                with self._lock:
                    self.stats.corrupt += 1
                store.quarantine(paths, why)
            manifest = self._build(req, backend, store, paths)
        return self._finish(req, store, paths, manifest, hit=False)

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

    def _build(self, req: BuildRequest, backend: Backend, store: Store,
               paths: EntryPaths) -> dict[str, Any]:
        """Compile ``req`` in a subprocess and publish it; call with the key's lock held."""
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
            argv, output = backend.command(req, staging)
            t0 = time.perf_counter()
            fault_point("compile")
            rc = run_logged(argv, log, timeout=timeout)
            seconds = time.perf_counter() - t0
            fault_point("compiled")
            if rc != 0 and (why := _ran_out_of_space(store.root, log)) is not None:
                # Not remembered as this config's failure: freeing space fixes it.
                raise CompileError(_no_space_message(req, store, why, log))
            if rc is None:
                self._fail(req, store, log, f"timed out after {timeout:g}s (--mlc-jit-timeout)")
            if rc != 0:
                self._fail(req, store, log, f"the compiler exited with code {rc}")
            if not output.is_file():
                self._fail(req, store, log, f"the compiler exited 0 but wrote no library "
                                            f"at {output.name}")
            manifest = {
                "format": req.key.get("format"), "backend": req.backend, "key": req.key,
                "toolchain": dict(req.toolchain), "compile_seconds": round(seconds, 3),
                "created": time.time(), "run_id": self.settings.run_id,
                "host": socket.gethostname(), "plugin_version": __version__,
                **backend.collect(req, staging),
            }
            published = store.publish(output, log, paths, manifest)
        except OSError as exc:
            if is_no_space(exc):
                raise CompileError(_no_space_message(req, store, "")) from None
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self._lock:
            self.stats.compiles += 1
            self.stats.prefetched += self._local.background
            self.stats.compile_seconds += seconds
            self.stats.bytes_compiled += int(published["size"])
        return published

    def _fail(self, req: BuildRequest, store: Store, log: Path, why: str) -> None:
        _, kept_log = store.failure_paths(req.digest)
        with best_effort(kept_log, "keep the failed compile's log at"):
            shutil.copyfile(log, kept_log)
        message = (f"compiling {req.describe} failed: {why}\n"
                   f"compile log: {kept_log}\n--- last lines of the log ---\n{_tail(log)}")
        store.record_failure(req.digest, self.settings.run_id, message)
        with self._lock:
            self.stats.failures += 1
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

