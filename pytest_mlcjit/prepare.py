"""Prepare mode (``pytest --mlc-jit-prepare``), and the request plan it shares with
``pytest-mlcjit key`` / ``explain``.

The plan reads, for every collected test that uses ``compiled_model``, the spec it asks
for (``mlc_model`` marker or indirect parametrization) and its device parameter, and keys
it without compiling. Tests skipped at collection (an absent device without a target, an
``mlc_llm`` that is not installed, a ``skip`` mark) and tests whose policy is OFF request
nothing.

In prepare mode the plan keeps one test per distinct library and deselects the others,
so under ``-n`` xdist hands the distinct libraries out to the workers and they compile in
parallel; each kept test's protocol compiles its library and runs neither fixtures nor the
test body. Its report is ``COMPILED`` or ``CACHED`` (failed if the compile failed), so
pytest exits 0 only if every library is there.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest

from .backends import BuildRequest
from .device import Device
from .engine import JIT
from .errors import MlcJitError
from .policy import Policy

#: What a kept test compiles: ``(spec, device)``, or the error its request raised.
planned_key = pytest.StashKey[tuple[Any, Device] | str]()
PROPERTY = "mlcjit_prepared"
#: Why a test requests no library, by the code :class:`Plan` records.
EXCLUDED = {
    "direct": "call mlc_jit.compile themselves: what they compile is not known before they "
              "run, so prepare cannot warm it",
    "plain": "do not use compiled_model",
    "off": "have policy OFF (mlc_jit_policy marker)",
    "skipped": "are skipped at collection (an absent device without a target, no mlc_llm, "
               "or a skip mark)",
    "no-device": "have no device",
}


@dataclasses.dataclass
class Plan:
    """The distinct libraries a list of tests requests."""

    #: digest → the request and the tests that ask for it (collection order).
    libraries: dict[str, tuple[BuildRequest, list[pytest.Item]]] = dataclasses.field(
        default_factory=dict)
    #: Tests whose request is malformed, with the error.
    errors: list[tuple[pytest.Item, str]] = dataclasses.field(default_factory=list)
    #: Tests that request no library, with why (a key of :data:`EXCLUDED`).
    excluded: list[tuple[pytest.Item, str]] = dataclasses.field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        return {
            "tests": sum(len(items) for _, items in self.libraries.values()),
            "libraries": len(self.libraries), "errors": len(self.errors),
            "excluded": dict(Counter(why for _, why in self.excluded)),
        }


def _params(item: pytest.Item) -> Mapping[str, Any]:
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


def static_skip(item: pytest.Item) -> str | None:
    """Why ``item`` is skipped at collection (a ``skip`` mark, or ``skipif`` with a true
    boolean condition), else None. String conditions are not evaluated: such a test's
    library is prepared anyway."""
    for mark in item.iter_markers("skip"):
        return str(mark.kwargs.get("reason") or (mark.args[0] if mark.args else "skip"))
    for mark in item.iter_markers("skipif"):
        conditions = mark.args or ((mark.kwargs["condition"],) if "condition" in mark.kwargs
                                   else ())
        if not conditions or any(c is True for c in conditions):
            return str(mark.kwargs.get("reason", "skipif"))
    return None


def make_plan(items: list[pytest.Item], engine: JIT) -> Plan:
    """Key what each test would request, without compiling anything."""
    from .plugin import requested_device, requested_spec

    plan = Plan()
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "compiled_model" not in fixtures:
            plan.excluded.append((item, "direct" if "mlc_jit" in fixtures else "plain"))
            continue
        if static_skip(item) is not None:
            plan.excluded.append((item, "skipped"))
            continue
        try:
            spec, policy = requested_spec(item, _params(item))
            if policy is Policy.OFF:
                plan.excluded.append((item, "off"))
                continue
            device = requested_device(_params(item), engine.settings)
            if device is None:
                plan.excluded.append((item, "no-device"))
                continue
            req = engine.request(spec, device)
        except MlcJitError as exc:
            plan.errors.append((item, f"{type(exc).__name__}: {exc}"))
            continue
        plan.libraries.setdefault(req.digest, (req, []))[1].append(item)
        item.stash[planned_key] = (spec, device)
    for item, error in plan.errors:
        item.stash[planned_key] = error
    return plan


class Prepare:
    """The ``--mlc-jit-prepare`` run: compile each distinct library once, run no test."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.counts: dict[str, Any] | None = None
        self.outcomes: Counter[str] = Counter()

    @pytest.hookimpl(trylast=True)  # after -k/-m deselection and skip marks
    def pytest_collection_modifyitems(self, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        from .plugin import get_engine

        plan = make_plan(items, get_engine(config))
        keep = {id(tests[0]) for _, tests in plan.libraries.values()}
        keep.update(id(item) for item, _ in plan.errors)
        deselected = [item for item in items if id(item) not in keep]
        items[:] = [item for item in items if id(item) in keep]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
        self.counts = plan.counts()
        workeroutput = getattr(config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["mlcjit_prepare"] = self.counts

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool:
        from .plugin import get_engine

        engine = get_engine(self.config)
        planned = item.stash.get(planned_key, "the plan has no library for this test")

        def build() -> None:
            if isinstance(planned, str):
                item.user_properties.append((PROPERTY, {"invalid": True}))
                pytest.fail(planned, pytrace=False)
            spec, device = planned
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
        from .manage import plural

        counts = self.counts or {"tests": 0, "libraries": 0, "errors": 0, "excluded": {}}
        done = self.outcomes
        terminalreporter.write_sep("-", "pytest-mlcjit prepare")
        terminalreporter.write_line(
            f"{plural(counts['tests'], 'test')} request "
            f"{plural(counts['libraries'], 'distinct library', 'distinct libraries')}: "
            f"{done['compiled']} compiled, "
            f"{done['cached']} already cached, {done['failed']} failed"
        )
        if counts["errors"]:
            terminalreporter.write_line(
                f"{plural(counts['errors'], 'test')} with an invalid model spec (failed)")
        excluded = counts["excluded"]
        if excluded:
            terminalreporter.write_line(
                f"{plural(sum(excluded.values()), 'test')} request no library:")
            for code, n in sorted(excluded.items()):
                terminalreporter.write_line(f"  {n} {EXCLUDED.get(code, code)}")
