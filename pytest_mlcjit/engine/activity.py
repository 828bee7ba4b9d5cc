"""What a run's process is doing that can take long: compiling a library, downloading
one, waiting for another's compile. The engine announces each such *job* on its run's
:class:`Board` (:meth:`Board.doing`); the live display (:mod:`pytest_mlcjit.plugin.progress`)
reads them.

How jobs reach the display. Within a process, from memory. Across processes, through a
*board directory*: a directory private to the user (``$TMPDIR/pytest-mlcjit-<uid>``,
mode 0700) in which each pytest process that started a job keeps one small JSON file,
``<pid>.json``, rewritten atomically (a temporary file, then ``os.replace``) whenever one of
its jobs starts or ends::

    {"pid": 4242, "host": "ci-7", "worker": "gw1", "run_id": "…",
     "jobs": [{"id": 3, "kind": "compile", "model": "mlp-hidden=128", "target": "llvm",
               "digest": "…", "root": "/cache", "started": 1700000000.0,
               "background": false}, …]}

An xdist worker reports to its controller this way (the controller reads the files whose
``run_id`` is its run's), and a process waiting for a key's lock finds there which worker
of which run is compiling it. Nothing goes into the cache (READONLY writes nothing), no
worker writes to the terminal, and a job's start time is all the display needs.

Each run has its own board object (a second run in the same process starts from none of
the first's jobs). Cheap: a job costs two small file writes when the board publishes,
and nothing but a dict in memory otherwise (plain :func:`pytest_mlcjit.jit`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import WriteWarnings, read_json
from pytest_mlcjit.cache.locks import pid_alive

#: Ended jobs kept in a process's record, so that a reader polling it sees them end.
ENDED_KEPT = 16
#: The file of a process that is gone is removed when it is this old (seconds).
STALE_S = 60.0
#: The most bytes a process record is read from.
RECORD_BYTES = 1 << 20

Job = dict[str, Any]


def default_board() -> Path | None:
    """``$TMPDIR/pytest-mlcjit-<uid>`` (made, mode 0700), or None when it is not ours
    alone: another owner, open to others, or a symlink."""
    path = Path(tempfile.gettempdir()) / f"pytest-mlcjit-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


class Board:
    """The jobs of one run in this process, and where they are published.

    ``directory``: the board directory to publish on (None with ``publish``: the default,
    :func:`default_board`); without ``publish`` jobs stay in memory (plain Python use).
    ``worker``: this process's name in messages, its xdist worker id (``gw1``) or
    ``main``, given by the plugin from this process's own pytest config (a pytest run
    started from inside an xdist worker inherits ``PYTEST_XDIST_WORKER`` without being a
    worker, so the environment is never read).
    """

    def __init__(self, *, run_id: str | None = None, worker: str = "main",
                 directory: str | os.PathLike[str] | None = None, publish: bool = False,
                 warnings: WriteWarnings | None = None) -> None:
        self.run_id = run_id
        self.worker = worker or "main"
        self.publish = publish
        self._directory = Path(directory) if directory is not None else None
        self.warnings = warnings or WriteWarnings()
        self._lock = threading.Lock()
        #: Held from reading this process's record to renaming its file into place, so
        #: that two threads' jobs (a prefetch's compile, a test's wait) never leave the
        #: older record last.
        self._publish_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._active: dict[int, Job] = {}
        self._ended: list[Job] = []
        self._failed = False
        #: Called with each ended job's record, in the thread that ran it (the trace).
        self.on_end: Callable[[Job], None] | None = None

    @property
    def path(self) -> Path | None:
        """The board directory this run writes to, if it writes to one."""
        if not self.publish:
            return None
        if self._directory is None:
            self._directory = default_board()
        return self._directory

    def record(self) -> dict[str, Any]:
        """This process's record: who it is, and its jobs (active ones, then recent ended)."""
        with self._lock:
            jobs = [dict(j) for j in self._active.values()] + [dict(j) for j in self._ended]
        return {"pid": os.getpid(), "host": socket.gethostname(), "worker": self.worker,
                "run_id": self.run_id, "jobs": jobs}

    def _publish(self) -> None:
        """Rewrite this process's file on the board (atomically); best effort."""
        board = self.path
        if board is None or self._failed:
            return
        path = board / f"{os.getpid()}.json"
        tmp = board / f".{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with self._publish_lock:
                tmp.write_text(json.dumps(self.record()), encoding="utf-8")
                os.replace(tmp, path)
        except OSError as exc:
            self._failed = True
            self.warnings.failed(path, "report progress to", exc)

    def close(self) -> None:
        """Remove this process's file from the board (at the end of its run)."""
        board = self.path
        if board is not None:
            with contextlib.suppress(OSError):
                (board / f"{os.getpid()}.json").unlink()

    @contextlib.contextmanager
    def doing(self, kind: str, *, model: str, target: str, digest: str, root: str,
              background: bool = False) -> Iterator[Job]:
        """Announce a job (``compile``, ``download``, ``wait``, or ``gpu``: a test waiting
        for the GPU lock, its ``root`` the lock file) for the duration of the block.

        The block's end ends the job: ``done``, ``failed`` (an exception) or
        ``interrupted`` (KeyboardInterrupt, or another BaseException such as
        pytest-timeout's, which is marked with the job: ``exc.mlcjit_interrupted``).
        Yields the job's record, whose ``seconds`` is set at the end.
        """
        job: Job = {"id": next(self._ids), "kind": kind, "model": model, "target": target,
                    "digest": digest, "root": root, "started": time.time(),
                    "background": background}
        t0 = time.monotonic()
        with self._lock:
            self._active[job["id"]] = job
        self._publish()
        outcome = "failed"
        try:
            yield job
            outcome = "done"
        except Exception:
            raise
        except BaseException as exc:
            outcome = "interrupted"
            _interrupted(exc, job, time.monotonic() - t0)
            raise
        finally:
            job["seconds"] = time.monotonic() - t0
            ended = {**job, "ended": time.time(), "outcome": outcome}
            with self._lock:
                self._active.pop(job["id"], None)
                self._ended.append(ended)
                del self._ended[:-ENDED_KEPT]
            self._publish()
            if self.on_end is not None:
                self.on_end(ended)


    @contextlib.contextmanager
    def unshown(self, kind: str, **fields: Any) -> Iterator[None]:
        """A job the live display does not show (``upload``): only :attr:`on_end` (the
        trace) is told of it, ended as :meth:`doing` ends its jobs."""
        started, outcome = time.time(), "failed"
        try:
            yield
            outcome = "done"
        except Exception:
            raise
        except BaseException:
            outcome = "interrupted"
            raise
        finally:
            if self.on_end is not None:
                self.on_end({"kind": kind, **fields, "started": started, "ended": time.time(),
                             "outcome": outcome})


def _interrupted(exc: BaseException, job: Mapping[str, Any], seconds: float) -> None:
    """Mark an interruption (KeyboardInterrupt, pytest-timeout's Failed) with the job it
    stopped, for the message the test gets; the innermost job wins."""
    if getattr(exc, "mlcjit_interrupted", None) is None:
        with contextlib.suppress(AttributeError, TypeError):
            exc.mlcjit_interrupted = {**job, "seconds": seconds}  # type: ignore[attr-defined]


def read_board(board: Path) -> list[dict[str, Any]]:
    """Every process record on ``board``; of a process that is gone (on this host), its
    ended jobs only, and its file is removed once a minute old (every reader has seen it)."""
    host = socket.gethostname()
    records = []
    try:
        names = os.listdir(board)
    except OSError:
        return []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = board / name
        data = read_json(path, RECORD_BYTES)
        if not isinstance(data, dict) or not isinstance(data.get("jobs"), list):
            continue
        pid = data.get("pid")
        if data.get("host") == host and isinstance(pid, int) and pid != os.getpid() \
                and not pid_alive(pid):
            with contextlib.suppress(OSError):
                if time.time() - path.stat().st_mtime > STALE_S:
                    path.unlink()
            data["jobs"] = [j for j in data["jobs"] if isinstance(j, dict) and "ended" in j]
        records.append(data)
    return records


def describe_target(target: Any) -> str:
    """A target in a few words: ``llvm``, ``cuda sm_90``, ``llvm znver4``."""
    if isinstance(target, Mapping):
        words = [str(target.get("kind", "?"))]
        words += [str(target[k]) for k in ("arch", "mcpu") if target.get(k)]
        return " ".join(words)
    return str(target)


def describe_spec(spec: Any, fallback: str = "") -> str:
    """A spec as its test id shows it: ``mlp-hidden=128``."""
    spec_id = getattr(spec, "id", None)
    return spec_id if isinstance(spec_id, str) and spec_id else (fallback or repr(spec))
