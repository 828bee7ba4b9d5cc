"""The run history: one JSON line per run that used the plugin, in
``<root>/.mlcjit/runs.jsonl`` (read by ``pytest-mlcjit info``).

Kept apart from :mod:`.manage` because every such run appends to it at the end: it
imports nothing the run has not imported already, and costs one ``flock`` and one append.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.fs import WriteWarnings
from pytest_mlcjit._util.jsonsafe import loads_bounded
from pytest_mlcjit.cache.layout import runs_file, runs_lock
from pytest_mlcjit.cache.locks import flocked

#: Runs kept when the file is cut back (it is cut once it holds twice as many).
RUNS_KEPT = 100
#: The longest line read back (a run's record is about a KiB; its remote warnings are
#: aggregated, so it stays small), and how much of the file's end is read.
LINE_BYTES = 64 << 10
TAIL_BYTES = 4 << 20


def record_run(root: Path, record: Mapping[str, Any],
               warnings: WriteWarnings | None = None) -> None:
    """Append one run's statistics to ``<root>/.mlcjit/runs.jsonl``; once the file passes
    ``2 * RUNS_KEPT`` lines it is cut back to the last ``RUNS_KEPT``. Cheap, because every
    run that used the plugin pays it: one ``flock``, one append, and a read only when the
    file has grown large enough to need cutting."""
    path = runs_file(root)
    line = json.dumps(dict(record), sort_keys=True, separators=(",", ":")) + "\n"
    try:
        with flocked(runs_lock(root), timeout=10):
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
    except TimeoutError:
        return  # another run holds the history for long: skip this record
    except OSError as exc:  # a convenience: never fail a run over it, but say so
        (warnings or WriteWarnings()).failed(path, "append the run to the history", exc)


def tail_lines(root: Path) -> list[bytes] | None:
    """The lines of the last :data:`TAIL_BYTES` of ``root``'s history, oldest first (a line
    cut by where the read starts is left out); None if there is no history; OSError if it
    cannot be read."""
    try:
        with open(runs_file(root), "rb") as f:
            f.seek(0, os.SEEK_END)
            start = max(0, f.tell() - TAIL_BYTES)
            f.seek(start)
            lines = f.read(TAIL_BYTES).split(b"\n")
    except FileNotFoundError:
        return None
    return lines[1:] if start else lines


def read_runs(root: Path, limit: int = 5) -> list[dict[str, Any]]:
    """The last ``limit`` runs recorded under ``root``, newest first. Only the file's last
    :data:`TAIL_BYTES` are read, and a line that is junk (:func:`.jsonsafe.loads_bounded`:
    longer than :data:`LINE_BYTES`, nested too deep, not JSON) or not a run record is
    skipped."""
    try:
        lines = tail_lines(root) or []
    except OSError:
        return []
    runs = []
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            data = loads_bounded(line, max_bytes=LINE_BYTES)
            if valid_run(data):
                runs.append(data)
        if len(runs) >= limit:
            break
    return runs


#: The latest time a run record may hold: the end of the year 9999 (tools print it).
_MAX_TIME = 253402300799.0
_COUNTS = ("requests", "hits", "compiles", "failures", "corrupt", "prefetched")


def valid_run(data: Any) -> bool:
    """Whether a line of the history is a run record whose known fields have their types
    and ranges (a damaged or foreign line is skipped, never shown half-read)."""
    if not isinstance(data, dict):
        return False
    for name in ("time", "compile_seconds"):
        value = data.get(name, 0)
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or not 0 <= value <= _MAX_TIME):
            return False
    for name in _COUNTS:
        value = data.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return False
    return isinstance(data.get("policy", ""), str) and isinstance(data.get("prepare", False),
                                                                   bool)
