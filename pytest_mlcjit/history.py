"""The run history: one JSON line per run that used the plugin, in
``<root>/.mlcjit/runs.jsonl`` (read by ``pytest-mlcjit info``).

Kept apart from :mod:`.manage` because every such run appends to it at the end: it
imports nothing the run has not imported already, and costs one ``flock`` and one append.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .cache import CONTROL_DIR, try_flock

#: Where the history lives, under the root's control directory (``.mlcjit``).
RUNS_FILE = "runs.jsonl"
#: Runs kept when the file is cut back (it is cut once it holds twice as many).
RUNS_KEPT = 100


def record_run(root: Path, record: Mapping[str, Any]) -> None:
    """Append one run's statistics to ``<root>/.mlcjit/runs.jsonl``; once the file passes
    ``2 * RUNS_KEPT`` lines it is cut back to the last ``RUNS_KEPT``. Cheap, because every
    run that used the plugin pays it: one ``flock``, one append, and a read only when the
    file has grown large enough to need cutting."""
    control = root / CONTROL_DIR
    path = control / RUNS_FILE
    line = json.dumps(dict(record), sort_keys=True, separators=(",", ":")) + "\n"
    try:
        with _flocked(os.path.join(control, "runs.lock"), timeout=10):
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)
                size = f.tell()
            if size < 2 * RUNS_KEPT * len(line):  # surely fewer than 2 * RUNS_KEPT lines
                return
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            if len(lines) < 2 * RUNS_KEPT:
                return
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(lines[-RUNS_KEPT:]), encoding="utf-8")
            os.replace(tmp, path)
    except (OSError, TimeoutError):
        return  # the history is a convenience; never fail a run over it


@contextlib.contextmanager
def _flocked(path: str, *, timeout: float) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (made if missing), waiting at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (fd := try_flock(path)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} stayed locked for {timeout:g}s")
        time.sleep(0.01)
    try:
        yield
    finally:
        os.close(fd)  # releases the flock


def read_runs(root: Path, limit: int = 5) -> list[dict[str, Any]]:
    """The last ``limit`` runs recorded under ``root``, newest first."""
    try:
        lines = (root / CONTROL_DIR / RUNS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    runs = []
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict):
                runs.append(data)
        if len(runs) >= limit:
            break
    return runs
