"""A cache is relocatable and keeps its own recency: tarred, restored to another path with
new mtimes (as CI cache actions do), it still hits 100% under READONLY, and pruning orders
entries by the cache's usage records, never by file times. The in-run size cap evicts the
least recently used entries and never one the run used: under xdist too, where the
workers use the entries and the controller evicts.

The hidden=4 entry comes from the shared warm cache (:func:`conftest.warm_template`);
the others are compiled here. The CLI runs in this process (``cli.main``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest

from conftest import Project, run_cli


def _ids(*hidden: int, per_config: int = 1) -> list[str]:
    return [f"test_tiny.py::test_forward[cpu-tinymodel-hidden={h}-{i}]"
            for h in hidden for i in range(per_config)]


def _cli(*args: str) -> Any:
    """``pytest-mlcjit ARGS --json`` in this process (:func:`conftest.run_cli`), which must
    succeed: its output, parsed."""
    ran = run_cli(*args, "--json")
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)


def _entries(cache: Path) -> dict[int, dict[str, Any]]:
    """``list --json`` by config: {hidden: entry}."""
    data = _cli("list", "--cache-dir", str(cache))
    return {int(json.loads(e["model"].split(" ", 1)[1])["hidden"]): e for e in data["entries"]}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def test_a_restored_cache_hits_everything_and_keeps_its_recency(
        project: Project, warm_template: Path, tmp_path: Path) -> None:
    project.write_tests([{"hidden": 4}, {"hidden": 6}, {"hidden": 8}], per_config=2)
    project.warm(warm_template)
    project.run("--mlc-device=cpu").assert_outcomes(passed=6)
    # Use 8, then 4: recency is now 6 < 8 < 4.
    for hidden in (8, 4):
        project.run("--mlc-device=cpu", *_ids(hidden, per_config=2)).assert_outcomes(passed=2)
    assert sorted(line.split()[1] for line in project.compiles()) == ["hidden=6", "hidden=8"]
    assert len(project.libraries()) == 3
    before = _entries(project.cache)
    assert before[6]["last_used"] < before[8]["last_used"] < before[4]["last_used"]

    archive = tmp_path / "cache.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(project.cache, arcname="cache")
    shutil.rmtree(project.cache)  # nothing may point back at the old path
    restored = tmp_path / "elsewhere" / "restored"
    restored.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(restored, filter="tar")
    cache = restored / "cache"
    # New mtimes, as a cache action restores them, and contradicting the real recency:
    # the most recently used entry gets the oldest files, the least recent the newest.
    for path in cache.rglob("*"):
        os.utime(path, (2_000_000_000, 2_000_000_000))
    for hidden, stamp in ((4, 1_000_000_000), (6, 3_000_000_000)):
        for path in (cache / "tvm").glob(f"{before[hidden]['digest']}.*"):
            os.utime(path, (stamp, stamp))

    files = _snapshot(cache)
    result = project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY",
                         f"--mlc-jit-cache-dir={cache}", cache=False)
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["6 requests: 6 hits"])
    assert len(project.compiles()) == 2, "nothing recompiled"
    assert _snapshot(cache) == files, "READONLY wrote nothing"

    after = _entries(cache)
    assert {h: (e["digest"], e["last_used"], e["created"]) for h, e in after.items()} == {
        h: (e["digest"], e["last_used"], e["created"]) for h, e in before.items()}
    pruned = _cli("prune", "--cache-dir", str(cache), "--keep-last-used", "2")
    assert [e["digest"] for e in pruned["roots"][0]["evicted"]] == [before[6]["digest"]]
    assert sorted(_entries(cache)) == [4, 8]
    assert sorted(p.name for p in (cache / "tvm").glob("*.so")) == sorted(
        f"{before[h]['digest']}.so" for h in (4, 8)), "the files of 6 are gone, no others"


def test_max_size_after_the_run_never_evicts_what_the_run_used(
        project: Project, warm_template: Path) -> None:
    project.write_tests([{"hidden": 4}, {"hidden": 6}, {"hidden": 8}], per_config=1)
    project.warm(warm_template)
    project.run("--mlc-device=cpu").assert_outcomes(passed=3)
    entries = _entries(project.cache)
    sizes = {h: e["disk_size"] for h, e in entries.items()}

    # A cap smaller than one entry: everything this run did not use goes, 4 stays. Under
    # xdist: a worker uses 4, the controller evicts (what the workers used reaches it).
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-max-size=1",
                         *_ids(4))
    result.assert_outcomes(passed=1)
    assert sorted(_entries(project.cache)) == [4]
    assert [p.name for p in project.libraries()] == [f"{entries[4]['digest']}.so"]
    result.stdout.fnmatch_lines([
        f"--mlc-jit-max-size=1 B: {project.cache} is * after evicting 2 least recently used "
        "entries (* kB); still over the cap: kept 1 used by this run and 0 being compiled",
    ])
    # What was freed: the two entries' files, plus their small records (usage, variants).
    freed = re.search(r"after evicting 2 least recently used entries \(([\d.]+) kB\)",
                      result.stdout.str())
    assert freed is not None
    assert (sizes[6] + sizes[8]) / 1000 - 0.05 <= float(freed.group(1)) <= (
        sizes[6] + sizes[8]) / 1000 + 10
    assert len(project.compiles()) == 2

    # CLI > ini: the ini's tiny cap is overridden by a generous one, so nothing goes.
    project.pytester.makeini("[pytest]\nmlc_jit_max_size = 1\n")
    project.run("--mlc-device=cpu", "--mlc-jit-max-size=10G", *_ids(6)).assert_outcomes(
        passed=1)
    assert sorted(_entries(project.cache)) == [4, 6]
    # The ini's cap applies when no option is given; this run used 8 only.
    project.run("--mlc-device=cpu", *_ids(8)).assert_outcomes(passed=1)
    assert sorted(_entries(project.cache)) == [8]
    assert sorted(line.split()[1] for line in project.compiles()) == [
        "hidden=6", "hidden=6", "hidden=8", "hidden=8"]


@pytest.mark.parametrize(("args", "ini", "message"), [
    (["--mlc-jit-max-size=lots"], None, "*invalid --mlc-jit-max-size 'lots': expected a number "
                                        "of bytes with an optional unit*"),
    ([], "mlc_jit_max_size = 5 parsecs", "*invalid ini mlc_jit_max_size '5 parsecs'*"),
])
def test_bad_max_size(project: Project, args: list[str], ini: str | None, message: str) -> None:
    project.write_tests([{"hidden": 4}])
    if ini:
        project.pytester.makeini(f"[pytest]\n{ini}\n")
    result = project.run(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
