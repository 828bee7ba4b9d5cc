"""The ``pytest-mlcjit`` command (also ``python -m pytest_mlcjit``): look after the cache.

Subcommands: ``list``, ``info``, ``verify``, ``prune``, ``clear``, ``key``, ``explain``.
Each takes ``--cache-dir PATH`` (default: the plugin's, ``$MLC_JIT_CACHE_DIR`` too) and
``--json`` (one JSON object on stdout). Exit status: 0 on success, 1 when ``verify``
leaves a corrupt entry, 2 on a usage or runtime error.

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

from . import __version__, manage
from .errors import MlcJitError, argparse_type
from .layout import default_roots
from .units import format_size, format_time, parse_age, parse_size, plural

PROG = "pytest-mlcjit"


class CliError(Exception):
    """A failure to report as ``pytest-mlcjit: error: …`` with exit status 2."""


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
            model = e.model if e.state == "ok" else f"{e.model} [{e.state}]"
            rows.append((e.digest[:12], e.backend, model, e.target, format_size(e.size),
                         format_time(e.created), format_time(e.last_used),
                         seconds))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False))
                  + "  " + r[-1] for r in rows]
    _out(args, data, lines)
    return 0


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
            "  toolchains seen:" + ("" if data["toolchains"] else " none"),
        ]
        for seen in data["toolchains"]:
            mark = " (the installed TVM)" if seen.get("installed_tvm") else ""
            lines.append(f"    {_toolchain_text(seen['toolchain'])}: "
                         f"{plural(seen['entries'], 'entry', 'entries')}{mark}")
        lines.append("  last runs:" + ("" if data["runs"] else " none recorded"))
        lines += [f"    {_run_line(run)}" for run in data["runs"]]
    _out(args, {"roots": infos}, lines)
    return 0


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
    if args.max_size is None and args.older_than is None and args.keep_last_used is None:
        raise CliError("prune needs at least one of --max-size, --older-than, "
                       "--keep-last-used (use 'clear' to remove everything)")
    results = [manage.prune(root, max_size=args.max_size, older_than=args.older_than,
                            keep_last_used=args.keep_last_used, dry_run=args.dry_run)
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
            lines.append(f"  removed {removed}")
        if r.over_cap:
            lines.append(f"  still over --max-size ({format_size(r.max_size or 0)}): "
                         "the rest is in use")
    _out(args, {"roots": [r.to_json() for r in results]}, lines)
    return 0


# -- clear --------------------------------------------------------------------------------------
def cmd_clear(args: argparse.Namespace) -> int:
    results = [manage.clear(root, dry_run=args.dry_run) for root in _roots(args)]
    verb = "would remove" if args.dry_run else "removed"
    lines: list[str] = []
    for r in results:
        lines.append(f"{r.root}: {verb} {plural(len(r.removed), 'entry', 'entries')} "
                     f"({format_size(r.freed)})")
        lines += [f"  kept {e.digest[:12]} {e.model}: its lock is held by a live process"
                  for e in r.kept_locked]
    _out(args, {"roots": [r.to_json() for r in results]}, lines)
    return 0


# -- key and explain: what the tests request ------------------------------------------------------
def collect_requests(pytest_args: Sequence[str], *, cache_dir: str | None,
                     status: bool) -> dict[str, Any]:
    """Run ``pytest --collect-only`` with our collector; the libraries the tests request."""
    from ._collect import OUT_ENV, STATUS_ENV

    with tempfile.TemporaryDirectory(prefix="mlcjit-collect-") as tmp:
        out = Path(tmp) / "requests.json"
        env = {**os.environ, OUT_ENV: str(out)}
        if status:
            env[STATUS_ENV] = "1"
        # READONLY: keying writes nothing (not even MLC's per-run key memos); the digests
        # do not depend on the policy.
        cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q",
               "-p", "pytest_mlcjit._collect", "-p", "no:cacheprovider", *pytest_args,
               "--mlc-jit-policy=READONLY"]
        if cache_dir:
            cmd += ["--mlc-jit-cache-dir", cache_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode not in (0, 5) or not out.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise CliError(f"collecting the tests failed (pytest exit {proc.returncode}): "
                           f"{' '.join(cmd[1:])}\n{tail}")
        data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    if "error" in data:
        raise CliError(str(data["error"]))
    return data


def cmd_key(args: argparse.Namespace) -> int:
    from .key import tvm_fingerprint

    data = collect_requests(args.pytest_args, cache_dir=args.cache_dir, status=False)
    libraries = data["libraries"]
    material = [{"digest": lib["digest"], "toolchain": lib["toolchain"]} for lib in libraries]
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
        from .backends.mlc import MLCModel

        return MLCModel(args.model_dir, overrides=_json_arg(args.overrides, "--overrides"),
                        opt=args.opt, target=args.target)
    from .spec import TVMModel

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
        raise CliError(f"invalid {name} {text!r}: not JSON ({exc})") from None


def _request_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Key one spec given on the command line, in this process (nothing is compiled)."""
    from .backends import get_backend
    from .engine import JIT
    from .policy import Policy
    from .settings import Settings

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # factories beside the tests, as pytest finds them
    root = default_roots(args.cache_dir)[0] if (
        args.cache_dir or os.environ.get("MLC_JIT_CACHE_DIR")) else None
    engine = JIT(Settings(policy=Policy.READONLY, cache_dir=root))
    req = engine.request(_spec_from_args(args), args.device)
    where = engine.root_for(req)
    entries = manage.scan(where)
    backend = get_backend(req.backend)
    return {"digest": req.digest, "backend": req.backend, "describe": req.describe,
            "key": req.key, "toolchain": dict(req.toolchain), "root": str(where),
            "tests": ["(command line)"],
            "status": manage.entry_status(entries, req.digest,
                                          lambda m: backend.stale(req, m))}


def cmd_explain(args: argparse.Namespace) -> int:
    if args.factory or args.model_dir:
        if args.pytest_args:
            raise CliError("give either a spec (--factory/--model-dir) or pytest arguments")
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

    add("list", cmd_list, "list the entries: backend, model, target, size, created, last used, "
        "compile seconds (most recently used first)")
    p = add("info", cmd_info, "summarize the cache: root, entries, size, toolchains seen, "
            "hits and misses of the last runs")
    p.add_argument("--runs", type=_count, default=5, metavar="N",
                   help="how many recent runs to show (default 5)")
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
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
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
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
