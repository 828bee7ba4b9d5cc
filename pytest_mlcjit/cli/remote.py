"""``pytest-mlcjit remote ls|verify|prune``: the remote tier's entries."""

from __future__ import annotations

import argparse
import os

from pytest_mlcjit.cache.manage import remote as jobs
from pytest_mlcjit.cache.store.remote import Remote, open_remote
from pytest_mlcjit.cli.render import EXIT_FAILURE, out
from pytest_mlcjit.engine.remote import remote_options
from pytest_mlcjit.engine.settings import from_environment
from pytest_mlcjit.errors import ConfigError
from pytest_mlcjit.units import format_size, format_time, plural


def cmd_remote(args: argparse.Namespace) -> int:
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
        result = jobs.verify(remote)
        how = "digests and signatures" if result["signatures_checked"] else (
            f"digests; ${result['signing_key_env']} is not set, so signatures are not checked")
        lines = [f"{remote.url}: {plural(result['checked'], 'entry', 'entries')} checked "
                 f"({how}): {len(result['bad'])} bad"]
        lines += [f"  {e['key_digest'][:12]}/{e['entry_digest'][:12]}: {e['problem']}"
                  for e in result["bad"]]
        out(args, {"remote": remote.url, **result}, lines)
        return EXIT_FAILURE if result["bad"] else 0
    result = jobs.prune(remote, args.older_than)
    lines = [f"{remote.url}: removed {plural(len(result['removed']), 'object')} older than "
             f"{args.older_than:g}s (entries and the blobs no entry uses)"]
    lines += [f"  {name}" for name in result["removed"]]
    out(args, {"remote": remote.url, **result}, lines)
    return 0


def open_for_cli(url: str | None) -> Remote:
    """The remote named by ``--remote`` or ``$MLC_JIT_REMOTE`` (signed with
    ``$MLC_JIT_REMOTE_SIGNING_KEY`` when set; the timeouts of the option table's
    ``MLC_JIT_REMOTE_*_TIMEOUT``); ConfigError if neither names one."""
    url = url or os.environ.get("MLC_JIT_REMOTE")
    if not url:
        raise ConfigError("no remote: pass --remote s3://bucket/prefix (or file:///path), or "
                          "set MLC_JIT_REMOTE")
    return open_remote(url, remote_options(from_environment()))
