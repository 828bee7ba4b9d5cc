"""``pytest-mlcjit stats``: the last runs of the cache's history, one row each, with a
sparkline of their hit rate and of the compile time they saved, and the totals
(:mod:`pytest_mlcjit.cache.manage.stats` reads them)."""

from __future__ import annotations

import argparse
from typing import Any

from pytest_mlcjit.cache.manage.stats import DEFAULT_LAST, history_stats, sparkline
from pytest_mlcjit.cli.render import count_arg, out, roots
from pytest_mlcjit.units import format_time, plural


def add_stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--last", type=count_arg, default=DEFAULT_LAST, metavar="N",
                   help=f"how many recent runs to show (default {DEFAULT_LAST}; 0: every "
                   "run the history holds)")


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}s"


def _rate(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.1f}%"


def _root_line(history: dict[str, Any]) -> str:
    if not history["exists"]:
        return f"no runs recorded yet in {history['history']}"
    text = (f"{history['history']}: {plural(history['recorded'], 'run')} recorded"
            if history["recorded"] else f"no runs recorded yet in {history['history']}")
    if history["skipped"]:
        text += (f" ({plural(history['skipped'], 'damaged line')} skipped: not a run "
                 "record, or cut short)")
    return text


def stats_lines(data: dict[str, Any]) -> list[str]:
    """The text of ``stats``: each root's history, then the table, the charts, the
    totals (nothing but the roots' lines when no run was recorded)."""
    lines = [_root_line(h) for h in data["roots"]]
    rows = data["runs"]
    if not rows:
        return lines
    lines.append(f"the last {plural(len(rows), 'run')} of {data['available']}, oldest first:")
    table = [("WHEN", "REQUESTS", "HITS", "HIT RATE", "COMPILES", "COMPILING", "SAVED")]
    table += [(format_time(r["time"]), str(r["requests"]),
               "?" if r["hits"] is None else str(r["hits"]), _rate(r["hit_rate"]),
               str(r["compiles"]), _seconds(r["compile_seconds"]),
               _seconds(r["saved_seconds"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True)))
              for row in table]
    saved = [r["saved_seconds"] for r in rows]
    top = max((s for s in saved if s is not None), default=0.0)
    lines += [
        f"  hit rate    {sparkline([r['hit_rate'] for r in rows], top=1.0)}  "
        "(0 to 100%, oldest to newest)",
        f"  time saved  {sparkline(saved)}  (0 to {top:.2f}s)",
    ]
    t = data["totals"]
    unknown = t["runs_without_saved"]
    lines.append(
        f"total: {plural(t['runs'], 'run')}, {plural(t['requests'], 'request')}, "
        f"{plural(t['hits'], 'hit')} ({_rate(t['hit_rate'])}), "
        f"{plural(t['compiles'], 'compile')}, {t['compile_seconds']:.2f}s compiling, "
        f"{t['saved_seconds']:.2f}s saved"
        + (f" ({plural(unknown, 'run')} recorded no saved time: '?')" if unknown else ""))
    return lines


def cmd_stats(args: argparse.Namespace) -> int:
    data = history_stats(roots(args), last=args.last)
    out(args, data, stats_lines(data))
    return 0
