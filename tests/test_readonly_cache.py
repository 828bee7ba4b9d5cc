"""A cache that cannot be written, under a policy that writes, serves its hits: only a
request that would have to compile fails, saying that the directory is not writable (and
that READONLY exists); nothing is recorded in it, not even the run's history, and the
summary says so once. Under READONLY, a cache directory that does not exist (a typo in a
CI file) is named as such, not reported as a miss.

The read-only cache is a read-only bind mount as root (root ignores permissions), else a
copy without write permissions (tests/test_disk.py's helper).
"""

from __future__ import annotations

from pathlib import Path

from test_disk import _read_only_copy

from conftest import Project


def test_a_read_only_warm_cache_serves_its_hits_under_on(project: Project,
                                                         warm_template: Path,
                                                         tmp_path: Path) -> None:
    project.write_tests([{"hidden": 4}, {"hidden": 5}], per_config=2)
    with _read_only_copy(warm_template / "cache", project.cache, tmp_path):
        on = project.run("--mlc-device=cpu")
        on.assert_outcomes(passed=2, errors=2, warnings=0)
        out = on.stdout.str()
        on.stdout.fnmatch_lines([
            f"*MlcJitError: cache directory {project.cache} is not writable (*): "
            "TVMModel('tinymodel:build', config={'hidden': 5})* has no usable entry there (or "
            "the policy is REDO), and compiling it would write there; choose another with "
            "--mlc-jit-cache-dir, or use "
            "--mlc-jit-policy=READONLY*"])
        assert out.count(f"cache {project.cache} is read-only: its hits were served without "
                         "recording their use") == 1, "said once, in the summary"
        assert "hidden': 4" not in "".join(
            line for line in out.splitlines() if line.startswith("ERROR")), \
            "the cached library's tests pass"
        readonly = project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY")
        readonly.assert_outcomes(passed=2, errors=2, warnings=0)
        assert "read-only: its hits" not in readonly.stdout.str(), "READONLY writes nothing"
    assert project.compiles() == []


def test_readonly_names_a_cache_directory_that_does_not_exist(project: Project,
                                                              tmp_path: Path) -> None:
    project.write_tests([{"hidden": 4}])
    typo = tmp_path / "mlcjit-cahce"
    result = project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY",
                         f"--mlc-jit-cache-dir={typo}", cache=False)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*CacheMissError: no cached library for key * (TVMModel("
                                 f"'tinymodel:build'*): cache directory {typo} does not exist *"
                                 "and the policy is READONLY*check the path*"])
    assert not typo.exists(), "READONLY makes nothing"
    assert project.compiles() == []
