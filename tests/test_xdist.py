"""One compilation per key across xdist workers and across independent processes; and a
failure is remembered for the rest of its run: a model that fails to compile, needed by
ten tests on two xdist workers, is compiled once per run, and every one of those tests
fails with the same message and the same log (the reliability suite, docs/reliability.md).

Compilations are counted by the model factory itself (it runs once per compile, in the
compile subprocess), not by the plugin's own statistics. tests/test_concurrency.py covers
locks, kills and many processes on one cache.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Project, accounting

TWO_CONFIGS = [{"hidden": 4}, {"hidden": 6}]


def test_n2_compiles_each_config_once(project: Project) -> None:
    project.write_tests(TWO_CONFIGS, per_config=3)
    first = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=off")
    first.assert_outcomes(passed=6)
    assert len(project.compiles()) == 2, project.compiles()
    assert len(project.manifests()) == 2
    assert {m["key"]["config"]["hidden"] for m in project.manifests()} == {4, 6}
    counts = accounting(first)  # the others hit, or waited for a compile
    assert counts["compiled"] == 2
    assert counts.get("hit", 0) + counts.get("waited", 0) == 4

    second = project.run("-n", "2", "--mlc-device=cpu")
    second.assert_outcomes(passed=6)
    assert len(project.compiles()) == 2, "the second run compiles nothing"
    second.stdout.fnmatch_lines(["6 requests: 6 hits"])


def test_redo_under_n2_compiles_each_key_once_per_run(project: Project) -> None:
    project.write_tests(TWO_CONFIGS, per_config=3)
    project.run("-n", "2", "--mlc-device=cpu").assert_outcomes(passed=6)
    assert len(project.compiles()) == 2
    project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-policy=REDO").assert_outcomes(passed=6)
    assert len(project.compiles()) == 4, "REDO: one rebuild per key per run, not per worker"


def test_two_independent_processes_on_one_cold_key(
    project: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.write_tests([{"hidden": 5}], per_config=1)
    # Slow the factory so both processes surely overlap on the cold key.
    monkeypatch.setenv("MLCJIT_TEST_SLEEP", "2")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
           "--mlc-device=cpu", "--mlc-jit-cache-dir", str(project.cache)]
    procs = [subprocess.Popen(cmd, cwd=project.pytester.path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert len(project.compiles()) == 1, outputs
    summaries = sorted(line for o in outputs for line in o.splitlines()
                       if line.startswith("1 request: "))
    assert [s.partition(";")[0] for s in summaries] == [
        "1 request: 1 compiled", "1 request: 1 waited"], "one compiled, the other waited"


def test_xdist_worker_stats_reach_the_controller(project: Project) -> None:
    project.write_tests(TWO_CONFIGS, per_config=2)
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=off")
    result.assert_outcomes(passed=4)
    # Only the controller prints the summary, and it counts every worker's requests.
    assert result.stdout.str().count("pytest-mlcjit ---") == 1
    counts = accounting(result)
    assert (counts["requests"], counts["compiled"]) == (4, 2), counts


def test_without_xdist(project: Project) -> None:
    project.write_tests([{"hidden": 4}], per_config=2)
    result = project.run("-p", "no:xdist", "--mlc-device=cpu")
    result.assert_outcomes(passed=2)
    assert len(project.compiles()) == 1


# -- a failing model: compiled once per run, one message for all its tests -----------------
def _errors(out: str) -> list[tuple[str, str]]:
    """(the error's first two lines: the cause with the model, then the first line of the
    CompileError; log path) for each failing test, in order.

    Only the ERRORS section is read: on CI (``CI`` set) pytest prints the messages again,
    untruncated, in the short test summary."""
    out = out.split("short test summary info", maxsplit=1)[0]
    heads = re.findall(r"^(.+ \(compiling \S+ for \S+\)\ncompiling .*)$", out,
                       flags=re.MULTILINE)
    logs = re.findall(r"^compile log: (.*)$", out, flags=re.MULTILINE)
    assert len(heads) == len(logs), out
    return list(zip(heads, logs, strict=True))


@pytest.mark.reliability
def test_a_failing_model_compiles_once_per_run(project: Project) -> None:
    project.write_tests([{"fail": True}], per_config=10)
    first = project.run("-n", "2", "--mlc-device=cpu")
    first.assert_outcomes(errors=10)
    assert len(project.compiles()) == 1, "one compile for ten tests on two workers"
    errors = _errors(first.stdout.str())
    assert len(errors) == 10
    assert len(set(errors)) == 1, f"one message and one log for all: {set(errors)}"
    head, log = errors[0]
    assert head.startswith("RuntimeError: factory failed on purpose (hidden=4) (compiling "
                           "tinymodel-fail=True for llvm)\n"), head
    assert "failed: the compiler exited with code 1" in head
    assert "RuntimeError: factory failed on purpose (hidden=4)" in Path(log).read_text()
    # At most one test saw the compile fail (none, if a background prefetch compiled it).
    assert first.stdout.str().count("(remembered from an earlier attempt in this run)") >= 9
    assert project.manifests() == [], "a failure publishes nothing"
    assert project.libraries() == []

    # A new run reports it from memory, without compiling (a known failure: the factory
    # raised, and nothing it depends on changed); --mlc-jit-retry-failed tries again, once.
    known = project.run("-n", "2", "--mlc-device=cpu")
    known.assert_outcomes(errors=10)
    assert len(project.compiles()) == 1
    assert set(_errors(known.stdout.str())) == {(head, log)}
    assert known.stdout.str().count("(a known failure, recorded ") >= 10
    second = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-retry-failed")
    second.assert_outcomes(errors=10)
    assert len(project.compiles()) == 2
    assert set(_errors(second.stdout.str())) == {(head, log)}
