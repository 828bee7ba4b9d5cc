"""The commands over the local cache: ``list``, ``info``, ``verify``, ``prune``, ``clear``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_mlcjit.cache import manage
from pytest_mlcjit.cache.manage.prune import quarantined
from pytest_mlcjit.cli.render import MODEL_WIDTH, out, roots
from pytest_mlcjit.compiler.toolchain import tvm_fingerprint
from pytest_mlcjit.engine.stats import OUTCOMES, Stats
from pytest_mlcjit.errors import CliUsageError
from pytest_mlcjit.units import format_size, format_time, plural


# -- list ---------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    if args.failed:
        return _list_failed(args)
    data: dict[str, Any] = {"roots": [], "entries": []}
    lines: list[str] = []
    for root in roots(args):
        entries = manage.scan(root)
        data["roots"].append(str(root))
        data["entries"] += [{**e.to_json(), "inputs": e.fields.get("inputs")} if args.inputs
                            else e.to_json() for e in entries]
        lines.append(f"{root}: {plural(len(entries), 'entry', 'entries')}"
                     + ("" if root.is_dir() else " (does not exist)"))
        if not entries:
            continue
        rows = [("DIGEST", "BACKEND", "MODEL", "TARGET", "SIZE", "CREATED", "LAST USED",
                 "COMPILE")]
        for e in entries:
            seconds = f"{e.compile_seconds:.1f}s" if e.compile_seconds is not None else "-"
            model = _model_text(e) if e.state == "ok" else f"{_model_text(e)} [{e.state}]"
            rows.append((e.digest[:12], e.backend, model, e.target, format_size(e.size),
                         format_time(e.created), format_time(e.last_used),
                         seconds))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        table = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False))
                 + "  " + r[-1] for r in rows]
        lines.append(table[0])
        for e, line in zip(entries, table[1:], strict=True):
            lines.append(line)
            if args.inputs:
                lines += [f"      {text}" for text in _input_lines(e.manifest)]
    out(args, data, lines)
    return 0


def _list_failed(args: argparse.Namespace) -> int:
    """``list --failed``: the remembered failures, newest first."""
    data: dict[str, Any] = {"roots": [], "failed": []}
    lines: list[str] = []
    for root in roots(args):
        failures = manage.read_failures(root)
        data["roots"].append(str(root))
        data["failed"] += [{**f, "root": str(root)} for f in failures]
        known = sum(f["known"] for f in failures)
        lines.append(f"{root}: {plural(len(failures), 'remembered failure')} ({known} known: "
                     "failed twice alike; reported without compiling while the key and its "
                     "inputs are unchanged)")
        for f in failures:
            kind = "known" if f["known"] else "seen once" if f["seen"] else "this run"
            model = f["model"] if len(f["model"]) <= MODEL_WIDTH else \
                f["model"][:MODEL_WIDTH - 1] + "\u2026"
            lines.append(f"  {f['digest'][:12]}  {kind:9}  {format_time(f['time'])}  {model}")
            lines.append(f"      {f['error']}")
            if f["log"]:
                lines.append(f"      log: {f['log']}")
    out(args, data, lines)
    return 0


def _model_text(entry: manage.Entry) -> str:
    """The MODEL column: the spec's name (``TVMModel(name=…)``, recorded in the manifest)
    and its config, cut to :data:`MODEL_WIDTH` characters (``--json`` has all of it)."""
    manifest = entry.fields
    config = entry.key.get("config") if entry.backend == "tvm" else None
    name = manifest.get("name")
    if isinstance(name, str) and isinstance(config, dict):
        text = f"{name} {json.dumps(config, sort_keys=True)}"
    else:
        text = entry.model
    return text if len(text) <= MODEL_WIDTH else text[:MODEL_WIDTH - 1] + "\u2026"


def _input_lines(manifest: Mapping[str, Any] | None) -> list[str]:
    """An entry's recorded inputs, one per line (``--inputs``)."""
    recorded = (manifest or {}).get("inputs")
    if not isinstance(recorded, dict):
        return ["(no recorded inputs)"]
    out = [f"module {m.get('path')}  sha256 {str(m.get('sha256'))[:12]}"
           for m in recorded.get("modules") or []]
    out += [f"file   {f.get('path')}  sha256 {str(f.get('sha256'))[:12]}"
            for f in recorded.get("files") or []]
    out += [f"dist   {name} {version}"
            for name, version in sorted((recorded.get("dists") or {}).items())]
    out += [f"dir    {d.get('path')}  {d.get('count')} names, sha256 {str(d.get('sha256'))[:12]}"
            for d in recorded.get("listings") or []]
    out += [f"path   {p.get('path')}  {p.get('state')}" for p in recorded.get("probes") or []]
    out += [f"env    {name}  " + ("unset" if digest is None else f"sha256 {str(digest)[:12]}")
            for name, digest in sorted((recorded.get("env") or {}).items())]
    out += [f"incomplete: {note}" for note in recorded.get("incomplete") or []]
    return out or ["(no recorded inputs)"]


# -- info ---------------------------------------------------------------------------------------
#: The totals of a run-history line that its summary line shows.
_RUN_TOTALS = frozenset({"requests", "compiles", "prefetched", "compile_seconds", "wait_seconds",
                         "corrupt"})


def _run_line(run: dict[str, Any]) -> str:
    """A run of the history in the words of the run's own summary line (its outcomes,
    each request counted once, then what the compiles and waits cost)."""
    mode = "prepare, " if run.get("prepare") else ""
    stats = Stats()
    outcomes = run.get("outcomes")
    # Only the numeric totals: a damaged line's other fields ("remote", "libraries") are
    # not this line's to render.
    stats.merge({k: v for k, v in run.items() if k in _RUN_TOTALS})
    if isinstance(outcomes, dict):  # else a record of an older version: its requests only
        stats.merge({"outcomes": {k: v for k, v in outcomes.items()
                                  if k in OUTCOMES and isinstance(v, int)}})
    return f"{format_time(run.get('time'))}  {mode}{run.get('policy', '?')}: " \
        f"{stats.accounting_line()}"


def _toolchain_text(chain: Any) -> str:
    if not isinstance(chain, dict):
        return json.dumps(chain)
    parts = []
    for name, value in sorted(chain.items()):
        if isinstance(value, dict):
            commit = str(value.get("commit") or "")[:10]
            parts.append(f"{name} {value.get('version')}" + (f" ({commit})" if commit else ""))
        elif value is not None:
            parts.append(f"{name} {value}")
    return ", ".join(parts) or "?"


def cmd_info(args: argparse.Namespace) -> int:

    installed = tvm_fingerprint()
    infos = [manage.info(root, runs=args.runs, installed_tvm=installed) for root in roots(args)]
    lines: list[str] = []
    for data in infos:
        if not data["exists"]:
            lines.append(f"cache root: {data['root']} (does not exist)")
            continue
        per = ", ".join(f"{n} {b}" for b, n in sorted(data["backends"].items()))
        lines += [
            f"cache root: {data['root']}",
            f"  entries: {data['entries']}" + (f" ({per})" if per else "")
            + f", {format_size(data['size'])}"
            + (f"; {data['unmanaged']} without manifest" if data["unmanaged"] else ""),
            f"  quarantine: {plural(data['quarantined'], 'entry', 'entries')} "
            f"({format_size(data['quarantine_size'])}); staging dirs: {data['staging']}",
            f"  on disk: {format_size(data['total_size'])} in all (failures remembered: "
            f"{data['failed']}, {format_size(data['failed_size'])}; staging "
            f"{format_size(data['staging_size'])}; locks, usage, history "
            f"{format_size(data['other_size'])})",
            "  toolchains seen:" + ("" if data["toolchains"] else " none"),
        ]
        for seen in data["toolchains"]:
            mark = " (the installed TVM)" if seen.get("installed_tvm") else ""
            lines.append(f"    {_toolchain_text(seen['toolchain'])}: "
                         f"{plural(seen['entries'], 'entry', 'entries')}{mark}")
        lines.append("  last runs:" + ("" if data["runs"] else " none recorded"))
        lines += [f"    {_run_line(run)}" for run in data["runs"]]
        if args.inputs:
            data["inputs"] = _recorded_inputs(Path(data["root"]))
            lines.append("  recorded inputs:" + ("" if data["inputs"] else " none"))
            lines += [f"    {name}: {plural(n, 'entry', 'entries')}"
                      for name, n in data["inputs"].items()]
    out(args, {"roots": infos}, lines)
    return 0


def _recorded_inputs(root: Path) -> dict[str, int]:
    """Every recorded input under ``root`` (``module``/``file``/``listing``/``probe`` path,
    ``dist`` and ``env`` name, ``incomplete`` note), with how many entries were built from
    it."""
    seen: dict[str, int] = {}
    for entry in manage.scan(root):
        recorded = entry.fields.get("inputs")
        if not isinstance(recorded, dict):
            continue
        names = [f"module {m.get('path')}" for m in recorded.get("modules") or []]
        names += [f"file {f.get('path')}" for f in recorded.get("files") or []]
        names += [f"dist {name}" for name in recorded.get("dists") or {}]
        names += [f"listing {d.get('path')}" for d in recorded.get("listings") or []]
        names += [f"probe {p.get('path')}" for p in recorded.get("probes") or []]
        names += [f"env {name}" for name in recorded.get("env") or {}]
        names += [f"incomplete: {note}" for note in recorded.get("incomplete") or []]
        for name in names:
            seen[name] = seen.get(name, 0) + 1
    return dict(sorted(seen.items()))


# -- verify -------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    results = [manage.verify(root, fix=args.fix) for root in roots(args)]
    lines: list[str] = []
    left = 0
    for r in results:
        checked = len(r.ok) + len(r.corrupt)
        lines.append(f"{r.root}: {plural(checked, 'entry', 'entries')} checked, "
                     f"{len(r.ok)} ok, {len(r.corrupt)} corrupt"
                     + (f", {len(r.unmanaged)} without manifest (not verifiable)"
                        if r.unmanaged else ""))
        for entry, why in r.corrupt:
            if entry.digest in r.quarantined:
                fate = f"quarantined to {r.quarantined[entry.digest]}"
            elif entry.digest in r.locked:
                fate = "not quarantined: its lock is held by a live process"
                left += 1
            else:
                fate = "run with --fix to quarantine it"
                left += 1
            lines.append(f"  CORRUPT {entry.digest[:12]} {entry.backend} {entry.model}: {why}"
                         f" ({fate})")
    out(args, {"roots": [r.to_json() for r in results], "corrupt_left": left}, lines)
    return 1 if left else 0


# -- prune --------------------------------------------------------------------------------------
def cmd_prune(args: argparse.Namespace) -> int:
    if (args.max_size is None and args.older_than is None and args.keep_last_used is None
            and not args.failed):
        raise CliUsageError("prune needs at least one of --max-size, --older-than, "
                            "--keep-last-used, --failed (use 'clear' to remove everything)")
    results = [manage.prune(root, max_size=args.max_size, older_than=args.older_than,
                            keep_last_used=args.keep_last_used, dry_run=args.dry_run,
                            failed=args.failed)
               for root in roots(args)]
    lines: list[str] = []
    verb = "would evict" if args.dry_run else "evicted"
    for r in results:
        lines.append(f"{r.root}: {verb} {plural(len(r.evicted), 'entry', 'entries')} "
                     f"({format_size(r.freed)}); "
                     f"{format_size(r.total_before)} -> "
                     f"{format_size(r.total_after)}")
        lines += [f"  {verb} {e.digest[:12]} {e.backend} {e.model} on {e.target} "
                  f"(last used {format_time(e.recency)})" for e in r.evicted]
        lines += [f"  kept {e.digest[:12]} {e.model}: its lock is held by a live process"
                  for e in r.kept_locked]
        if r.quarantine_removed:
            removed = plural(len(r.quarantine_removed), "quarantined entry",
                             "quarantined entries")
            lines.append(f"  {'would remove' if args.dry_run else 'removed'} {removed}")
        if r.failures_removed:
            removed = plural(len(r.failures_removed), "remembered failure",
                             "remembered failures")
            lines.append(f"  {'would remove' if args.dry_run else 'removed'} {removed}")
        if r.over_cap:
            lines.append(f"  still over --max-size ({format_size(r.max_size or 0)}): "
                         "the rest is in use")
    out(args, {"roots": [r.to_json() for r in results]}, lines)
    return 0


def cmd_clear(args: argparse.Namespace) -> int:

    verb = "would remove" if args.dry_run else "removed"
    lines: list[str] = []
    cleared: list[dict[str, Any]] = []
    for root in roots(args):
        quarantine = quarantined(root)  # what clear removes besides the entries
        r = manage.clear(root, dry_run=args.dry_run)
        cleared.append({**r.to_json(), "quarantine_removed": [str(p) for _, p, _ in quarantine]})
        lines.append(f"{r.root}: {verb} {plural(len(r.removed), 'entry', 'entries')} and "
                     f"{plural(len(quarantine), 'quarantined entry', 'quarantined entries')} "
                     f"({format_size(r.freed)})")
        lines += [f"  kept {e.digest[:12]} {e.model}: its lock is held by a live process"
                  for e in r.kept_locked]
    out(args, {"roots": cleared}, lines)
    return 0
