"""Background prefetch: compile, before the tests ask, the libraries a run will need, and
download those the remote tier has.

Compiling on demand makes xdist workers wait on each other: they all start on the same
tests, so they all need the same first library, and one compiles while the others wait.
After collection, every worker computes the list of distinct libraries (each worker
collects every test), longest expected compile first (:mod:`.schedule`: the compile
times this cache recorded; first-use order where it has none), and a background thread
walks it: a free worker takes the next library no one holds. A library whose key
another worker (or this worker's test) holds now is being compiled there: it is skipped
at once (:meth:`.engine.JIT.prefetch`), never waited for, so no worker idles while a
library is left. The key's lock keeps this single-flight: a test that needs a library
another worker is still compiling waits for it, and never compiles it twice.

**Remote hits ahead of time.** With a remote tier, the same list is first fetched from the
remote (:mod:`.engine.ahead`), ``MLC_JIT_REMOTE_AHEAD`` libraries at once (default 4), in
every run that reads the remote (READONLY too, into the run's private directory), with or
without xdist: one download per library and machine (the key's locks again: a key another
process holds is skipped at once), none of it counted as a request. The first library
the tests use is fetched before they start (the first test would wait for it anyway), so
that a remote that does not answer costs the run one timeout, not one per download in
flight; the others are fetched in the background. A fetch-ahead never compiles; the
compile walk keeps its order and compiles only what the remote did not have: before each
library it waits for that library's fetch to be decided (a listing, where the remote
lacks it), so it never downloads what a fetch-ahead is downloading, and never compiles
what the remote has.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import TYPE_CHECKING

import pytest

from pytest_mlcjit.engine.ahead import READS_REMOTE, FetchAhead, Fetched
from pytest_mlcjit.engine.jit import JIT
from pytest_mlcjit.engine.schedule import expected_seconds, longest_first
from pytest_mlcjit.errors import MlcJitError
from pytest_mlcjit.plugin.plan import make_plan, planned_key
from pytest_mlcjit.policy import Policy

if TYPE_CHECKING:
    from pytest_mlcjit.compiler.backends import BuildRequest

#: After an interrupt, how long ``stop`` waits for the prefetch thread (it has nothing left
#: to do but remove its staging directory; a wait for another process's lock is given up).
INTERRUPTED_JOIN_S = 10.0

#: A library the remote may have, and the policy to fetch it with.
Fetch = tuple["BuildRequest", Policy]


class Prefetcher:
    """Fetches the run's remote hits (``downloads`` at once; 0: none) and compiles the run's
    libraries (``compiles``) in daemon threads, longest first, each library no other
    worker holds at the time (``index`` and ``count``: this worker's place among the
    run's, kept for the record)."""

    def __init__(self, engine: JIT, index: int = 0, count: int = 1, *,
                 compiles: bool = True, downloads: int = 0) -> None:
        self.engine = engine
        self.index, self.count = index, count
        self.compiles, self.downloads = compiles, downloads
        self.ahead = FetchAhead(engine)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: While the thread runs: a SIGINT stops its compile at once (runner.kill_all).
        self._sigint = contextlib.ExitStack()
        #: Libraries the compile walk may compile, and those fetched ahead.
        self.planned = self.fetching = 0
        #: Set once a library's fetch-ahead is over, with what it found.
        self._decided: dict[str, threading.Event] = {}
        self._found: dict[str, Fetched] = {}

    def start(self, items: list[pytest.Item]) -> None:
        engine = self.engine
        plan = make_plan(items, engine)
        wanted: list[BuildRequest] = []
        compiled: set[str] = set()
        reads: dict[str, Policy] = {}
        for req, tests in plan.libraries.values():
            # Only libraries a test may compile: its own policy (mlc_jit_policy marker)
            # decides, as it does every write of its request; a READONLY test's library is
            # not built, but fetched ahead (into the run's private directory) as it reads.
            if self.compiles and any(_policy(item, engine).writes for item in tests):
                compiled.add(req.digest)
            policies = {_policy(item, engine) for item in tests}
            reading = next((p for p in READS_REMOTE if p in policies), None)
            if reading is Policy.READONLY and self.count > 1:
                # Into each worker's private directory: every worker would download every
                # library; on demand, each downloads only what its own tests use.
                reading = None
            if self.downloads > 0 and self.ahead.has_remote and reading is not None:
                reads[req.digest] = reading
                self._decided[req.digest] = threading.Event()
            if req.digest in compiled or req.digest in reads:
                wanted.append(req)
        self.planned, self.fetching = len(compiled), len(reads)
        if reads:  # the first library the tests use: here, before they start (see _run)
            first = next(req for req in wanted if req.digest in reads)
            self._fetch_one(first, reads.pop(first.digest))
        if compiled:  # (SIGINT: the downloads have no process to stop)
            self._sigint = contextlib.ExitStack()
            self._sigint.enter_context(engine.interrupting_on_sigint())
        if compiled or reads:
            self._thread = threading.Thread(target=self._run, args=(wanted, compiled, reads),
                                            name="mlcjit-prefetch", daemon=True)
            self._thread.start()

    def order(self, reqs: list[BuildRequest]) -> list[BuildRequest]:
        """``reqs`` (in first-use order), longest expected compile first."""
        policy = self.engine.settings.policy
        expected = []
        for req in reqs:
            try:
                expected.append(expected_seconds(self.engine.query(req), req,
                                                 self.engine.store_for(req, policy)))
            except MlcJitError:
                expected.append(None)
        return longest_first(reqs, expected)

    def _run(self, wanted: list[BuildRequest], compiled: set[str],
             reads: dict[str, Policy]) -> None:
        """Download ``reads`` (all but the first library the tests use, which :meth:`start`
        fetched before any test could ask: a remote that does not answer then costs the
        run one timeout, as without fetching ahead, not one per download in flight), at
        most :attr:`downloads` at once, while the compile walk compiles ``compiled``."""
        ordered = self.order(wanted)
        pending: queue.SimpleQueue[Fetch] = queue.SimpleQueue()
        for req in ordered:
            if req.digest in reads:
                pending.put((req, reads[req.digest]))
        fetchers = [threading.Thread(target=self._fetch, args=(pending,), daemon=True,
                                     name=f"mlcjit-fetch-ahead-{i}")
                    for i in range(min(self.downloads, len(reads)))]
        for thread in fetchers:
            thread.start()
        try:
            self._compile([req for req in ordered if req.digest in compiled])
        finally:
            for thread in fetchers:
                thread.join()

    def _fetch(self, pending: queue.SimpleQueue[Fetch]) -> None:
        """Fetch ahead the next library of ``pending`` until none is left (or stopped)."""
        while not self._stop.is_set():
            try:
                req, policy = pending.get_nowait()
            except queue.Empty:
                return
            self._fetch_one(req, policy)

    def _fetch_one(self, req: BuildRequest, policy: Policy) -> None:
        found: Fetched = "absent"
        try:
            found = self.ahead.fetch(req.spec, req.device, policy)
        except (MlcJitError, OSError):
            pass  # reported by the tier; the test that needs it meets it again
        except KeyboardInterrupt:  # a load check stopped by the run's interrupt
            pass
        finally:
            self._found[req.digest] = found
            self._decided[req.digest].set()

    def _compile(self, reqs: list[BuildRequest]) -> None:
        for req in reqs:
            decided = self._decided.get(req.digest)
            if decided is not None:  # fetched ahead: compile only what the remote lacks
                decided.wait()
                if self._found.get(req.digest) in ("fetched", "local"):
                    continue
            if self._stop.is_set():
                return
            try:
                self.engine.prefetch(req.spec, req.device)  # False: another compiles it
            except MlcJitError:
                pass  # remembered for this run: the test that needs it reports it
            except KeyboardInterrupt:  # stopped by an interrupt (JIT.interrupt)
                return

    def stop(self, *, interrupted: bool = False) -> None:
        """Start no further compiles or downloads, and wait for those in flight (others
        may need them); ``interrupted`` (the run was interrupted): stop the compile
        instead, its whole process tree, and wait only a while for its staging directory
        to be removed and the downloads in flight to end (each removes what it wrote
        unless it completes; a stalled one is bounded by the remote's deadline)."""
        self._stop.set()
        for decided in self._decided.values():
            decided.set()  # the compile walk waits for none
        self._sigint.close()
        if interrupted:
            self.engine.interrupt()
        if self._thread is not None:
            self._thread.join(timeout=INTERRUPTED_JOIN_S if interrupted
                              else self.engine.settings.compile_timeout + 60)


def _policy(item: pytest.Item, engine: JIT) -> Policy:
    """The policy of ``item``'s request: its own (mlc_jit_policy marker), else the run's."""
    planned = item.stash.get(planned_key, None)
    policy = planned[2] if isinstance(planned, tuple) else None
    return policy or engine.settings.policy
