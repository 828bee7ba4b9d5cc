"""Background prefetch: right after collection, each xdist worker compiles the next of the
run's libraries no other worker holds; every library is still compiled exactly once
(counted by the factory), a failing one too. Without xdist, ``--mlc-jit-prefetch=on``
does the same in one process. That ``--mlc-jit-prefetch=off`` under ``-n 2`` compiles
nothing ahead of time is tests/test_xdist.py's; the order prefetch compiles in and work
stealing, tests/test_schedule.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import Project, hold_tests

FOUR = [{"hidden": h} for h in (3, 4, 5, 6)]

#: Holds every test until the cache holds ``count`` libraries and ``failed`` remembered
#: failures (as conftest.hold_tests, failures included): "prefetch compiled them all,
#: the failing one too" is then a fact to assert, not a race the tests might win.
HOLD_TESTS = '''
import pathlib, time
import pytest


@pytest.fixture(autouse=True)
def _hold_until_prefetched():
    root = pathlib.Path({root!r})
    deadline = time.monotonic() + 300
    while (len(list((root / "tvm").glob("*.manifest.json"))) < {count}
           or len(list((root / ".mlcjit" / "failed").glob("*.json"))) < {failed}):
        assert time.monotonic() < deadline, "prefetch did not get through the libraries"
        time.sleep(0.01)
'''


def configs(project: Project) -> list[str]:
    """The configs the factory was called with (its own counter), sorted."""
    return sorted(line.split(maxsplit=1)[1] for line in project.compiles())


def test_prefetch_compiles_every_library_once_ahead_of_time(
        project: Project, warm_template: Path, tmp_path: Path) -> None:
    """Two workers, five libraries: one already cached (compiled by an earlier run), one
    that fails. Each of the others is compiled (or tried) once, ahead of time, the cached
    one not at all, and the failing one's tests report its error. A warm run prefetches
    nothing new, and the failure, a known one, is not tried again."""
    project.warm(warm_template)  # hidden=4
    project.write_path_tests([*FOUR, {"hidden": 9, "fail": True}], per_config=2)
    project.pytester.makeconftest(HOLD_TESTS.format(root=str(project.cache), count=4,
                                                    failed=1))
    out = tmp_path / "report.json"
    result = project.run("-n", "2", "--mlc-device=cpu", "--mlc-jit-prefetch=auto",
                         f"--mlc-jit-report={out}")
    result.assert_outcomes(passed=8, errors=2)
    assert configs(project) == ["hidden=3", "hidden=5", "hidden=6", "hidden=9"]
    assert len(project.libraries()) == len(project.manifests()) == 4
    result.stdout.fnmatch_lines(
        ["10 requests: 8 hits, 2 failed; 3 libraries compiled ahead of time, *"])
    assert result.stdout.str().count("factory failed on purpose (hidden=9)") >= 2
    data = json.loads(out.read_text())
    assert data["prefetched"] == data["compiles"] == 3
    assert sorted((lib["spec"], lib["outcome"], lib["prefetched"])
                  for lib in data["libraries"]) == [
        ("tinymodel-fail=True-hidden=9", "failed", False),
        ("tinymodel-hidden=3", "compiled", True), ("tinymodel-hidden=4", "hit", False),
        ("tinymodel-hidden=5", "compiled", True), ("tinymodel-hidden=6", "compiled", True)]

    # (In this process, prefetch on: the same prefetch, without starting two workers.)
    warm = project.run("--mlc-device=cpu", "--mlc-jit-prefetch=on")
    warm.assert_outcomes(passed=8, errors=2)
    # The failing hidden=9 was seen once: a failure is known only once it repeats.
    assert len(project.compiles()) == 5, "a warm run prefetches nothing new"
    warm.stdout.fnmatch_lines(["10 requests: 8 hits, 2 failed*"])
    assert "ahead of time" not in warm.stdout.str()


def test_prefetch_on_in_a_single_process(project: Project, warm_template: Path) -> None:
    project.write_tests(FOUR[:3], per_config=2)
    project.warm(warm_template)  # hidden=4 is cached: nothing to prefetch for it
    hold_tests(project, 3)
    single = project.run("-p", "no:xdist", "--mlc-device=cpu", "--mlc-jit-prefetch=on")
    single.assert_outcomes(passed=6)
    single.stdout.fnmatch_lines(["6 requests: 6 hits; 2 libraries compiled ahead of time, *"])
    assert configs(project) == ["hidden=3", "hidden=5"]
    assert len(project.libraries()) == 3


def test_no_prefetch_when_the_policy_does_not_write(project: Project) -> None:
    project.write_tests(FOUR[:2])
    result = project.run("--mlc-device=cpu", "--mlc-jit-policy=READONLY",
                         "--mlc-jit-prefetch=on")
    result.assert_outcomes(errors=2)
    assert project.compiles() == []
    assert not project.cache.exists()


def test_prefetch_builds_nothing_for_a_test_whose_own_policy_does_not_write(
        project: Project) -> None:
    """A test marked READONLY in an ON run: its request's policy decides, so prefetch does
    not compile its library either, and the test fails as READONLY does."""
    project.pytester.makepyfile(test_readonly_marked='''
        import pytest
        from pytest_mlcjit import TVMModel

        @pytest.mark.mlc_jit_policy("READONLY")
        @pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 7}))
        def test_marked(compiled_model):
            pass

        @pytest.mark.mlc_model(TVMModel("tinymodel:build", config={"hidden": 3}))
        def test_plain(compiled_model):
            pass
    ''')
    result = project.run("--mlc-device=cpu", "--mlc-jit-prefetch=on")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*CacheMissError: no cached library*"])
    assert configs(project) == ["hidden=3"]
    assert len(project.libraries()) == 1
