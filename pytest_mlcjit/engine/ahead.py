"""Remote hits ahead of time: the engine's side of fetching, before the tests ask, the
libraries the remote tier has (:mod:`pytest_mlcjit.plugin.prefetch` decides which, in
which order and how many at once).

A fetch-ahead goes through the request's own store exactly as a request's fetch does (the
same listing, checks and local publish, or the run's private directory where the store
takes no writes), with the same locks: this run's lock of the key, then, where the store
takes writes, the key's lock in the store, so one process per machine downloads an entry.
A key that another thread or process holds is skipped at once (it is being compiled or
downloaded there), never waited for. A fetch-ahead never compiles (the compile prefetch
does, in its own order) and is not a request: its download is counted as a download, and
the requests that then find the library in the local cache as the remote hits they are
(the local manifest records the run that downloaded it: :func:`.stats.by_download`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pytest_mlcjit.cache.store.interface import Corrupt, Hit, Store
from pytest_mlcjit.engine.request import Query, RequestState
from pytest_mlcjit.errors import KeyBusy
from pytest_mlcjit.policy import Policy

if TYPE_CHECKING:
    from pytest_mlcjit.device import Device
    from pytest_mlcjit.engine.jit import JIT

#: What a fetch-ahead found: ``fetched`` (downloaded now), ``local`` (already in the
#: cache), ``busy`` (another thread or process holds the key), ``absent`` (no remote
#: entry fits, or the remote is down), ``skipped`` (nothing to fetch: no remote, a policy
#: that does not read the remote first, a damaged local entry the request will handle).
Fetched = Literal["fetched", "local", "busy", "absent", "skipped"]

#: The policies whose requests read the remote before they compile (REDO rebuilds).
READS_REMOTE = (Policy.ON, Policy.READONLY)


class FetchAhead:
    """Fetches ahead of time for the run of ``engine``; thread-safe."""

    def __init__(self, engine: JIT) -> None:
        self.engine = engine

    @property
    def has_remote(self) -> bool:
        """Whether the run has a remote tier to fetch from."""
        return self.engine.settings.remote is not None

    def fetch(self, spec: Any, device: Device | str | None = "cpu",
              policy: Policy | str | None = None) -> Fetched:
        """Download ``spec``'s library from the remote into the cache now, as a request
        with ``policy`` (default: the run's) would, without compiling and without waiting
        for a key another holds. A failure raises as the request's fetch would (the
        tier has reported it; the caller moves on, and the request meets it again)."""
        engine = self.engine
        pol = Policy.parse(policy) if policy is not None else engine.settings.policy
        if pol not in READS_REMOTE or engine.stores.tier() is None:
            return "skipped"
        state = RequestState(background=True, blocking=False)
        req = state.req = engine.request(spec, device, pol)
        store = engine.store_for(req, pol)
        try:
            with engine._holding_key(state, store):
                return self._fetch(state, engine.query(req), store)
        except KeyBusy:
            return "busy"

    def _fetch(self, state: RequestState, query: Query, store: Store) -> Fetched:
        engine = self.engine
        found = store.lookup(query)
        if isinstance(found, Hit):
            return "local"
        job = engine._download_job(state, store)
        if not store.writable:  # READONLY, or a cache directory that takes no writes
            fetched = store.fetch(query, job=job)  # into the run's private directory
            return "fetched" if isinstance(fetched, Hit) else "absent"
        if isinstance(found, Corrupt):
            return "skipped"  # the request quarantines it (and counts it), then fetches
        with engine._locked(state, store):  # KeyBusy: another process has it in hand
            if isinstance(store.lookup(query), Hit):
                return "local"
            fetched = store.fetch(query, job=job)
        return "fetched" if isinstance(fetched, Hit) else "absent"
