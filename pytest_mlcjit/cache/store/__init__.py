"""Where libraries are kept: every tier behind one interface (:class:`.interface.Store`).

* :mod:`.interface`: the seam: ``Store``, ``EntryQuery``, the typed lookup results;
* :mod:`.local`: one cache root on this machine (with :mod:`.staging`, :mod:`.records`);
* :mod:`.readonly`: the read-only view of a store (READONLY); :mod:`.unwritable`: that
  of a directory that cannot be written, under a policy that writes (its hits served);
* :mod:`.tiered`: the local store, then a remote (download, backfill, upload), with
  :mod:`.remote_policy` (failures, refused entries, the load check's interface) and
  :mod:`.remote_stats` (what the remote did in the run);
* :mod:`.remote`: the remotes themselves, one adapter per kind (``s3``, ``file``).

:class:`Stores` makes the stores of one run; the engine asks it for the store of a
request (its cache root, and whether its policy writes) and holds nothing else.
"""

from __future__ import annotations

import threading
from pathlib import Path

from pytest_mlcjit._util.fs import WriteWarnings
from pytest_mlcjit.cache.store.interface import Store
from pytest_mlcjit.cache.store.local import LocalStore
from pytest_mlcjit.cache.store.readonly import ReadOnlyStore
from pytest_mlcjit.cache.store.remote import RemoteOptions
from pytest_mlcjit.cache.store.remote_policy import LoadCheck
from pytest_mlcjit.cache.store.remote_stats import RemoteStats
from pytest_mlcjit.cache.store.tiered import Announce, RemoteTier, TieredStore
from pytest_mlcjit.cache.store.unwritable import UnwritableStore
from pytest_mlcjit.inputs.check import InputChecker


class Stores:
    """The stores of one run: one per cache root and kind (taking writes or not), sharing
    the run's remote tier (opened on first use), write warnings and input checker.
    ``load_check`` (from the engine: the cache starts no process) checks what the remote
    tier uploads, and downloads recorded unchecked; ``worker``: this process's name in the
    run (its record of the remote entries it used); ``announce``: tells of each upload."""

    def __init__(self, *, allow_untrusted: bool = False, warnings: WriteWarnings | None = None,
                 checker: InputChecker | None = None, remote: str | None = None,
                 remote_mode: str = "readwrite", remote_required: bool = False,
                 remote_options: RemoteOptions | None = None,
                 remote_stats: RemoteStats | None = None, load_check: LoadCheck | None = None,
                 worker: str = "main", announce: Announce | None = None) -> None:
        self.allow_untrusted = allow_untrusted
        self._announce = announce
        self.warnings = warnings or WriteWarnings()
        self.checker = checker or InputChecker()
        self._remote_args = (remote, remote_mode, remote_required, remote_options)
        self._remote_stats = remote_stats
        self._load_check = load_check
        self._worker = worker
        self._tier: RemoteTier | None = None
        self._stores: dict[tuple[Path, bool], Store] = {}
        self._lock = threading.RLock()

    def get(self, root: Path, *, writes: bool) -> Store:
        """The store of ``root`` for a request whose policy writes (or not)."""
        with self._lock:
            store = self._stores.get((root, writes))
            if store is None:
                store = self._stores[(root, writes)] = self._open(root, writes)
            return store

    def _open(self, root: Path, writes: bool) -> Store:
        local = LocalStore(root, allow_untrusted=self.allow_untrusted, warnings=self.warnings,
                           checker=self.checker)
        store: Store
        if writes:  # a directory that cannot be written serves its hits (UnwritableStore)
            reason = local.make_writable()
            store = local if reason is None else UnwritableStore(local, reason)
        else:
            if local.root.exists():
                local.check_trusted()
            store = ReadOnlyStore(local)
        tier = self.tier()
        return store if tier is None else TieredStore(store, tier, checker=self.checker)

    def tier(self) -> RemoteTier | None:
        """The run's remote tier, opened on first use; None without one."""
        url, mode, required, options = self._remote_args
        if url is None:
            return None
        with self._lock:
            if self._tier is None:
                self._tier = RemoteTier(url, mode=mode, required=required, options=options,
                                        stats=self._remote_stats,
                                        load_check=self._load_check, worker=self._worker,
                                        announce=self._announce)
            return self._tier

    @property
    def remote_stats(self) -> RemoteStats | None:
        """What the remote did in this run, once it was opened."""
        return None if self._tier is None else self._tier.stats

    def close(self) -> None:
        """The run is over: record the remote entries it used, remove its private
        downloads."""
        if self._tier is not None:
            self._tier.close()


__all__ = ["LocalStore", "ReadOnlyStore", "Store", "Stores", "TieredStore", "UnwritableStore"]
