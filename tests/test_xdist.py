"""One compilation per key across xdist workers; the workers' accounts merged into one
summary; and a failure remembered for the rest of its run: a model that fails to compile,
needed by ten tests on two xdist workers, is compiled once per run, and every one of those
tests fails with the same message and the same log (the reliability suite,
docs/explanation/reliability.md).

Compilations are counted by the model factory itself (it runs once per compile, in the
compile subprocess), libraries from the cache's files, not from the plugin's statistics.
Two independent pytest processes on one cold key: tests/test_progress.py (the one that
waits says whose compile it waits for); locks, kills and many processes on one cache:
tests/test_concurrency.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import Project, accounting

TWO_CONFIGS = [{"hidden": 4}, {"hidden": 6}]


def configs(lines: list[str]) -> list[str]:
    """The configs of the factory's counter lines (``pid hidden=N``), sorted."""
    return sorted(line.split()[1] for line in lines)


def on_disk(project: Project) -> dict[int, Path]:
    """hidden → library file, for each entry whose library and manifest are both there."""
    found = {}
    for manifest in (project.cache / "tvm").glob("*.manifest.json"):
        data = json.loads(manifest.read_text())
        library = manifest.with_name(data["library"])  # the file the manifest names
        assert library.is_file(), f"{manifest} without its library"
        hidden = data["key"]["config"]["hidden"]
        assert hidden not in found, f"two entries of hidden={hidden}"
        found[hidden] = library
    assert len(project.libraries()) == len(found), "a library without its manifest"
    return found


def test_n2_compiles_each_key_once_and_redo_once_per_run(project: Project,
                                                        tmp_path: Path) -> None:
    """Two workers, prefetch off, so that the tests themselves race for the keys: each
    key is compiled once, the other tests hit or wait; only the controller prints the
    summary, and it counts every worker's requests. Then REDO (prefetch on, as -n 2 has it
    by default): one rebuild per key per run, not per worker."""
    project.write_path_tests(TWO_CONFIGS, per_config=3)
    out = tmp_path / "cold.json"
    first = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=off",
                        f"--mlc-jit-report={out}")
    first.assert_outcomes(passed=6)
    assert configs(project.compiles()) == ["hidden=4", "hidden=6"], project.compiles()
    cold = on_disk(project)
    assert sorted(cold) == [4, 6]
    text = first.stdout.str()
    assert text.count("pytest-mlcjit ---") == 1, "one summary, the controller's"
    assert "ahead of time" not in text, "prefetch off: nothing compiled ahead of time"
    counts = accounting(first)  # the others hit, or waited for a compile
    assert counts["requests"] == 6
    assert counts["compiled"] == len(project.compiles()) == 2
    assert counts.get("hit", 0) + counts.get("waited", 0) == 4
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["compiles"] == 2
    assert sorted(lib["requests"] for lib in data["libraries"]) == [3, 3]
    assert {lib["worker"] for lib in data["libraries"]} <= {"gw0", "gw1"}
    assert sorted(lib["size"] for lib in data["libraries"]) == sorted(
        p.stat().st_size for p in cold.values())

    mtimes = {h: p.stat().st_mtime_ns for h, p in cold.items()}
    out = tmp_path / "redo.json"
    redo = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-policy=REDO",
                       f"--mlc-jit-report={out}")
    redo.assert_outcomes(passed=6)
    assert len(project.compiles()) == 4, "REDO: one rebuild per key per run, not per worker"
    assert configs(project.compiles()[2:]) == ["hidden=4", "hidden=6"]
    rebuilt = on_disk(project)
    assert sorted(rebuilt) == [4, 6]
    assert all(rebuilt[h].stat().st_mtime_ns != mtimes[h] for h in rebuilt), "rebuilt"
    assert accounting(redo)["requests"] == 6
    data = json.loads(out.read_text())
    assert data["compiles"] == 2
    assert {lib["outcome"] for lib in data["libraries"]} == {"compiled"}


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
    """Ten tests of one failing model on two workers, three runs. The default tier keeps
    the invariant in tests/test_prefetch.py (a failing library among others, -n 2: tried
    once) and tests/test_accounting.py (failures across two workers counted, one compile)."""
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

    # Seen once, it is tried again by the next run (it may have been transient); failing
    # the same way twice makes it a known failure.
    again = project.run("-n", "2", "--mlc-device=cpu")
    again.assert_outcomes(errors=10)
    assert len(project.compiles()) == 2
    (head, log), = set(_errors(again.stdout.str()))
    # A new run reports it from memory, without compiling (a known failure: the factory
    # raised twice, and nothing it depends on changed); --mlc-jit-retry-failed tries again.
    known = project.run("-n", "2", "--mlc-device=cpu")
    known.assert_outcomes(errors=10)
    assert len(project.compiles()) == 2
    assert set(_errors(known.stdout.str())) == {(head, log)}
    assert known.stdout.str().count("(a known failure, recorded ") >= 10
    second = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-retry-failed")
    second.assert_outcomes(errors=10)
    assert len(project.compiles()) == 3
    assert set(_errors(second.stdout.str())) == {(head, log)}
    assert project.libraries() == []
