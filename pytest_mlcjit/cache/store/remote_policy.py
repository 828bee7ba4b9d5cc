"""What the run's remote tier does when the remote fails or holds something wrong: the base
of :class:`.tiered.RemoteTier` (the adapter, the statistics, the failure policy), as
sccache and ccache users asked for it:

* authentication and permission errors on a read always fail the request (they are never
  a miss); an upload refused for permission while reads work (read-only credentials) is
  warned once and the rest of the run only reads (it fails with ``--mlc-jit-remote-required``);
* any other error (connection, timeout, an operation past its deadline, throttling, server
  error) fails the request with ``--mlc-jit-remote-required``; otherwise it is reported
  once, the remote is marked down for the rest of the run, and the library is compiled
  locally. The first process of the run to find it down tells the others (a file in the
  run's board directory: :attr:`.RemoteOptions.run_dir`), so the run waits out one timeout;
* a remote object whose digest or signature is wrong is reported and never loaded; one that
  is not a usable manifest is skipped and counted (:class:`RemoteStats`: one line however
  many); a full disk during a download is reported and the library compiled instead;
* no write is dropped silently: every upload that could not be made (the remote failed or
  refused it, was down or read-only by then, the library failed its load check or the
  check could not run, an interrupt or a local error stopped it) is counted as a write
  not made, with its reason (:meth:`RemoteStats.write_not_made`);
* a refused entry is set aside on the remote (:meth:`RemotePolicy.set_aside`) by a job
  that writes, so the library compiled instead can be published in its place.

The load check's interface is here too (:data:`LoadCheck`, :class:`LoadResult`): the
engine injects the check (the cache starts no process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import read_json, write_json_atomic
from pytest_mlcjit.cache.store.remote import Remote, RemoteOptions, open_remote
from pytest_mlcjit.cache.store.remote.base import RemoteEntry
from pytest_mlcjit.cache.store.remote.entries import manifest_problem
from pytest_mlcjit.cache.store.remote_stats import RemoteStats
from pytest_mlcjit.errors import (
    RemoteAuthError,
    RemoteConfigError,
    RemoteError,
    RemoteIntegrityError,
    RemoteUnavailableError,
)
from pytest_mlcjit.key import sha256_digest

REMOTE_MODES = ("read", "readwrite")
#: How long a run's "remote down" file is kept (a later run that finds it down removes it).
MARKER_KEPT_S = 86400.0


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What a load check found: ``ok``; ``detail``: what was checked, or why it failed;
    ``at_fault``: (not ok) the library failed, rather than the check itself (it could not
    run); ``seconds``: how long it took."""

    ok: bool
    detail: str
    at_fault: bool = True
    seconds: float = 0.0


#: Loads a library in a process of its own and checks it against its manifest (the
#: engine's :class:`pytest_mlcjit.compiler.loadcheck.LoadChecker`).
LoadCheck = Callable[[Path, Mapping[str, Any]], LoadResult]


class RemotePolicy:
    """One remote for one run, and what happens when it fails (see the module's doc);
    thread-safe. ``mode`` ``read`` never uploads."""

    def __init__(self, url: str, *, mode: str = "readwrite", required: bool = False,
                 options: RemoteOptions | None = None, remote: Remote | None = None,
                 stats: RemoteStats | None = None) -> None:
        self.mode = mode
        self.required = required
        self.remote = remote or open_remote(url, options)
        self.url = self.remote.url
        #: Why the remote is down for the rest of this run (None: usable), and the error
        #: that put it down (raised again for every later use when the remote is required).
        self.down: str | None = None
        self._down_error: RemoteError | None = None
        #: Whether a read was refused (bad credentials: an upload refused too fails).
        self._read_refused = False
        #: Why uploads stopped in this run (the remote refused one), once they did.
        self.demoted: str | None = None
        self.stats = stats if stats is not None else RemoteStats()
        self._lock = threading.Lock()
        #: Downloads refused in this run (by location and SHA-256), and why: not
        #: downloaded again (a fetch ahead, then the request).
        self._refusals: dict[tuple[str, object], str] = {}
        opts = options or self.remote.options
        self.run_id = opts.run_id
        #: Where the processes of this run tell one another that the remote is down (the
        #: run's directory, a file per run and remote), so that it costs one timeout.
        self._marker = None if not (opts.run_dir and opts.run_id) else Path(
            opts.run_dir, f".remote-down-{opts.run_id}-{sha256_digest(self.url)[:16]}.json")

    @property
    def writes(self) -> bool:
        return self.mode == "readwrite"

    def warn(self, message: str) -> None:
        with self._lock:
            self.stats.note(message)

    def not_made(self, why: str) -> None:
        """Count an upload that could not be made (a write not made), with why."""
        with self._lock:
            self.stats.write_not_made(why)

    @contextlib.contextmanager
    def guard(self, what: str, *, upload: bool = False) -> Iterator[None]:
        """Apply the failure policy to a remote operation (see the module's docstring)."""
        try:
            yield
        except RemoteIntegrityError as exc:
            with self._lock:
                self.stats.errors += 1
            self.warn(f"{what}: {exc} (not loaded)")
            if self.required:
                raise
        except RemoteAuthError as exc:
            with self._lock:
                self.stats.errors += 1
                if not upload:
                    self._read_refused = True
            if not upload or self._read_refused or self.required:
                raise
            # Credentials that read but may not write (the default mode is readwrite):
            # the library is fine; the rest of this run only reads.
            self.mode = "read"
            self.demoted = self.demoted or f"the remote refused an upload: {exc}"
            with self._lock:
                self.stats.refused_upload(
                    f"remote {self.url} refused an upload ({what}): {exc}; this run only "
                    "reads from it from now on (set --mlc-jit-remote-mode=read for "
                    "read-only credentials, or --mlc-jit-remote-required to fail instead)")
        except RemoteError as exc:
            self._went_down(exc, f"remote {self.url} failed while {what}: {exc}; it is not "
                            "used for the rest of this run (pass --mlc-jit-remote-required "
                            "to fail instead)")
            if self.required:
                raise

    def _went_down(self, exc: RemoteError, message: str, *, told: bool = False) -> None:
        """The remote is down for the rest of this run: say so once (the run's first
        process to find it down also tells the others, unless ``told`` by one)."""
        with self._lock:
            self.stats.errors += not told
            first = self.down is None
            self.down = self.down or str(exc)
            self._down_error = self._down_error or exc
            if not self.required:
                self.stats.went_down(message)
        if first and not told and self._marker is not None:
            with contextlib.suppress(OSError):
                write_json_atomic(self._marker, {"error": str(exc), "class": type(exc).__name__,
                                                 "message": message})
                for old in self._marker.parent.glob(".remote-down-*.json"):  # earlier runs'
                    if old.stat().st_mtime < time.time() - MARKER_KEPT_S:
                        old.unlink()

    def _told_down(self) -> None:
        """Take the remote as down when another process of this run found it so."""
        if self._marker is None or not self._marker.exists():
            return
        data = read_json(self._marker)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str)
                                                 for k in ("error", "class", "message")):
            return
        cls = {c.__name__: c for c in (RemoteUnavailableError, RemoteConfigError)}.get(
            data["class"], RemoteError)
        self._went_down(cls(data["error"]), data["message"], told=True)

    def usable(self) -> bool:
        """Whether to use the remote now: not when it is down (found so here or by another
        process of the run), and then, when it is required, the error that put it down is
        raised again (every request that would have used it fails, not only the first)."""
        if self.down is None:
            self._told_down()
        if self.down is None:
            return True
        if self.required and self._down_error is not None:
            raise type(self._down_error)(str(self._down_error))
        return False

    # -- refused entries -----------------------------------------------------------------
    def refuse(self, entry: RemoteEntry, why: str, refused: list[str] | None, *,
               writer: bool) -> None:
        """A downloaded entry failed its digest or its load check: counted, its reason
        kept for the miss (``refused``), and, in a job that writes (``writer``), set
        aside on the remote."""
        with self._lock:
            self.stats.downloads_refused += 1
            self._refusals[refusal_key(entry)] = why
        if refused is not None:
            refused.append(why)
        if writer:
            self.set_aside(entry, why)

    def refused_before(self, entry: RemoteEntry) -> str | None:
        """Why this run refused ``entry``'s download before, if it did."""
        with self._lock:
            return self._refusals.get(refusal_key(entry))

    def set_aside(self, entry: RemoteEntry, why: str) -> None:
        """Move a refused remote entry aside (``quarantine/`` on the remote), so that the
        library compiled instead can be published in its place; said either way. Only in a
        job that writes, while the remote is up; a failure here is a warning."""
        if not self.writes or self.down is not None:
            return
        try:
            where = self.remote.quarantine(entry, why)
        except RemoteError as exc:
            self.warn(f"could not set aside the refused remote entry {entry.location}: {exc}")
            return
        with self._lock:
            self.stats.quarantined += 1
        self.warn(f"set aside the refused remote entry {entry.location} (now {where}): "
                  f"{why}")


#: What :mod:`.remote.signing` says of a signature no writer could have made honestly:
#: none, forged or tampered with. (A valid signature by a key this job does not trust may
#: be another writer's, a revoked one's: left in place, refused, never set aside.)
_FORGED = ("is unsigned", "malformed signature", "does not match")


def badly_signed(entry: RemoteEntry) -> bool:
    """Whether a refused entry's only problem is a signature that is missing, malformed or
    does not match its content (its manifest is otherwise a usable one of its name)."""
    return (entry.manifest is not None and entry.problem is not None
            and any(word in entry.problem for word in _FORGED)
            and manifest_problem(entry.manifest, entry.key_digest, entry.entry_digest) is None)


def refusal_key(entry: RemoteEntry) -> tuple[str, object]:
    return entry.location, (entry.manifest or {}).get("sha256")
