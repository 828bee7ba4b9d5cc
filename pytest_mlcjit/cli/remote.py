"""``pytest-mlcjit remote ls|verify|prune|rm``: the remote tier's entries."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from pytest_mlcjit.cache.manage import remote as jobs
from pytest_mlcjit.cache.store.remote import Remote, open_remote
from pytest_mlcjit.cache.store.remote.maintenance import DEFAULT_BLOB_GRACE_S, PruneReport
from pytest_mlcjit.cli.render import EXIT_FAILURE, out
from pytest_mlcjit.engine.remote import remote_options
from pytest_mlcjit.engine.settings import from_environment
from pytest_mlcjit.errors import CliError, CliUsageError, ConfigError, argparse_type
from pytest_mlcjit.units import format_size, format_time, parse_age, parse_size, plural

__all__ = ["add_remote_commands", "cmd_remote", "open_for_cli"]

#: How many candidates an ambiguous ``remote rm`` lists.
MAX_CANDIDATES = 20


def add_remote_commands(parser: argparse.ArgumentParser,
                        common: argparse.ArgumentParser) -> None:
    """``remote``'s subcommands and their options."""
    remote_sub = parser.add_subparsers(dest="remote_command", metavar="ls|verify|prune|rm",
                                       required=True)
    for name, text in (("ls", "list the remote's entries"),
                       ("verify", "check every entry's digest and signature; list the "
                        "entries runs moved aside (quarantine/)"),
                       ("prune", "remove entries not used for --older-than, then the least "
                        "recently used down to --max-size, then the blobs no entry uses "
                        "(past --blob-grace)"),
                       ("rm", "remove one entry (KEY/ENTRY) or every entry of a key (KEY); "
                        "its blob goes with the next prune")):
        r = remote_sub.add_parser(name, parents=[common], help=text, description=text)
        r.add_argument("--remote", metavar="URL", default=None,
                       help="s3://bucket/prefix or file:///path (default $MLC_JIT_REMOTE)")
        if name == "prune":
            r.add_argument("--older-than", metavar="AGE", default=None,
                           type=argparse_type(lambda t: parse_age(t, what="--older-than")),
                           help="remove entries last used (or created) longer ago than AGE: "
                           "30d, 12h, 2w")
            r.add_argument("--max-size", metavar="SIZE", default=None,
                           type=argparse_type(lambda t: parse_size(t, what="--max-size")),
                           help="then remove least recently used entries until the blobs "
                           "the others use total at most SIZE: 10G, 500M, 1.5GiB (K/M/G/T "
                           "are powers of 1000, Ki/Mi/Gi/Ti of 1024)")
            r.add_argument("--blob-grace", metavar="SECONDS", default=None,
                           type=argparse_type(lambda t: parse_age(t, what="--blob-grace")),
                           help="keep a blob no entry uses this long after its last write "
                           "(an upload writes its blob before its entry; one that reuses a "
                           f"blob touches it): seconds, or 30m, 2h (default "
                           f"{DEFAULT_BLOB_GRACE_S:g})")
            r.add_argument("--dry-run", action="store_true",
                           help="say what would go, remove nothing")
        if name == "rm":
            r.add_argument("target", metavar="ENTRY|KEY",
                           type=argparse_type(jobs.parse_target),
                           help="KEY/ENTRY as 'remote ls' prints it (12-digit prefixes of "
                           "the key and entry digests, or the full digests), or KEY: "
                           "every entry of that key")


def cmd_remote(args: argparse.Namespace) -> int:
    if args.remote_command == "prune" and args.older_than is None and args.max_size is None:
        raise CliUsageError("remote prune needs --older-than AGE, --max-size SIZE or both "
                            "(the blobs no entry uses go with either)")
    remote = open_for_cli(args.remote)
    if args.remote_command == "ls":
        entries = jobs.list_entries(remote)
        lines = [f"{remote.url}: {plural(len(entries), 'entry', 'entries')}"]
        for e in entries:
            state = f" [{e['problem']}]" if e["problem"] else (" signed" if e["signed"] else "")
            lines.append(f"  {e['key_digest'][:12]}/{e['entry_digest'][:12]}  {e['model']}  "
                         f"{e['target']}  {format_size(e['size'] or 0)}  "
                         f"{format_time(e['created'])}{state}")
        out(args, {"remote": remote.url, "entries": entries}, lines)
        return 0
    if args.remote_command == "verify":
        return _verify(args, remote)
    if args.remote_command == "rm":
        return _rm(args, remote)
    return _prune(args, remote)


def _verify(args: argparse.Namespace, remote: Remote) -> int:
    result = jobs.verify(remote)
    how = "digests and signatures" if result["signatures_checked"] else (
        f"digests; neither $MLC_JIT_REMOTE_TRUSTED_KEYS nor ${result['signing_key_env']} is "
        "set, so signatures are not checked")
    lines = [f"{remote.url}: {plural(result['checked'], 'entry', 'entries')} checked "
             f"({how}): {len(result['bad'])} bad"]
    for e in result["bad"]:
        lines += [f"  {e['key_digest'][:12]}/{e['entry_digest'][:12]}: {e['problem']}",
                  f"    remove it: {e['remove']}" if e["remove"] else
                  "    never used (a newer generation replaced it); remote prune removes it "
                  "by age (--older-than)"]
    quarantined = result["quarantined"]
    if quarantined:
        lines.append(f"{plural(len(quarantined), 'entry', 'entries')} moved aside by the runs "
                     "that refused them (quarantine/; they are misses, compiled again):")
    for q in quarantined:
        name = (f"{q['key_digest'][:12]}/{q['entry_digest'][:12]}" if q["key_digest"]
                else q["location"])
        lines.append(f"  {name}: {q['why']} ({format_time(q['time'])})")
        if q["remove"]:
            lines.append(f"    remove the record: {q['remove']}")
    out(args, {"remote": remote.url, **result}, lines)
    return EXIT_FAILURE if result["bad"] else 0


def _prune(args: argparse.Namespace, remote: Remote) -> int:
    grace = DEFAULT_BLOB_GRACE_S if args.blob_grace is None else args.blob_grace
    r = jobs.prune(remote, older_than=args.older_than, max_size=args.max_size,
                   dry_run=args.dry_run, blob_grace=grace)
    out(args, {"remote": remote.url, **jobs.prune_json(r)}, _prune_lines(remote, r))
    return 0


def _prune_lines(remote: Remote, r: PruneReport) -> list[str]:
    verb = "would remove" if r.dry_run else "removed"
    limits = [] if r.older_than is None else [f"unused for {_age(r.older_than)}"]
    if r.max_size is not None:
        limits.append(f"least recently used beyond --max-size {format_size(r.max_size)}")
    lines = [f"{remote.url}: {verb} {plural(len(r.entries), 'entry', 'entries')} "
             f"({' or '.join(limits)}) and {plural(len(r.blobs), 'blob')} no entry uses; "
             f"the entries' blobs: {format_size(r.total_before)} -> "
             f"{format_size(r.total_after)}",
             f"  blob grace period: {r.blob_grace:g}s (--blob-grace): a blob no entry uses "
             "is kept that long after its last write"]
    for p in r.entries:
        why = "least recently used" if p.why == "max-size" else "unused"
        lines.append(f"  {verb} {p.entry.location} ({why}; last used "
                     f"{format_time(p.last_used)})")
    lines += [f"  {verb} {url}" for url in r.blobs]
    if r.blobs_in_grace:
        lines.append(f"  kept {plural(r.blobs_in_grace, 'blob')} no entry uses, written "
                     f"within the last {r.blob_grace:g}s (a later prune removes them)")
    lines += [f"  kept {url}: {why}" for url, why in r.blobs_rescued]
    for count, what in ((r.access_records, "access record"),
                        (r.quarantine_records, "quarantine record")):
        if count:
            lines.append(f"  {verb} {plural(count, what)}")
    others = len(r.removed) - len(r.entries) - len(r.blobs) - r.access_records \
        - r.quarantine_records
    if others > 0:
        lines.append(f"  {verb} {plural(others, 'temporary file')} left by writers that died")
    if r.over_budget:
        lines.append(f"  still over --max-size: {plural(r.kept_in_use, 'entry', 'entries')} "
                     "in use kept")
    return lines


def _age(seconds: float) -> str:
    """``2592000`` → ``30d``: the largest unit that divides it (as --older-than takes)."""
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _rm(args: argparse.Namespace, remote: Remote) -> int:
    key, entry = args.target
    what = f"{key}/{entry}" if entry is not None else key
    found = jobs.find(remote, key, entry)
    if not found:
        raise CliError(f"{remote.url} has no entry {what} (nothing removed); "
                       "'pytest-mlcjit remote ls' lists the entries")
    keys = sorted({k for k, _ in found})
    if entry is not None and len(found) > 1:
        _ambiguous(what, [f"{k}/{e}" for k, e in sorted(found)])
    if entry is None and len(keys) > 1:
        counts = {k: sum(1 for kk, _ in found if kk == k) for k in keys}
        _ambiguous(what, [f"{k} ({plural(n, 'entry', 'entries')})"
                          for k, n in counts.items()])
    removed = jobs.remove(remote, found)
    lines = [f"{remote.url}: removed {plural(len(found), 'entry', 'entries')} of key "
             f"{keys[0]}; the blobs go with the next 'pytest-mlcjit remote prune' once no "
             "entry uses them"]
    lines += [f"  removed {url}" for url in removed]
    out(args, {"remote": remote.url, "removed": removed,
               "entries": [f"{k}/{e}" for k, e in sorted(found)]}, lines)
    return 0


def _ambiguous(what: str, candidates: Sequence[str]) -> None:
    shown = [f"  {c}" for c in candidates[:MAX_CANDIDATES]]
    if len(candidates) > MAX_CANDIDATES:
        shown.append(f"  and {len(candidates) - MAX_CANDIDATES} more")
    raise CliError(f"{what} is ambiguous: it names {len(candidates)} candidates "
                   "(nothing removed); give more digits:\n" + "\n".join(shown))


def open_for_cli(url: str | None) -> Remote:
    """The remote named by ``--remote`` or ``$MLC_JIT_REMOTE`` (signed with
    ``$MLC_JIT_REMOTE_SIGNING_KEY`` when set; the timeouts of the option table's
    ``MLC_JIT_REMOTE_*_TIMEOUT``); ConfigError if neither names one."""
    url = url or os.environ.get("MLC_JIT_REMOTE")
    if not url:
        raise ConfigError("no remote: pass --remote s3://bucket/prefix (or file:///path), or "
                          "set MLC_JIT_REMOTE")
    return open_remote(url, remote_options(from_environment()))
