"""The ``pytest-mlcjit`` command (also ``python -m pytest_mlcjit``): look after the cache.

Subcommands: ``list``, ``info``, ``verify``, ``prune``, ``clear``, ``key``, ``explain``.
Each takes ``--cache-dir PATH`` (default: the plugin's, ``$MLC_JIT_CACHE_DIR`` too) and
``--json`` (one JSON object on stdout). Exit status: 0 on success; 1 on a runtime failure
(``verify`` leaves a corrupt entry, ``explain --check`` finds a library that would miss,
the tests fail to collect, the cache cannot be read); 2 on a usage error (a bad option or
argument value).

``key`` and ``explain`` run a ``pytest --collect-only`` over the given pytest arguments
(after ``--``) to learn what the tests request; the rest never start pytest, and nothing
here imports TVM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pytest_mlcjit import __version__
from pytest_mlcjit.cache import manage
from pytest_mlcjit.errors import ConfigError, MlcJitError, SpecError, argparse_type
from pytest_mlcjit.cache.layout import default_roots
from pytest_mlcjit.units import format_size, format_time, parse_age, parse_size, plural

PROG = "pytest-mlcjit"


#: Exit statuses: a runtime failure, a usage error (as argparse's own).
EXIT_FAILURE, EXIT_USAGE = 1, 2


class CliError(Exception):
    """A runtime failure to report as ``pytest-mlcjit: error: …`` with exit status 1."""

    status = EXIT_FAILURE


class CliUsageError(CliError):
    """A bad argument, reported with exit status 2 (as argparse reports its own)."""

    status = EXIT_USAGE


#: How many characters of a model's config ``list`` shows (``--json`` has all of it).
MODEL_WIDTH = 60


def _count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"invalid count {text!r}: expected a non-negative whole number")
    return int(text)


def _out(args: argparse.Namespace, data: Any, lines: Sequence[str]) -> None:
    if args.json:
        # Indented for a person at a terminal; compact for a pipe, where it is parsed (and
        # where json's C encoder, which indenting turns off, keeps large outputs fast).
        indent = 2 if sys.stdout.isatty() else None
        print(json.dumps(data, indent=indent, sort_keys=True, default=str))
    else:
        for line in lines:
            print(line)


def _roots(args: argparse.Namespace) -> list[Path]:
    return default_roots(args.cache_dir)


# -- list ---------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    if args.failed:
        return _list_failed(args)
    data: dict[str, Any] = {"roots": [], "entries": []}
    lines: list[str] = []
    for root in _roots(args):
        entries = manage.scan(root)
        data["roots"].append(str(root))
        data["entries"] += [e.to_json() for e in entries]
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
    if args.inputs:
        for entry in data["entries"]:
            found = next((e for e in entries if e.digest == entry["digest"]), None)
            entry["inputs"] = (found.manifest or {}).get("inputs") if found else None
    _out(args, data, lines)
    return 0


def _list_failed(args: argparse.Namespace) -> int:
    """``list --failed``: the remembered failures, newest first."""
    data: dict[str, Any] = {"roots": [], "failed": []}
    lines: list[str] = []
    for root in _roots(args):
        failures = manage.read_failures(root)
        data["roots"].append(str(root))
        data["failed"] += [{**f, "root": str(root)} for f in failures]
        known = sum(f["known"] for f in failures)
        lines.append(f"{root}: {plural(len(failures), 'remembered failure')} ({known} known: "
                     "reported without compiling while the key and its inputs are unchanged)")
        for f in failures:
            kind = "known" if f["known"] else "this run"
            model = f["model"] if len(f["model"]) <= MODEL_WIDTH else \
                f["model"][:MODEL_WIDTH - 1] + "\u2026"
            lines.append(f"  {f['digest'][:12]}  {kind:8}  {format_time(f['time'])}  {model}")
            lines.append(f"      {f['error']}")
            if f["log"]:
                lines.append(f"      log: {f['log']}")
    _out(args, data, lines)
    return 0


def _model_text(entry: manage.Entry) -> str:
    """The MODEL column: the spec's name (``TVMModel(name=…)``, recorded in the manifest)
    and its config, cut to :data:`MODEL_WIDTH` characters (``--json`` has all of it)."""
    manifest = entry.manifest or {}
    config = entry.key.get("config") if entry.backend == "tvm" else None
    name = manifest.get("name")
    if isinstance(name, str) and isinstance(config, dict):
        text = f"{name} {json.dumps(config, sort_keys=True)}"
    else:
        text = entry.model
    return text if len(text) <= MODEL_WIDTH else text[:MODEL_WIDTH - 1] + "\u2026"


def _input_lines(manifest: dict[str, Any] | None) -> list[str]:
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
    return out or ["(no recorded inputs)"]


# -- info ---------------------------------------------------------------------------------------
def _run_line(run: dict[str, Any]) -> str:
    mode = "prepare, " if run.get("prepare") else ""
    requests, hits = int(run.get("requests", 0)), int(run.get("hits", 0))
    return (f"{format_time(run.get('time'))}  {mode}{run.get('policy', '?')}: "
            f"{requests} requests, {hits} hits, {requests - hits} misses "
            f"({run.get('compiles', 0)} compiled in "
            f"{float(run.get('compile_seconds', 0)):.1f}s, {run.get('failures', 0)} failed, "
            f"{run.get('corrupt', 0)} corrupt)")


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
    infos = [manage.info(root, runs=args.runs) for root in _roots(args)]
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
    _out(args, {"roots": infos}, lines)
    return 0


def _recorded_inputs(root: Path) -> dict[str, int]:
    """Every recorded input under ``root`` (``module``/``file`` path, ``dist`` name), with
    how many entries were built from it."""
    seen: dict[str, int] = {}
    for entry in manage.scan(root):
        for text in _input_lines(entry.manifest):
            if not text.startswith("("):
                name = " ".join(text.split()[:2])
                seen[name] = seen.get(name, 0) + 1
    return dict(sorted(seen.items()))


# -- verify -------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    results = [manage.verify(root, fix=args.fix) for root in _roots(args)]
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
    _out(args, {"roots": [r.to_json() for r in results], "corrupt_left": left}, lines)
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
               for root in _roots(args)]
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
    _out(args, {"roots": [r.to_json() for r in results]}, lines)
    return 0


# -- clear --------------------------------------------------------------------------------------
# -- remote -------------------------------------------------------------------------------------
def cmd_remote(args: argparse.Namespace) -> int:
    from pytest_mlcjit.cache.manage import remote as jobs

    remote = jobs.open_for_cli(args.remote)
    if args.remote_command == "ls":
        entries = jobs.list_entries(remote)
        lines = [f"{remote.url}: {plural(len(entries), 'entry', 'entries')}"]
        for e in entries:
            state = f" [{e['problem']}]" if e["problem"] else (" signed" if e["signed"] else "")
            lines.append(f"  {e['key_digest'][:12]}/{e['entry_digest'][:12]}  {e['model']}  "
                         f"{e['target']}  {format_size(e['size'] or 0)}  "
                         f"{format_time(e['created'])}{state}")
        _out(args, {"remote": remote.url, "entries": entries}, lines)
        return 0
    if args.remote_command == "verify":
        result = jobs.verify(remote)
        how = "digests and signatures" if result["signatures_checked"] else (
            f"digests; ${result['signing_key_env']} is not set, so signatures are not checked")
        lines = [f"{remote.url}: {plural(result['checked'], 'entry', 'entries')} checked "
                 f"({how}): {len(result['bad'])} bad"]
        lines += [f"  {e['key_digest'][:12]}/{e['entry_digest'][:12]}: {e['problem']}"
                  for e in result["bad"]]
        _out(args, {"remote": remote.url, **result}, lines)
        return EXIT_FAILURE if result["bad"] else 0
    result = jobs.prune(remote, args.older_than)
    lines = [f"{remote.url}: removed {plural(len(result['removed']), 'object')} older than "
             f"{args.older_than:g}s (entries and the blobs no entry uses)"]
    lines += [f"  {name}" for name in result["removed"]]
    _out(args, {"remote": remote.url, **result}, lines)
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    from pytest_mlcjit.cache.manage.prune import quarantined

    verb = "would remove" if args.dry_run else "removed"
    lines: list[str] = []
    roots: list[dict[str, Any]] = []
    for root in _roots(args):
        quarantine = quarantined(root)  # what clear removes besides the entries
        r = manage.clear(root, dry_run=args.dry_run)
        roots.append({**r.to_json(), "quarantine_removed": [str(p) for _, p, _ in quarantine]})
        lines.append(f"{r.root}: {verb} {plural(len(r.removed), 'entry', 'entries')} and "
                     f"{plural(len(quarantine), 'quarantined entry', 'quarantined entries')} "
                     f"({format_size(r.freed)})")
        lines += [f"  kept {e.digest[:12]} {e.model}: its lock is held by a live process"
                  for e in r.kept_locked]
    _out(args, {"roots": roots}, lines)
    return 0


# -- key and explain: what the tests request ------------------------------------------------------
def collect_requests(pytest_args: Sequence[str], *, cache_dir: str | None,
                     status: bool) -> dict[str, Any]:
    """Run ``pytest --collect-only`` with our collector; the libraries the tests request."""
    from pytest_mlcjit.plugin.collect import OUT_ENV, STATUS_ENV

    with tempfile.TemporaryDirectory(prefix="mlcjit-collect-") as tmp:
        out = Path(tmp) / "requests.json"
        env = {**os.environ, OUT_ENV: str(out)}
        if status:
            env[STATUS_ENV] = "1"
        # READONLY: keying writes nothing (not even MLC's per-run key memos); the digests
        # do not depend on the policy.
        cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q",
               "-p", "pytest_mlcjit.plugin.collect", "-p", "no:cacheprovider", *pytest_args,
               "--mlc-jit-policy=READONLY"]
        if cache_dir:
            cmd += ["--mlc-jit-cache-dir", cache_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode not in (0, 5) or not out.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            # pytest's own usage error (exit 4: a bad pytest option) is ours too.
            error = CliUsageError if proc.returncode == 4 else CliError
            raise error(f"collecting the tests failed (pytest exit {proc.returncode}): "
                           f"{' '.join(cmd[1:])}\n{tail}")
        data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    if "error" in data:
        raise CliError(str(data["error"]))
    return data


def cmd_key(args: argparse.Namespace) -> int:
    from pytest_mlcjit.key import tvm_fingerprint

    data = collect_requests(args.pytest_args, cache_dir=args.cache_dir, status=False)
    libraries = data["libraries"]
    material = [{"digest": lib["digest"], "toolchain": lib["toolchain"],
                 "sources": lib.get("sources", [])} for lib in libraries]
    # A malformed spec has no digest; its error text stands in, so fixing it changes the key.
    material += [{"digest": e["error"], "toolchain": None} for e in data["errors"]]
    key = manage.cache_key(material)
    for error in data["errors"]:
        print(f"{PROG}: warning: {error['test']}: {error['error']}", file=sys.stderr)
    _out(args, {"key": key, "libraries": libraries, "errors": data["errors"],
                "excluded": len(data["excluded"]), "tvm": tvm_fingerprint(),
                "policy": data["policy"], "devices": data["devices"]}, [key])
    return 0


def _explain_one(lib: dict[str, Any], scans: dict[str, list[manage.Entry]]) -> dict[str, Any]:
    lib = dict(lib)
    lib["nearest"], lib["differences"] = None, []
    if lib["status"] != "missing":
        return lib
    root = lib["root"]
    if root not in scans:
        scans[root] = manage.scan(Path(root))
    entry, diffs = manage.nearest(scans[root], lib["key"], lib["backend"])
    if entry is not None:
        lib["nearest"] = {"digest": entry.digest, "model": entry.model, "target": entry.target,
                          "created": entry.created, "last_used": entry.last_used}
        lib["differences"] = [{"field": f, "wanted": w, "cached": c} for f, w, c in diffs]
    return lib


def _explain_lines(lib: dict[str, Any]) -> list[str]:
    tests = lib["tests"]
    more = f" (+{plural(len(tests) - 1, 'more test')})" if len(tests) > 1 else ""
    lines = [f"{tests[0]}{more}", f"  {lib['describe']}",
             f"  key {lib['digest']}: {lib['status']} in {lib['root']}"]
    nearest = lib["nearest"]
    if lib["status"] == "missing" and nearest is None:
        lines.append(f"  the cache holds no {lib['backend']} entry to compare with")
    elif nearest is not None:
        diffs = lib["differences"]
        lines.append(f"  nearest entry {nearest['digest'][:12]} ({nearest['model']} on "
                     f"{nearest['target']}, created {format_time(nearest['created'])}) "
                     f"differs in {plural(len(diffs), 'key field')}:")
        lines += [f"    {d['field']}: wanted {json.dumps(d['wanted'])}, cached "
                  f"{json.dumps(d['cached'])}" for d in diffs]
    return lines


def _spec_from_args(args: argparse.Namespace) -> Any:
    if args.model_dir:
        from pytest_mlcjit.build.backends.mlc import MLCModel

        return MLCModel(args.model_dir, overrides=_json_arg(args.overrides, "--overrides"),
                        opt=args.opt, target=args.target)
    from pytest_mlcjit.spec import TVMModel

    target: Any = args.target
    if target and target.strip().startswith("{"):
        target = _json_arg(target, "--target")
    return TVMModel(args.factory, _json_arg(args.config, "--config"), target=target,
                    opt_level=args.opt_level)


def _json_arg(text: str | None, name: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CliUsageError(f"invalid {name} {text!r}: not JSON ({exc})") from None


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Key one spec given on the command line, in this process (nothing is compiled)."""
    from pytest_mlcjit.engine.jit import JIT
    from pytest_mlcjit.policy import Policy
    from pytest_mlcjit.engine.settings import Settings

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # factories beside the tests, as pytest finds them
    root = default_roots(args.cache_dir)[0] if (
        args.cache_dir or os.environ.get("MLC_JIT_CACHE_DIR")) else None
    engine = JIT(Settings(policy=Policy.READONLY, cache_dir=root))
    spec = _spec_from_args(args)
    req = engine.request(spec, args.device)
    return {"digest": req.digest, "backend": req.backend, "describe": req.describe,
            "key": req.key, "toolchain": dict(req.toolchain), "root": str(engine.root_for(req)),
            "tests": ["(command line)"], "status": engine.status(spec, args.device)}


def cmd_explain(args: argparse.Namespace) -> int:
    if args.factory or args.model_dir:
        if args.pytest_args:
            raise CliUsageError("give either a spec (--factory/--model-dir) or pytest "
                                "arguments")
        libraries = [_request_from_args(args)]
        errors: list[dict[str, str]] = []
    else:
        data = collect_requests(args.pytest_args, cache_dir=args.cache_dir, status=True)
        libraries, errors = data["libraries"], data["errors"]
    scans: dict[str, list[manage.Entry]] = {}
    explained = [_explain_one(lib, scans) for lib in libraries]
    hits = sum(lib["status"] == "hit" for lib in explained)
    lines = [f"{plural(len(explained), 'library', 'libraries')} requested: {hits} cached, "
             f"{len(explained) - hits} would miss under READONLY"]
    for lib in explained:
        if lib["status"] != "hit" or args.all:
            lines += _explain_lines(lib)
    lines += [f"{e['test']}: {e['error']}" for e in errors]
    _out(args, {"libraries": explained, "errors": errors}, lines)
    if args.check and (hits < len(explained) or errors):
        return EXIT_FAILURE
    return 0


# -- the parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir", metavar="PATH", default=None,
        help="the cache root (default: $MLC_JIT_CACHE_DIR, else the plugin's defaults: "
        "$XDG_CACHE_HOME/pytest-mlcjit and, for MLC entries, $MLC_LLM_HOME)")
    common.add_argument("--json", action="store_true", help="print one JSON object")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Look after the pytest-mlcjit cache of compiled libraries.",
        epilog="Run 'pytest-mlcjit COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(func=func)
        return p

    p = add("list", cmd_list, "list the entries: backend, model, target, size, created, last "
            "used, compile seconds (most recently used first)")
    p.add_argument("--inputs", action="store_true",
                   help="also show each entry's recorded inputs: the local modules and files "
                   "its factory read (path, SHA-256) and the distributions it imported")
    p.add_argument("--failed", action="store_true",
                   help="list the remembered failures instead: known failures (the factory "
                   "or the compiler raised; later runs report them without compiling while "
                   "the key and its recorded inputs are unchanged) and failures remembered "
                   "for their run only, with their error and compile log")
    p = add("info", cmd_info, "summarize the cache: root, entries, size, toolchains seen, "
            "hits and misses of the last runs")
    p.add_argument("--runs", type=_count, default=5, metavar="N",
                   help="how many recent runs to show (default 5)")
    p.add_argument("--inputs", action="store_true",
                   help="also list the recorded inputs (local modules, files, distributions) "
                   "the entries were built from, with how many entries use each")
    p = add("verify", cmd_verify, "check every entry's size and SHA-256 against its manifest; "
            "exit 1 if a corrupt entry remains")
    p.add_argument("--fix", action="store_true",
                   help="move corrupt entries to .mlcjit/quarantine (they are then misses)")
    p = add("prune", cmd_prune, "evict least recently used entries (by the cache's own usage "
            "records), never one being compiled")
    p.add_argument("--max-size", type=argparse_type(lambda t: parse_size(t,
                   what="--max-size")), metavar="SIZE",
                   help="evict until the cache is at most SIZE: 10G, 500M, 2GiB (K/M/G/T are "
                   "powers of 1000, Ki/Mi/Gi/Ti of 1024)")
    p.add_argument("--older-than", type=argparse_type(lambda t: parse_age(t,
                   what="--older-than")), metavar="AGE",
                   help="evict entries last used longer ago than AGE: 30d, 12h, 90m, 2w")
    p.add_argument("--keep-last-used", type=_count, metavar="N",
                   help="keep only the N most recently used entries")
    p.add_argument("--failed", action="store_true",
                   help="remove every remembered failure (known failures are then compiled "
                   "again by the next run); --older-than also removes those recorded longer "
                   "ago than AGE")
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    p = add("remote", cmd_remote, "the remote tier (--remote URL or $MLC_JIT_REMOTE; "
            "signatures checked with $MLC_JIT_REMOTE_SIGNING_KEY): ls lists its entries, "
            "verify checks every digest and signature (exit 1 on a bad entry), prune "
            "--older-than AGE removes old entries and unused blobs")
    remote_sub = p.add_subparsers(dest="remote_command", metavar="ls|verify|prune",
                                  required=True)
    for name, text in (("ls", "list the remote's entries"),
                       ("verify", "check every entry's digest and signature"),
                       ("prune", "remove entries created longer ago than --older-than")):
        r = remote_sub.add_parser(name, parents=[common], help=text, description=text)
        r.add_argument("--remote", metavar="URL", default=None,
                       help="s3://bucket/prefix or file:///path (default $MLC_JIT_REMOTE)")
        if name == "prune":
            r.add_argument("--older-than", required=True, metavar="AGE",
                           type=argparse_type(lambda t: parse_age(t, what="--older-than")),
                           help="remove entries created longer ago than AGE: 30d, 12h, 2w")
    p = add("clear", cmd_clear, "remove every entry (except one being compiled), the "
            "quarantine and the run history")
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    p = add("key", cmd_key, "print a cache key for CI cache actions: a digest of the toolchain "
            "and of every library the tests request (pytest arguments after --)")
    p.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
                   help="paths and options as for pytest, e.g. -- tests --mlc-device=cpu")
    p = add("explain", cmd_explain, "for each library the tests request (pytest arguments "
            "after --) or for one spec: whether it is cached and, if not, the nearest entry "
            "and the key fields that differ")
    p.add_argument("pytest_args", nargs="*", metavar="-- PYTEST_ARGS",
                   help="paths and options as for pytest")
    p.add_argument("--all", action="store_true", help="also show the libraries that hit")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a library would miss under READONLY (or a test's spec is "
                   "invalid): a CI step that gates a READONLY test run")
    spec = p.add_argument_group("one spec instead of tests")
    spec.add_argument("--factory", metavar="MODULE:FUNC", help="a TVMModel factory")
    spec.add_argument("--config", metavar="JSON", help="the TVMModel config, as JSON")
    spec.add_argument("--opt-level", type=int, default=3, metavar="N",
                      help="the TVMModel opt_level (default 3)")
    spec.add_argument("--model-dir", metavar="DIR", help="an MLC model directory")
    spec.add_argument("--overrides", metavar="JSON", help="MLC overrides, as a JSON object")
    spec.add_argument("--opt", metavar="OPT", default=None, help="MLC opt (default O2)")
    spec.add_argument("--target", metavar="TARGET",
                      help="a target: a TVM target (kind or JSON) or an MLC packaging target")
    spec.add_argument("--device", default="cpu", help="the device (default cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        hint = (f"; pytest arguments go after '--': {PROG} {args.command} -- {' '.join(extra)}"
                if args.command in ("key", "explain") else "")
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    try:
        result: int = args.func(args)
    except (CliError, MlcJitError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        if isinstance(exc, CliError):
            return exc.status
        # A bad value given on the command line (a spec, a device) is a usage error.
        return EXIT_USAGE if isinstance(exc, ConfigError | SpecError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as exc:  # a cache file we may not read or change: say which, no traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: cannot use{where}: {exc.strerror or exc}; check its owner and "
              "permissions (another user's files, a read-only filesystem)", file=sys.stderr)
        return EXIT_FAILURE
    return result


if __name__ == "__main__":
    sys.exit(main())
