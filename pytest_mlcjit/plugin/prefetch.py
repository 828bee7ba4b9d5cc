"""Background prefetch: compile, before the tests ask, the libraries a run will need.

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
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import pytest

from pytest_mlcjit.engine.jit import JIT
from pytest_mlcjit.engine.schedule import expected_seconds, longest_first
from pytest_mlcjit.errors import MlcJitError
from pytest_mlcjit.plugin.plan import make_plan, planned_key

if TYPE_CHECKING:
    from pytest_mlcjit.compiler.backends import BuildRequest

#: After an interrupt, how long ``stop`` waits for the prefetch thread (it has nothing left
#: to do but remove its staging directory; a wait for another process's lock is given up).
INTERRUPTED_JOIN_S = 10.0


class Prefetcher:
    """Compiles the run's libraries in a daemon thread, longest first, each library no
    other worker is compiling at the time (``index`` and ``count``: this worker's place
    among the run's, kept for the record)."""

    def __init__(self, engine: JIT, index: int = 0, count: int = 1) -> None:
        self.engine = engine
        self.index, self.count = index, count
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: While the thread runs: a SIGINT stops its compile at once (runner.kill_all).
        self._sigint = contextlib.ExitStack()
        self.planned = 0

    def start(self, items: list[pytest.Item]) -> None:
        plan = make_plan(items, self.engine)
        # Only libraries a test may compile: its own policy (mlc_jit_policy marker) decides,
        # as it does every write of its request; a READONLY test's library is not built.
        reqs = [req for req, tests in plan.libraries.values()
                if any(_writes(item, self.engine) for item in tests)]
        self.planned = len(reqs)
        if reqs:
            self._sigint = contextlib.ExitStack()
            self._sigint.enter_context(self.engine.interrupting_on_sigint())
            self._thread = threading.Thread(target=self._run, args=(reqs,),
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

    def _run(self, reqs: list[BuildRequest]) -> None:
        for req in self.order(reqs):
            if self._stop.is_set():
                return
            try:
                self.engine.prefetch(req.spec, req.device)  # False: another compiles it
            except MlcJitError:
                pass  # remembered for this run: the test that needs it reports it
            except KeyboardInterrupt:  # stopped by an interrupt (JIT.interrupt)
                return

    def stop(self, *, interrupted: bool = False) -> None:
        """Start no further compiles, and wait for the one in flight (others may need
        it); ``interrupted`` (the run was interrupted): stop it instead, its whole process
        tree, and wait only for its staging directory to be removed."""
        self._stop.set()
        self._sigint.close()
        if interrupted:
            self.engine.interrupt()
        if self._thread is not None:
            self._thread.join(timeout=INTERRUPTED_JOIN_S if interrupted
                              else self.engine.settings.compile_timeout + 60)


def _writes(item: pytest.Item, engine: JIT) -> bool:
    planned = item.stash.get(planned_key, None)
    policy = planned[2] if isinstance(planned, tuple) else None
    return (policy or engine.settings.policy).writes
