"""What this process is doing that can take long: compiling a library, downloading one,
waiting for another's compile. The engine announces each such *job* (:func:`doing`); the
live display (:mod:`.progress`) reads them.

How jobs reach the display. Within a process, from memory. Across processes, through a
*board*: a directory private to the user (``$TMPDIR/pytest-mlcjit-<uid>``, mode 0700) in
which each pytest process that started a job keeps one small JSON file, ``<pid>.json``,
rewritten atomically (a temporary file, then ``os.replace``) whenever one of its jobs
starts or ends::

    {"pid": 4242, "host": "ci-7", "worker": "gw1", "run_id": "…",
     "jobs": [{"id": 3, "kind": "compile", "model": "mlp-hidden=128", "target": "llvm",
               "digest": "…", "root": "/cache", "started": 1700000000.0,
               "background": false}, …]}

An xdist worker reports to its controller this way (the controller reads the files whose
``run_id`` is its run's), and a process waiting for a key's lock finds there which worker
of which run is compiling it. Nothing goes into the cache (READONLY writes nothing), no
worker writes to the terminal, and a job's start time is all the display needs: a worker
busy compiling writes nothing more until the job ends.

Cheap: a job costs two small file writes when a board is configured (:func:`configure`,
done by the plugin), and nothing but a dict in memory otherwise (plain :func:`..jit`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

#: Ended jobs kept in a process's record, so that a reader polling it sees them end.
ENDED_KEPT = 16
#: The file of a process that is gone is removed when it is this old (seconds).
STALE_S = 60.0

_lock = threading.Lock()
#: Held from reading this process's record to renaming its file into place, so that two
#: threads' jobs (a prefetch's compile, a test's wait) never leave the older record last.
_publish_lock = threading.Lock()
_ids = itertools.count(1)
_active: dict[int, dict[str, Any]] = {}
_ended: list[dict[str, Any]] = []
_config: dict[str, Any] = {"board": None, "run_id": None, "worker": None, "enabled": False}
_board_failed = False


def worker_name() -> str:
    """This process's name in messages: its xdist worker id (``gw1``), else ``main``.

    Set by the plugin from this process's own pytest config (:func:`configure`), never
    read from the environment: a pytest run started from inside an xdist worker (a test
    using ``pytester``) inherits ``PYTEST_XDIST_WORKER`` without being a worker."""
    return _config["worker"] or "main"


def configure(*, run_id: str, worker: str | None = None, board: str | None = None) -> None:
    """Publish this process's jobs on the board (``board``: its directory; None: the
    default, :func:`default_board`), tagged with ``run_id`` and ``worker``."""
    with _lock:
        _config.update(run_id=run_id, worker=worker, board=board, enabled=True)


def default_board() -> Path | None:
    """``$TMPDIR/pytest-mlcjit-<uid>`` (made, mode 0700), or None when it is not ours
    alone: another owner, open to others, or a symlink."""
    import stat
    import tempfile

    path = Path(tempfile.gettempdir()) / f"pytest-mlcjit-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = path.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


def board_path() -> Path | None:
    """The board this process writes to, if it writes to one."""
    if not _config["enabled"]:
        return None
    if _config["board"] is None:
        board = default_board()
        if board is None:
            return None
        _config["board"] = str(board)
    return Path(_config["board"])


def record() -> dict[str, Any]:
    """This process's record: who it is, and its jobs (active ones, then recent ended)."""
    import socket

    with _lock:
        jobs = [dict(j) for j in _active.values()] + [dict(j) for j in _ended]
    return {"pid": os.getpid(), "host": socket.gethostname(), "worker": worker_name(),
            "run_id": _config["run_id"], "jobs": jobs}


def _publish() -> None:
    """Rewrite this process's file on the board (atomically); best effort."""
    global _board_failed  # noqa: PLW0603 - one warning per process
    board = board_path()
    if board is None or _board_failed:
        return
    import json

    path = board / f"{os.getpid()}.json"
    tmp = board / f".{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with _publish_lock:
            tmp.write_text(json.dumps(record()), encoding="utf-8")
            os.replace(tmp, path)
    except OSError as exc:
        _board_failed = True
        from pytest_mlcjit._util.fs import warn_write_failed

        warn_write_failed(path, "report progress to", exc)


def close() -> None:
    """Remove this process's file from the board (at the end of its run)."""
    board = board_path()
    if board is not None:
        with contextlib.suppress(OSError):
            (board / f"{os.getpid()}.json").unlink()


def _interrupted(exc: BaseException, job: Mapping[str, Any], seconds: float) -> None:
    """Mark an interruption (KeyboardInterrupt, pytest-timeout's Failed) with the job it
    stopped, for the message the test gets; the innermost job wins."""
    if getattr(exc, "mlcjit_interrupted", None) is None:
        with contextlib.suppress(AttributeError, TypeError):
            exc.mlcjit_interrupted = {**job, "seconds": seconds}  # type: ignore[attr-defined]


@contextlib.contextmanager
def doing(kind: str, *, model: str, target: str, digest: str, root: str,
          background: bool = False) -> Iterator[dict[str, Any]]:
    """Announce a job (``compile``, ``download`` or ``wait``) for the duration of the block.

    The block's end ends the job: ``done``, ``failed`` (an exception) or ``interrupted``
    (KeyboardInterrupt, or another BaseException such as pytest-timeout's, which is
    marked with the job: ``exc.mlcjit_interrupted``). Yields the job's record, whose
    ``seconds`` is set at the end.
    """
    job: dict[str, Any] = {"id": next(_ids), "kind": kind, "model": model, "target": target,
                           "digest": digest, "root": root, "started": time.time(),
                           "background": background}
    t0 = time.monotonic()
    with _lock:
        _active[job["id"]] = job
    _publish()
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
        with _lock:
            _active.pop(job["id"], None)
            _ended.append({**job, "ended": time.time(), "outcome": outcome})
            del _ended[:-ENDED_KEPT]
        _publish()


def active() -> list[dict[str, Any]]:
    """This process's jobs now (copies)."""
    with _lock:
        return [dict(j) for j in _active.values()]


def read_board(board: Path) -> list[dict[str, Any]]:
    """Every process record on ``board``; of a process that is gone (on this host), its
    ended jobs only, and its file is removed once a minute old (every reader has seen it)."""
    import json
    import socket

    from pytest_mlcjit.cache.locks import pid_alive

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
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
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
