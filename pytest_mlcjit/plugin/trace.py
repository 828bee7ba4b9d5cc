"""The run's timeline (``--mlc-jit-trace PATH``), as Chrome trace-event JSON: it opens in
Perfetto (ui.perfetto.dev) and ``chrome://tracing``.

Each pytest process records its own events: the jobs its run's :class:`~..engine.activity.Board`
ended (compiles, downloads, waits for another's compile, waits for the GPU lock), each on
the track of the thread that ran it (the main thread, the prefetch thread, the fetch-ahead
threads), and each test's setup and call. Times are ``time.time()`` (one clock for every
process of the run on this host). An xdist worker sends its events to the controller in
``workeroutput`` (as it sends its statistics); the controller (or the one process without
xdist) merges them, makes the times microseconds since the run's start, and writes PATH at
its end, atomically, with whatever it has: a run stopped with Ctrl-C leaves valid JSON too.

One process (an xdist worker, ``gw0``…, or ``main``) is one ``pid``; its threads are its
``tid``\\ s, named by metadata events (``ph`` ``M``). Every other event is a complete event
(``ph`` ``X``, ``ts`` and ``dur`` in microseconds).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Generator, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from pytest_mlcjit._util.fs import read_json, write_json_atomic
from pytest_mlcjit.plugin.session import RunState

#: Fixed thread ids, so that every process's tracks sort the same way.
_TIDS = {"MainThread": (1, "main"), "mlcjit-prefetch": (2, "prefetch")}
_FETCH_AHEAD = "mlcjit-fetch-ahead-"
#: The most bytes a worker's part left on the board is read from.
PART_BYTES = 256 << 20
#: Job kinds, as the trace names them.
_KINDS = {"gpu": "GPU lock"}


class Tracer:
    """This process's events (a pytest plugin, registered when ``--mlc-jit-trace`` is set)."""

    def __init__(self, config: pytest.Config, state: RunState) -> None:
        self.config = config
        self.state = state
        self.worker = state.worker
        self._lock = threading.Lock()
        self._events: list[dict[str, Any]] = []
        self._threads: dict[str, tuple[int, str]] = {}
        self._parts: list[Mapping[str, Any]] = []  # the workers' (controller)
        self._written = False

    # -- recording --------------------------------------------------------------------------
    def _tid(self) -> int:
        name = threading.current_thread().name
        with self._lock:
            if name not in self._threads:
                if name in _TIDS:
                    self._threads[name] = _TIDS[name]
                elif name.startswith(_FETCH_AHEAD) and name[len(_FETCH_AHEAD):].isdigit():
                    n = int(name[len(_FETCH_AHEAD):])
                    self._threads[name] = (10 + n, f"fetch-ahead {n}")
                else:
                    self._threads[name] = (100 + len(self._threads), name)
            return self._threads[name][0]

    def add(self, name: str, cat: str, start: float, end: float, args: dict[str, Any]) -> None:
        """Record a span of this thread (``start``/``end``: ``time.time()``)."""
        event = {"name": name, "cat": cat, "start": start, "end": max(start, end),
                 "tid": self._tid(), "args": args}
        with self._lock:
            self._events.append(event)

    def job(self, job: Mapping[str, Any]) -> None:
        """A job the board ended (called in the thread that ran it)."""
        kind = str(job.get("kind", "job"))
        args = {k: job[k] for k in ("model", "target", "digest", "root", "outcome", "rc",
                                    "background") if job.get(k) is not None}
        what = f"{job.get('model', '')} ({job['target']})" if job.get("target") and \
            kind != "gpu" else str(job.get("model", ""))
        self.add(f"{_KINDS.get(kind, kind)} {what}".strip(), kind,
                 float(job["started"]), float(job.get("ended") or time.time()), args)

    def _phase(self, item: pytest.Item, when: str) -> Generator[None, object, object]:
        start = time.time()
        try:
            return (yield)
        finally:
            self.add(f"{when} {item.name}", when, start, time.time(), {"nodeid": item.nodeid})

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._phase(item, "setup"))

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, object, object]:
        return (yield from self._phase(item, "call"))

    def part(self) -> dict[str, Any]:
        """This process's events, as plain data (what a worker sends)."""
        with self._lock:
            return {"pid": os.getpid(), "worker": self.worker, "events": list(self._events),
                    "threads": {str(tid): name for tid, name in self._threads.values()}}

    # -- the hand-off and the file ----------------------------------------------------------
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:
            part = workeroutput["mlcjit_trace"] = self.part()
            # Also on the run's board: an interrupted run's controller may never get the
            # workeroutput, but reads this file once its workers have stopped.
            board, run_id = self.state.progress_board(), self.state.options.run_id
            if board is not None and run_id:
                with contextlib.suppress(OSError):
                    write_json_atomic(Path(board) / f".trace-{run_id}-{os.getpid()}.json", part)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        part = getattr(node, "workeroutput", {}).get("mlcjit_trace")
        if isinstance(part, Mapping):
            self._parts.append(part)

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.write()

    def write(self) -> None:
        """Write the merged trace (controller, or without xdist), once."""
        path = self.state.options.trace_path
        if self._written or path is None or hasattr(self.config, "workeroutput"):
            return
        self._written = True
        parts = [self.part(), *self._parts, *self._left_on_board()]
        started = self.state.started or min(
            (e["start"] for p in parts for e in p["events"]), default=time.time())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, document(parts, started))
        except OSError as exc:
            self.state.warnings.failed(path, "write the trace to", exc)

    def _left_on_board(self) -> list[Mapping[str, Any]]:
        """The parts the workers left on the board that did not come in ``workeroutput``
        (an interrupted run); every part file of this run is removed."""
        board, run_id = self.state.progress_board(), self.state.options.run_id
        if board is None or not run_id:
            return []
        got = {p.get("pid") for p in self._parts}
        found: list[Mapping[str, Any]] = []
        for path in Path(board).glob(f".trace-{run_id}-*.json"):
            part = read_json(path, PART_BYTES)
            with contextlib.suppress(OSError):
                path.unlink()
            if isinstance(part, dict) and part.get("pid") not in got \
                    and isinstance(part.get("events"), list):
                found.append(part)
        return found


#: The first tid of the compile worker's tracks (one per compile running at once).
COMPILE_WORKER_TID = 50


def _compile_worker_spans(events: Iterable[Mapping[str, Any]], threads: dict[int, str]
                          ) -> list[dict[str, Any]]:
    """The compiles of one process as its compile worker ran them: each compile runs in a
    process of its own (a fork of the warm compile worker, or a fresh interpreter), shown on
    the lowest ``compile worker N`` track free when it started; the thread that asked for
    it keeps its own span (what it waited for). Adds the tracks' names to ``threads``."""
    spans: list[dict[str, Any]] = []
    lanes: list[float] = []  # each track's last end
    for e in sorted((e for e in events if e.get("cat") == "compile"),
                    key=lambda e: float(e["start"])):
        lane = next((i for i, end in enumerate(lanes) if end <= float(e["start"])),
                    len(lanes))
        if lane == len(lanes):
            lanes.append(0.0)
            threads[COMPILE_WORKER_TID + lane] = f"compile worker {lane}"
        lanes[lane] = float(e["end"])
        spans.append({**e, "name": f"compiling {e['name'].removeprefix('compile ')}",
                      "cat": "compile-worker", "tid": COMPILE_WORKER_TID + lane})
    return spans


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def document(parts: Iterable[Mapping[str, Any]], started: float) -> dict[str, Any]:
    """The trace-event JSON of the processes' ``parts``, times from ``started``."""
    events: list[dict[str, Any]] = []
    for part in parts:
        pid, worker = int(part["pid"]), str(part["worker"])
        if not part["events"]:
            continue
        order = int(worker[2:]) + 1 if worker[2:].isdigit() else 0
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "ts": 0,
                       "args": {"name": f"{worker} (pid {pid})"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                       "ts": 0, "args": {"sort_index": order}})
        threads = {int(tid): str(name) for tid, name in part["threads"].items()}
        spans = list(part["events"]) + _compile_worker_spans(part["events"], threads)
        for tid, name in threads.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": int(tid),
                           "ts": 0, "args": {"name": name}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid,
                           "tid": int(tid), "ts": 0, "args": {"sort_index": int(tid)}})
        for e in spans:
            ts = _us(e["start"] - started)
            events.append({"ph": "X", "name": e["name"], "cat": e["cat"], "ts": ts,
                           "dur": _us(e["end"] - started) - ts, "pid": pid, "tid": e["tid"],
                           "args": e["args"]})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "pytest-mlcjit", "started": started}}
