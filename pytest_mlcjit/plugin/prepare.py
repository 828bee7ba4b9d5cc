"""Prepare mode (``pytest --mlc-jit-prepare``): compile every distinct library the
collected tests request (:func:`.plan.make_plan`), run no test.

The plan keeps one test per distinct library and deselects the others,
so under ``-n`` xdist hands the distinct libraries out to the workers and they compile in
parallel; each kept test's protocol compiles its library and runs neither fixtures nor the
test body. Its report is ``COMPILED`` or ``CACHED`` (failed if the compile failed), so
pytest exits 0 only if every library is there.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from pytest_mlcjit.errors import MlcJitError
from pytest_mlcjit.plugin.plan import EXCLUDED, make_plan, planned_key
from pytest_mlcjit.plugin.session import get_engine, run_state
from pytest_mlcjit.units import plural

PROPERTY = "mlcjit_prepared"


def in_shard(digest: str, index: int, total: int) -> bool:
    """Whether the library ``digest`` belongs to shard ``index`` of ``total`` (1-based):
    stable, by the digest's value, so every job computes the same split."""
    return int(digest, 16) % total == index - 1


class Prepare:
    """The ``--mlc-jit-prepare`` run: compile each distinct library once, run no test."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.counts: dict[str, Any] | None = None
        self.outcomes: Counter[str] = Counter()

    @pytest.hookimpl(trylast=True)  # after -k/-m deselection and skip marks
    def pytest_collection_modifyitems(self, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        plan = make_plan(items, get_engine(config))
        libraries = list(plan.libraries.items())
        shard = run_state(config).options.shard
        if shard is not None:
            libraries = [(digest, found) for digest, found in libraries
                         if in_shard(digest, *shard)]
        keep = {id(tests[0]) for _, (_, tests) in libraries}
        keep.update(id(item) for item, _ in plan.errors)
        deselected = [item for item in items if id(item) not in keep]
        items[:] = [item for item in items if id(item) in keep]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
        self.counts = plan.counts()
        if shard is not None:
            self.counts["shard"] = [*shard, len(libraries)]
        workeroutput = getattr(config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["mlcjit_prepare"] = self.counts

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        engine = get_engine(self.config)
        planned = item.stash.get(planned_key, "the plan has no library for this test")

        def build() -> None:
            if isinstance(planned, str):
                item.user_properties.append((PROPERTY, {"invalid": True}))
                pytest.fail(planned, pytrace=False)
            spec, device, _ = planned  # the run's policy: prepare warms the cache
            try:
                model = engine.compile(spec, device)
            except MlcJitError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                item.user_properties.append((PROPERTY, {
                    "digest": model.digest, "hit": model.hit, "path": str(model.path)}))
                return
            pytest.fail(error, pytrace=False)

        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        for when, func in (("setup", lambda: None), ("call", build), ("teardown", lambda: None)):
            call = pytest.CallInfo.from_call(
                func, when=when,  # type: ignore[arg-type]
                reraise=(pytest.exit.Exception, KeyboardInterrupt))
            ihook.pytest_runtest_logreport(report=pytest.TestReport.from_item_and_call(item, call))
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        return True

    def pytest_report_teststatus(self, report: pytest.TestReport,
                                 config: pytest.Config) -> tuple[str, str, Any] | None:
        if report.when != "call" or not report.passed:
            return None
        prepared = dict(report.user_properties).get(PROPERTY)
        if not isinstance(prepared, dict):
            return None
        if prepared.get("hit"):
            return "cached", "c", ("CACHED", {"green": True})
        return "compiled", "C", ("COMPILED", {"green": True})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if hasattr(self.config, "workeroutput") or report.when != "call":
            return
        prepared = dict(report.user_properties).get(PROPERTY)
        if report.failed:
            invalid = isinstance(prepared, dict) and prepared.get("invalid")
            self.outcomes["invalid" if invalid else "failed"] += 1
        elif isinstance(prepared, dict):
            self.outcomes["cached" if prepared.get("hit") else "compiled"] += 1

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        counts = getattr(node, "workeroutput", {}).get("mlcjit_prepare")
        if counts and self.counts is None:
            self.counts = counts

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and self.counts is not None:
            session.exitstatus = pytest.ExitCode.OK  # nothing to prepare: all is there

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workeroutput"):
            return
        counts = self.counts or {"tests": 0, "libraries": 0, "errors": 0, "excluded": {}}
        done = self.outcomes
        terminalreporter.write_sep("-", "pytest-mlcjit prepare")
        terminalreporter.write_line(
            f"{plural(counts['tests'], 'test')} request "
            f"{plural(counts['libraries'], 'distinct library', 'distinct libraries')}: "
            f"{done['compiled']} compiled, "
            f"{done['cached']} already cached, {done['failed']} failed"
        )
        if "shard" in counts:
            index, total, mine = counts["shard"]
            terminalreporter.write_line(
                f"shard {index}/{total} (--mlc-jit-shard): "
                f"{plural(mine, 'library', 'libraries')} of {counts['libraries']} "
                f"{'is' if mine == 1 else 'are'} this shard's; the others are left to the "
                "other shards")
        if counts["errors"]:
            terminalreporter.write_line(
                f"{plural(counts['errors'], 'test')} with an invalid model spec (failed)")
        excluded = counts["excluded"]
        if excluded:
            terminalreporter.write_line(
                f"{plural(sum(excluded.values()), 'test')} request no library:")
            for code, n in sorted(excluded.items()):
                terminalreporter.write_line(f"  {n} {EXCLUDED.get(code, code)}")
