"""``pytest-mlcjit key`` and ``explain``: what the tests request (a ``pytest --collect-only``
run with :mod:`pytest_mlcjit.plugin.collect`), the CI cache key over it, and misses
explained against the nearest entry."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_mlcjit._util.collect import OUT_ENV, PLUGIN, STATUS_ENV
from pytest_mlcjit.cache import manage
from pytest_mlcjit.cache.layout import default_roots
from pytest_mlcjit.cache.manage.explain import incomplete_inputs
from pytest_mlcjit.cli.render import EXIT_FAILURE, PROG, out
from pytest_mlcjit.compiler.backends.mlc import MLCModel
from pytest_mlcjit.compiler.toolchain import toolchain_changes, tvm_fingerprint
from pytest_mlcjit.engine.jit import JIT
from pytest_mlcjit.engine.settings import Settings
from pytest_mlcjit.errors import CliError, CliUsageError
from pytest_mlcjit.key import CACHE_FORMAT, sha256_digest
from pytest_mlcjit.policy import Policy
from pytest_mlcjit.spec import TVMModel
from pytest_mlcjit.units import format_time, plural


# -- key and explain: what the tests request ------------------------------------------------------
def collect_requests(pytest_args: Sequence[str], *, cache_dir: str | None,
                     status: bool) -> dict[str, Any]:
    """Run ``pytest --collect-only`` with our collector; the libraries the tests request."""
    with tempfile.TemporaryDirectory(prefix="mlcjit-collect-") as tmp:
        out = Path(tmp) / "requests.json"
        env = {**os.environ, OUT_ENV: str(out)}
        if status:
            env[STATUS_ENV] = "1"
        # READONLY: keying writes nothing (not even MLC's per-run key memos); the digests
        # do not depend on the policy.
        cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q",
               "-p", PLUGIN, "-p", "no:cacheprovider", *pytest_args,
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

    data = collect_requests(args.pytest_args, cache_dir=args.cache_dir, status=False)
    libraries = data["libraries"]
    material = [{"digest": lib["digest"], "toolchain": lib["toolchain"],
                 "sources": lib.get("sources", [])} for lib in libraries]
    # A malformed spec has no digest; its error text stands in, so fixing it changes the key.
    material += [{"digest": e["error"], "toolchain": None} for e in data["errors"]]
    key = cache_key(material)
    for error in data["errors"]:
        print(f"{PROG}: warning: {error['test']}: {error['error']}", file=sys.stderr)
    out(args, {"key": key, "libraries": libraries, "errors": data["errors"],
                "excluded": len(data["excluded"]), "tvm": tvm_fingerprint(),
                "policy": data["policy"], "devices": data["devices"]}, [key])
    return 0


def _explain_one(lib: dict[str, Any], scans: dict[str, list[manage.Entry]]) -> dict[str, Any]:
    lib = dict(lib)
    lib["nearest"], lib["differences"] = None, []
    root = lib["root"]
    if root not in scans:
        scans[root] = manage.scan(Path(root))
    lib["incomplete"] = incomplete_inputs(scans[root], lib["digest"])
    if lib["status"] != "missing":
        return lib
    entry, diffs = manage.nearest(scans[root], lib["key"], lib["backend"])
    if entry is not None:
        lib["nearest"] = {"digest": entry.digest, "model": entry.model, "target": entry.target,
                          "created": entry.created, "last_used": entry.last_used}
        lib["differences"] = [{"field": f, "wanted": w, "cached": c} for f, w, c in diffs]
        wanted, cached = lib.get("toolchain") or lib["key"].get("toolchain"), entry.toolchain
        if isinstance(wanted, Mapping) and isinstance(cached, Mapping):
            lib["toolchain_changes"] = [{"software": name, "cached": old, "installed": new}
                                        for name, old, new in toolchain_changes(cached, wanted)]
    return lib


def _explain_lines(lib: dict[str, Any]) -> list[str]:
    tests = lib["tests"]
    more = f" (+{plural(len(tests) - 1, 'more test')})" if len(tests) > 1 else ""
    lines = [f"{tests[0]}{more}", f"  {lib['describe']}",
             f"  key {lib['digest']}: {lib['status']} in {lib['root']}"]
    lines += [f"  recorded inputs incomplete: {note}" for note in lib.get("incomplete", ())]
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
        lines += [f"  toolchain changed: {c['software']} {c['cached']} in the cache, "
                  f"{c['installed']} installed" for c in lib.get("toolchain_changes", ())]
    return lines


def _spec_from_args(args: argparse.Namespace) -> Any:
    if args.model_dir:

        return MLCModel(args.model_dir, overrides=_json_arg(args.overrides, "--overrides"),
                        opt=args.opt, target=args.target)

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
    added = os.getcwd() not in sys.path
    if added:  # factories beside the tests, as pytest finds them
        sys.path.insert(0, os.getcwd())
    try:
        root = default_roots(args.cache_dir)[0] if (
            args.cache_dir or os.environ.get("MLC_JIT_CACHE_DIR")) else None
        engine = JIT(Settings(policy=Policy.READONLY, cache_dir=root))
        spec = _spec_from_args(args)
        req = engine.request(spec, args.device)
        return {"digest": req.digest, "backend": req.backend, "describe": req.describe,
                "key": req.key, "toolchain": dict(req.toolchain),
                "root": str(engine.root_for(req)), "tests": ["(command line)"],
                "status": engine.status(spec, args.device)}
    finally:
        if added:
            sys.path.remove(os.getcwd())


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
        if lib["status"] != "hit" or args.all or lib["incomplete"]:
            lines += _explain_lines(lib)
    lines += [f"{e['test']}: {e['error']}" for e in errors]
    out(args, {"libraries": explained, "errors": errors}, lines)
    if args.check and (hits < len(explained) or errors):
        return EXIT_FAILURE
    return 0


def cache_key(requests: Sequence[Mapping[str, Any]]) -> str:
    """The CI cache key of a test suite: the SHA-256 of the toolchain and of every distinct
    library it requests (each request's digest and toolchain; the digests of TVM entries
    already cover the toolchain, MLC's MD5 does not), and of the local source files each
    is known to depend on (``sources``: a factory's local imports, read not run)."""
    libraries = sorted({json.dumps([r["digest"], r.get("toolchain"), r.get("sources") or []],
                                   sort_keys=True) for r in requests})
    return sha256_digest({"format": CACHE_FORMAT, "tvm": tvm_fingerprint(),
                          "libraries": libraries})
