"""One compilation per key across xdist workers and across independent processes.

Compilations are counted by the model factory itself (it runs once per compile, in the
compile subprocess), not by the plugin's own statistics.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import Project

TWO_CONFIGS = [{"hidden": 4}, {"hidden": 6}]


def test_n2_compiles_each_config_once(project: Project) -> None:
    project.write_tests(TWO_CONFIGS, per_config=3)
    first = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=off")
    first.assert_outcomes(passed=6)
    assert len(project.compiles()) == 2, project.compiles()
    assert len(project.manifests()) == 2
    assert {m["key"]["config"]["hidden"] for m in project.manifests()} == {4, 6}
    first.stdout.fnmatch_lines(["*6 requests: 4 hits, 2 compiled*"])

    second = project.run("-n", "2", "--mlc-device=cpu")
    second.assert_outcomes(passed=6)
    assert len(project.compiles()) == 2, "the second run compiles nothing"
    second.stdout.fnmatch_lines(["*6 requests: 6 hits, 0 compiled*"])


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
    waited = [o for o in outputs if "1 hits, 0 compiled" in o]
    assert len(waited) == 1, "one process compiled, the other waited and reused"


def test_xdist_worker_stats_reach_the_controller(project: Project) -> None:
    project.write_tests(TWO_CONFIGS, per_config=2)
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=off")
    result.assert_outcomes(passed=4)
    # Only the controller prints the summary, and it counts every worker's requests.
    assert result.stdout.str().count("pytest-mlcjit ---") == 1
    result.stdout.fnmatch_lines(["*4 requests: 2 hits, 2 compiled*"])


def test_without_xdist(project: Project) -> None:
    project.write_tests([{"hidden": 4}], per_config=2)
    result = project.run("-p", "no:xdist", "--mlc-device=cpu")
    result.assert_outcomes(passed=2)
    assert len(project.compiles()) == 1
