"""A pytest plugin for ``pytest-mlcjit key`` and ``explain``: loaded with
``-p pytest_mlcjit._collect`` into a ``--collect-only`` run, it writes the distinct
libraries the collected tests request (keyed, not compiled) as JSON to the file named by
``$PYTEST_MLCJIT_COLLECT_OUT``; with ``$PYTEST_MLCJIT_COLLECT_STATUS`` set, also how a
READONLY run would find each one in its cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_mlcjit._util.collect import OUT_ENV, STATUS_ENV
from pytest_mlcjit.compiler.backends import get_backend
from pytest_mlcjit.plugin.plan import make_plan
from pytest_mlcjit.plugin.session import get_engine, state_key


def pytest_collection_finish(session: pytest.Session) -> None:
    out = os.environ.get(OUT_ENV)
    if not out:
        return

    config = session.config
    if state_key not in config.stash:
        data: dict[str, Any] = {"error": "the pytest-mlcjit plugin is not active (-p no:mlcjit?)"}
    else:
        data = describe_requests(session.items, config, status=bool(os.environ.get(STATUS_ENV)))
    Path(out).write_text(json.dumps(data, sort_keys=True, default=str), encoding="utf-8")


def describe_requests(items: list[pytest.Item], config: pytest.Config, *,
                      status: bool) -> dict[str, Any]:

    engine = get_engine(config)
    plan = make_plan(items, engine)
    libraries = []
    for digest, (req, tests) in plan.libraries.items():
        root = engine.root_for(req)
        library: dict[str, Any] = {
            "digest": digest, "backend": req.backend, "describe": req.describe,
            "key": req.key, "toolchain": dict(req.toolchain) or req.key.get("toolchain"),
            "root": str(root), "tests": [item.nodeid for item in tests],
            "sources": get_backend(req.backend).static_inputs(req),
        }
        if status:
            library["status"] = engine.status(req.spec, req.device)
        libraries.append(library)
    settings = engine.settings
    return {
        "libraries": libraries,
        "errors": [{"test": item.nodeid, "error": error} for item, error in plan.errors],
        "excluded": [{"test": item.nodeid, "reason": why} for item, why in plan.excluded],
        "policy": settings.policy.value, "devices": list(settings.devices),
    }
