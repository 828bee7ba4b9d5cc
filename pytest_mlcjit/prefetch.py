"""Background prefetch: compile, before the tests ask, the libraries a run will need.

Compiling on demand makes xdist workers wait on each other: they all start on the same
tests, so they all need the same first library, and one compiles while the others wait.
After collection, every worker computes the same list of distinct libraries (each
worker collects every test), ordered by first use, and takes a deterministic share:
library *j* goes to worker *j* mod *W*. A background thread compiles that share in
order. The key's lock keeps this single-flight: a test that needs a library another
worker is still compiling waits for it, and never compiles it twice.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import pytest

from .engine import JIT
from .errors import MlcJitError
from .plan import make_plan


def my_share(libraries: list[Any], index: int, count: int) -> list[Any]:
    """Library *j* (in first-use order) belongs to worker *j* mod *count*."""
    return [lib for j, lib in enumerate(libraries) if j % count == index]


class Prefetcher:
    """Compiles one worker's share of the run's libraries in a daemon thread."""

    def __init__(self, engine: JIT, index: int = 0, count: int = 1) -> None:
        self.engine = engine
        self.index, self.count = index, count
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.planned = 0

    def start(self, items: list[pytest.Item]) -> None:
        plan = make_plan(items, self.engine)
        jobs = [(req.spec, req.device) for req, _ in plan.libraries.values()]
        mine = my_share(jobs, self.index, self.count)
        self.planned = len(mine)
        if mine:
            self._thread = threading.Thread(target=self._run, args=(mine,),
                                            name="mlcjit-prefetch", daemon=True)
            self._thread.start()

    def _run(self, jobs: list[tuple[Any, Any]]) -> None:
        for spec, device in jobs:
            if self._stop.is_set():
                return
            # A failure is remembered for this run: the test that needs it reports it.
            with contextlib.suppress(MlcJitError):
                self.engine.compile(spec, device, background=True)

    def stop(self) -> None:
        """Start no further compiles; wait for the one in flight (others may need it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.engine.settings.compile_timeout + 60)
