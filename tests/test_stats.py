"""``pytest-mlcjit stats``: the last runs of the cache's history (``runs.jsonl``), their
totals and charts, over a synthetic history written by the history's own writer and over
empty, missing and damaged files; and the time a real run's hits saved, in its summary,
its JSON report and its history line."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import Project, run_cli
from pytest_mlcjit.cache.history import record_run
from pytest_mlcjit.cache.layout import runs_file
from pytest_mlcjit.cache.store.local import LocalStore

#: The sparkline's characters: the eight block elements, and the mark of an unknown value.
BLOCKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"
UNKNOWN = "\u00b7"
#: A table row: the time, then requests, hits, hit rate, compiles, compiling, saved.
ROW_RE = re.compile(r"  \d{4}-\d\d-\d\d \d\d:\d\d +(\d+) +(\d+|\?) +(\S+) +(\d+) +(\S+)s"
                    r" +(\S+?)s?")
T0 = 1_780_000_000.0


def _synthetic(n: int) -> list[dict[str, Any]]:
    """``n`` run records as a run writes them (plugin/after_run.py); every ninth from an
    older version, without ``saved_seconds``; some runs have no request."""
    rng = random.Random(22)
    runs = []
    for i in range(n):
        requests = rng.choice([0, rng.randint(1, 40)]) if i % 5 == 0 else rng.randint(1, 40)
        hit = rng.randint(0, requests)
        remote = rng.randint(0, requests - hit)
        compiled = requests - hit - remote
        outcomes = {k: v for k, v in
                    {"hit": hit, "remote_hit": remote, "compiled": compiled}.items() if v}
        record: dict[str, Any] = {
            "time": T0 + 600 * i, "started": T0 + 600 * i - 30, "run_id": f"run{i:03}",
            "policy": "ON", "devices": ["cpu"], "prepare": False, "exitstatus": 0,
            "requests": requests, "outcomes": outcomes, "compiles": compiled,
            "prefetched": 0, "compile_seconds": round(rng.uniform(0, 90) * (compiled > 0), 3),
            "wait_seconds": 0.0, "bytes_compiled": 0, "corrupt": 0,
        }
        if i % 9:
            record["saved_seconds"] = round(rng.uniform(0, 300) * (hit + remote > 0), 3)
        runs.append(record)
    return runs


def _history(tmp_path: Path, runs: list[dict[str, Any]]) -> Path:
    root = tmp_path / "cache"
    LocalStore(root).open_for_writing()
    for run in runs:
        record_run(root, run)
    return root


def _chart(stdout: str, label: str) -> str:
    (line,) = [line for line in stdout.splitlines() if line.startswith(f"  {label}  ")]
    return line[len(label) + 2:].strip().split()[0]


def test_stats_over_a_synthetic_history_of_200_runs(tmp_path: Path) -> None:
    runs = _synthetic(200)
    root = _history(tmp_path, runs)
    last = runs[-50:]
    hits = [r["outcomes"].get("hit", 0) + r["outcomes"].get("remote_hit", 0) for r in last]
    rates = [h / r["requests"] if r["requests"] else None for h, r in zip(hits, last, strict=True)]
    saved = [r.get("saved_seconds") for r in last]
    asked = sum(r["requests"] for r in last)
    expected = {
        "runs": 50, "requests": asked, "hits": sum(hits), "hit_rate": sum(hits) / asked,
        "compiles": sum(r["compiles"] for r in last),
        "compile_seconds": sum(r["compile_seconds"] for r in last),
        "saved_seconds": sum(s for s in saved if s is not None),
        "runs_without_saved": saved.count(None),
    }
    assert 0 < expected["runs_without_saved"] < 50, "old lines among the shown"
    assert None in rates, "a run without requests among the shown"

    result = run_cli("stats", "--last", "50", "--cache-dir", str(root))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = [ROW_RE.fullmatch(line) for line in result.stdout.splitlines()]
    rows_found = [m for m in rows if m is not None]
    assert len(rows_found) == 50, result.stdout
    assert [int(m.group(1)) for m in rows_found] == [r["requests"] for r in last], \
        "the last 50 runs, oldest first"
    assert [m.group(6) for m in rows_found] == \
        ["?" if s is None else f"{s:.2f}" for s in saved], "an old line's saving is '?'"
    assert f"the last 50 runs of {len(runs_file(root).read_text().splitlines())}" \
        in result.stdout
    total = (f"total: 50 runs, {asked} requests, {sum(hits)} hits "
             f"({100 * sum(hits) / asked:.1f}%), {expected['compiles']} compiles, "
             f"{expected['compile_seconds']:.2f}s compiling, "
             f"{expected['saved_seconds']:.2f}s saved ({expected['runs_without_saved']} runs "
             "recorded no saved time: '?')")
    assert total in result.stdout.splitlines(), result.stdout

    # The charts: one character per run, oldest first; as high as the value.
    for label, values in (("hit rate", rates), ("time saved", saved)):
        chart = _chart(result.stdout, label)
        assert len(chart) == 50, chart
        assert [c == UNKNOWN for c in chart] == [v is None for v in values], label
        known = [(v, BLOCKS.index(c)) for v, c in zip(values, chart, strict=True) if v is not None]
        for v, level in known:  # higher values never have lower blocks
            assert all(level >= other for w, other in known if w < v), (label, v)
        assert max(known)[1] == len(BLOCKS) - 1, "the largest value is a full block"
        assert min(known)[0] > 0 or min(known)[1] == 0, "zero is the lowest block"

    data = json.loads(run_cli("stats", "--last", "50", "--json", "--cache-dir",
                              str(root)).stdout)
    assert [r["run_id"] for r in data["runs"]] == [r["run_id"] for r in last]
    assert [r["saved_seconds"] for r in data["runs"]] == saved
    assert [r["hits"] for r in data["runs"]] == hits
    assert data["totals"] == pytest.approx(expected)
    (history,) = data["roots"]
    assert history["skipped"] == 0
    assert history["history"] == str(runs_file(root))

    default = run_cli("stats", "--cache-dir", str(root))
    assert len([line for line in default.stdout.splitlines() if ROW_RE.fullmatch(line)]) == 20


def test_stats_of_an_empty_a_missing_and_a_damaged_history(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    missing = run_cli("stats", "--cache-dir", str(root))
    assert (missing.returncode, missing.stderr) == (0, "")
    assert missing.stdout == f"no runs recorded yet in {runs_file(root)}\n"
    LocalStore(root).open_for_writing()
    runs_file(root).write_bytes(b"")
    empty = run_cli("stats", "--cache-dir", str(root))
    assert (empty.returncode, empty.stderr) == (0, "")
    assert empty.stdout == f"no runs recorded yet in {runs_file(root)}\n"
    data = json.loads(run_cli("stats", "--json", "--cache-dir", str(root)).stdout)
    assert data["runs"] == []
    assert data["totals"]["runs"] == 0

    good = [{"time": T0, "run_id": "a", "requests": 4, "outcomes": {"hit": 3, "compiled": 1},
             "compiles": 1, "compile_seconds": 2.5, "saved_seconds": 7.5, "policy": "ON"},
            {"time": T0 + 60, "run_id": "b", "requests": 2, "outcomes": {"hit": 2},
             "compiles": 0, "compile_seconds": 0, "saved_seconds": 5.0, "policy": "ON"}]
    damaged = [
        b"junk",
        b'{"time": 1780000030, "requests": ',  # cut short
        json.dumps({"time": T0, "pad": "x" * (100 << 10)}).encode(),  # a huge line
        b"[1, 2, 3]",  # JSON, but a list
        b'{"time": 1780000030, "requests": 1, "saved_seconds": NaN}',
        b'{"time": NaN, "requests": 1}',
        b'{"time": 1780000030, "requests": "many"}',  # wrong types
        b'{"time": 1780000030, "requests": 1, "outcomes": {"hit": 5}}',  # 5 hits of 1
        b'{"time": 1780000030, "requests": 1, "outcomes": {"hit": true}}',
        b'{"time": 1780000030, "requests": 2, "saved_seconds": -1}',
        b'{"time": 1780000030, "requests": 2, "saved_seconds": "1s"}',
        b"\xff\xfe not UTF-8",
        b'{"time": 1e400, "requests": 1}',
    ]
    lines = [json.dumps(good[0]).encode(), *damaged, json.dumps(good[1]).encode()]
    runs_file(root).write_bytes(b"\n".join(lines))  # the last line without its newline
    result = run_cli("stats", "--cache-dir", str(root))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert f"2 runs recorded ({len(damaged)} damaged lines skipped" in result.stdout
    assert len([line for line in result.stdout.splitlines() if ROW_RE.fullmatch(line)]) == 2
    assert "total: 2 runs, 6 requests, 5 hits (83.3%), 1 compile, 2.50s compiling, " \
        "12.50s saved" in result.stdout.splitlines()
    data = json.loads(run_cli("stats", "--json", "--cache-dir", str(root)).stdout)
    assert data["roots"][0]["skipped"] == len(damaged)
    assert [r["run_id"] for r in data["runs"]] == ["a", "b"]

    runs_file(root).write_bytes(b"\n".join(damaged) + b"\n")  # nothing usable at all
    junk = run_cli("stats", "--cache-dir", str(root))
    assert (junk.returncode, junk.stderr) == (0, "")
    assert junk.stdout.startswith(f"no runs recorded yet in {runs_file(root)} "
                                  f"({len(damaged)} damaged lines skipped")


def test_a_runs_hits_say_the_compile_time_they_saved(project: Project,
                                                      warm_template: Path) -> None:
    project.write_tests([{"hidden": 4}], per_config=2)
    project.warm(warm_template)
    (manifest,) = project.manifests()
    recorded = float(manifest["compile_seconds"])
    assert recorded > 0
    report = project.pytester.path / "report.json"
    result = project.run("--mlc-device=cpu", f"--mlc-jit-report={report}")
    result.assert_outcomes(passed=2)
    assert project.compiles() == []
    # Two hits of one library: its compile is saved once.
    result.stdout.fnmatch_lines([f"hits saved {recorded:.2f}s of compiling (1 library found "
                                 "in the cache, by their recorded compile times)"])
    assert json.loads(report.read_text())["saved_seconds"] == round(recorded, 3)
    line = json.loads(runs_file(project.cache).read_text().splitlines()[-1])
    assert line["saved_seconds"] == pytest.approx(recorded)
    stats = run_cli("stats", "--json", "--cache-dir", str(project.cache))
    (run,) = json.loads(stats.stdout)["runs"]
    assert (run["hits"], run["hit_rate"], run["compiles"]) == (2, 1.0, 0)
    assert run["saved_seconds"] == pytest.approx(recorded)


def test_saved_time_counts_each_library_found_in_the_cache_once() -> None:
    """The accounting of two processes merged as the xdist controller merges them: a
    library hit by both saved its compile once; one that this run compiled saved nothing,
    though other requests hit it after; waits and misses save nothing."""
    from pytest_mlcjit.engine.stats import Stats

    workers = [Stats(), Stats()]
    for stats in workers:
        cached = stats.library("a" * 64)
        stats.count("hit", lib=cached, saved=30.0)
        stats.count("hit", lib=cached, saved=30.0)
        stats.count("remote_hit", lib=stats.library("b" * 64), saved=12.5)
        stats.count("waited", lib=stats.library("d" * 64), saved=99.0)
        stats.count("missed", lib=stats.library("e" * 64), saved=99.0)
    new = workers[0].library("c" * 64)
    workers[0].compiled(new, seconds=4.0, ok=True, background=False, worker="gw0")
    workers[1].count("hit", lib=workers[1].library("c" * 64), saved=4.0)
    assert [w.saved_seconds for w in workers] == [42.5, 46.5]
    merged = Stats()
    for stats in workers:
        merged.merge(stats.to_json())
    assert merged.saved_seconds == 42.5
    assert merged.to_json()["saved_seconds"] == 42.5
