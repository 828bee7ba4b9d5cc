"""Writes the cache can do without (usage records, the run history, cleanups) never fail a
test, and never fail silently: each failure is a warning naming the path and the error,
once per path per run."""

from __future__ import annotations

from pathlib import Path

from conftest import Project


def test_a_failed_best_effort_write_warns_once_per_path(project: Project,
                                                       warm_template: Path) -> None:
    project.warm(warm_template)  # holds the library: three hits, no compile
    project.write_tests([{"hidden": 4}], per_config=3)
    (manifest,) = project.manifests()
    record = project.cache / ".mlcjit" / "usage" / manifest["digest"]
    record.unlink(missing_ok=True)
    record.mkdir()  # the usage record of the one library can no longer be written

    result = project.run("--mlc-device=cpu", "-W", "default")
    result.assert_outcomes(passed=3)
    assert project.compiles() == []
    out = result.stdout.str()
    warnings = [line for line in out.splitlines()
                if "pytest-mlcjit could not record the use of" in line]
    assert len(warnings) == 1, out
    assert str(record) in warnings[0], out
    assert "Is a directory" in warnings[0], out
