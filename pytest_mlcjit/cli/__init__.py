"""The ``pytest-mlcjit`` command (also ``python -m pytest_mlcjit``): look after the cache.

Subcommands: ``list``, ``info``, ``verify``, ``prune``, ``clear`` (:mod:`.local`), ``stats``
(:mod:`.stats`), ``remote`` (:mod:`.remote`), ``key`` and ``explain`` (:mod:`.requests`).
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
import os
import sys
from collections.abc import Callable, Sequence

from pytest_mlcjit._version import __version__
from pytest_mlcjit.cli.local import cmd_clear, cmd_info, cmd_list, cmd_prune, cmd_verify
from pytest_mlcjit.cli.remote import add_remote_commands, cmd_remote
from pytest_mlcjit.cli.render import EXIT_FAILURE, EXIT_USAGE, PROG, count_arg
from pytest_mlcjit.cli.requests import cmd_explain, cmd_key
from pytest_mlcjit.cli.stats import add_stats_arguments, cmd_stats
from pytest_mlcjit.errors import (
    CliError,
    ConfigError,
    MlcJitError,
    SpecError,
    argparse_type,
)
from pytest_mlcjit.units import parse_age, parse_size


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
            "each of the last runs, in the summary's words")
    p.add_argument("--runs", type=count_arg, default=5, metavar="N",
                   help="how many recent runs to show (default 5)")
    p.add_argument("--inputs", action="store_true",
                   help="also list the recorded inputs (local modules, files, distributions) "
                   "the entries were built from, with how many entries use each")
    p = add("stats", cmd_stats, "the cache's history at a glance: each of the last runs' "
            "requests, hit rate, compiles, seconds compiling and seconds saved (its hits' "
            "recorded compile times), charts of hit rate and time saved, and the totals")
    add_stats_arguments(p)
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
    p.add_argument("--keep-last-used", type=count_arg, metavar="N",
                   help="keep only the N most recently used entries")
    p.add_argument("--failed", action="store_true",
                   help="remove every remembered failure (known failures are then compiled "
                   "again by the next run); --older-than also removes those recorded longer "
                   "ago than AGE")
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    p = add("remote", cmd_remote, "the remote tier (--remote URL or $MLC_JIT_REMOTE; "
            "signatures checked with $MLC_JIT_REMOTE_SIGNING_KEY): ls lists its entries, "
            "verify checks every digest and signature (exit 1 on a bad entry) and lists the "
            "quarantined ones, prune removes old or least recently used entries and the "
            "blobs no entry uses, rm removes one entry or key")
    add_remote_commands(p, common)
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
