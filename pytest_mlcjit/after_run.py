"""The controller's work once a run ends, when its policy writes: append the run's
statistics to each cache root's history (``.mlcjit/runs.jsonl``, read by
``pytest-mlcjit info``), then apply ``--mlc-jit-max-size``, never evicting an entry this
run used."""

from __future__ import annotations

import time

import pytest

from .errors import MlcJitError
from .history import record_run
from .layout import CONTROL_DIR, default_roots
from .session import RunState


def after_run(session: pytest.Session, state: RunState) -> None:
    config = session.config
    opts = state.options
    stats = state.stats()
    requests = stats.requests if stats is not None else 0
    if not opts.policy.writes or (not requests and opts.max_size is None):
        return
    settings = state.settings
    roots = [r for r in default_roots(settings.cache_dir) if (r / CONTROL_DIR).is_dir()]
    started = state.started or time.time()
    if stats is not None and requests:
        record = {"time": time.time(), "started": started, "run_id": settings.run_id,
                  "policy": settings.policy.value, "devices": list(settings.devices),
                  "prepare": opts.prepare, "exitstatus": int(session.exitstatus),
                  **stats.to_json()}
        for root in roots:
            record_run(root, record)
    if opts.max_size is None or config.option.collectonly:
        return
    from .manage import prune

    for root in roots:
        try:
            state.pruned.append(prune(root, max_size=opts.max_size, protect=state.used,
                                      protect_used_since=started))
        except (OSError, MlcJitError) as exc:
            state.pruned.append(f"pruning {root} failed: {exc}")
