"""The controller's work once a run ends: write the JSON report (``--mlc-jit-report``),
and, when the policy writes, append the run's accounting to each cache root's history
(``.mlcjit/runs.jsonl``, read by ``pytest-mlcjit info``), then apply
``--mlc-jit-max-size``, never evicting an entry this run used. A root that cannot be
written (a read-only cache, whose hits the run served) is left alone, and the summary
says so once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_mlcjit.cache.history import record_run
from pytest_mlcjit.cache.layout import control_dir, default_roots
from pytest_mlcjit.cache.manage import prune
from pytest_mlcjit.cache.manage.remote import keep_to_budget
from pytest_mlcjit.cache.store.remote import open_remote
from pytest_mlcjit.cache.store.unwritable import writable_reason
from pytest_mlcjit.cache.trust import Trust
from pytest_mlcjit.engine.remote import remote_options
from pytest_mlcjit.errors import MlcJitError
from pytest_mlcjit.plugin.report import fail_if_remote_required, write_report
from pytest_mlcjit.plugin.session import RunState


def after_run(session: pytest.Session, state: RunState) -> None:
    config = session.config
    opts = state.options
    stats = state.stats()
    requests = stats.requests if stats is not None else 0
    fail_if_remote_required(session, state)  # a write not made, with the remote required
    if opts.report_path is not None and not config.option.collectonly:
        state.report_written, written = write_report(state, opts.report_path,
                                                     exitstatus=int(session.exitstatus))
        if not written and session.exitstatus in (pytest.ExitCode.OK,
                                                  pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.USAGE_ERROR  # the summary says why
    if not opts.policy.writes or (not requests and opts.max_size is None):
        return
    found = [r for r in default_roots(opts.cache_dir)
             if control_dir(r).is_dir() and _trusted(r, opts.allow_untrusted)]
    roots = [r for r in found if writable_reason(control_dir(r)) is None]
    if requests:  # its hits were served all the same (cache/store/unwritable.py)
        state.pruned += [f"cache {r} is read-only: its hits were served without recording "
                         "their use (no usage stamps, no run history)"
                         for r in found if r not in roots]
    started = state.started or time.time()
    if stats is not None and requests:
        data = stats.to_json()
        del data["libraries"]  # one short line per run: totals
        if not opts.remote:
            del data["remote"]
        data["outcomes"] = {k: n for k, n in data["outcomes"].items() if n}
        record = {"time": time.time(), "started": started, "run_id": opts.run_id,
                  "policy": opts.policy.value, "devices": list(state.settings.devices),
                  "prepare": opts.prepare, "exitstatus": int(session.exitstatus), **data}
        for root in roots:
            record_run(root, record, state.warnings)
    # The remote's budget (--mlc-jit-remote-max-size), once, after a prepare run that
    # uploaded: least recently used entries first, never one this run used or uploaded.
    if (opts.prepare and opts.remote and opts.remote_max_size is not None
            and opts.remote_mode == "readwrite" and stats is not None
            and stats.remote.uploads and not config.option.collectonly):
        try:
            remote = open_remote(opts.remote, remote_options(opts))
            state.pruned.append(keep_to_budget(remote, opts.remote_max_size, started))
        except (OSError, MlcJitError) as exc:
            state.pruned.append(f"--mlc-jit-remote-max-size: pruning the remote failed: {exc}")
    if opts.max_size is None or config.option.collectonly:
        return

    for root in roots:
        try:
            state.pruned.append(prune(root, max_size=opts.max_size, protect=state.used,
                                      protect_used_since=started, warnings=state.warnings))
        except (OSError, MlcJitError) as exc:
            state.pruned.append(f"pruning {root} failed: {exc}")


def _trusted(root: Path, allow_untrusted: bool) -> bool:
    """Whether the run may write its history into ``root``: never into a root the cache
    refuses (others can write to it), where the run itself wrote nothing."""
    try:
        Trust(root, allow_untrusted=allow_untrusted).check_tree(control_dir(root))
    except (OSError, MlcJitError):
        return False
    return True
