"""Writes the cache can do without (usage records, the run history, cleanups) never fail a
test, and never fail silently: each failure is a warning naming the path and the error,
once per path per run."""

from __future__ import annotations

from conftest import Project


def test_a_failed_best_effort_write_warns_once_per_path(project: Project) -> None:
    project.write_tests([{"hidden": 4}], per_config=3)
    result = project.run("--mlc-device=cpu", "-p", "no:randomly")
    result.assert_outcomes(passed=3)
    (manifest,) = project.manifests()
    record = project.cache / ".mlcjit" / "usage" / manifest["digest"]
    record.unlink()
    record.mkdir()  # the usage record of the one library can no longer be written

    result = project.run("--mlc-device=cpu", "-p", "no:randomly", "-W", "default")
    result.assert_outcomes(passed=3)
    out = result.stdout.str()
    warnings = [line for line in out.splitlines()
                if "pytest-mlcjit could not record the use of" in line]
    assert len(warnings) == 1, out
    assert str(record) in warnings[0], out
    assert "Is a directory" in warnings[0], out
