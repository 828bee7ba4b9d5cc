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
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import __version__
from ._defaults import DEFAULT_COMPILE_TIMEOUT_S, default_cache_dir, mlc_llm_home
from .backends import BuildRequest, child_env
from .cache import Cache, EntryPaths, fault_point, is_no_space, write_json_atomic
from .device import Device, Presence, probe
from .errors import (
    CacheMissError,
    CompileError,
    CorruptEntryError,
    JitDisabledError,
    SpecError,
)
from .model import CompiledModel
from .policy import Policy

LOG_TAIL_LINES = 20


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the engine needs, resolved once (by the plugin, or by you)."""

    policy: Policy = Policy.ON
    #: The cache root; None means each backend's default (see :func:`default_cache_dir`).
    cache_dir: Path | None = None
    compile_timeout: float = DEFAULT_COMPILE_TIMEOUT_S
    #: How long to wait for another process's compile; None: compile timeout + 5 minutes.
    lock_timeout: float | None = None
    #: Identifies one test run across all its xdist workers (REDO and failure memory).
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    #: Probed devices, ``{str(device): Presence}``; others are probed on first use.
    presence: Mapping[str, Presence] = dataclasses.field(default_factory=dict)
    allow_untrusted: bool = False
    #: The devices tests run on (resolved ``--mlc-device``).
    devices: tuple[str, ...] = ("cpu",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Policy.parse(self.policy))

    @property
    def effective_lock_timeout(self) -> float:
        return self.lock_timeout if self.lock_timeout is not None else self.compile_timeout + 300


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


def run_logged(argv: list[str], log_path: Path, *, timeout: float,
               env: Mapping[str, str]) -> int | None:
    """Run ``argv`` with all output appended to ``log_path``; None if it timed out.

    The child runs in its own process group (killed whole on timeout or interrupt) and dies
    with this process (see :mod:`pytest_mlcjit._child`).
    """
    launcher = [sys.executable, "-m", "pytest_mlcjit._child", str(os.getpid()), "--", *argv]
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(launcher, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env), start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None
        except BaseException:
            _kill_group(proc)
            raise


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


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


def _no_space_message(req: BuildRequest, cache: Cache, why: str, log: Path | None = None) -> str:
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
        self._caches: dict[tuple[Path, bool], Cache] = {}
        self._requests: dict[tuple[Any, str | None], BuildRequest] = {}
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

    def request(self, spec: Any, device: Device | str | None = "cpu") -> BuildRequest:
        """The validated, keyed request for ``spec`` on ``device`` (memoized)."""
        dev = Device.parse(device) if isinstance(device, str) else device
        memo_key = (spec, None if dev is None else str(dev))
        with self._lock:
            found = self._requests.get(memo_key)
        if found is not None:
            return found
        backend = getattr(spec, "backend", None)
        if backend == "tvm":
            from .backends import tvm as tvm_backend

            needs_presence = dev is not None and dev.is_gpu and spec.target is None
            req = tvm_backend.request(spec, dev, self.presence(dev) if needs_presence and dev
                                      else None)
        elif backend == "mlc":
            from .backends import mlc as mlc_backend

            root = self.settings.cache_dir or mlc_llm_home()
            req = mlc_backend.request(spec, dev, run_id=self.settings.run_id, cache_root=root,
                                      memo=self.settings.policy.writes)
        else:
            raise SpecError(
                f"invalid model spec {spec!r}: expected a TVMModel, an MLCModel or an MLC "
                "model directory"
            )
        with self._lock:
            self._requests[memo_key] = req
        return req

    def cache_for(self, req: BuildRequest, policy: Policy) -> Cache:
        root = self.settings.cache_dir or req.default_root or default_cache_dir()
        writable = policy.writes
        with self._lock:
            cache = self._caches.get((root, writable))
            if cache is None:
                cache = Cache(root, writable=writable,
                              allow_untrusted=self.settings.allow_untrusted)
                self._caches[(root, writable)] = cache
        return cache

    # -- the one public operation -----------------------------------------------------------
    def compile(self, spec: Any, device: Device | str | None = "cpu", *,
                policy: Policy | str | None = None, background: bool = False) -> CompiledModel:
        """Return the compiled library for ``spec`` on ``device``, compiling it if needed.

        ``background=True`` is for prefetching: the call is not counted as a request (nor
        its outcome as a hit); a compile it does is counted as ``prefetched`` too.
        """
        self._local.background = background
        pol = Policy.parse(policy) if policy is not None else self.settings.policy
        if pol is Policy.OFF:
            raise JitDisabledError(
                "JIT compilation is disabled (policy OFF): nothing is read from or written to "
                "the cache; use --mlc-jit-policy=ON (or MLC_JIT_POLICY=ON) to compile"
            )
        req = self.request(spec, device)
        cache = self.cache_for(req, pol)
        paths = req.locate(cache.root)
        with self._lock:
            self.stats.requests += not background
            done = self._done.get((req.digest, cache.root))
        if done is not None and cache.is_verified(paths):
            with self._lock:
                self.stats.hits += not background
            return dataclasses.replace(done, hit=True)
        with self._key_lock(req.digest):
            return self._compile_or_fetch(req, cache, paths, pol)

    def _key_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(digest, threading.Lock())

    def _finish(self, req: BuildRequest, cache: Cache, paths: EntryPaths,
                manifest: dict[str, Any], *, hit: bool) -> CompiledModel:
        cache.record_use(req.digest)
        loadable = req.runnable and (req.device.kind == "cpu"
                                     or self.presence(req.device).present)
        model = CompiledModel(
            spec=req.spec, device=req.device, path=paths.library, key=req.key,
            digest=req.digest, hit=hit, compile_seconds=float(manifest.get("compile_seconds", 0)),
            manifest=manifest, loadable=loadable,
        )
        with self._lock:
            self._done[(req.digest, cache.root)] = model
            if hit and not self._local.background:
                self.stats.hits += 1
        return model

    def _lookup(self, req: BuildRequest, cache: Cache, paths: EntryPaths,
                policy: Policy) -> tuple[dict[str, Any] | None, str]:
        """``(manifest, "")`` for a usable entry, else ``(None, why it is not usable)``."""
        try:
            manifest = cache.read_manifest(paths)
            if manifest is None:
                if req.adopt is None or not paths.library.is_file():
                    return None, "missing"
                manifest = self._adopt(req, cache, paths)
            cache.verify(paths, manifest)
        except CorruptEntryError as exc:
            return None, f"corrupt: {exc}"
        if (why := req.stale(manifest)) is not None:
            return None, f"stale: {why}"
        if policy is Policy.REDO and manifest.get("run_id") != self.settings.run_id:
            return None, "redo"
        return manifest, ""

    def _adopt(self, req: BuildRequest, cache: Cache, paths: EntryPaths) -> dict[str, Any]:
        """Take over a library another tool (MLC's own JIT) left without a manifest: it is
        used once it proves loadable, and its manifest is written if the cache is writable."""
        assert req.adopt is not None
        manifest = req.adopt(paths)
        if cache.writable:
            with contextlib.suppress(OSError):
                write_json_atomic(paths.manifest, manifest)
        return manifest

    def _compile_or_fetch(self, req: BuildRequest, cache: Cache, paths: EntryPaths,
                          policy: Policy) -> CompiledModel:
        manifest, why = self._lookup(req, cache, paths, policy)
        if manifest is not None:
            return self._finish(req, cache, paths, manifest, hit=True)
        if policy is Policy.READONLY:
            with self._lock:
                self.stats.corrupt += why.startswith("corrupt")
            raise CacheMissError(self._readonly_message(req, cache, why))
        if (failed := cache.read_failure(req.digest, self.settings.run_id)) is not None:
            raise CompileError(f"{failed}\n(remembered from an earlier attempt in this run)")
        with cache.lock(req.digest, self.settings.effective_lock_timeout,
                        req.describe) as waited:
            with self._lock:
                self.stats.lock_wait_seconds += waited
            manifest, why = self._lookup(req, cache, paths, policy)
            if manifest is not None:
                return self._finish(req, cache, paths, manifest, hit=True)
            if (failed := cache.read_failure(req.digest, self.settings.run_id)) is not None:
                raise CompileError(f"{failed}\n(remembered from an earlier attempt in this run)")
            if why.startswith("corrupt"):
                with self._lock:
                    self.stats.corrupt += 1
                cache.quarantine(paths, why)
            manifest = self._build(req, cache, paths)
        return self._finish(req, cache, paths, manifest, hit=False)

    def _readonly_message(self, req: BuildRequest, cache: Cache, why: str) -> str:
        head = {
            "missing": "no cached library",
        }.get(why, f"the cached library is {why.split(':', 1)[0]}")
        detail = "" if why == "missing" else f" ({why.split(': ', 1)[-1]})"
        return (
            f"{head} for key {req.digest} ({req.describe}) in {cache.root}{detail}, and the "
            "policy is READONLY, which never compiles or repairs; warm the cache first "
            "(pytest --mlc-jit-prepare, or a run with --mlc-jit-policy=ON)"
        )

    def _build(self, req: BuildRequest, cache: Cache, paths: EntryPaths) -> dict[str, Any]:
        """Compile ``req`` in a subprocess and publish it; call with the key's lock held."""
        cache.clean_staging()
        parent, note = req.staging_parent(cache.root) if req.staging_parent else (None, "")
        if parent is not None:
            cache.clean_staging(where=parent)
        try:
            staging = cache.new_staging_dir(req.digest, parent=parent)
        except OSError as exc:
            if is_no_space(exc):
                raise CompileError(_no_space_message(req, cache, "")) from None
            raise
        log = staging / "compile.log"
        timeout = self.settings.compile_timeout
        try:
            fault_point("staging")
            if note:
                log.write_text(f"[pytest-mlcjit] {note}\n", encoding="utf-8")
            argv, output = req.command(staging)
            t0 = time.perf_counter()
            fault_point("compile")
            rc = run_logged(argv, log, timeout=timeout, env=child_env())
            seconds = time.perf_counter() - t0
            fault_point("compiled")
            if rc != 0 and (why := _ran_out_of_space(cache.root, log)) is not None:
                # Not remembered as this config's failure: freeing space fixes it.
                raise CompileError(_no_space_message(req, cache, why, log))
            if rc is None:
                self._fail(req, cache, log, f"timed out after {timeout:g}s (--mlc-jit-timeout)")
            if rc != 0:
                self._fail(req, cache, log, f"the compiler exited with code {rc}")
            if not output.is_file():
                self._fail(req, cache, log, f"the compiler exited 0 but wrote no library "
                                            f"at {output.name}")
            manifest = {
                "format": req.key.get("format"), "backend": req.backend, "key": req.key,
                "toolchain": req.toolchain, "compile_seconds": round(seconds, 3),
                "created": time.time(), "run_id": self.settings.run_id,
                "host": socket.gethostname(), "plugin_version": __version__,
                **req.collect(staging),
            }
            published = cache.publish(output, log, paths, manifest)
        except OSError as exc:
            if is_no_space(exc):
                raise CompileError(_no_space_message(req, cache, "")) from None
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self._lock:
            self.stats.compiles += 1
            self.stats.prefetched += self._local.background
            self.stats.compile_seconds += seconds
            self.stats.bytes_compiled += int(published["size"])
        return published

    def _fail(self, req: BuildRequest, cache: Cache, log: Path, why: str) -> None:
        _, kept_log = cache.failure_paths(req.digest)
        with contextlib.suppress(OSError):
            shutil.copyfile(log, kept_log)
        message = (f"compiling {req.describe} failed: {why}\n"
                   f"compile log: {kept_log}\n--- last lines of the log ---\n{_tail(log)}")
        cache.record_failure(req.digest, self.settings.run_id, message)
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

