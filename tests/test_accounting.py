"""Honest accounting: every request is counted once, as one outcome (hit, remote_hit,
compiled, waited, failed, missed), in the summary line, in runs.jsonl and in the JSON
report (``--mlc-jit-report``), merged across xdist workers; the slowest compiles are listed;
a failed compile's test shows the cause first and the log's last lines; a compile that
pytest-timeout or Ctrl-C interrupts says so, and what to do."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Project, accounting, wait_until
from pytest_mlcjit.engine.stats import OUTCOMES, Stats
from pytest_mlcjit.plugin.report import accounting_line, cause, durations_lines

TWO = [{"hidden": 4}, {"hidden": 6}]


def report(path: Path) -> dict[str, Any]:
    """The JSON report, checked: outcomes sum to requests, as do the libraries' requests
    (every request here has a key), one record per digest."""
    data: dict[str, Any] = json.loads(path.read_text())
    assert set(data["outcomes"]) == set(OUTCOMES)
    assert sum(data["outcomes"].values()) == data["requests"]
    libs = data["libraries"]
    assert len({lib["digest"] for lib in libs}) == len(libs)
    for lib in libs:
        assert sum(lib["outcomes"].values()) == lib["requests"]
        assert set(lib) >= {"spec", "digest", "target", "outcome", "compile_seconds",
                            "wait_seconds", "size", "worker"}
    return data


def summary_matches(counts: dict[str, int], data: dict[str, Any]) -> None:
    """The summary line and the JSON report say the same."""
    assert counts["requests"] == data["requests"]
    shown = {k: v for k, v in counts.items() if k != "requests"}
    assert shown == {k: v for k, v in data["outcomes"].items() if v}


# -- the arithmetic, without pytest ---------------------------------------------------------
def test_the_summary_line_names_every_nonzero_kind_with_plurals() -> None:
    s = Stats()
    lib = s.library("a" * 64, spec="tiny-hidden=4", target={"kind": "llvm"}, worker="gw0")
    s.count("hit", lib=lib)
    assert accounting_line(s) == "1 request: 1 hit"
    s.count("hit", lib=lib)
    s.count("waited", wait_seconds=3.5, lib=lib)
    s.count("missed")
    s.count("remote_hit", lib=lib)
    assert accounting_line(s) == ("5 requests: 2 hits, 1 remote hit, 1 waited, 1 missed; "
                                  "3.50s waiting for other compiles")
    s.compiled(lib, seconds=12.0, ok=True, background=True, worker="gw0", size=100)
    assert accounting_line(s).endswith(
        "; 1 library compiled ahead of time, 12.00s compiling, 3.50s waiting for other compiles")
    assert sum(s.outcomes.values()) == s.requests == 5
    assert (s.hits, s.failures) == (4, 0)  # the run history's older names


def test_merging_workers_keeps_one_record_per_library() -> None:
    digest = "b" * 64
    gw0, gw1 = Stats(), Stats()
    lib0 = gw0.library(digest, spec="tiny-hidden=4", target={"kind": "llvm"}, worker="gw0")
    gw0.compiled(lib0, seconds=11.0, ok=True, background=True, worker="gw0", size=10)
    gw0.count("hit", lib=lib0, size=10)
    lib1 = gw1.library(digest, spec="tiny-hidden=4", worker="gw1")
    gw1.count("waited", wait_seconds=9.0, lib=lib1)
    gw1.count("failed")
    total = Stats()
    for worker in (gw0, gw1):
        total.merge(json.loads(json.dumps(worker.to_json())))  # as execnet sends it
    assert total.requests == 3
    assert total.outcomes["waited"] == 1
    (rec,) = total.library_records()
    assert (rec.requests, rec.outcome, rec.worker, rec.size) == (
        2, "compiled", "gw0", 10)
    assert (rec.compile_seconds, rec.wait_seconds) == (11.0, 9.0)
    assert durations_lines(total, None) == [
        "compiles (1 of 1):",
        f"     11.00s  tiny-hidden=4 (llvm) on gw0, ahead of time  {digest[:12]}"]
    assert durations_lines(total, 0)[0] == "compiles (1 of 1):"
    short = Stats()
    short.compiled(short.library(digest), seconds=2.0, ok=True, background=False, worker="x")
    assert durations_lines(short, None) == [], "nothing over 10s: no list by default"


def test_the_cause_is_the_last_exception_line_of_the_log() -> None:
    log = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
           "tvm.error.InternalError: Check failed: (a == b) is false", "", "done"]
    assert cause(log, "exit 1") == "tvm.error.InternalError: Check failed: (a == b) is false"
    assert cause(["error: module 'm' has no attribute 'f'"], "x") == \
        "error: module 'm' has no attribute 'f'"
    assert cause(["[pytest-mlcjit] building"], "timed out after 5s") == "timed out after 5s"


# -- real runs ----------------------------------------------------------------------------------
def test_cold_then_warm_run_adds_up(project: Project, tmp_path: Path) -> None:
    project.write_tests(TWO, per_config=2)
    out = tmp_path / "cold.json"
    cold = project.run("-p", "no:xdist", "--mlc-device=cpu", f"--mlc-jit-report={out}")
    cold.assert_outcomes(passed=4)
    assert accounting(cold) == {"requests": 4, "hit": 2, "compiled": 2}
    cold.stdout.fnmatch_lines([f"JSON report: {out}"])
    data = report(out)
    summary_matches(accounting(cold), data)
    assert data["compiles"] == 2
    assert data["compile_seconds"] > 0
    assert sorted((lib["spec"], lib["outcome"], lib["requests"], lib["worker"])
                  for lib in data["libraries"]) == [
        ("tinymodel-hidden=4", "compiled", 2, "main"),
        ("tinymodel-hidden=6", "compiled", 2, "main")]
    sizes = {m.get("key_digest", m["digest"]): m["size"] for m in project.manifests()}
    for lib in data["libraries"]:
        assert lib["target"] == {"kind": "llvm"}
        assert lib["size"] == sizes[lib["digest"]]  # the key's digest; its entry's size
        assert lib["compile_seconds"] > 0
    # runs.jsonl: the same accounting, one line per run.
    (run,) = [json.loads(line) for line in
              (project.cache / ".mlcjit" / "runs.jsonl").read_text().splitlines()]
    assert run["requests"] == 4
    assert run["outcomes"] == {k: n for k, n in data["outcomes"].items() if n}

    warm_out = tmp_path / "warm.json"
    warm = project.run("-p", "no:xdist", "--mlc-device=cpu", f"--mlc-jit-report={warm_out}")
    warm.stdout.fnmatch_lines(["4 requests: 4 hits"])
    data = report(warm_out)
    assert data["outcomes"]["hit"] == 4
    assert data["compiles"] == 0
    assert {lib["outcome"] for lib in data["libraries"]} == {"hit"}
    runs = (project.cache / ".mlcjit" / "runs.jsonl").read_text().splitlines()
    assert json.loads(runs[-1])["outcomes"]["hit"] == 4


def test_redo_under_n2_adds_up(project: Project, tmp_path: Path) -> None:
    project.write_tests(TWO, per_config=3)
    project.run("-n", "2", "--mlc-device=cpu").assert_outcomes(passed=6)
    out = tmp_path / "redo.json"
    redo = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-policy=REDO",
                       "--mlc-jit-prefetch=off", f"--mlc-jit-report={out}")
    redo.assert_outcomes(passed=6)
    counts = accounting(redo)
    assert counts["compiled"] == 2, counts  # once per key per run, whichever worker
    assert counts.get("hit", 0) + counts.get("waited", 0) == 4
    data = report(out)
    summary_matches(counts, data)
    assert sorted(lib["requests"] for lib in data["libraries"]) == [3, 3]
    assert {lib["outcome"] for lib in data["libraries"]} == {"compiled"}
    assert {lib["worker"] for lib in data["libraries"]} <= {"gw0", "gw1"}


def test_readonly_misses_are_counted(project: Project, tmp_path: Path) -> None:
    project.write_tests(TWO[:1], per_config=2)
    project.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=2)
    project.write_tests(TWO, per_config=2)
    out = tmp_path / "ro.json"
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-policy=READONLY",
                         f"--mlc-jit-report={out}")
    result.assert_outcomes(passed=2, errors=2)
    assert accounting(result) == {"requests": 4, "hit": 2, "missed": 2}
    result.stdout.fnmatch_lines(["4 requests: 2 hits, 2 missed"])
    data = report(out)
    summary_matches(accounting(result), data)
    assert sorted(lib["outcome"] for lib in data["libraries"]) == ["hit", "missed"]


def test_a_mixed_run_under_n2_adds_up(project: Project, tmp_path: Path) -> None:
    """Hits, compiles, failures and READONLY misses in one run of two workers, merged."""
    project.write_tests(TWO[:1], per_config=1)
    project.run("-p", "no:xdist", "--mlc-device=cpu").assert_outcomes(passed=1)
    project.pytester.makepyfile(test_mixed='''
import pytest
from pytest_mlcjit import TVMModel

BAD = TVMModel("tinymodel:build", config={"hidden": 9, "fail": True})
NEW = TVMModel("tinymodel:build", config={"hidden": 5})
ABSENT = TVMModel("tinymodel:build", config={"hidden": 11})

@pytest.mark.parametrize("i", range(2))
@pytest.mark.mlc_model(BAD)
def test_bad(compiled_model, i): pass

@pytest.mark.parametrize("i", range(3))
@pytest.mark.mlc_model(NEW)
def test_new(compiled_model, i): pass

@pytest.mark.mlc_jit_policy("READONLY")
@pytest.mark.mlc_model(ABSENT)
def test_absent(compiled_model): pass
''')
    out = tmp_path / "mixed.json"
    # Prefetch off: it compiles every planned library under the run's policy, the
    # READONLY test's too (reported, not this test's subject).
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=off",
                         f"--mlc-jit-report={out}")
    result.assert_outcomes(passed=4, errors=3)
    counts = accounting(result)
    assert counts["requests"] == 7
    assert (counts["failed"], counts["missed"]) == (2, 1)
    assert counts.get("hit", 0) + counts.get("waited", 0) + counts.get("compiled", 0) == 4
    data = report(out)
    summary_matches(counts, data)
    by_spec = {lib["spec"]: lib for lib in data["libraries"]}
    assert by_spec["tinymodel-fail=True-hidden=9"]["outcome"] == "failed"
    assert by_spec["tinymodel-hidden=11"]["outcome"] == "missed"
    assert by_spec["tinymodel-hidden=5"]["outcome"] == "compiled"
    assert by_spec["tinymodel-hidden=5"]["requests"] == 3
    assert by_spec["tinymodel-hidden=4"]["outcome"] == "hit"
    assert sum(lib["requests"] for lib in data["libraries"]) == 7


def test_a_wait_for_the_prefetch_is_counted_as_waiting(project: Project, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The test asks while this process's prefetch compiles its library: it waited, and
    the time is counted as waiting (it used to read "0.00s waiting for locks"). The
    compile lasts 2 s, so that the test asks before it ends even on a loaded machine."""
    monkeypatch.setenv("MLCJIT_TEST_SLEEP", "2")
    project.write_tests(TWO[:1], per_config=1)
    staging = project.cache / ".mlcjit" / "staging"
    project.pytester.makeconftest(f'''
import pathlib, time
import pytest

STAGING = pathlib.Path({str(staging)!r})


@pytest.fixture(autouse=True)
def _ask_once_the_prefetch_compiles():
    deadline = time.monotonic() + 120
    while not (STAGING.is_dir() and any(STAGING.iterdir())):
        assert time.monotonic() < deadline, "the prefetch did not start compiling"
        time.sleep(0.02)
''')
    out = tmp_path / "r.json"
    result = project.run("-p", "no:xdist", "--mlc-device=cpu", "--mlc-jit-prefetch=on",
                         "-o", "mlc_jit_durations=0", f"--mlc-jit-report={out}")
    result.assert_outcomes(passed=1)
    assert accounting(result) == {"requests": 1, "waited": 1}
    result.stdout.fnmatch_lines([
        "1 request: 1 waited; 1 library compiled ahead of time, *s compiling, "
        "*s waiting for other compiles",
        "compiles (1 of 1):", "  * tinymodel-hidden=4 (llvm) on main, ahead of time  *"])
    data = report(out)
    assert data["prefetched"] == 1
    (lib,) = data["libraries"]
    assert lib["wait_seconds"] > 0
    assert data["wait_seconds"] == lib["wait_seconds"]


def test_options_are_checked(pytester: pytest.Pytester) -> None:
    bad = pytester.runpytest_subprocess("--mlc-jit-durations=-1")
    bad.stderr.fnmatch_lines(["*invalid --mlc-jit-durations '-1': expected a whole number*"])
    bad = pytester.runpytest_subprocess("--mlc-jit-progress=sometimes")
    bad.stderr.fnmatch_lines(
        ["*invalid --mlc-jit-progress 'sometimes': expected one of auto, on, off*"])
    helped = pytester.runpytest_subprocess("--help")
    helped.stdout.fnmatch_lines(["*--mlc-jit-progress*", "*--mlc-jit-report*",
                                 "*--mlc-jit-durations*", "*mlc_jit_progress*",
                                 "*mlc_jit_report*", "*mlc_jit_durations*"])
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in ("--mlc-jit-progress", "--mlc-jit-report", "--mlc-jit-durations",
                 "mlc_jit_progress", "mlc_jit_report", "mlc_jit_durations",
                 "timeout_func_only"):
        assert name in readme, name


def test_report_path_from_the_ini_file_is_relative_to_it(project: Project) -> None:
    project.write_tests(TWO[:1], per_config=1)
    project.pytester.makeini("[pytest]\nmlc_jit_report = out/mlcjit.json\n")
    result = project.run("-p", "no:xdist", "--mlc-device=cpu")
    result.assert_outcomes(passed=1)
    data = report(project.pytester.path / "out" / "mlcjit.json")
    assert data["outcomes"]["compiled"] == 1


# -- failures a reader can act on ---------------------------------------------------------
FAILING = '''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.parametrize("i", range(2))
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 8, "fail": True}))
def test_fail(compiled_model, i):
    pass
'''


def test_a_failed_compile_shows_the_cause_first_and_the_log(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # -rE lines are cut at the terminal's width
    project.pytester.makepyfile(test_failing=FAILING)
    result = project.run("-n", "2", "--mlc-device=cpu", "-rE", "--mlc-jit-prefetch=off")
    result.assert_outcomes(errors=2)
    text = result.stdout.str()
    # -rE: the cause (the exception's last line), then the model.
    result.stdout.re_match_lines([
        r"ERROR test_failing.py::test_fail\[cpu-\d\] - RuntimeError: factory failed on purpose "
        r"\(hidden=8\) \(compiling tinymodel-fail=True-hidden=8 for llvm\)$"])
    # Each error's message starts so too (the log's own last line is the bare cause).
    first = [line for line in result.outlines if line.startswith("RuntimeError: factory")]
    assert first.count("RuntimeError: factory failed on purpose (hidden=8) (compiling "
                       "tinymodel-fail=True-hidden=8 for llvm)") == 2
    # The section: the log's path and its last lines (the traceback ends it).
    sections = re.findall(r"-+ mlcjit compile log: (\S+) \(last (\d+) lines\) -+", text)
    assert len(sections) == 2
    log = Path(sections[0][0])
    assert log.is_file()
    assert log.parent.name == "failed"
    assert int(sections[0][1]) == min(50, len(log.read_text().splitlines()))
    assert "raise RuntimeError(f\"factory failed on purpose" in text
    assert "(remembered from an earlier attempt in this run)" in text
    assert accounting(result) == {"requests": 2, "failed": 2}


def test_pytest_timeout_during_a_compile_says_what_happened(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pytest_timeout")
    monkeypatch.setenv("COLUMNS", "300")
    project.pytester.makepyfile(test_slow='''
import pytest
from pytest_mlcjit import TVMModel

@pytest.mark.timeout(3)
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 7, "sleep": 120}))
def test_slow(compiled_model):
    pass
''')
    result = project.run("-p", "no:xdist", "--mlc-device=cpu", "-rE")
    result.assert_outcomes(errors=1)
    result.stdout.re_match_lines([
        r"ERROR test_slow.py::test_slow\[cpu\] - Timeout \(>3.0s\) from pytest-timeout: "
        r"interrupted while compiling tinymodel-hidden=7-sleep=120 \(llvm\) after "
        r"\d+\.\ds; nothing was cached$"])
    result.stdout.re_match_lines([
        r"^Timeout \(>3.0s\) from pytest-timeout: interrupted while compiling "
        r"tinymodel-hidden=7-sleep=120 \(llvm\) after \d+\.\ds; nothing was cached$",
        r"^The compile was killed: the next run compiles it again from the start.$",
        r".*pytest --mlc-jit-prepare.*timeout_func_only = true.*"])
    assert project.libraries() == [], "nothing was cached"
    assert list((project.cache / ".mlcjit" / "staging").iterdir()) == []
    assert accounting(result) == {"requests": 1, "failed": 1}


def test_ctrl_c_during_a_compile_says_what_happened(project: Project) -> None:
    project.write_tests(TWO[:1], per_config=1)
    staging = project.cache / ".mlcjit" / "staging"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--mlc-device=cpu", f"--mlc-jit-cache-dir={project.cache}"],
        cwd=project.pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "MLCJIT_TEST_SLEEP": "120"})
    try:
        wait_until(lambda: staging.is_dir() and any(staging.iterdir()), "the compile")
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert re.search(r"KeyboardInterrupt: interrupted while compiling tinymodel-hidden=4 "
                     r"\(llvm\) after \d+\.\ds; nothing was cached", out), out
    assert project.libraries() == []
