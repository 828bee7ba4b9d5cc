"""Honest accounting: every request is counted once, as one outcome (hit, remote_hit,
compiled, waited, failed, missed), in the summary line, in runs.jsonl and in the JSON
report (``--mlc-jit-report``), merged across xdist workers; the slowest compiles are listed;
a failed compile's test shows the cause first and the log's last lines; a compile that
pytest-timeout or Ctrl-C interrupts says so, and what to do.

The plugin's three accounts are compared with each other, and every count in them with
what happened outside the plugin: compiles with the factory's own counter (one line per
call, written in the compile process), libraries and their sizes with the cache's files.
A consistent miscount in all three accounts fails here. The REDO accounting under
``-n 2`` is tests/test_xdist.py's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from faultmodels import add_hold_model

from conftest import (
    PYTEST_HEARING_SIGINT,
    Project,
    accounting,
    compilers_running,
    inprocess,
    wait_until,
)
from pytest_mlcjit.engine import activity
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


# -- what happened, seen from outside the plugin ----------------------------------------------
def compiled(project: Project, since: int = 0) -> list[str]:
    """The configs the factory was called with (its own counter), from line ``since`` on."""
    return sorted(line.split(maxsplit=1)[1] for line in project.compiles()[since:])


def on_disk(project: Project) -> dict[int, tuple[str, int, int]]:
    """hidden → (key digest, library size, library mtime) of each entry in the cache: the
    library found beside its manifest, its size and time from the filesystem."""
    found = {}
    for manifest in sorted((project.cache / "tvm").glob("*.manifest.json")):
        data = json.loads(manifest.read_text())
        library = manifest.with_name(data["library"])  # the file the manifest names
        st = library.stat()  # a manifest without its library fails here
        hidden = data["key"]["config"]["hidden"]
        assert hidden not in found, f"two entries of hidden={hidden}"
        found[hidden] = (data.get("key_digest", data["digest"]), st.st_size, st.st_mtime_ns)
    assert len(project.libraries()) == len(found), "a library without a manifest"
    return found


def sizes_match_the_files(data: dict[str, Any], disk: dict[int, tuple[str, int, int]]) -> None:
    """Each library the report says was built or found has the size of its file; one it
    says failed or was missed has no file."""
    size_of = {digest: size for digest, size, _ in disk.values()}
    for lib in data["libraries"]:
        if lib["outcome"] in ("compiled", "hit", "waited"):
            assert lib["size"] == size_of[lib["digest"]], lib
        else:
            assert lib["digest"] not in size_of, f"{lib['outcome']}, but in the cache: {lib}"


def runs(project: Project) -> list[dict[str, Any]]:
    path = project.cache / ".mlcjit" / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_matches(run: dict[str, Any], data: dict[str, Any],
                disk: dict[int, tuple[str, int, int]]) -> None:
    """runs.jsonl's line says what the report says, and its compiled bytes are the sizes
    of the compiled libraries' files."""
    assert run["requests"] == data["requests"]
    assert run["outcomes"] == {k: n for k, n in data["outcomes"].items() if n}
    assert run["compiles"] == data["compiles"]
    size_of = {digest: size for digest, size, _ in disk.values()}
    assert run["bytes_compiled"] == sum(size_of[lib["digest"]] for lib in data["libraries"]
                                        if lib["outcome"] == "compiled")


def failure_records(project: Project) -> list[Path]:
    return sorted((project.cache / ".mlcjit" / "failed").glob("*.json"))


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
    data = s.to_json()  # what the run history keeps: the same words, no older "hits"
    assert data["outcomes"] == {"hit": 2, "remote_hit": 1, "compiled": 0, "waited": 1,
                                "failed": 0, "missed": 1}
    assert "hits" not in data
    assert "failures" not in data


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
def test_a_cold_run_then_a_warm_run_add_up(project: Project, warm_template: Path,
                                           tmp_path: Path) -> None:
    """hidden=4 is in the cache (compiled by an earlier run), hidden=6 is not: two tests
    of each; then the same run again, all warm."""
    project.write_tests(TWO, per_config=2)
    project.warm(warm_template)
    before = on_disk(project)
    assert sorted(before) == [4]
    out = tmp_path / "cold.json"
    cold = project.run("-p", "no:xdist", "--mlc-device=cpu", f"--mlc-jit-report={out}")
    cold.assert_outcomes(passed=4)
    # Outside: the factory ran once, for hidden=6; the cache now holds both, hidden=4 as
    # it was.
    assert compiled(project) == ["hidden=6"]
    disk = on_disk(project)
    assert sorted(disk) == [4, 6]
    assert disk[4] == before[4], "the hit was not rebuilt"
    # The three accounts, and each against that.
    counts = accounting(cold)
    assert counts == {"requests": 4, "hit": 3, "compiled": 1}
    cold.stdout.fnmatch_lines([f"JSON report: {out}"])
    data = report(out)
    summary_matches(counts, data)
    assert data["compiles"] == len(project.compiles()) == 1
    assert data["compile_seconds"] > 0
    assert sorted((lib["spec"], lib["outcome"], lib["requests"], lib["worker"])
                  for lib in data["libraries"]) == [
        ("tinymodel-hidden=4", "hit", 2, "main"),
        ("tinymodel-hidden=6", "compiled", 2, "main")]
    assert {lib["digest"] for lib in data["libraries"]} == {d for d, _, _ in disk.values()}
    sizes_match_the_files(data, disk)
    for lib in data["libraries"]:
        assert lib["target"] == {"kind": "llvm"}
        assert (lib["compile_seconds"] > 0) == (lib["outcome"] == "compiled")
    # runs.jsonl: the same accounting, one line per run.
    (run,) = runs(project)
    run_matches(run, data, disk)

    warm_out = tmp_path / "warm.json"
    warm = project.run("-p", "no:xdist", "--mlc-device=cpu", f"--mlc-jit-report={warm_out}")
    warm.assert_outcomes(passed=4)
    assert len(project.compiles()) == 1, "the warm run compiled nothing"
    assert on_disk(project) == disk, "and changed no library"
    warm.stdout.fnmatch_lines(["4 requests: 4 hits"])
    data = report(warm_out)
    summary_matches(accounting(warm), data)
    assert data["outcomes"]["hit"] == 4
    assert data["compiles"] == 0
    assert {lib["outcome"] for lib in data["libraries"]} == {"hit"}
    sizes_match_the_files(data, disk)
    assert len(runs(project)) == 2
    run_matches(runs(project)[-1], data, disk)


def test_readonly_misses_are_counted(project: Project, warm_template: Path,
                                     tmp_path: Path) -> None:
    project.write_tests(TWO, per_config=2)
    project.warm(warm_template)  # hidden=4 cached, hidden=6 not
    before = sorted(str(p.relative_to(project.cache)) for p in project.cache.rglob("*"))
    disk = on_disk(project)
    out = tmp_path / "ro.json"
    result = project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY",
                         f"--mlc-jit-report={out}")
    result.assert_outcomes(passed=2, errors=2)
    assert compiled(project) == [], "READONLY compiles nothing"
    after = sorted(str(p.relative_to(project.cache)) for p in project.cache.rglob("*"))
    assert after == before, "and writes nothing: hidden=6 is still missing"
    assert accounting(result) == {"requests": 4, "hit": 2, "missed": 2}
    result.stdout.fnmatch_lines(["4 requests: 2 hits, 2 missed"])
    data = report(out)
    summary_matches(accounting(result), data)
    assert data["compiles"] == 0
    assert sorted((lib["spec"], lib["outcome"]) for lib in data["libraries"]) == [
        ("tinymodel-hidden=4", "hit"), ("tinymodel-hidden=6", "missed")]
    sizes_match_the_files(data, disk)


MIXED = '''
import pytest
from pytest_mlcjit import TVMModel

BAD = TVMModel("tinymodel:build", config={"hidden": 9, "fail": True})
NEW = TVMModel("tinymodel:build", config={"hidden": 5})
ABSENT = TVMModel("tinymodel:build", config={"hidden": 11})
CACHED = TVMModel("tinymodel:build", config={"hidden": 4})

@pytest.mark.parametrize("i", range(2))
@pytest.mark.mlc_model(BAD)
def test_bad(compiled_model, i): pass

@pytest.mark.parametrize("i", range(3))
@pytest.mark.mlc_model(NEW)
def test_new(compiled_model, i): pass

@pytest.mark.mlc_jit_policy("READONLY")
@pytest.mark.mlc_model(ABSENT)
def test_absent(compiled_model): pass

@pytest.mark.mlc_model(CACHED)
def test_cached(compiled_model): pass
'''


def test_a_mixed_run_under_n2_adds_up(project: Project, warm_template: Path,
                                      tmp_path: Path) -> None:
    """Hits, compiles, failures and READONLY misses in one run of two workers, merged:
    the failing library tried once and the new one compiled once across both workers."""
    project.warm(warm_template)  # hidden=4
    before = on_disk(project)
    project.pytester.makepyfile(test_mixed=MIXED)
    out = tmp_path / "mixed.json"
    # Prefetch off: it compiles every planned library under the run's policy, the
    # READONLY test's too (reported, not this test's subject).
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=off",
                         f"--mlc-jit-report={out}")
    result.assert_outcomes(passed=4, errors=3)
    # Outside: one factory call for each of hidden=5 and hidden=9 (which failed), none for
    # the cached hidden=4 or the READONLY hidden=11; the cache holds 4 and 5, unchanged 4.
    assert compiled(project) == ["hidden=5", "hidden=9"]
    disk = on_disk(project)
    assert sorted(disk) == [4, 5]
    assert disk[4] == before[4]
    assert len(failure_records(project)) == 1, "the failure, remembered for the run"
    counts = accounting(result)
    assert counts["requests"] == 7
    assert (counts["failed"], counts["missed"]) == (2, 1)
    assert counts.get("compiled", 0) == 1, counts
    assert counts.get("hit", 0) + counts.get("waited", 0) == 3
    data = report(out)
    summary_matches(counts, data)
    assert data["compiles"] == 1, "compiles are the published ones"
    by_spec = {lib["spec"]: lib for lib in data["libraries"]}
    assert by_spec["tinymodel-fail=True-hidden=9"]["outcome"] == "failed"
    assert by_spec["tinymodel-hidden=11"]["outcome"] == "missed"
    assert by_spec["tinymodel-hidden=5"]["outcome"] == "compiled"
    assert by_spec["tinymodel-hidden=5"]["requests"] == 3
    assert by_spec["tinymodel-hidden=4"]["outcome"] == "hit"
    assert sum(lib["requests"] for lib in data["libraries"]) == 7
    assert {lib["worker"] for lib in data["libraries"]} <= {"gw0", "gw1"}
    sizes_match_the_files(data, disk)
    (run,) = runs(project)
    run_matches(run, data, disk)


HELD_TEST = '''
from pytest_mlcjit import TVMModel
import pytest

@pytest.mark.mlc_model(TVMModel("holdmodel:build", config={{"hidden": 4, "hold": {hold!r}}}))
def test_held(compiled_model):
    pass
'''

#: Holds the test until this process's prefetch is compiling (its staging dir exists).
ASK_ONCE_THE_PREFETCH_COMPILES = '''
import pathlib, time
import pytest

STAGING = pathlib.Path({staging!r})


@pytest.fixture(autouse=True)
def _ask_once_the_prefetch_compiles():
    deadline = time.monotonic() + 120
    while not (STAGING.is_dir() and any(STAGING.iterdir())):
        assert time.monotonic() < deadline, "the prefetch did not start compiling"
        time.sleep(0.01)
'''


def release_when_waited_for(hold: Path, model: str) -> threading.Thread:
    """A thread that creates ``hold`` once this process's board record shows a wait for
    ``model`` (a request waiting for a compile in flight)."""
    board = activity.default_board()
    assert board is not None
    record = board / f"{os.getpid()}.json"

    def waiting() -> bool:
        try:
            jobs = json.loads(record.read_text()).get("jobs", [])
        except (OSError, ValueError):
            return False
        return any(job.get("kind") == "wait" and "ended" not in job
                   and model in str(job.get("model")) for job in jobs)

    def release() -> None:
        try:
            wait_until(waiting, f"a wait for {model}")
        finally:
            hold.touch()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def test_a_wait_for_the_prefetch_is_counted_as_waiting(project: Project, tmp_path: Path) -> None:
    """The test asks while this process's prefetch compiles its library: it waited, and
    the time is counted as waiting (it used to read "0.00s waiting for locks"). The
    compile lasts until the test is seen waiting for it (on the run's board)."""
    add_hold_model(project)
    hold = tmp_path / "hold"
    project.pytester.makepyfile(test_held=HELD_TEST.format(hold=str(hold)))
    project.pytester.makeconftest(ASK_ONCE_THE_PREFETCH_COMPILES.format(
        staging=str(project.cache / ".mlcjit" / "staging")))
    out = tmp_path / "r.json"
    releaser = release_when_waited_for(hold, "holdmodel-hidden=4")
    try:
        result = project.run("-p", "no:xdist", "--mlc-device=cpu", "--mlc-jit-prefetch=on",
                             "-o", "mlc_jit_durations=0", f"--mlc-jit-report={out}")
    finally:
        hold.touch()
        releaser.join(timeout=60)
    result.assert_outcomes(passed=1)
    assert compiled(project) == ["hidden=4"], "one compile: the prefetch's"
    disk = on_disk(project)
    assert sorted(disk) == [4]
    assert accounting(result) == {"requests": 1, "waited": 1}
    result.stdout.fnmatch_lines([
        "1 request: 1 waited; 1 library compiled ahead of time, *s compiling, "
        "*s waiting for other compiles",
        "compiles (1 of 1):", "  * holdmodel-hidden=4-* (llvm) on main, ahead of time  *"])
    data = report(out)
    assert data["prefetched"] == data["compiles"] == 1
    (lib,) = data["libraries"]
    assert lib["wait_seconds"] > 0
    assert data["wait_seconds"] == lib["wait_seconds"]
    sizes_match_the_files(data, disk)


def test_options_are_checked(pytester: pytest.Pytester) -> None:
    bad = inprocess(pytester, "--mlc-jit-durations=-1")
    bad.stderr.fnmatch_lines(["*invalid --mlc-jit-durations '-1': expected a whole number*"])
    bad = inprocess(pytester, "--mlc-jit-progress=sometimes")
    bad.stderr.fnmatch_lines(
        ["*invalid --mlc-jit-progress 'sometimes': expected one of auto, on, off*"])
    helped = inprocess(pytester, "--help")
    helped.stdout.fnmatch_lines(["*--mlc-jit-progress*", "*--mlc-jit-report*",
                                 "*--mlc-jit-durations*", "*mlc_jit_progress*",
                                 "*mlc_jit_report*", "*mlc_jit_durations*"])
    docs = Path(__file__).resolve().parent.parent / "docs"
    pages = "\n".join(p.read_text(encoding="utf-8") for p in docs.rglob("*.md"))
    for name in ("--mlc-jit-progress", "--mlc-jit-report", "--mlc-jit-durations",
                 "mlc_jit_progress", "mlc_jit_report", "mlc_jit_durations",
                 "timeout_func_only"):
        assert name in pages, name


def test_report_path_from_the_ini_file_is_relative_to_it(project: Project,
                                                         warm_template: Path) -> None:
    project.write_tests(TWO[:1], per_config=1)
    project.warm(warm_template)  # a hit: compiling proves nothing here
    project.pytester.makeini("[pytest]\nmlc_jit_report = out/mlcjit.json\n")
    result = project.run("-p", "no:xdist", "--mlc-device=cpu")
    result.assert_outcomes(passed=1)
    data = report(project.pytester.path / "out" / "mlcjit.json")
    summary_matches(accounting(result), data)
    assert data["outcomes"]["hit"] == 1
    assert compiled(project) == []
    assert data["compiles"] == 0
    sizes_match_the_files(data, on_disk(project))


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
    result = project.run("--mlc-device=cpu", "-rE")
    result.assert_outcomes(errors=2)
    assert compiled(project) == ["hidden=8"], "tried once; the second test remembers it"
    assert project.libraries() == []
    assert project.manifests() == []
    assert len(failure_records(project)) == 1
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

@pytest.mark.timeout(2)
@pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 7, "sleep": 120}))
def test_slow(compiled_model):
    pass
''')
    result = project.run("-p", "no:xdist", "--mlc-device=cpu", "-rE")
    result.assert_outcomes(errors=1)
    result.stdout.re_match_lines([
        r"ERROR test_slow.py::test_slow\[cpu\] - Timeout \(>2.0s\) from pytest-timeout: "
        r"interrupted while compiling tinymodel-hidden=7-sleep=120 \(llvm\) after "
        r"\d+\.\ds; nothing was cached$"])
    result.stdout.re_match_lines([
        r"^Timeout \(>2.0s\) from pytest-timeout: interrupted while compiling "
        r"tinymodel-hidden=7-sleep=120 \(llvm\) after \d+\.\ds; nothing was cached$",
        r"^The compile was killed: the next run compiles it again from the start.$",
        r".*pytest --mlc-jit-prepare.*timeout_func_only = true.*"])
    assert compiled(project) in ([], ["hidden=7"]), "at most the one interrupted call"
    assert project.libraries() == [], "nothing was cached"
    assert project.manifests() == []
    assert list((project.cache / ".mlcjit" / "staging").iterdir()) == []
    wait_until(lambda: compilers_running(project.cache, "") == [],
               "the compile's processes to exit (killed)", timeout=60)
    assert accounting(result) == {"requests": 1, "failed": 1}


def test_ctrl_c_during_a_compile_says_what_happened(project: Project) -> None:
    """SIGINT to a real pytest process (a signal: a process of its own) once the factory
    runs (its counter line is written, then it sleeps until killed)."""
    project.write_tests(TWO[:1], per_config=1)
    proc = subprocess.Popen(
        [*PYTEST_HEARING_SIGINT, "-p", "no:cacheprovider", "-p", "no:xdist",
         "--mlc-device=cpu", f"--mlc-jit-cache-dir={project.cache}"],
        cwd=project.pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env={**os.environ, "MLCJIT_TEST_SLEEP": "600"})
    try:
        wait_until(lambda: project.compiles() or proc.poll() is not None, "the compile")
        assert proc.poll() is None, proc.communicate()[0]
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert re.search(r"KeyboardInterrupt: interrupted while compiling tinymodel-hidden=4 "
                     r"\(llvm\) after \d+\.\ds; nothing was cached", out), out
    assert compiled(project) == ["hidden=4"], "the one call, interrupted"
    assert project.libraries() == []
    assert project.manifests() == []
    wait_until(lambda: compilers_running(project.cache, "") == [],
               "the compile's processes to exit (killed)", timeout=60)
    assert list((project.cache / ".mlcjit" / "staging").iterdir()) == []
