"""The remote tier as the engine sees it: which remote entry a request selects, its
download, the upload of a fresh entry, and what to do when the remote fails.

The local cache stays the first tier; this one is asked on a local miss (under the key's
lock, so one process per machine downloads or uploads an entry), and told of each local
compile. Failure policy, as sccache and ccache users asked for it:

* authentication and permission errors always fail the request (they are never a miss);
* any other error (connection, timeout, throttling, server error) fails the request with
  ``--mlc-jit-remote-required``; otherwise it is reported once, the remote is marked down
  for the rest of the process, and the library is compiled locally;
* a remote object whose digest or signature is wrong is reported and never loaded.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_mlcjit.errors import ConfigError
from pytest_mlcjit.cache.layout import EntryPaths
from pytest_mlcjit.cache.store.remote import (
    SIGNATURE_FIELD,
    Remote,
    RemoteAuthError,
    RemoteEntry,
    RemoteError,
    RemoteIntegrityError,
    open_remote,
)

if TYPE_CHECKING:
    from pytest_mlcjit.build.backends import Backend, BuildRequest
    from pytest_mlcjit.cache.store import Store

#: The environment variable holding the secret that signs (and checks) remote manifests.
ENV_SIGNING_KEY = "MLC_JIT_REMOTE_SIGNING_KEY"
REMOTE_MODES = ("read", "readwrite")
#: Bounded waits on the remote (seconds; each can be set in the environment) and the
#: retries of a failed request (throttling, server errors).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
ENV_CONNECT_TIMEOUT = "MLC_JIT_REMOTE_CONNECT_TIMEOUT"
ENV_READ_TIMEOUT = "MLC_JIT_REMOTE_READ_TIMEOUT"
RETRIES = 2


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"invalid {name} {text!r}: expected a positive number of seconds")
    return value
#: Manifest fields a download does not carry over: the local publish writes its own.
_LOCAL_FIELDS = ("digest", "library", "sha256", "size", "log", SIGNATURE_FIELD)


def signing_key_from_env() -> bytes | None:
    value = os.environ.get(ENV_SIGNING_KEY)
    return value.encode("utf-8") if value else None


class RemoteTier:
    """One remote (``--mlc-jit-remote``) for one process; thread-safe."""

    def __init__(self, url: str, *, mode: str = "readwrite", required: bool = False,
                 signing_key: bytes | None = None, remote: Remote | None = None) -> None:
        self.mode = mode
        self.required = required
        self.remote = remote or open_remote(
            url, signing_key=signing_key, retries=RETRIES,
            connect_timeout=_seconds_from_env(ENV_CONNECT_TIMEOUT, CONNECT_TIMEOUT_S),
            read_timeout=_seconds_from_env(ENV_READ_TIMEOUT, READ_TIMEOUT_S))
        self.url = self.remote.url
        #: Why the remote is down for the rest of this process (None: usable).
        self.down: str | None = None
        self.stats: dict[str, Any] = {"downloads": 0, "download_bytes": 0,
                                      "download_seconds": 0.0, "uploads": 0,
                                      "upload_bytes": 0, "errors": 0, "warnings": []}
        self._lock = threading.Lock()
        self._private: dict[str, tuple[EntryPaths, dict[str, Any]]] = {}
        self._private_dir: Path | None = None

    @property
    def writes(self) -> bool:
        return self.mode == "readwrite"

    # -- failures ------------------------------------------------------------------------
    def _warn(self, message: str) -> None:
        with self._lock:
            if message not in self.stats["warnings"]:
                self.stats["warnings"].append(message)

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Apply the failure policy to a remote operation (see the module's docstring)."""
        try:
            yield
        except RemoteIntegrityError as exc:
            with self._lock:
                self.stats["errors"] += 1
            self._warn(f"{what}: {exc} (not loaded)")
            if self.required:
                raise
        except RemoteAuthError:
            with self._lock:
                self.stats["errors"] += 1
            raise
        except RemoteError as exc:
            with self._lock:
                self.stats["errors"] += 1
                self.down = self.down or str(exc)
            if self.required:
                raise
            self._warn(f"remote {self.url} failed while {what}: {exc}; it is not used for the "
                       "rest of this process (pass --mlc-jit-remote-required to fail instead)")

    # -- reading -------------------------------------------------------------------------
    def select(self, req: BuildRequest, backend: Backend,
               fits: Callable[[Mapping[str, Any]], bool]) -> RemoteEntry | None:
        """The newest usable remote entry of ``req``'s key for which ``fits(manifest)`` is
        true (its recorded inputs are unchanged here, its toolchain is current), or None.
        Entries with a problem (a bad or missing signature, a malformed manifest) are
        reported and skipped."""
        if self.down is not None:
            return None
        found: list[RemoteEntry] = []
        with self.guard(f"listing the entries of key {req.digest}"):
            found = self.remote.list_manifests(req.digest)
        usable = []
        for entry in found:
            if entry.problem is not None:
                self._warn(f"refused a remote entry of {req.describe}: {entry.problem}")
            elif entry.manifest is not None and fits(entry.manifest):
                usable.append(entry)
        usable.sort(key=lambda e: -(e.created or 0.0))
        return usable[0] if usable else None

    def download(self, entry: RemoteEntry, dest: Path) -> dict[str, Any] | None:
        """Download ``entry``'s library to ``dest`` (checked against its size and SHA-256
        before this returns); its manifest as the local cache keeps it, or None if the
        download failed (reported)."""
        assert entry.manifest is not None
        t0 = time.monotonic()
        ok = False
        with self.guard(f"downloading {entry.location}"):
            self.remote.download(entry.manifest, dest)
            ok = True
        if not ok:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            return None
        with self._lock:
            self.stats["downloads"] += 1
            self.stats["download_bytes"] += int(entry.manifest["size"])
            self.stats["download_seconds"] += time.monotonic() - t0
        manifest = {k: v for k, v in entry.manifest.items() if k not in _LOCAL_FIELDS}
        manifest["remote"] = entry.location
        return manifest

        # -- the engine's two uses ----------------------------------------------------------
    def fits(self, req: BuildRequest, backend: Backend) -> Callable[[Mapping[str, Any]], bool]:
        """Whether a remote manifest fits ``req`` here: the recorded-inputs rule exactly as
        for local entries (its inputs are unchanged here), and a current toolchain."""
        from pytest_mlcjit.inputs import changes_since

        base = backend.inputs_base(req)

        def fits(manifest: Mapping[str, Any]) -> bool:
            if backend.stale(req, manifest) is not None:
                return False
            if base is None:
                return manifest.get("digest") == req.digest
            return changes_since(manifest.get("inputs"), base) == []

        return fits

    def pull(self, req: BuildRequest, backend: Backend, store: Store,
             job: Callable[[], AbstractContextManager[Any]]
             ) -> tuple[EntryPaths, dict[str, Any]] | None:
        """On a local miss, under the key's lock: the remote entry that fits ``req``,
        downloaded into a staging directory, checked, and published into ``store`` with the
        same atomic publish as a compile; None if the remote has none (or failed)."""
        entry = self.select(req, backend, self.fits(req, backend))
        if entry is None:
            return None
        staging = store.new_staging_dir(req.digest)
        try:
            with job():
                manifest = self.download(entry, staging / "library")
            if manifest is None:
                return None
            variant = entry.entry_digest != req.digest
            paths = backend.locate(req, store.root, entry.entry_digest if variant else None)
            if variant:  # listed first, as a compile's entry is (JIT._publish)
                store.add_variant(paths.library.parent, req.digest, {
                    "entry": paths.digest, "inputs": manifest.get("inputs"),
                    "created": manifest.get("created") or time.time()})
            published = store.publish(staging / "library", None, paths, manifest)
        finally:
            store.remove_staging(staging)
        return paths, published

    def pull_private(self, req: BuildRequest, backend: Backend,
                     job: Callable[[], AbstractContextManager[Any]]
                     ) -> tuple[EntryPaths, dict[str, Any]] | None:
        """For READONLY, which writes to no cache: the remote entry that fits ``req``,
        downloaded into this process's private temporary directory (so a read-only cache
        directory still works); None if there is none."""
        with self._lock:
            found = self._private.get(req.digest)
        if found is not None and found[0].library.is_file() and self.fits(req, backend)(
                found[1]):
            return found
        entry = self.select(req, backend, self.fits(req, backend))
        if entry is None or entry.manifest is None:
            return None
        variant = entry.entry_digest != req.digest
        paths = backend.locate(req, self._private_root(), entry.entry_digest if variant
                               else None)
        paths.library.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            paths.library.unlink()
        with job():
            manifest = self.download(entry, paths.library)
        if manifest is None:
            return None
        manifest = {**manifest, "digest": entry.manifest["digest"],
                    "sha256": entry.manifest["sha256"], "size": entry.manifest["size"]}
        with self._lock:
            self._private[req.digest] = (paths, manifest)
        return paths, manifest

    def _private_root(self) -> Path:
        with self._lock:
            if self._private_dir is None:
                self._private_dir = Path(tempfile.mkdtemp(prefix="mlcjit-remote-"))
                atexit.register(shutil.rmtree, self._private_dir, True)
            return self._private_dir

    # -- writing -------------------------------------------------------------------------
    def upload(self, req: BuildRequest, entry_digest: str, library: Path,
               manifest: Mapping[str, Any], *, replace: bool) -> bool:
        """Upload a freshly published local entry (``readwrite`` only); ``replace`` for
        REDO. True if this process published it."""
        if not self.writes or self.down is not None:
            return False
        body = {k: v for k, v in manifest.items() if k not in ("log", "remote")}
        done = False
        with self.guard(f"uploading {req.describe}"):
            done = self.remote.upload(req.digest, entry_digest, library, body, replace=replace)
        if done:
            with self._lock:
                self.stats["uploads"] += 1
                self.stats["upload_bytes"] += int(manifest["size"])
        return done


def merge_remote_stats(total: dict[str, Any], other: Mapping[str, Any]) -> None:
    """Add another process's remote statistics to ``total``."""
    for name, value in other.items():
        if name == "warnings":
            total.setdefault("warnings", [])
            total["warnings"] += [w for w in value if w not in total["warnings"]]
        elif isinstance(value, int | float):
            total[name] = total.get(name, 0) + value
