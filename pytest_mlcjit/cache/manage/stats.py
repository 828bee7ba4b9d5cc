"""``pytest-mlcjit stats``: the cache's history at a glance. Reads each root's run history
(:mod:`..history`: ``<root>/.mlcjit/runs.jsonl``), counting the lines it cannot use, and
makes of the last runs one row each (requests, hit rate, compiles, seconds compiling,
seconds saved) and their totals. Data only: the command (:mod:`pytest_mlcjit.cli.stats`)
prints it.

A run appends its line to every root it used, so the roots' histories share runs: a run is
counted once (by its ``run_id``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.jsonsafe import loads_bounded
from pytest_mlcjit.cache.history import LINE_BYTES, tail_lines, valid_run
from pytest_mlcjit.cache.layout import runs_file

#: The runs shown by default.
DEFAULT_LAST = 20
#: A sparkline's levels, lowest first (the Unicode block elements), and an unknown value.
BLOCKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
UNKNOWN = "\u00b7"


@dataclasses.dataclass
class History:
    """What one root's history holds: the path, whether it exists, the run records read
    (oldest first) and the lines skipped (junk, truncated, not a run record)."""

    root: Path
    path: Path
    exists: bool
    runs: list[dict[str, Any]]
    skipped: int

    def to_json(self) -> dict[str, Any]:
        return {"root": str(self.root), "history": str(self.path), "exists": self.exists,
                "recorded": len(self.runs), "skipped": self.skipped}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _seconds(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _usable(data: Any) -> bool:
    """Whether a parsed line is a run record whose fields this command reads have their
    types (:func:`.history.valid_run`, and ``outcomes``, ``saved_seconds``, ``run_id``)."""
    if not valid_run(data):
        return False
    outcomes = data.get("outcomes", {})
    if not isinstance(outcomes, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0
            for n in outcomes.values()):
        return False
    if "saved_seconds" in data and not _seconds(data["saved_seconds"]):
        return False
    hits = _hits(data)
    return isinstance(data.get("run_id", ""), str) and (
        hits is None or hits <= int(data.get("requests", 0)))


def read_history(root: Path) -> History:
    """``root``'s run history: every usable line of the file's last
    :data:`.history.TAIL_BYTES` (a line cut by that start is not counted), oldest first.
    A missing file is an empty history; one that cannot be read raises OSError."""
    path = runs_file(root)
    lines = tail_lines(root)
    if lines is None:
        return History(root, path, False, [], 0)
    runs, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            data = loads_bounded(line, max_bytes=LINE_BYTES, parse_constant=_refuse_constant)
        except ValueError:
            skipped += 1
            continue
        if _usable(data):
            runs.append(data)
        else:
            skipped += 1
    return History(root, path, True, runs, skipped)


def _hits(run: dict[str, Any]) -> int | None:
    """The requests found in the cache (local or remote), or None when the line does not
    say (an older version's record: its ``hits``, if it has them)."""
    outcomes = run.get("outcomes")
    if isinstance(outcomes, dict):
        return int(outcomes.get("hit", 0)) + int(outcomes.get("remote_hit", 0))
    hits = run.get("hits")
    return hits if isinstance(hits, int) and not isinstance(hits, bool) else None


def run_row(run: dict[str, Any]) -> dict[str, Any]:
    """One run's row: ``hits`` and ``hit_rate`` (of the requests) are None when the line
    does not say, ``saved_seconds`` when it predates the field."""
    requests = int(run.get("requests", 0))
    hits = _hits(run)
    saved = run.get("saved_seconds")
    return {
        "time": run.get("time"), "run_id": run.get("run_id"), "policy": run.get("policy"),
        "prepare": bool(run.get("prepare", False)),
        "requests": requests, "hits": hits,
        "hit_rate": hits / requests if hits is not None and requests else None,
        "compiles": int(run.get("compiles", 0)),
        "compile_seconds": float(run.get("compile_seconds", 0)),
        "saved_seconds": float(saved) if saved is not None else None,
    }


def totals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The rows' sums; ``hit_rate`` over the runs whose hits are known, ``saved_seconds``
    over those that recorded it (``runs_without_saved`` says how many did not)."""
    known = [r for r in rows if r["hits"] is not None]
    hits, asked = sum(r["hits"] for r in known), sum(r["requests"] for r in known)
    saved = [r["saved_seconds"] for r in rows if r["saved_seconds"] is not None]
    return {
        "runs": len(rows), "requests": sum(r["requests"] for r in rows),
        "hits": hits, "hit_rate": hits / asked if asked else None,
        "compiles": sum(r["compiles"] for r in rows),
        "compile_seconds": sum(r["compile_seconds"] for r in rows),
        "saved_seconds": sum(saved), "runs_without_saved": len(rows) - len(saved),
    }


def history_stats(roots: Sequence[Path], last: int = DEFAULT_LAST) -> dict[str, Any]:
    """The last ``last`` runs (0: every run read) of the roots' histories, oldest first,
    each counted once; their totals; each root's :class:`History` summary."""
    histories = [read_history(root) for root in roots]
    seen: set[str] = set()
    runs = []
    for history in histories:
        for run in history.runs:
            run_id = run.get("run_id")
            if run_id:
                if run_id in seen:
                    continue
                seen.add(run_id)
            runs.append(run)
    runs.sort(key=lambda r: float(r.get("time", 0)))  # stable: a root's order kept
    rows = [run_row(run) for run in (runs[-last:] if last else runs)]
    return {"roots": [h.to_json() for h in histories], "last": last,
            "available": len(runs), "runs": rows, "totals": totals(rows)}


def sparkline(values: Sequence[float | None], top: float | None = None) -> str:
    """One character per value, a block as high as the value is of ``top`` (the largest
    value when not given; the lowest block for 0, :data:`UNKNOWN` for None)."""
    known = [v for v in values if v is not None]
    top = top if top is not None else max(known, default=0.0)
    chars = []
    for v in values:
        if v is None:
            chars.append(UNKNOWN)
        else:
            level = round(v / top * (len(BLOCKS) - 1)) if top > 0 else 0
            chars.append(BLOCKS[min(max(level, 0), len(BLOCKS) - 1)])
    return "".join(chars)
